"""FSDP2 training step: nf4 (NF4 base + LoRA) against the same model in 16 bits with PEFT's LoRA.

Both stacks are a random Llama-shaped model sharded the same way (`fully_shard` on each decoder layer, then
the root) over `--world` ranks (gloo on the CPU, nccl on CUDA), trained on the same global batch split
across the ranks. Per step: bytes all-gathered (counted by wrapping the collective FSDP2 calls), bytes
reduce-scattered are the adapters' gradients in both, time of forward + backward + AdamW (median of the
timed steps after warm-up), and the bytes each rank stores. Ratios nf4 / 16-bit.

    python benchmarks/bench_fsdp.py                          # 2 gloo ranks on the CPU
    torchrun is not needed: the script spawns its ranks itself

Prints a table and one JSON line per stack (appended to --out if given).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

MIB = 1 << 20


def _model(args, stack: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if stack == "nf4":
        from nf4.lora import apply_lora

        apply_lora(model, r=args.r, lora_alpha=args.r, target_modules=targets)
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=args.r, target_modules=targets))
    return model


def _worker(rank: int, world: int, port: int, args, stack: str, out: str) -> None:
    import torch.distributed as dist
    from common import lm_training_steps
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nf4.lora.distributed import AllGatherBytes, local_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))
    model = _model(args, stack).to(device)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in inner.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch * world, args.seq), generator=torch.Generator().manual_seed(1))
    mine = ids.chunk(world)[rank].to(device)
    step_s, loss, gathered = lm_training_steps(model, opt, lambda step: mine, args.warmup, args.steps, AllGatherBytes)
    result = dict(
        stack=stack, rank=rank, step_s=step_s, all_gather_bytes=gathered.bytes,
        all_gathers=gathered.calls, local_bytes=local_bytes(model), loss=loss,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )  # fmt: skip
    if cuda:
        result["max_allocated"] = torch.cuda.max_memory_allocated()
    Path(out, f"{stack}-{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # leave together (a rank tearing down while another still talks can abort in gloo)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank")
    parser.add_argument("-r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="append the JSON records to this file")
    args = parser.parse_args(argv)
    if "TRITON_INTERPRET" in os.environ and args.device == "cpu":
        del os.environ["TRITON_INTERPRET"]  # the CPU torch path, not the kernel interpreter
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stack in ("nf4", "16-bit"):
            mp.start_processes(_worker, args=(args.world, _free_port(), args, stack, tmp), nprocs=args.world,
                               join=True, start_method="spawn")  # fmt: skip
            ranks = [json.loads(Path(tmp, f"{stack}-{r}.json").read_text()) for r in range(args.world)]
            records[stack] = dict(
                ranks[0], step_s=max(r["step_s"] for r in ranks), local_bytes=[r["local_bytes"] for r in ranks]
            )
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    ours, theirs = records["nf4"], records["16-bit"]
    rows = [
        ("", "nf4", "16-bit LoRA", "nf4 / 16-bit"),
        ("all-gathered per step per rank", f"{ours['all_gather_bytes'] / MIB:.1f} MiB",
         f"{theirs['all_gather_bytes'] / MIB:.1f} MiB", f"{ours['all_gather_bytes'] / theirs['all_gather_bytes']:.3f}"),
        ("stored per rank (params + buffers)", f"{max(ours['local_bytes']) / MIB:.1f} MiB",
         f"{max(theirs['local_bytes']) / MIB:.1f} MiB", f"{max(ours['local_bytes']) / max(theirs['local_bytes']):.3f}"),
        ("step time (fwd + bwd + AdamW)", f"{ours['step_s'] * 1e3:.0f} ms", f"{theirs['step_s'] * 1e3:.0f} ms",
         f"{ours['step_s'] / theirs['step_s']:.2f}"),
        ("loss after the steps", f"{ours['loss']:.4f}", f"{theirs['loss']:.4f}", ""),
    ]  # fmt: skip
    print(f"FSDP2, {args.world} ranks ({args.device}), Llama-shaped {args.layers} layers, hidden {args.hidden}, "
          f"intermediate {args.intermediate}, vocab {args.vocab}, {args.batch} x {args.seq} tokens per rank, "
          f"r={args.r}")  # fmt: skip
    for row in rows:
        print(f"{row[0]:<36}{row[1]:>14}{row[2]:>14}{row[3]:>14}")
    lines = []
    for record in records.values():
        record.update(world=args.world, device=args.device, layers=args.layers, hidden=args.hidden,
                      intermediate=args.intermediate, vocab=args.vocab, seq=args.seq, batch=args.batch, r=args.r,
                      commit=commit, date=time.strftime("%Y-%m-%d"))  # fmt: skip
        lines.append(json.dumps(record))
        print(lines[-1])
    if args.out:
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
