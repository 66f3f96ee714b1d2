"""Worker processes for tests/test_distributed.py: gloo ranks on the CPU running FSDP2 on nf4 models.

Each worker writes what it measured to `out/rank{r}.pt`; the test process asserts. Every rank builds the
same model from the same seeds, so each can compare its sharded run with the single-process one.
"""

import multiprocessing
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

TIMEOUT = timedelta(seconds=120)  # a collective that waits longer fails the worker (no silent hang)
IN, HIDDEN, MID, OUT = 256, 1030, 518, 72  # rows: 1030, 518 divide by no world size; blocks straddle edges


def build(seed: int = 0, device: str | None = None) -> nn.Module:
    """The test model; with device="meta" a skeleton (no values: they come from a checkpoint)."""
    from nf4.lora import LoRALinearNF4, apply_lora

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, MID), nn.GELU(), nn.Linear(MID, OUT))
    apply_lora(model, r=4, lora_alpha=8, target_modules=["0", "2"])
    apply_lora(model, r=2, lora_alpha=4, target_modules=["4"], double_quant=False)  # float32 absmax too
    for m in model.modules():
        if isinstance(m, LoRALinearNF4):
            nn.init.normal_(m.lora_B, std=0.1)
    return model


def batch(world: int) -> torch.Tensor:
    return torch.randn(4 * world, IN, generator=torch.Generator().manual_seed(1))


def nf4_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "bias" not in k}


def logged(fn, rank: int, world: int, port: int, out: str) -> None:
    """Run `fn` with this process's stdout and stderr (Python's and the C++ libraries') in a log file."""
    log = os.open(os.path.join(out, f"{fn.__name__}-{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    fn(rank, world, port, out)
    # NOTE: the results are on disk and the process group is gone; leave without the interpreter's and
    # the C++ libraries' teardown, where a rank occasionally aborted after FSDP2 / DCP work ("terminate
    # called without an active exception", 2 of ~30 launches on the 2-core CI machine; never with plain
    # gloo collectives, 0 of 45; not in our code, which starts no thread).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn, world: int, out, timeout: float = 180) -> None:
    """Run `fn(rank, world, port, out)` on `world` spawned processes; fail on a crash or a timeout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=logged, args=(fn, rank, world, port, str(out))) for rank in range(world)]
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # whole models: the torch path, not the interpreter
    try:
        for p in procs:
            p.start()
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{fn.__name__}: {len(alive)} of {world} ranks still running after {timeout} s (a hang)"
    logs = "".join(f"--- rank {r} ---\n{(out / f'{fn.__name__}-{r}.log').read_text()[-2000:]}" for r in range(world))
    assert all(p.exitcode == 0 for p in procs), f"{fn.__name__}: exit codes {[p.exitcode for p in procs]}\n{logs}"


def finish() -> None:
    """Leave together: a rank that tears its process group down while another still talks to it (DCP's
    coordinator writing, a gather's last receive) can abort in gloo's threads at exit."""
    dist.barrier()
    dist.destroy_process_group()


def init(rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def train_and_check(rank: int, world: int, port: int, out: str) -> None:
    """Sharded forward/backward against the single-process run, bytes per rank and per all-gather,
    optimizer steps, the full state dict, save_adapter and a DCP checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from nf4.lora import save_adapter
    from nf4.lora.distributed import AllGatherBytes, local_bytes, shard_model

    mesh = init(rank, world, port)
    result = {}
    model = build()
    x = batch(world)
    reference = model(x)
    reference.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    result["unsharded_state"] = model.state_dict()
    result["total_bytes"] = local_bytes(model)
    result["buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers())
    result["largest_share"] = sum(  # FSDP2 gives each rank ceil(rows / world) rows of every parameter at most
        -(-p.shape[0] // world) * (p.numel() // p.shape[0]) * p.element_size() for p in model.parameters()
    )
    result["nf4_weights"] = sum(m.weight.numel() * 2 for m in model if hasattr(m, "nf4_weight"))

    shard_model(model, mesh=mesh)
    result["local_bytes"] = local_bytes(model)
    mine = x.chunk(world)[rank]
    with AllGatherBytes() as gathered:
        y = model(mine)
        (y.square().sum() / reference.numel() * world).backward()  # FSDP2 averages over ranks
    result["all_gather_bytes"] = gathered.bytes
    result["forward_error"] = (y - reference.chunk(world)[rank]).abs().max().item()
    result["grad_error"] = max(
        ((p.grad.full_tensor() - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item()
        for n, p in model.named_parameters()
        if p.grad is not None
    )
    result["grad_names"] = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    before = nf4_state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.step()
        opt.zero_grad()
        model(mine).square().mean().backward()
    after = nf4_state(model)
    result["nf4_unchanged_by_steps"] = all(torch.equal(before[k].full_tensor() if hasattr(before[k], "full_tensor")
                                               else before[k], v.full_tensor() if hasattr(v, "full_tensor") else v)
                                           for k, v in after.items())  # fmt: skip
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result["full_state_dict"] = full
    save_adapter(model, os.path.join(out, "adapter"))
    dcp.save(get_model_state_dict(model), checkpoint_id=os.path.join(out, "dcp"))
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finish()


def load_checkpoint(rank: int, world: int, port: int, out: str) -> None:
    """Load the DCP checkpoint another world size saved into a model built the same way."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from nf4.lora.distributed import shard_model

    mesh = init(rank, world, port)
    model = shard_model(build(), mesh=mesh)
    state = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=os.path.join(out, "dcp"))
    set_model_state_dict(model, state)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save({"full_state_dict": full}, os.path.join(out, f"load-rank{rank}.pt"))
    finish()


def mixed_precision(rank: int, world: int, port: int, out: str) -> None:
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the NF4 pieces the forward sees are the
    unsharded model's, bit for bit; outputs agree with the bf16 computation. (CPUOffloadPolicy needs an
    accelerator: tests/test_distributed.py's GPU test.)"""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from nf4.lora.distributed import shard_model

    mesh = init(rank, world, port)
    result = {}
    for name, kwargs in {
        "mp": dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)),
        "plain": {},
    }.items():
        model = build()
        x = batch(world)
        dequantized = [m.dequantize_weight(torch.float32) for m in model if hasattr(m, "nf4_weight")]
        if name == "mp":
            reference = model.to(torch.bfloat16)(x.bfloat16()).float()
            model = build()
        else:
            reference = model(x)
        seen = []

        def capture(module, args, seen=seen):
            seen.append(module.dequantize_weight(torch.float32))

        for m in model:
            if hasattr(m, "nf4_weight"):
                m.register_forward_pre_hook(capture)
        shard_model(model, mesh=mesh, **kwargs)
        y = model(x.chunk(world)[rank]).float()
        y.square().mean().backward()
        result[name] = {
            "weights_identical": len(seen) == 3
            and all(torch.equal(a, b) for a, b in zip(seen, dequantized, strict=True)),
            "output_error": ((y - reference.chunk(world)[rank]).abs().max() / reference.abs().max()).item(),
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        }
    torch.save(result, os.path.join(out, f"mp-rank{rank}.pt"))
    finish()


def one_gpu(rank: int, world: int, port: int, out: str) -> None:
    """World size 1 on CUDA (nccl): fully_shard, with and without CPUOffloadPolicy, through the Triton
    kernels; forward and LoRA gradients against the unsharded model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy

    from nf4.lora.distributed import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=TIMEOUT)
    mesh = init_device_mesh("cuda", (world,))
    result = {}
    for name, kwargs in {"plain": {}, "offload": dict(offload_policy=CPUOffloadPolicy())}.items():
        model = build().cuda()
        x = batch(world).cuda()
        reference = model(x)
        reference.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model = build()
        model = shard_model(model if name == "offload" else model.cuda(), mesh=mesh, **kwargs)
        y = model(x)
        y.square().mean().backward()
        result[name] = {
            "forward_error": ((y - reference).abs().max() / reference.abs().max()).item(),
            "grad_error": max(
                ((p.grad.full_tensor().cuda() - grads[n]).abs().max() / grads[n].abs().max()).item()
                for n, p in model.named_parameters()
                if p.grad is not None
            ),
        }
    torch.save(result, os.path.join(out, "gpu.pt"))
    finish()


def demo(rank: int, world: int, port: int, out: str) -> None:
    """`nf4 demo`, small, as torchrun starts it (WORLD_SIZE, RANK, ... in the environment); rank 0 saves its
    report and result."""
    from nf4.demo import run

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    lines = []
    result = run(steps=6, batch=4, heldout=16, train_pool=48, out=os.path.join(out, "demo"), progress=False,
                 log=lines.append)  # fmt: skip
    if rank == 0:
        fields = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in result.__dict__.items()}
        torch.save({"result": fields, "lines": lines}, os.path.join(out, "demo.pt"))
    else:
        assert result is None


def peft_sharded(rank: int, world: int, port: int, out: str) -> None:
    """Converting an already sharded model (the wrong order) is refused; a PEFT model on nf4 layers,
    sharded and trained a step, saves its adapter in PEFT's format (`nf4.lora.save_adapter` gathers it
    and hands it to PEFT's `save_pretrained`); rank 0 keeps the gathered full state dict to compare."""
    import peft
    from hf_helpers import TARGETS, tiny_config
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    import nf4.hf
    from nf4.lora import apply_lora, quantize_model, save_adapter
    from nf4.lora.distributed import shard_model

    mesh = init(rank, world, port)
    result = {}
    plain = nn.Sequential(nn.Linear(IN, MID), nn.GELU(), nn.Linear(MID, OUT))
    fully_shard(plain[0], mesh=mesh)
    fully_shard(plain, mesh=mesh)
    for convert in (apply_lora, quantize_model):
        try:
            convert(plain)
        except ValueError as e:
            result[convert.__name__] = str(e)

    torch.manual_seed(0)
    model = quantize_model(LlamaForCausalLM(tiny_config()), target_modules=TARGETS, progress=False)
    model = peft.get_peft_model(model, nf4.hf.lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    shard_model(model, mesh=mesh)
    ids = torch.randint(1, 128, (2 * world, 8), generator=torch.Generator().manual_seed(1)).chunk(world)[rank]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    save_adapter(model, os.path.join(out, "adapter"))
    if rank == 0:
        result["adapter"] = {k: v for k, v in full.items() if "lora_" in k}
        torch.save(result, os.path.join(out, "peft.pt"))
    finish()
