"""GPU-only checks (skipped without CUDA): sizes the interpreter cannot reach."""

import pytest
import torch

import nf4
from nf4 import reference

pytestmark = pytest.mark.gpu


def test_tensor_past_2_31_elements_indexes_correctly():
    n = 2**31 + 4096 + 7  # odd, a partial last block, offsets past int32
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda", generator=g)
    q = nf4.quantize(x, 64, double_quant=False)
    start = (n - 100_000) // 128 * 128  # a block- and byte-aligned tail
    packed, absmax = reference.quantize_ref(x[start:].cpu(), 64)
    assert torch.equal(q.packed[start // 2 :].cpu(), packed)
    assert torch.equal(q.absmax[start // 64 :].cpu(), absmax)
    del x
    out = nf4.dequantize(q)
    tail = reference.dequantize_ref(packed, absmax, 64, (n - start,), torch.bfloat16)
    assert torch.equal(out[start:].cpu(), tail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_large_weight_bit_exact_with_reference(dtype):
    x = torch.randn(4096, 4100, device="cuda").to(dtype)
    q = nf4.quantize(x, 64)
    qr = nf4.quantize(x.cpu(), 64)  # CPU: the torch reference on this machine
    for name, t in q.cpu()._tensors().items():
        assert torch.equal(t, qr._tensors()[name]), name
    assert torch.equal(nf4.dequantize(q).cpu(), nf4.dequantize(qr))
