"""The benchmark tooling runs end to end (tiny shapes); benchmarks themselves never assert on speed."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def clean_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env={**clean_env(), "OUT": str(tmp_path), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = {p.name for p in tmp_path.iterdir()}
    expected = {"env.txt", "pytest.txt", "table.txt", "results.jsonl", "profile.txt", "static_report.txt", "log.txt"}
    assert expected <= files
    assert len(files) <= 8  # what the GPU machine sends back
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in records} == {"quantize", "matmul", "train_step", "lookup", "decode"}
    lookups = {r["case"]: r for r in records if r["bench"] == "lookup"}
    assert set(lookups) == {"read", "global", "shared", "register"}
    assert all(r["checksum_agrees"] for case, r in lookups.items() if case != "read")
    decode = {r["impl"]: r for r in records if r["bench"] == "decode"}
    assert set(decode) == {"2d550bfb5869", "current"} and decode["current"]["max_diff_vs_old"] is not None
    for r in records:
        assert r["median_ms"] > 0 and {"device", "torch", "triton", "commit", "date"} <= set(r["env"])
    for r in (r for r in records if r["bench"] in ("matmul", "train_step")):
        # graph and eager times in every record; on the CPU both are the one perf_counter time, no graph
        assert {"median_ms", "eager_ms", "graph", "graph_error"} <= set(r), sorted(r)
        assert r["eager_ms"] == r["median_ms"] and r["graph"] is False and r["graph_error"] is None
    table = (tmp_path / "table.txt").read_text()
    assert "CPU run" in table.splitlines()[0] and "nf4 fused" in table and "bitsandbytes" in table
    assert "eager ms" in table
    assert "kernel breakdown: skipped" in (tmp_path / "profile.txt").read_text()
    assert re.search(r"pytest summary: .*\d+ (passed|skipped)", (tmp_path / "log.txt").read_text())
