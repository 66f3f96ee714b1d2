"""The `nf4` command line (also `python -m nf4`).

nf4 demo [--model DIR] [--data FILE] [--device cuda] [--steps N] ...   QLoRA end to end, offline
nf4 quantize IN OUT [--pattern REGEX] [--overwrite] ...                  checkpoint -> bitsandbytes NF4

Every mistake in the arguments is refused before anything runs or is written: the subcommand's usage
line, then one `nf4: error: ...` line naming the option and the remedy, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse, with each error as the (sub)command's usage line, then `nf4: error: <message>`, exit 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"nf4: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number such as 1e-3, got {text!r}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda (cuda:1 for a second GPU), got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
            raise argparse.ArgumentTypeError(
                f"{text!r}, but torch {torch.__version__} sees no CUDA device ({why}); "
                "use --device cpu, or a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        if (device.index or 0) >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise argparse.ArgumentTypeError(f"{text!r}, but torch sees {n} CUDA device(s): use cuda:0 to cuda:{n - 1}")
    return text


def _model_dir(text: str) -> Path:
    path = Path(text)
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{text} is not a model directory (no config.json); pass a local transformers or "
            "sentence-transformers model directory, or leave --model out for the bundled all-MiniLM-L6-v2"
        )
    return path


def _text_file(text: str) -> Path:
    from nf4.demo import load_sentences

    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file; pass a UTF-8 text file of English prose")
    try:
        load_sentences(path)
    except (ValueError, OSError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def _out_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; pass a directory (it is created if missing)")
    return path


def _demo(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from nf4.demo import default_model_dir, run

    if args.model is None:
        try:
            default_model_dir()
        except ModuleNotFoundError as e:
            args.parser.error(f"--model: {e}")
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
    return 0 if result is None or result.ok else 1  # None: a rank other than 0 of a sharded run


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
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError) as e:
        args.parser.error(str(e))
    mb = lambda b: f"{b / 2**20:.2f} MB"  # noqa: E731
    print(f"quantized {len(s.quantized)} weights: {s.selection}")
    if s.kept_weights:
        more = f" and {len(s.kept_weights) - 5} more" if len(s.kept_weights) > 5 else ""
        print(f"2-D weights kept as they were: {', '.join(s.kept_weights[:5])}{more}")
    print(f"{len(s.kept)} tensors copied unchanged")
    print(
        f"quantized weights: {mb(s.bytes_before)} -> {mb(s.bytes_after)} (NF4, blocksize {args.blocksize}, "
        f"double quantization {'off' if args.no_double_quant else 'on'})"
    )
    if s.copied or s.left_out:
        print(f"copied from {args.input}: {', '.join(s.copied) or 'nothing'}")
    if s.left_out:
        print(f"not copied (other weight files, hidden folders): {', '.join(s.left_out)}")
    print(f"written to {s.output} in bitsandbytes' serialized form")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="nf4", description="NF4 quantization and QLoRA with Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="quantize a pretrained encoder, train LoRA adapters, report fidelity",
        description="QLoRA end to end, offline: quantize a sentence encoder's Linear layers to NF4, train LoRA "
        "adapters to win back the float32 embeddings, save the adapter in PEFT's format, reload and merge it.",
    )
    demo.add_argument(
        "--model", type=_model_dir, metavar="DIR", help="local model directory (default: the bundled all-MiniLM-L6-v2)"
    )
    demo.add_argument(
        "--data", type=_text_file, metavar="FILE", help="text file to train on (default: stdlib docstrings)"
    )
    demo.add_argument(
        "--device", type=_device, default="cpu", metavar="DEVICE", help="cpu or cuda (default: %(default)s)"
    )
    demo.add_argument(
        "--steps", type=_positive_int, default=200, metavar="N", help="training steps (default: %(default)s)"
    )
    demo.add_argument(
        "--batch",
        type=_positive_int,
        default=16,
        metavar="N",
        help="sentences per training step (default: %(default)s)",
    )
    demo.add_argument("--rank", type=_positive_int, default=16, metavar="R", help="LoRA rank r (default: %(default)s)")
    demo.add_argument(
        "--alpha",
        type=_positive,
        default=32.0,
        metavar="A",
        help="lora_alpha; scaling = lora_alpha / r (default: %(default)s)",
    )
    demo.add_argument("--lr", type=_positive, default=2e-3, help="peak AdamW learning rate (default: %(default)s)")
    demo.add_argument(
        "--out",
        type=_out_dir,
        default="nf4-demo",
        metavar="DIR",
        help="the adapter is saved in DIR/adapter (default: %(default)s)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the data split, the batches, the adapters (default: %(default)s)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines on stderr")
    demo.set_defaults(run=_demo, parser=demo)

    q = sub.add_parser(
        "quantize",
        help="quantize a safetensors checkpoint into bitsandbytes' NF4 form",
        description="Quantize a safetensors checkpoint (a file, or a model directory) into bitsandbytes' "
        "serialized NF4 form; a model directory comes out loadable by transformers in 4 bits.",
    )
    q.add_argument(
        "input", type=Path, metavar="IN", help="a .safetensors file, or a model directory with model.safetensors"
    )
    q.add_argument("output", type=Path, metavar="OUT", help="the output file (a directory, for a directory input)")
    q.add_argument(
        "--pattern",
        metavar="REGEX",
        help="quantize the 2-D weights whose names match (default: the nn.Linear weights but the output head, "
        "read from config.json; every 2-D weight without one)",
    )
    q.add_argument(
        "--blocksize",
        type=int,
        default=64,
        metavar="N",
        help="elements per absmax block: 32, 64, ..., 4096 (default: %(default)s)",
    )
    q.add_argument(
        "--no-double-quant", action="store_true", help="keep the absmax in float32: 4.5 instead of 4.127 bits/param"
    )
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines on stderr")
    q.set_defaults(run=_quantize, parser=q)

    args, extra = parser.parse_known_args(argv)
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.run(args)
