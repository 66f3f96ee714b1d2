"""Mutation check: realistic one-line bugs planted in the core modules, each run against the test file(s)
that guard the module. Run it before a release, not in CI (about 8 minutes on 2 cores):

    .venv/bin/python benchmarks/mutants.py                 # every mutant: a table of killed / survived
    .venv/bin/python benchmarks/mutants.py -k gemv -k tie  # those whose name contains "gemv" or "tie"
    .venv/bin/python benchmarks/mutants.py --list          # the mutants, without running anything

The checkout is never modified: the script copies the repository's files (tracked and untracked, not
ignored) to a temporary directory, adds the installed layout there (`nf4/kernels/` from `kernels/`,
`nf4/lora/` from `lora/`) and puts that `nf4` first on PYTHONPATH, so the installed (editable) `nf4` is
shadowed by the copy. It runs the selected test files once unmutated (they must
pass), then for each mutant: replaces its line fragment (which must occur exactly once in its file:
a mutant whose line has changed is reported as stale, not as survived), runs pytest with `-x` on the
guarding test files under the derandomized hypothesis profile (failures not shrunk), and restores the file. A mutant is
killed when a test fails (the first failing test is shown) or the run times out; a survivor is a
missing test, or an equivalent mutant explained in its `equivalent` note.

Exit status: 0 when every mutant is killed or explained, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = {"nf4/": "nf4/", "kernels/": "nf4/kernels/", "lora/": "nf4/lora/"}
"""Source folder -> its place in the installed package (pyproject's package-dir)."""


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # repository-relative source file
    old: str  # a fragment of one line, present exactly once in the file
    new: str
    tests: tuple[str, ...]  # the test files that guard this code
    bug: str  # what the mutant does, in words
    equivalent: str | None = None  # why it cannot be caught, if it is an equivalent mutant


# fmt: off
MUTANTS = (
    # -- the format: codebook, reference, serialized state ----------------------------------------------
    Mutant("codebook-digit", "nf4/codebook.py", "    0.33791524171829224,", "    0.33791624171829224,",
           ("tests/test_codebook.py",), "one digit of the NF4 value of code 11"),
    Mutant("thresholds-not-rounded-down", "nf4/codebook.py",
           "down[above] = np.nextafter(down[above], np.float32(-np.inf))", "down[above] = down[above]",
           ("tests/test_codebook.py", "tests/test_reference.py"),
           "nested thresholds: a float32 midpoint rounded up is kept (ties can go to the upper entry)"),
    Mutant("reference-midpoint-tie", "nf4/reference.py", "torch.searchsorted(midpoints, scaled.reshape(-1))",
           "torch.searchsorted(midpoints, scaled.reshape(-1), right=True)", ("tests/test_reference.py",),
           "reference quantize: a value on a midpoint gets the upper code"),
    Mutant("reference-divides", "nf4/reference.py", "return (blocks * pre[:, None]) * inv[:, None]",
           "return torch.nan_to_num((blocks * pre[:, None]) / (absmax * pre)[:, None])",
           ("tests/test_reference.py",), "reference scaling x / absmax instead of x * (1 / absmax)"),
    Mutant("reference-pad-nibble", "nf4/reference.py", "codes.new_full((1,), 7)", "codes.new_full((1,), 0)",
           ("tests/test_reference.py",), "odd n: the pad nibble is code 0 instead of 7 (the code of 0.0)"),
    Mutant("reference-double-rounding", "nf4/reference.py", "out = (_blocks(values, blocksize) * absmax[:, None])",
           "out = (_blocks(values.to(dtype).float(), blocksize) * absmax[:, None])", ("tests/test_reference.py",),
           "dequantize rounds the NF4 value to the output dtype before the product (two roundings)"),
    Mutant("reference-nested-offset-dropped", "nf4/reference.py",
           "return nested_code[codes.long()] * scale + offset", "return nested_code[codes.long()] * scale",
           ("tests/test_reference.py",), "double quant decode forgets the offset"),
    Mutant("offset-divisor", "nf4/reference.py", "math.ldexp(1.0, e - k) / n)",
           "math.ldexp(1.0, e - k) / max(n - 1, 1))", ("tests/test_reference.py",),
           "the double-quant offset divides by n - 1"),
    Mutant("reference-nested-tie", "nf4/reference.py", "torch.searchsorted(thresholds.to(y.device), scaled)",
           "torch.searchsorted(thresholds.to(y.device), scaled, right=True)", ("tests/test_reference.py",),
           "reference double quant sends a value on a threshold to the upper map entry"),
    Mutant("serialized-blocksize", "nf4/tensor.py", '"blocksize": self.blocksize}', '"blocksize": 64}',
           ("tests/test_tensor.py",), "the serialized quant state always says blocksize 64"),
    Mutant("cpu-bf16-rounding", "nf4/cpu.py", "return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16",
           "return (bits + 0x8000) >> 16", ("tests/test_cpu.py",),
           "compiled CPU dequantize rounds bf16 ties away from zero instead of to even"),
    # -- kernels ---------------------------------------------------------------------------------------
    Mutant("quantize-midpoint-tie", "kernels/quantize.py", "tl.umulhi((mid - xs).to(", "tl.umulhi((-(xs - mid)).to(",
           ("tests/test_kernels.py",), "issue 19 #1: quantize kernel sends a value on a midpoint to the upper code"),
    Mutant("nested-code-tie", "kernels/quantize.py", "idx += tl.where(v > t, step, 0)",
           "idx += tl.where(v >= t, step, 0)", ("tests/test_kernels.py",),
           "double-quant kernel sends a value on a threshold to the upper map entry"),
    Mutant("dequantize-nested-offset-dropped", "kernels/dequantize.py",
           "return tl.load(nested_code_ptr + q) * scale + tl.load(nested_offset_ptr)",
           "return tl.load(nested_code_ptr + q) * scale", ("tests/test_kernels.py",),
           "the kernels' double-quant absmax decode forgets the offset"),
    Mutant("gemv-absmax-index", "kernels/gemv.py", "block = (first_code + 2 * kb0) >> log2_bs",
           "block = (first_code + kb0) >> log2_bs", ("tests/test_gemv.py",),
           "decode kernel's aligned path indexes absmax by byte instead of by code"),
    Mutant("gemv-split-slice-dropped", "kernels/gemv.py", "tl.full(tile.shape, s0 + t, tl.int32) < split",
           "tl.full(tile.shape, s0 + t, tl.int32) < split - 1", ("tests/test_gemv.py",),
           "decode epilogue leaves out the last split-K slice"),
    Mutant("gemv-lora-scale-twice", "kernels/gemv.py", "    return lora * lora_scale\n",
           "    return lora * lora_scale * lora_scale\n", ("tests/test_gemv.py",),
           "issue 19 #5: decode epilogue scales the LoRA term twice"),
    Mutant("matmul-lora-scale-twice", "kernels/matmul.py", "        lora = lora * lora_scale\n",
           "        lora = lora * lora_scale * lora_scale\n", ("tests/test_matmul.py",),
           "fused matmul epilogue scales the LoRA term twice"),
    Mutant("matmul-bias-only-with-lora", "kernels/matmul.py", "    if has_bias:\n        acc += tl.load(bias_ptr",
           "    if has_bias and has_lora:\n        acc += tl.load(bias_ptr", ("tests/test_matmul.py",),
           "fused matmul adds the bias only when there is a LoRA term"),
    # -- LoRA ------------------------------------------------------------------------------------------
    Mutant("dropout-missing-from-dA", "lora/functional.py", "(g.t() @ _dropped(x2, mask, ctx.keep_scale))",
           "(g.t() @ x2)", ("tests/test_functional.py",), "lora_A's gradient uses x instead of the dropped-out x"),
    Mutant("dB-scaling-missing", "lora/functional.py", "(dy2.t() @ xa).mul_(ctx.scaling)", "(dy2.t() @ xa)",
           ("tests/test_functional.py",), "lora_B's gradient without the scaling"),
    Mutant("dropout-keep-scale", "lora/functional.py", ">= p, 1.0 / (1.0 - p)", ">= p, 1.0 - p",
           ("tests/test_functional.py",), "dropout scales kept values by 1 - p instead of 1 / (1 - p)"),
    Mutant("rslora-scaling-at-init", "lora/modules.py",
           "self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r",
           "self.scaling = lora_alpha / r", ("tests/test_merge.py",), "use_rslora ignored by the layer"),
    Mutant("merge-delta-ignores-rslora", "lora/modules.py",
           "return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())",
           "return self.lora_alpha / self.r * (self.lora_B.detach().float() @ self.lora_A.detach().float())",
           ("tests/test_merge.py",), "issue 19 #2: delta_weight uses alpha / r, wrong for rsLoRA merges"),
    Mutant("merge-into-nf4-drops-update", "lora/modules.py", "merged = quantize(target.to(q.dtype)",
           "merged = quantize(base.to(q.dtype)", ("tests/test_merge.py",),
           "issue 19 #4: merge() requantizes the base, throwing the adapter away"),
    Mutant("merged-weight-adds-update-twice", "lora/merge.py",
           "if isinstance(layer, LoRALinearNF4) and not layer.merged:", "if isinstance(layer, LoRALinearNF4):",
           ("tests/test_adapter.py",), "merge_and_unload of an NF4-merged layer adds the adapter again"),
    Mutant("load-ignores-alpha-pattern", "lora/adapter.py",
           '(path, module, r, _pattern(config.get("alpha_pattern"), path, config["lora_alpha"]), a, b, magnitude)',
           '(path, module, r, config["lora_alpha"], a, b, magnitude)', ("tests/test_adapter.py",),
           "issue 19 #3: load_adapter ignores alpha_pattern"),
    Mutant("load-ignores-rslora", "lora/adapter.py", 'bool(config.get("use_rslora"))', "False",
           ("tests/test_adapter.py",), "load_adapter ignores use_rslora"),
    Mutant("save-alpha-pattern-by-rank", "lora/adapter.py", "if m.lora_alpha != alpha}", "if m.r != r}",
           ("tests/test_adapter.py",), "save_adapter writes alpha_pattern for layers whose rank differs"),
    Mutant("save-adapter-local-shard", "lora/adapter.py", '_full(m.lora_A).to("cpu")', 'm.lora_A.detach().to("cpu")',
           ("tests/test_distributed.py",), "save_adapter writes a rank's shard of a sharded lora_A"),
    # -- storage: loaders, FSDP2 ------------------------------------------------------------------------
    Mutant("meta-weight-entry-dtype", "lora/modules.py", 'torch.empty(meta.shape, dtype=meta.dtype, device="meta")',
           'torch.empty(meta.shape, dtype=torch.uint8, device="meta")', ("tests/test_modules.py",),
           "a meta module lists its weight as uint8 (transformers 5.17 then casts the 16-bit weight to uint8)"),
    Mutant("load-state-dict-replaces", "lora/modules.py", "if assign or not self._same_layout(q):", "if True:",
           ("tests/test_modules.py",), "load_state_dict replaces the parameter objects FSDP2 and optimizers hold"),
    Mutant("dcp-keys-unresolvable", "lora/modules.py", 'return {"weight": "_bnb_key_path"}', "return {}",
           ("tests/test_distributed.py",), "torch.distributed.checkpoint cannot walk bitsandbytes' keys"),
    Mutant("apply-lora-refreezes-adapters", "lora/convert.py", "        if id(param) not in adapters:",
           "        if True:", ("tests/test_models.py", "tests/test_hf_peft.py"),
           "apply_lora freezes the adapters already in the model (PEFT's, or its own from before)"),
    # -- nf4.hf: transformers and PEFT ------------------------------------------------------------------
    Mutant("hf-conv1d-not-transposed", "nf4/hf/quantizer.py", "                    value = value.t()",
           "                    value = value", ("tests/test_hf.py",), "GPT-2's Conv1D weight quantized untransposed"),
    Mutant("hf-blocksize-unchecked", "nf4/hf/quantizer.py", "if blocksize is not None and q.blocksize != blocksize:",
           "if False:", ("tests/test_hf.py",), "a checkpoint with another blocksize than the config loads silently"),
    Mutant("hf-fp4-accepted", "nf4/hf/quantizer.py", "if _FP4_KEY in pieces:", "if False:", ("tests/test_hf.py",),
           "an FP4 layer in an NF4 checkpoint is not refused by name"),
    Mutant("hf-missing-layer-silent", "nf4/hf/quantizer.py", "if name not in self.loaded and name not in self.errors:",
           "if False:", ("tests/test_hf.py",), "a layer missing from the checkpoint is left on meta without an error"),
    Mutant("hf-saves-fp4-config", "nf4/hf/quantizer.py", '"bnb_4bit_quant_type": "nf4",',
           '"bnb_4bit_quant_type": "fp4",', ("tests/test_hf.py",),
           "save_pretrained writes a config on which stock bitsandbytes reads the codes as FP4"),
    Mutant("peft-dropout-dropped", "nf4/hf/peft.py", "lora_B, base.bias, self.scaling[name], p, self.training,",
           "lora_B, base.bias, self.scaling[name], 0.0, self.training,", ("tests/test_hf_peft.py",),
           "the fused PEFT path forgets lora_dropout"),
    Mutant("peft-scaling-ignored", "nf4/hf/peft.py", "lora_B, base.bias, self.scaling[name], p, self.training,",
           "lora_B, base.bias, 1.0, p, self.training,", ("tests/test_hf_peft.py",), "the fused PEFT path ignores scaling"),
    Mutant("peft-unmerge-keeps-merge", "nf4/hf/peft.py", "self.get_base_layer().set_weight(self._nf4_before_merge)",
           "pass", ("tests/test_hf_peft.py",), "unmerge leaves the requantized weight in place"),
    Mutant("compat-absmax-counted", "nf4/hf/compat.py", "out[id(m.weight_absmax)] = 0",
           "out[id(m.weight_absmax)] = 1", ("tests/test_hf_peft.py",),
           "num_parameters / PEFT's counts take the absmax for model parameters"),
    Mutant("compat-packed-counted-once", "nf4/hf/compat.py", "out[id(m.weight)] = 2", "out[id(m.weight)] = 1",
           ("tests/test_hf_peft.py",), "the packed codes count one weight per byte, not bitsandbytes' two"),
    Mutant("compat-stock-lora-unregistered", "nf4/hf/compat.py",
           "peft_config._register_custom_module({LinearNF4: PeftLinearNF4})", "pass", ("tests/test_hf_peft.py",),
           "a stock peft.LoraConfig finds no LoRA layer for nf4's layers"),
    Mutant("merge-keeps-quantizer", "nf4/hf/peft.py", "quantizer.remove_quantization_config(model)", "pass",
           ("tests/test_hf_peft.py",), "the 16-bit merge keeps the 4-bit quantizer on the model"),
    Mutant("hf-bnb-config-passed-through", "nf4/hf/__init__.py",
           "quantization_config = as_nf4_config(quantization_config)", "pass", ("tests/test_hf.py",),
           "nf4.hf.from_pretrained quietly hands a BitsAndBytesConfig to bitsandbytes"),
)
# fmt: on


def _files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def _copy(root: Path, dest: Path) -> None:
    """dest/repo: the repository's files, with `nf4/kernels/` and `nf4/lora/` added inside `nf4/` (the installed
    layout); dest/site/nf4: a link to that `nf4/`. Python finds the same complete package whether it looks in
    the working directory (`python -c` in a test's subprocess) or on PYTHONPATH."""
    for f in _files(root):
        target = dest / "repo" / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, target)
    for src, installed in LAYOUT.items():
        if src != installed:
            shutil.copytree(dest / "repo" / src, dest / "repo" / installed)
    (dest / "site").mkdir()
    (dest / "site" / "nf4").symlink_to(dest / "repo" / "nf4", target_is_directory=True)


def _targets(dest: Path, path: str) -> list[Path]:
    """The copies of repository file `path` a mutant changes: the file itself and its installed copy."""
    for src, installed in LAYOUT.items():
        if path.startswith(src):
            return list(dict.fromkeys([dest / "repo" / path, dest / "repo" / (installed + path[len(src) :])]))
    raise ValueError(f"{path}: not in a package folder {list(LAYOUT)}")


def _env(dest: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(dest / "site"), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant and its restore can have the same size and mtime second
    env["HYPOTHESIS_PROFILE"] = "mutation"  # the derandomized CI examples, failures not shrunk (conftest.py)
    return env


def _pytest(dest: Path, tests: tuple[str, ...], timeout: float, first_failure: bool) -> tuple[str, str, float]:
    """('passed' | 'failed' | 'timeout', the first failing test or '', seconds)."""
    pytest = Path(sys.executable).parent / "pytest"
    cmd = [str(pytest), "-q", "-p", "no:cacheprovider", "--tb=no", "-rfE", *(["-x"] if first_failure else []), *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=dest / "repo", env=_env(dest), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"(no result in {timeout:.0f} s)", time.monotonic() - start
    seconds = time.monotonic() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    if proc.returncode == 0:
        return "passed", "", seconds
    return "failed", failed[0] if failed else f"(pytest exit {proc.returncode})\n{proc.stdout[-2000:]}", seconds


def _check_layout(dest: Path) -> None:
    code = "import nf4, nf4.kernels, nf4.lora; print(nf4.__file__, nf4.kernels.__file__, nf4.lora.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=dest / "repo", env=_env(dest), capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    package = str(dest / "repo" / "nf4") + os.sep
    assert all(os.path.realpath(p).startswith(package) for p in out), f"the copy is not what gets imported: {out}"


def run(mutants: list[Mutant], timeout_factor: float = 3.0) -> list[tuple[Mutant, str, str, float]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="nf4-mutants-") as tmp:
        dest = Path(tmp)
        _copy(ROOT, dest)
        _check_layout(dest)
        files = tuple(sorted({t for m in mutants for t in m.tests}))
        baseline = {}
        for f in files:  # unmutated, the guarding tests must pass (and give the time a mutant may take)
            status, failure, seconds = _pytest(dest, (f,), 3600, first_failure=False)
            if status != "passed":
                raise SystemExit(f"{f} does not pass unmutated ({status}): {failure}")
            baseline[f] = seconds
            print(f"baseline {f}: passed in {seconds:.0f} s", flush=True)
        for m in mutants:
            targets = _targets(dest, m.path)
            original = targets[0].read_text()
            count = original.count(m.old)
            if count != 1:
                results.append((m, "stale", f"the fragment occurs {count} times in {m.path}", 0.0))
                print(f"{m.name}: stale ({count} occurrences)", flush=True)
                continue
            mutated = original.replace(m.old, m.new)
            try:
                compile(mutated, m.path, "exec")
            except SyntaxError as e:
                results.append((m, "invalid", f"SyntaxError: {e}", 0.0))
                continue
            for t in targets:
                t.write_text(mutated)
            try:
                limit = timeout_factor * sum(baseline[f] for f in m.tests) + 120
                status, failure, seconds = _pytest(dest, m.tests, limit, first_failure=True)
            finally:
                for t in targets:
                    t.write_text(original)
            outcome = {"passed": "SURVIVED", "failed": "killed", "timeout": "killed"}[status]
            if outcome == "SURVIVED" and m.equivalent:
                outcome = "equivalent"
            results.append((m, outcome, failure, seconds))
            print(f"{m.name}: {outcome} {failure} ({seconds:.0f} s)", flush=True)
    return results


def table(results) -> str:
    rows = [("mutant", "file", "result", "killed by", "s")]
    rows += [(m.name, m.path, outcome, failure.splitlines()[0] if failure else "", f"{s:.0f}")
             for m, outcome, failure, s in results]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for m, outcome, _, _ in results:
        if outcome == "equivalent":
            lines.append(f"{m.name}: equivalent: {m.equivalent}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", action="append", default=[], help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout-factor", type=float, default=3.0, help="x the unmutated run's time, + 120 s")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.k or any(k in m.name for k in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.path:22} {', '.join(m.tests):45} {m.bug}")
        return 0
    if not chosen:
        raise SystemExit(f"no mutant matches {args.k}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop pytest, remove the copy
    start = time.monotonic()
    results = run(chosen, args.timeout_factor)
    print()
    print(table(results))
    counts = {k: sum(1 for r in results if r[1] == k) for k in ("killed", "equivalent", "SURVIVED", "stale", "invalid")}
    print(f"\n{len(results)} mutants: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
          + f" in {time.monotonic() - start:.0f} s")  # fmt: skip
    return 0 if counts["killed"] + counts["equivalent"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
