"""Many adapters on one NF4 base: a mixed batch (PEFT's `adapter_names`), each sequence its own adapter.

Three stacks on the same seeded Llama-shaped model (`bench_model.py`'s presets and weights), `--adapters`
LoRA adapters (r = `--rank`, on q/k/v/o/gate/up/down) added to each, inference (eval, no grad):

- nf4 fused: nf4's layers with PEFT; a mixed batch is one `multi_lora_linear` call per layer;
- nf4 loop: the same model, `PeftLinearNF4` made to run PEFT's loop (base, then each adapter's rows);
- bnb+peft: bitsandbytes' Linear4bit (nf4, double quant, bf16 compute) with PEFT's own loop.

A batch of `--seqs` sequences x `--tokens` tokens; sequence i runs adapter i mod d, for d distinct adapters in
`--distinct`. Timed: one adapted layer's call (`layers.0.self_attn.q_proj`, input [seqs, tokens, hidden]),
the whole model's forward, and `generate` (`--new-tokens` greedy tokens; tokens/s). Reported beside the totals:
what the adapters add over a batch on one adapter (time at d minus time at d = 1; on the CPU the base
forward dominates every stack), and those costs' ratio, bnb+peft over nf4 fused.

    python benchmarks/bench_adapters.py        # 16 x 32 tokens, 1/4/16 adapters; preset small (GPU) / tiny (CPU)
    python benchmarks/bench_adapters.py --quick             # 4 x 8 tokens, 1/4 adapters, seconds

On the CPU, bf16 matmuls of the small preset take seconds a forward (no native bf16 there): the tiny one
keeps the run to minutes.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import TARGETS, build, to_bitsandbytes  # noqa: E402
from harness import Timer, bench_main, bnb_available, format_table  # noqa: E402

STACKS = ("nf4 fused", "nf4 loop", "bnb+peft")
LAYER = "layers.0.self_attn.q_proj"


def adapted_model(stack: str, preset: str, adapters: int, rank: int, device: torch.device):
    """The stack's model with `adapters` random adapters "a0", "a1", ... (non-zero B), in eval mode."""
    import peft

    model = build(preset, 128, device)
    if stack.startswith("nf4"):
        import nf4.hf
        from nf4.lora import quantize_model

        quantize_model(model, target_modules=TARGETS)
        model.is_loaded_in_4bit = True
        config = lambda: nf4.hf.lora_config(r=rank, lora_alpha=rank, target_modules=TARGETS)  # noqa: E731
    else:
        model = to_bitsandbytes(model, device)
        config = lambda: peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)  # noqa: E731
    for p in model.parameters():
        p.requires_grad_(False)
    pm = peft.get_peft_model(model, config(), adapter_name="a0")
    for i in range(1, adapters):
        pm.add_adapter(f"a{i}", config())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            p.requires_grad_(False)  # inference: no gradient is needed
    return pm.eval()


@contextlib.contextmanager
def peft_loop(stack: str):
    """For "nf4 loop": PeftLinearNF4's mixed batch as PEFT's loop."""
    if stack != "nf4 loop":
        yield
        return
    from nf4.hf.peft import PeftLinearNF4

    fused = PeftLinearNF4._mixed_batch_forward
    PeftLinearNF4._mixed_batch_forward = PeftLinearNF4._looped_mixed_batch
    try:
        yield
    finally:
        PeftLinearNF4._mixed_batch_forward = fused


def run(device, quick, results, preset, seqs, tokens, rank, distinct, new_tokens, adapters):
    preset = "tiny" if quick else preset or ("small" if device.type == "cuda" else "tiny")
    seqs, tokens, new_tokens = (4, 8, 2) if quick else (seqs, tokens, new_tokens)
    distinct = [d for d in distinct if d <= seqs]
    adapters = max(adapters, *distinct)
    timer = Timer(device, quick)
    stacks = [s for s in STACKS if s != "bnb+peft" or bnb_available(device)]
    rows = []
    for stack in stacks:
        model = adapted_model(stack, preset, adapters, rank, device)
        hidden = model.config.hidden_size
        layer = model.base_model.model.model.get_submodule(LAYER)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (seqs, tokens), generator=g).to(device)
        x = torch.randn(seqs, tokens, hidden, generator=g).to(device, torch.bfloat16)
        batches = {d: [f"a{i % d}" for i in range(seqs)] for d in distinct}
        with torch.no_grad(), peft_loop(stack):  # every batch once first: caches, compiled CPU code, allocator
            for names in batches.values():
                model(input_ids=ids, adapter_names=names)
        for d, names in batches.items():
            with torch.no_grad(), peft_loop(stack):
                t_layer = timer(lambda: layer(x, adapter_names=names), warmup=2, repeats=15)
                t_forward = timer(lambda: model(input_ids=ids, adapter_names=names), warmup=1, repeats=5)
                t_generate = timer(
                    lambda: model.generate(input_ids=ids, adapter_names=names, max_new_tokens=new_tokens,
                                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0),
                    warmup=1, repeats=3,
                )  # fmt: skip
            row = dict(bench="adapters", stack=stack, preset=preset, seqs=seqs, tokens=tokens, rank=rank,
                       distinct=d, adapters=adapters, layer_ms=t_layer.median_ms, forward_ms=t_forward.median_ms,
                       generate_ms=t_generate.median_ms, generate_tok_s=seqs * new_tokens / t_generate.median_ms * 1e3,
                       new_tokens=new_tokens)  # fmt: skip
            rows.append(row)
            print(f"  {stack:10s} d={d:3d}: layer {row['layer_ms']:.3f} ms, forward {row['forward_ms']:.1f} ms, "
                  f"generate {row['generate_tok_s']:.1f} tok/s", flush=True)  # fmt: skip
    add_costs(rows)
    case_keys = ("preset", "seqs", "tokens", "rank", "distinct", "adapters", "new_tokens")
    for row in rows:
        case = {k: row[k] for k in case_keys}
        metrics = {k: v for k, v in row.items() if k not in (*case_keys, "bench", "stack")}
        results.add("adapters", case, row["stack"], None, **metrics)
    return rows


def add_costs(rows: list[dict]) -> None:
    """Per row: its time over the same stack's one-adapter batch (`*_x1`) and the difference (`*_adds_ms`);
    per row of bnb+peft, what its adapters add over nf4 fused's (`*_adds_bnb_over_fused`)."""
    one = {(r["stack"], k): r[k] for r in rows if r["distinct"] == 1 for k in ("layer_ms", "forward_ms", "generate_ms")}
    for r in rows:
        for k in ("layer_ms", "forward_ms", "generate_ms"):
            base = one.get((r["stack"], k))
            if base is not None:
                name = k.removesuffix("_ms")
                r[f"{name}_x1"] = r[k] / base
                r[f"{name}_adds_ms"] = r[k] - base
    fused = {(r["distinct"], k): r.get(k) for r in rows if r["stack"] == "nf4 fused" for k in r}
    for r in rows:
        for name in ("layer", "forward", "generate"):
            theirs, ours = r.get(f"{name}_adds_ms"), fused.get((r["distinct"], f"{name}_adds_ms"))
            if r["distinct"] > 1 and theirs is not None and ours:
                r[f"{name}_adds_vs_fused"] = theirs / ours


def table(rows: list[dict]) -> str:
    head = rows[0]
    title = (f"# many adapters, one batch (bench_adapters.py): preset {head['preset']}, {head['seqs']} sequences x "
             f"{head['tokens']} tokens, r = {head['rank']}, bf16; layer {LAYER}; generate {head['new_tokens']} "
             "tokens\n# x1: over the same stack's batch on one adapter; adds: that difference in ms; "
             "adds / fused's: the difference over nf4 fused's (> 1: nf4 fused adds less)\n")  # fmt: skip
    columns = [
        ("stack", "stack", ""),
        ("adapters", "distinct", ""),
        ("layer ms", "layer_ms", ".3f"),
        ("x1", "layer_x1", ".2f"),
        ("adds ms", "layer_adds_ms", ".3f"),
        ("adds / fused's", "layer_adds_vs_fused", ".2f"),
        ("forward ms", "forward_ms", ".1f"),
        ("x1", "forward_x1", ".2f"),
        ("adds ms", "forward_adds_ms", ".1f"),
        ("adds / fused's", "forward_adds_vs_fused", ".2f"),
        ("generate tok/s", "generate_tok_s", ".1f"),
        ("x1 (time)", "generate_x1", ".2f"),
    ]
    return title + format_table(rows, columns)


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default=None, help="default: small on a GPU, tiny on the CPU")
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--distinct", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--adapters", type=int, default=16, help="adapters loaded (at least the largest --distinct)")
    parser.add_argument("--new-tokens", type=int, default=8)


if __name__ == "__main__":
    bench_main(__doc__, run, table, add_arguments=add_arguments)
