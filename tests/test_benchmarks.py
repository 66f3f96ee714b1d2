"""The benchmark tooling runs end to end (tiny shapes); benchmarks themselves never assert on speed."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def clean_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.skipif(
    os.environ.get("NF4_DRY_RUN") != "1",
    reason="gpu_check.sh's dry run, 4-10 min on 2 cores: run NF4_DRY_RUN=1 pytest tests/test_benchmarks.py "
    "before a GPU session",
)
def test_gpu_check_dry_run(tmp_path):
    """Every step of the GPU machine's script runs on the CPU, tiny, and writes what the machine sends back."""
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env={**clean_env(), "OUT": str(tmp_path), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = {p.name for p in tmp_path.iterdir()}
    expected = {"env.txt", "pytest.txt", "table.txt", "results.jsonl", "profile.txt", "static_report.txt", "log.txt"}
    assert expected <= files
    assert len(files) <= 8  # what the GPU machine sends back
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    benches = {"quantize", "matmul", "train_step", "lookup", "decode", "model_step", "kernels", "adapters"}
    assert {r["bench"] for r in records} == benches
    kernels = {r["case"]: r for r in records if r["bench"] == "kernels"}  # bench_kernels.py: no GPU, not timed
    decodes = ("decode_r0", "decode_r16", "decode_m16_r16", "decode_m16_bank16")
    assert set(kernels) == {"dequantize", "quantize", *decodes}
    assert all(kernels[c]["error_over_bound"] <= 1.0 for c in decodes)
    steps = {(r["stack"], r["batch"]) for r in records if r["bench"] == "model_step" and "trainable" in r}
    assert {("nf4", 1), ("bnb+peft", 1), ("lora16", 1), ("nf4+dora", 1), ("bnb+peft+dora", 1)} <= steps
    assert ("nf4", 8) in steps  # tiny fits batch 8
    lookups = {r["case"]: r for r in records if r["bench"] == "lookup"}
    assert set(lookups) == {"read", "global", "shared", "register"}
    assert all(r["checksum_agrees"] for case, r in lookups.items() if case != "read")
    decode = {r["impl"]: r for r in records if r["bench"] == "decode"}
    assert set(decode) == {"2d550bfb5869", "current"} and decode["current"]["max_diff_vs_old"] is not None
    for r in (r for r in records if r["bench"] not in ("model_step", "kernels")):
        timed = r["layer_ms"] > 0 and r["generate_tok_s"] > 0 if r["bench"] == "adapters" else r["median_ms"] > 0
        assert timed and {"device", "torch", "triton", "commit", "date"} <= set(r["env"])
    for r in (r for r in records if r["bench"] in ("matmul", "train_step")):
        # graph and eager times in every record; on the CPU both are the one perf_counter time, no graph
        assert {"median_ms", "eager_ms", "graph", "graph_error"} <= set(r), sorted(r)
        assert r["eager_ms"] == r["median_ms"] and r["graph"] is False and r["graph_error"] is None
    assert any(r["bench"] == "model_step" and r.get("preset") == "tiny" and r["batch"] == 1 for r in records)
    table = (tmp_path / "table.txt").read_text()
    assert "a whole model's QLoRA step (bench_model.py, preset tiny)" in table and "nf4 / bnb+peft" in table
    assert "CPU run" in table.splitlines()[0] and "nf4 fused" in table and "bitsandbytes" in table
    assert "many adapters, one batch (bench_adapters.py): preset tiny" in table
    assert {(r["impl"], r["distinct"]) for r in records if r["bench"] == "adapters"} == {
        (s, d) for s in ("nf4 fused", "nf4 loop", "bnb+peft") for d in (1, 4)
    }
    assert "eager ms" in table
    assert "kernel breakdown: skipped" in (tmp_path / "profile.txt").read_text()
    assert re.search(r"pytest summary: .*\d+ (passed|skipped)", (tmp_path / "log.txt").read_text())


def test_bench_model_tiny_runs_every_stack(tmp_path):
    """The whole-model QLoRA step on the CPU, tiny preset: every stack (QDoRA's too) trains (finite loss)
    and the ratio lines are written; speed is not asserted."""
    out = tmp_path / "model.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--preset", "tiny", "--checkpointing", "on",
         "--warmup", "1", "--steps", "1", "--out", str(out), "--stacks", "nf4,bnb+peft,lora16,nf4+dora,bnb+peft+dora"],
        env=clean_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    runs = {r["stack"]: r for r in records if "trainable" in r}
    assert set(runs) == {"nf4", "bnb+peft", "lora16", "nf4+dora", "bnb+peft+dora"}
    assert runs["nf4+dora"]["trainable"] > runs["nf4"]["trainable"]  # the magnitudes
    assert runs["nf4+dora"]["trainable"] == runs["bnb+peft+dora"]["trainable"]
    for r in runs.values():
        assert r["checkpointing"] and r["step_s"] > 0 and r["peak_bytes"] >= 0 and r["trainable"] > 0
        assert 0 < r["loss"] < 20  # random tokens over a 512-word vocabulary: about ln(512) = 6.2
    ratio = next(r for r in records if r["stack"] == "nf4 / bnb+peft")
    assert ratio["tokens_per_s"] > 0 and ratio["peak_bytes"] > 0
    for pair in ("nf4 / bnb+peft", "nf4+dora / bnb+peft+dora", "nf4+dora / nf4"):
        ratio = next(r for r in records if r["stack"] == pair)
        assert ratio["step_s"] == runs[pair.split(" / ")[0]]["step_s"] / runs[pair.split(" / ")[1]]["step_s"]
        assert f"{pair}, checkpointing on:" in proc.stdout


def test_the_mutation_list_is_current():
    """benchmarks/mutants.py's list stays runnable as the code moves: each fragment is in its file exactly
    once (a mutant whose fragment is gone or ambiguous tests nothing) and each guarding test file exists."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import mutants
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    stale = [m.name for m in mutants.MUTANTS if (ROOT / m.path).read_text().count(m.old) != 1]
    missing = [t for m in mutants.MUTANTS for t in m.tests if not (ROOT / t).is_file()]
    assert len(mutants.MUTANTS) >= 40 and stale == [] and missing == []


def test_bench_adapters_derives_what_the_adapters_add(monkeypatch):
    """bench_adapters.py's derived columns from its timings (its run: gpu_check.sh's dry run)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_adapters

    rows = [
        dict(stack=s, distinct=d, layer_ms=t, forward_ms=10 * t, generate_ms=100 * t)
        for s, times in (("nf4 fused", (2.0, 2.5)), ("bnb+peft", (1.0, 4.0)))
        for d, t in zip((1, 16), times, strict=True)
    ]
    bench_adapters.add_costs(rows)
    fused1, fused16, bnb1, bnb16 = rows
    assert fused1["layer_x1"] == 1.0 and fused1["layer_adds_ms"] == 0.0 and "layer_adds_vs_fused" not in fused1
    assert fused16["layer_x1"] == 1.25 and fused16["forward_adds_ms"] == 5.0 and fused16["layer_adds_vs_fused"] == 1
    assert bnb16["layer_x1"] == 4.0 and bnb16["generate_adds_ms"] == 300.0
    assert bnb16["layer_adds_vs_fused"] == 6.0 and bnb16["forward_adds_vs_fused"] == 6.0  # 3 ms over 0.5 ms
    assert bnb1["generate_x1"] == 1.0
    for r in rows:
        r.update(preset="tiny", seqs=4, tokens=8, rank=16, new_tokens=2, generate_tok_s=1.0)
    text = bench_adapters.table(rows)
    assert "preset tiny, 4 sequences x 8 tokens" in text and " 6.00" in text and "bnb+peft" in text
