"""A QLoRA training step of a whole Llama-shaped model: nf4 against bitsandbytes + PEFT and 16-bit LoRA.

Every stack starts from the same random 16-bit weights (a seeded `LlamaForCausalLM` from a `LlamaConfig`, no
download) and gets LoRA adapters of the same rank on q/k/v/o/gate/up/down (dropout 0):

- nf4: the Linear layers quantized by nf4 (`nf4.lora.quantize_model`, the bytes `from_pretrained` with
  `NF4Config` gives) with PEFT's LoRA through `nf4.hf.lora_config`: one fused nf4 op per layer;
- bnb+peft: bitsandbytes' `Linear4bit` (nf4, double quantization, compute dtype bf16) with PEFT's LoRA;
- lora16: the 16-bit model with PEFT's LoRA (the reference);
- with `--dora`: nf4 (QLoRA), nf4+dora and bnb+peft+dora, the same stacks with PEFT's `use_dora=True`
  (QDoRA; nf4's norm without a dense [out, in] matrix, lora/dora.py).

Each (stack, gradient checkpointing) runs in its own process: forward + backward + AdamW on the adapters for
`--warmup` steps, then `--steps` timed steps on random tokens. Reported: step time (median), tokens/s,
peak memory (CUDA: `torch.cuda.max_memory_allocated` over the whole run; CPU: peak anonymous RSS above
the process's start, sampled every 2 ms), the loss after the timed steps (so a broken stack cannot look
fast), and the ratios nf4 / bnb+peft.

    python benchmarks/bench_model.py --preset tiny                     # CPU, seconds
    python benchmarks/bench_model.py --preset small --seq 256          # CPU, a minute
    python benchmarks/bench_model.py --preset 8b --seq 2048 --batch 1  # a GPU (Llama-3-8B dimensions)
    python benchmarks/bench_model.py --preset small --seq 256 --dora   # QDoRA: nf4 QLoRA, nf4 and PEFT DoRA

Prints a table and JSON lines (each also appended to --out, if given, as soon as it is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=8192),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
STACKS = ("nf4", "bnb+peft", "lora16", "nf4+dora", "bnb+peft+dora")
DORA_STACKS = ("nf4", "nf4+dora", "bnb+peft+dora")
RATIOS = (("nf4", "bnb+peft"), ("nf4+dora", "bnb+peft+dora"), ("nf4+dora", "nf4"))
"""(ours, theirs) pairs reported as ratios when both ran."""
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 1 << 20


def build(preset: str, seq: int, device):
    """The seeded 16-bit model (transformers' own initialisation, in bf16 on `device`): the same weights for
    every stack."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=max(seq, 128), tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def to_bitsandbytes(model, device):
    """bitsandbytes' Linear4bit (nf4, double quant, bf16 compute) for the target layers, as transformers does."""
    import bitsandbytes as bnb
    import torch

    for name, linear in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="cpu")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)  # fmt: skip
        layer = layer.to(device)  # bitsandbytes quantizes here
        model.set_submodule(name, layer)
    model.is_loaded_in_4bit = True
    return model


def prepare(stack: str, preset: str, seq: int, r: int, device):
    import peft

    model = build(preset, seq, device)
    dora = stack.endswith("+dora")
    stack = stack.removesuffix("+dora")
    if stack == "nf4":
        import nf4.hf
        from nf4.lora import quantize_model

        quantize_model(model, target_modules=TARGETS)
        model.is_loaded_in_4bit = True
        config = nf4.hf.lora_config(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS, use_dora=dora)
    else:
        if stack == "bnb+peft":
            model = to_bitsandbytes(model, device)
        config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS, use_dora=dora)
    for p in model.parameters():
        p.requires_grad_(False)
    return peft.get_peft_model(model, config)


def anon_bytes() -> int:
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def run_one(args) -> dict:
    """One (stack, checkpointing) configuration in this process."""
    if args.device == "cpu":
        os.environ.pop("TRITON_INTERPRET", None)  # the CPU torch path, not the kernel interpreter
    import peft  # noqa: F401 - every library loaded before the memory baseline
    import torch
    import transformers  # noqa: F401
    from common import lm_training_steps

    import nf4.hf  # noqa: F401

    if args.stack.startswith("bnb+peft"):
        import bitsandbytes  # noqa: F401
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    start = anon_bytes()
    peak, done = [start], [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], anon_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = prepare(args.stack, args.preset, args.seq, args.r, device)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    vocab = PRESETS[args.preset]["vocab_size"]
    step_s, loss, _ = lm_training_steps(
        model, opt, lambda step: torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device),
        args.warmup, args.steps,
    )  # fmt: skip
    done[0] = True
    sampler.join()
    peak[0] = max(peak[0], anon_bytes())
    return dict(
        bench="model_step", stack=args.stack, checkpointing=args.checkpointing, preset=args.preset, seq=args.seq,
        batch=args.batch, r=args.r, device=args.device, step_s=step_s, tokens_per_s=args.batch * args.seq / step_s,
        peak_bytes=torch.cuda.max_memory_allocated() if cuda else peak[0] - start,
        peak_kind="cuda max allocated" if cuda else "anonymous RSS above start", loss=loss,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (tiny: 64, else 2048)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("-r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--stacks",
        default=None,
        help="comma-separated subset of "
        + ", ".join(STACKS)
        + " (default: the first three, or with --dora "
        + ", ".join(DORA_STACKS)
        + ")",
    )
    parser.add_argument("--dora", action="store_true", help="QDoRA: nf4 QLoRA against nf4 and PEFT DoRA")
    parser.add_argument("--checkpointing", choices=("on", "off", "both"), default="both")
    parser.add_argument("--out", type=Path, help="append the JSON records to this file")
    parser.add_argument("--largest-batch", type=int, metavar="LIMIT", default=0,
                        help="first find the largest batch (doubling, up to LIMIT) at which nf4 trains with "
                        "checkpointing on, then run every stack at it")  # fmt: skip
    parser.add_argument("--stack", help=argparse.SUPPRESS)  # internal: run one configuration here
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.seq = args.seq or (64 if args.preset == "tiny" else 2048)
    if args.stack:
        args.checkpointing = args.checkpointing == "on"
        print(json.dumps(run_one(args)))
        return 0
    stacks = [s for s in (args.stacks or ",".join(DORA_STACKS if args.dora else STACKS[:3])).split(",") if s]
    unknown = sorted(set(stacks) - set(STACKS))
    if unknown:
        parser.error(f"--stacks: unknown {unknown}; choose from {', '.join(STACKS)}")
    modes = {"on": ["on"], "off": ["off"], "both": ["off", "on"]}[args.checkpointing]
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()  # fmt: skip

    def one(stack: str, mode: str, batch: int, warmup: int, steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, __file__, "--stack", stack, "--checkpointing", mode, "--preset", args.preset,
               "--device", args.device, "--seq", str(args.seq), "--batch", str(batch), "-r", str(args.r),
               "--warmup", str(warmup), "--steps", str(steps)]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True)

    if args.largest_batch:
        batch = 1
        while batch * 2 <= args.largest_batch and one("nf4", "on", batch * 2, 0, 1).returncode == 0:
            batch *= 2
        print(f"largest batch that trains for nf4 (checkpointing on, doubling up to {args.largest_batch}): {batch}")
        args.batch = batch
    records = []
    for mode in modes:
        for stack in stacks:
            proc = one(stack, mode, args.batch, args.warmup, args.steps)
            if proc.returncode != 0:
                print(f"{stack} (checkpointing {mode}) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                record = dict(bench="model_step", stack=stack, checkpointing=mode == "on",
                              error=proc.stderr.strip().splitlines()[-1:])  # fmt: skip
            else:
                record = json.loads(proc.stdout.strip().splitlines()[-1])
            record.update(commit=commit, date=time.strftime("%Y-%m-%d"))
            records.append(record)
            if args.out:  # as soon as measured: a run cut short (gpu_check.sh's time limit) keeps it
                with args.out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    print(f"QLoRA training step, preset {args.preset} ({args.device}), {args.batch} x {args.seq} tokens, r={args.r}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")  # fmt: skip
    print(f"{'stack':<14}{'checkpointing':>14}{'step':>10}{'tokens/s':>11}{'peak memory':>14}{'loss':>9}")
    for rec in records:
        if "error" in rec:
            print(f"{rec['stack']:<14}{str(rec['checkpointing']):>14}   failed: {rec['error']}")
            continue
        print(f"{rec['stack']:<14}{str(rec['checkpointing']):>14}{rec['step_s'] * 1e3:>8.0f}ms"
              f"{rec['tokens_per_s']:>11.0f}{rec['peak_bytes'] / MIB:>10.0f} MiB{rec['loss']:>9.4f}")  # fmt: skip
    by = {(r["stack"], r["checkpointing"]): r for r in records if "error" not in r}
    for mode in modes:
        for mine, other in RATIOS:
            ours, theirs = by.get((mine, mode == "on")), by.get((other, mode == "on"))
            if not (ours and theirs):
                continue
            ratio = dict(bench="model_step", stack=f"{mine} / {other}", checkpointing=mode == "on",
                         tokens_per_s=ours["tokens_per_s"] / theirs["tokens_per_s"],
                         step_s=ours["step_s"] / theirs["step_s"], peak_bytes=ours["peak_bytes"] / theirs["peak_bytes"],
                         commit=commit)  # fmt: skip
            records.append(ratio)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(ratio) + "\n")
            print(f"{mine} / {other}, checkpointing {mode}: {ratio['tokens_per_s']:.2f}x the tokens/s, "
                  f"{ratio['step_s']:.2f}x the step time, {ratio['peak_bytes']:.2f}x the peak memory")  # fmt: skip
    for record in records:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
