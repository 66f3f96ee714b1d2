"""Peak memory of `from_pretrained(..., quantization_config=nf4.hf.NF4Config())` against the model's sizes.

Writes a random Llama-shaped checkpoint in bfloat16 (no download), then loads it in a fresh process while a
thread samples the process's anonymous resident memory (`/proc/self/statm`: resident minus file-backed
pages, so the memory-mapped checkpoint itself does not count) every 0.5 ms. Reports the peak above the
memory before the load, next to the loaded model's size (NF4 layers plus the 16-bit embeddings, norms and
head), the bfloat16 checkpoint's size and its largest tensor. The bound the loader must keep:
peak <= loaded size + 2 x largest 16-bit tensor + a fixed overhead.

    python benchmarks/bench_load.py                  # ~300M parameters (CPU: about a minute)
    python benchmarks/bench_load.py --layers 2       # smaller
    python benchmarks/bench_load.py --device cuda    # on a GPU: torch.cuda.max_memory_allocated instead

Linux only (reads /proc). Prints a table and one JSON line (also appended to --out if given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20


def write_checkpoint(path: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=2048,
        tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16))
    model.to(torch.bfloat16).save_pretrained(path)
    sizes = [p.numel() * 2 for p in model.parameters()]
    return {"params": sum(p.numel() for p in model.parameters()), "bf16_bytes": sum(sizes), "largest": max(sizes)}


CHILD = r"""
import json, sys, threading, time, os
import torch
import nf4.hf
from transformers import AutoModelForCausalLM

path, device = sys.argv[1], sys.argv[2]
page = os.sysconf("SC_PAGE_SIZE")


def anon():
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * page


def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


peak, done = [0], [False]


def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)


if device == "cuda":
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats()
base, base_hwm = anon(), hwm()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(
    path, quantization_config=nf4.hf.NF4Config(), dtype=torch.bfloat16, device_map=device
)
seconds = time.perf_counter() - t0
done[0] = True
thread.join()
loaded = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
nf4_layers = sum(1 for m in model.modules() if type(m).__name__ == "LinearNF4")
nf4_bytes = sum(
    t.numel() * t.element_size()
    for m in model.modules() if type(m).__name__ == "LinearNF4"
    for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
)
out = dict(peak_above_start=peak[0] - base, anon_after=anon() - base, rss_peak_above_start=hwm() - base_hwm,
           loaded_bytes=loaded, nf4_bytes=nf4_bytes, seconds=seconds, nf4_layers=nf4_layers)
if device == "cuda":
    out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
print(json.dumps(out))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="append the JSON record to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = write_checkpoint(Path(tmp), args.layers, args.hidden, args.intermediate, args.vocab)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-c", CHILD, tmp, args.device], capture_output=True, text=True,
                              env=env, check=False)  # fmt: skip
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    record = dict(sizes, **result, device=args.device, layers=args.layers, hidden=args.hidden,
                  intermediate=args.intermediate, vocab=args.vocab, date=time.strftime("%Y-%m-%d"))  # fmt: skip
    try:
        record["commit"] = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                          text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except OSError:
        pass
    bound = record["loaded_bytes"] + 2 * record["largest"]
    rows = [
        ("parameters", f"{record['params'] / 1e6:.0f} M"),
        ("bfloat16 checkpoint", f"{record['bf16_bytes'] / MIB:.0f} MiB"),
        ("largest 16-bit tensor", f"{record['largest'] / MIB:.0f} MiB"),
        ("loaded model (NF4 layers + 16-bit rest)", f"{record['loaded_bytes'] / MIB:.0f} MiB"),
        ("  of which NF4 layers", f"{record['nf4_bytes'] / MIB:.0f} MiB"),
        ("  of which in anonymous memory after the load", f"{record['anon_after'] / MIB:.0f} MiB"),
        ("peak memory of the load (anonymous RSS)", f"{record['peak_above_start'] / MIB:.0f} MiB"),
        ("  over loaded + 2 x largest", f"{(record['peak_above_start'] - bound) / MIB:+.0f} MiB"),
        ("  as a fraction of the bfloat16 size", f"{record['peak_above_start'] / record['bf16_bytes']:.2f}"),
        ("peak total RSS (file pages of the mmap too)", f"{record['rss_peak_above_start'] / MIB:.0f} MiB"),
        ("load time", f"{record['seconds']:.1f} s ({record['nf4_layers']} NF4 layers, {args.device})"),
    ]
    if "cuda_max_allocated" in record:
        rows.append(("CUDA max allocated", f"{record['cuda_max_allocated'] / MIB:.0f} MiB"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    line = json.dumps(record)
    print(line)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
