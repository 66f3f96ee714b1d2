"""Every kernel configuration compiles ahead of time for sm_80 and sm_90, without a GPU.

The compile runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

import json
import os
import subprocess
import sys

import pytest

from nf4.kernels.aot import ARCHS, SHARED_LIMIT, TABLE_ARGS, all_configs


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "nf4.kernels.aot", "--json"], capture_output=True, text=True, env=env, timeout=1500
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report; stderr:\n{proc.stderr[-3000:]}"
    return lines


def test_every_configuration_compiles_for_every_arch(reports):
    names = {cfg.name for cfg in all_configs()}
    assert len(names) == len(all_configs()), "configuration names must be unique"
    assert {(r["name"], r["arch"]) for r in reports} == {(n, a) for n in names for a in ARCHS}


def test_no_spills_and_shared_memory_within_limits(reports):
    bad = [r for r in reports if r["spill_bytes"] or r["stack_bytes"] or r["shared_bytes"] > SHARED_LIMIT[r["arch"]]]
    assert not bad, "\n".join(json.dumps(r) for r in bad)
    assert all(0 < r["registers"] <= 255 for r in reports)


def test_offsets_into_tensors_are_int64(reports):
    bad = [r for r in reports if not set(r["i32_indexed"]) <= TABLE_ARGS]
    assert not bad, "\n".join(f"{r['name']} sm_{r['arch']}: {r['i32_indexed']}" for r in bad)
    assert all(r["ok"] for r in reports)


def test_large_m_matmul_uses_wgmma_on_hopper_and_mma_on_ampere(reports):
    large = [r for r in reports if r["large_m"]]
    assert large, "no large-M configuration"
    assert all("wgmma" in r["mma"] for r in large if r["arch"] == 90)
    assert all("mma.sync" in r["mma"] for r in large if r["arch"] == 80)
