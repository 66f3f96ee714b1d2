"""The `nf4` command line (also `python -m nf4`).

nf4 demo [--model DIR] [--data FILE] [--device cuda] [--steps N]   QLoRA end to end, offline
nf4 quantize IN OUT [--pattern REGEX]                                 checkpoint -> bitsandbytes NF4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _demo(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from nf4.lora.demo import run

    result = run(
        model_dir=args.model,
        data=args.data,
        device=args.device,
        steps=args.steps,
        batch=args.batch,
        r=args.rank,
        lora_alpha=args.alpha,
        lr=args.lr,
        out=args.out,
        seed=args.seed,
        progress=False if args.no_progress else None,
    )
    return 0 if result.ok else 1


def _quantize(args) -> int:
    from nf4.checkpoint import quantize_checkpoint

    try:
        s = quantize_checkpoint(
            args.input,
            args.output,
            args.pattern,
            args.blocksize,
            not args.no_double_quant,
            progress=False if args.no_progress else None,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"nf4 quantize: {e}", file=sys.stderr)
        return 2
    mb = lambda b: f"{b / 2**20:.2f} MB"  # noqa: E731
    print(f"quantized {len(s.quantized)} weights ({s.selection}), kept {len(s.kept)} tensors unchanged")
    print(
        f"quantized weights: {mb(s.bytes_before)} -> {mb(s.bytes_after)} (NF4, blocksize {args.blocksize}, "
        f"double quantization {'off' if args.no_double_quant else 'on'})"
    )
    print(f"written to {s.output} in bitsandbytes' serialized form")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nf4", description="NF4 quantization and QLoRA with Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="quantize a pretrained encoder, train LoRA adapters, report fidelity")
    demo.add_argument("--model", type=Path, help="local model directory (default: the bundled all-MiniLM-L6-v2)")
    demo.add_argument("--data", type=Path, help="a text file to train on (default: stdlib docstrings)")
    demo.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    demo.add_argument("--alpha", type=float, default=32, help="lora_alpha")
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--out", type=Path, default=Path("nf4-demo"), help="where the adapter is saved")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)

    q = sub.add_parser("quantize", help="quantize a safetensors checkpoint into bitsandbytes' NF4 form")
    q.add_argument("input", type=Path, help="a .safetensors file, or a model directory with model.safetensors")
    q.add_argument("output", type=Path, help="the output file (or directory, for a directory input)")
    q.add_argument("--pattern", help="quantize the 2-D weights whose names match this regular expression")
    q.add_argument("--blocksize", type=int, default=64)
    q.add_argument("--no-double-quant", action="store_true")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(run=_quantize)

    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        parser.error("--steps must be at least 1")
    return args.run(args)
