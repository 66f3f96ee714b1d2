"""Hypothesis strategies and data generators shared by the tests."""

import os
import subprocess
import sys

import torch
from hypothesis import strategies as st

from nf4.tensor import BLOCKSIZES

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
dtypes = st.sampled_from(DTYPES)
blocksizes = st.sampled_from(BLOCKSIZES)
small_blocksizes = st.sampled_from(BLOCKSIZES[:4])


@st.composite
def shapes(draw, max_numel=3000, max_dims=3):
    """Shapes of 1 to 3 dims, from a single element up to about `max_numel`, odd sizes included."""
    ndim = draw(st.integers(1, max_dims))
    dims = []
    budget = max_numel
    for _ in range(ndim):
        d = draw(st.integers(1, max(1, budget)))
        dims.append(d)
        budget = max(1, budget // d)
    return tuple(dims)


def make_data(shape, dtype, kind, seed, blocksize=64):
    """Test data of a given `kind`: normal, zero blocks, extreme magnitudes, mixed scales."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    x = torch.randn(n, generator=g)
    if kind == "zero_blocks":
        mask = torch.rand(-(-n // blocksize), generator=g) < 0.5
        x = x * (~mask).repeat_interleave(blocksize)[:n]
    elif kind == "scales":
        x = x * torch.exp(torch.randn(n, generator=g) * 4)
    elif kind == "extreme":
        finfo = torch.finfo(dtype)
        choices = torch.tensor([finfo.max / 2, finfo.tiny, finfo.tiny * 0.01, 1e-30, 1.0, 0.0])
        pick = torch.randint(0, len(choices), (-(-n // blocksize),), generator=g)
        x = x.clamp(-1, 1) * choices[pick].repeat_interleave(blocksize)[:n]
    big = torch.finfo(dtype).max
    return x.clamp(-big, big).to(dtype).reshape(shape)  # finite in every dtype


data_kinds = st.sampled_from(("normal", "zero_blocks", "scales", "extreme"))


def without_interpreter(code: str, timeout: int = 900) -> str:
    """Run Python `code` in a subprocess without TRITON_INTERPRET (so kernels compile for a GPU target);
    its stdout. Fails the test with the subprocess's stderr if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
