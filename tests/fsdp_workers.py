"""Worker for tests/test_fsdp_helpers.py: gloo ranks on the CPU applying nf4.lora.distributed's helpers to
a PEFT model and to a model whose root holds parameters; each rank writes what it measured to
`out/rank{r}.pt` and the test process asserts."""

import os

import torch
from dist_workers import finish, init
from torch import nn

IN, HIDDEN, OUT = 256, 1030, 72  # 1030 and 72 rows: uneven shares on 2 ranks, blocks straddle the edge


class Net(nn.Module):
    def __init__(self, root_params: bool):
        super().__init__()
        self.up, self.down = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)
        if root_params:
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, OUT))
            self.norm = nn.LayerNorm(OUT)

    def forward(self, x):
        y = self.down(torch.relu(self.up(x)))
        return self.norm(y * self.scale) if hasattr(self, "scale") else y


def build(kind: str) -> nn.Module:
    from nf4.lora import LoRALinearNF4, apply_lora, quantize_model

    torch.manual_seed(0)
    if kind == "peft":
        import peft

        import nf4.hf

        model = quantize_model(Net(root_params=False))
        config = nf4.hf.lora_config(r=4, lora_alpha=8, target_modules=["up"])
        model = peft.get_peft_model(model, config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
        return model
    model = Net(root_params=True)
    apply_lora(model, r=2, target_modules=["up"])
    quantize_model(model, target_modules=["down"], double_quant=False)
    for m in model.modules():
        if isinstance(m, LoRALinearNF4):
            nn.init.normal_(m.lora_B, std=0.1)
    return model


def shares(model, rank: int, world: int) -> dict[str, int]:
    """name -> bytes of the rows of each parameter rank `rank` holds after FSDP2 shards dim 0 in
    ceil(rows / world) row chunks (computed from the unsharded shapes), and each buffer whole."""
    found = {}
    for name, p in model.named_parameters():
        rows = p.shape[0]
        step = -(-rows // world)
        mine = max(0, min(step, rows - rank * step))
        found[name] = mine * (p.numel() // rows) * p.element_size()
    for name, b in model.named_buffers():
        found[name] = b.numel() * b.element_size()
    return found


def helpers(rank: int, world: int, port: int, out: str) -> None:
    from nf4.lora import LinearNF4
    from nf4.lora.distributed import (
        AllGatherBytes,
        is_main_process,
        local_bytes,
        nf4_layers,
        nf4_local_bytes,
        shard_model,
    )

    mesh = init(rank, world, port)
    result = {"main": is_main_process()}
    x = torch.randn(4 * world, IN, generator=torch.Generator().manual_seed(1))
    for kind in ("peft", "root"):
        model = build(kind)
        reference = model(x)
        share = shares(model, rank, world)
        nf4_names = {n for n, m in model.named_modules() if isinstance(m, LinearNF4)}
        expect_nf4 = sum(  # the NF4 pieces: biases and adapters left out
            v
            for k, v in share.items()
            if k.rpartition(".")[0] in nf4_names and k.rpartition(".")[2] not in ("bias", "lora_A", "lora_B")
        )
        whole = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        groups = [n for layer in nf4_layers(model) for n, m in model.named_modules() if m is layer]
        layers = nf4_layers(model)
        returned = shard_model(model, mesh=mesh)
        from torch.distributed.fsdp import FSDPModule

        own_groups = [isinstance(m, FSDPModule) for m in (model, *layers)]  # each layer its own group, and the root
        stored = local_bytes(model), nf4_local_bytes(model)  # before a forward leaves the root unsharded
        with AllGatherBytes() as counted:
            y = model(x.chunk(world)[rank])
        result[kind] = {
            "groups": groups,
            "own_groups": own_groups,
            "returned_model": returned is model,
            "local_bytes": stored[0],
            "expect_local": sum(share.values()),
            "nf4_local_bytes": stored[1],
            "expect_nf4": expect_nf4,
            "whole": whole,
            "error": (y - reference.chunk(world)[rank]).abs().max().item(),
            "scale": reference.abs().max().item(),
            "gathered": counted.bytes,
            "sizes": counted.sizes,
            "calls": counted.calls,
        }
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finish()
