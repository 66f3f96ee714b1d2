"""The LoRA op's forward and gradients, and the LinearNF4 / LoRALinearNF4 modules."""

import copy
import importlib
import math

import bitsandbytes as bnb
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nf4
from helpers import bnb_cpu_inference, nf4_error_bound, same_bnb_entry
from nf4.lora import (
    LinearNF4,
    LoRALinearNF4,
    apply_lora,
    lora_linear,
    merge_and_unload,
    merged_weight,
    quantize_model,
)
from nf4.lora.functional import LoRALinearFunction

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reference_forward(x, q, a, b, bias, scaling, mask, keep):
    """The formula in float64 with torch autograd: the oracle for the values and all gradients."""
    w = nf4.dequantize(q, torch.float32).double()
    xd = x if mask is None else x * mask * keep
    y = x @ w.t()
    if a is not None:
        y = y + scaling * (xd @ a.t()) @ b.t()
    if bias is not None:
        y = y + bias
    return y


def run_op(x, q, a, b, bias, scaling, mask, keep):
    """The autograd function itself, with a given dropout mask (`lora_linear` draws its own)."""
    return LoRALinearFunction.apply(x, q, a, b, bias, scaling, mask, keep)


def leaf(t, device, dtype=None):
    return None if t is None else t.to(device=device, dtype=dtype or t.dtype).detach().requires_grad_(True)


def tolerance(dtype, scale):
    """Errors torch itself makes in `dtype`: a few ulps per output, growing with the reduction size."""
    return 8 * torch.finfo(dtype).eps * scale + 1e-6


def assert_linear_within_float32(y, x, w, bias=None, a=None, b=None, scaling=0.0):
    """y (float32 [M, N]) is `x @ w^T + scaling * (x @ a^T) @ b^T + bias` (w [N, K] float64: the exact
    weight) up to float32's worst-case error for its dot products and additions, about
    (K + r + 2) * eps * (|x| @ |w|^T + |scaling| * (|x| @ |a|^T) @ |b|^T + |bias|)."""
    x, w = x.detach().double().cpu(), w.detach().double().cpu()
    exact, size, r = x @ w.t(), x.abs() @ w.abs().t(), 0
    if a is not None:
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        exact = exact + scaling * (x @ a.t()) @ b.t()
        size = size + abs(scaling) * (x.abs() @ a.abs().t()) @ b.abs().t()
        r = a.shape[0]
    if bias is not None:
        bias = bias.detach().double().cpu()
        exact, size = exact + bias, size + bias.abs()
    bound = (x.shape[-1] + r + 2) * torch.finfo(torch.float32).eps * size
    err = (y.detach().double().cpu() - exact).abs()
    assert torch.all(err <= bound), err.max()


@given(
    lead=st.sampled_from([(1,), (5,), (2, 3), (2, 1, 4)]),
    n=st.integers(1, 48),
    k=st.integers(1, 100),
    r=st.sampled_from([0, 1, 4, 16]),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    dropout=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_and_gradients(kernel_device, lead, n, k, r, dtype, bias, dropout, seed):
    g = torch.Generator().manual_seed(seed)
    q = nf4.quantize(torch.randn(n, k, generator=g), 64)
    x = torch.randn(*lead, k, generator=g)
    a = torch.randn(r, k, generator=g) / math.sqrt(k) if r else None
    b = torch.randn(n, r, generator=g) if r else None
    bias_t = torch.randn(n, generator=g) if bias else None
    mask = (torch.rand(*lead, k, generator=g) > 0.25) if dropout and r else None
    keep = 1 / 0.75 if mask is not None else 1.0
    dy = torch.randn(*lead, n, generator=g)

    d = kernel_device
    xs, as_, bs, biass = leaf(x, d, dtype), leaf(a, d), leaf(b, d), leaf(bias_t, d)
    y = run_op(xs, q.to(d), as_, bs, biass, 1.5, None if mask is None else mask.to(d), keep)
    y.backward(dy.to(d, dtype))

    xr, ar, br, biasr = (
        leaf(x, "cpu", torch.float64),
        leaf(a, "cpu", torch.float64),
        leaf(b, "cpu", torch.float64),
        leaf(bias_t, "cpu", torch.float64),
    )
    yr = reference_forward(xr, q, ar, br, biasr, 1.5, mask, keep)
    yr.backward(dy.double())

    assert y.dtype == dtype and y.shape == (*lead, n)
    assert (y.cpu().double() - yr).abs().max() <= tolerance(dtype, yr.abs().max().item() + 1)
    assert (xs.grad.cpu().double() - xr.grad).abs().max() <= tolerance(dtype, xr.grad.abs().max().item() + 1)
    if r:
        # adapter gradients are computed in float32 from activations in `dtype`
        for got, want in ((as_.grad, ar.grad), (bs.grad, br.grad)):
            assert got.dtype == torch.float32
            assert (got.cpu().double() - want).abs().max() <= tolerance(dtype, want.abs().max().item() + 1) * 4
    if bias:
        assert (biass.grad.cpu().double() - biasr.grad).abs().max() <= tolerance(
            dtype, biasr.grad.abs().max().item() + 1
        )


def test_gradcheck_float64_reference_path(reference_path):
    g = torch.Generator().manual_seed(0)
    q = nf4.quantize(torch.randn(6, 10, generator=g), 32)
    x = torch.randn(3, 10, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 10, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(3, 10, generator=g) > 0.5
    assert torch.autograd.gradcheck(lambda x, a, b, bias: run_op(x, q, a, b, bias, 0.7, mask, 2.0), (x, a, b, bias))
    assert torch.autograd.gradcheck(lambda x, bias: run_op(x, q, None, None, bias, 1.0, None, 1.0), (x, bias))


def test_weight_gets_no_gradient_and_no_dequantized_copy_is_saved(reference_path):
    layer = LoRALinearNF4.from_linear(nn.Linear(64, 32), r=4)
    x = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        y = layer(x)
    assert not any(t.dtype.is_floating_point and t.shape == (32, 64) for t in saved)
    y.sum().backward()
    assert all(not b.requires_grad for b in layer.buffers())


# -- modules ----------------------------------------------------------------------------------------


def test_fresh_adapter_leaves_output_unchanged(kernel_device):
    linear = nn.Linear(96, 40).to(kernel_device)
    base = LinearNF4.from_linear(linear)
    lora = LoRALinearNF4.from_linear(linear, r=8, lora_alpha=16)
    x = torch.randn(2, 7, 96, device=kernel_device)
    assert torch.equal(base(x), lora(x))
    assert torch.equal(lora.lora_B, torch.zeros(40, 8, device=kernel_device))
    bound = 1 / math.sqrt(96)  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.std() > bound / 3
    assert lora.scaling == 2.0
    assert LoRALinearNF4.from_linear(linear, r=16, lora_alpha=8, use_rslora=True).scaling == 2.0


def test_linear_nf4_matches_dequantized_linear(kernel_device):
    linear = nn.Linear(130, 33)
    layer = LinearNF4.from_linear(linear).to(kernel_device)
    x = torch.randn(4, 130)
    w = nf4.dequantize(nf4.quantize(linear.weight.detach()))
    assert_linear_within_float32(layer(x.to(kernel_device)), x, w.double(), linear.bias)


def test_dropout_in_train_mode_only(reference_path):
    layer = LoRALinearNF4.from_linear(nn.Linear(32, 16), r=4, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(64, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(a, layer(x))
    with torch.no_grad():
        assert layer(x).requires_grad is False


def test_dropout_keeps_with_probability_1_minus_p_and_rescales_by_its_inverse(kernel_device):
    """Training mode with lora_dropout p: the adapter's input is x * keep / (1 - p), keep ~ U[0, 1) >= p
    drawn from torch's generator (PEFT's nn.Dropout semantics); reproduced here from the same seed, the
    output and the adapter's gradients match the float64 formula."""
    p = 0.25
    layer = trained_layer(48, 24, use_rslora=False).to(kernel_device).train()
    layer.lora_dropout = p
    x = torch.randn(6, 48, device=kernel_device)
    torch.manual_seed(7)
    y = layer(x)
    y.square().sum().backward()
    torch.manual_seed(7)
    keep = (torch.rand(x.shape, device=kernel_device) >= p).cpu()
    assert 0 < keep.float().mean() < 1
    a, b = (leaf(t, "cpu", torch.float64) for t in (layer.lora_A, layer.lora_B))
    bias = layer.bias.cpu().double()
    exact = reference_forward(x.cpu().double(), layer.nf4_weight.cpu(), a, b, bias, 1.5, keep, 1 / (1 - p))
    exact.square().sum().backward()
    assert (y.detach().cpu().double() - exact).abs().max() <= tolerance(torch.float32, exact.abs().max().item() + 1)
    for got, want in ((layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)):
        assert (got.cpu().double() - want).abs().max() <= tolerance(torch.float32, want.abs().max().item() + 1) * 4


def peft_scaling(r, lora_alpha, use_rslora):
    """PEFT's scaling, from its definition (not from the layer): alpha / r, or alpha / sqrt(r) (rsLoRA)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def trained_layer(in_features, out_features, use_rslora, double_quant=True, std=0.5, seed=0):
    """A LoRALinearNF4 with r = 4, lora_alpha = 6 (scaling 1.5, or 3 with rsLoRA) and a non-zero lora_B."""
    torch.manual_seed(seed)
    layer = LoRALinearNF4.from_linear(
        nn.Linear(in_features, out_features), r=4, lora_alpha=6, use_rslora=use_rslora, double_quant=double_quant
    )
    nn.init.normal_(layer.lora_B, std=std)
    return layer


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_every_16_bit_merge_path_uses_the_layers_scaling(reference_path, use_rslora):
    """`delta_weight`, `merged_weight` and `merge_and_unload` fold in the scaling the forward uses
    (lora_alpha / sqrt(r) with rsLoRA): the exported nn.Linear and the layer both compute the float64
    formula within float32's worst-case accumulation error (gamma_n = n * eps / 2 per term)."""
    import copy

    layer = trained_layer(64, 48, use_rslora)
    scaling = peft_scaling(4, 6, use_rslora)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    w = nf4.dequantize(layer.nf4_weight, torch.float32)
    assert layer.scaling == scaling
    assert torch.equal(layer.delta_weight(), scaling * (b @ a))
    assert torch.equal(merged_weight(layer), w + scaling * (b @ a))
    exported = merge_and_unload(nn.Sequential(copy.deepcopy(layer)))[0]
    assert type(exported) is nn.Linear and torch.equal(exported.weight, w + scaling * (b @ a))

    x = torch.randn(5, 64)
    with torch.no_grad():
        for y in (layer(x), exported(x)):
            assert_linear_within_float32(y, x, w.double() + scaling * b.double() @ a.double(), layer.bias)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_merge_into_nf4_requantizes_base_plus_update(reference_path, use_rslora, double_quant):
    """`merge()` stores quantize(dequant(W) + scaling * B @ A), byte for byte (rsLoRA's scaling
    included): within the format's error bound of the intended weight (`helpers.nf4_error_bound`) and,
    for an update that moves codes, closer to it than the base alone. The reported norms are those of
    the weights; `unmerge()` restores the base bytes."""
    layer = trained_layer(256, 96, use_rslora, double_quant, std=0.05)
    base_q = layer.nf4_weight
    base = nf4.dequantize(base_q, torch.float32)
    delta = peft_scaling(4, 6, use_rslora) * (layer.lora_B.detach() @ layer.lora_A.detach())
    target = base + delta
    stats = layer.merge()
    expect = nf4.quantize(target, 64, double_quant)
    for name, t in expect._tensors().items():
        assert torch.equal(getattr(layer.nf4_weight, name), t), name
    merged = nf4.dequantize(layer.nf4_weight, torch.float32)
    error = merged - target
    assert torch.all(error.abs().double() <= nf4_error_bound(target, 64, double_quant))
    assert error.norm() < delta.norm()  # the base alone is off by the whole update (measured ~0.45 of it)
    assert stats["update_norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
    assert stats["error_norm"] == pytest.approx(float(error.norm()), rel=1e-6)
    assert stats["update_lost"] == pytest.approx(float(error.norm() / delta.norm()), rel=1e-6)
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert_linear_within_float32(layer(x), x, merged.double(), layer.bias)  # the adapter is not added again
        layer.unmerge()
    for name, t in base_q._tensors().items():
        assert torch.equal(getattr(layer.nf4_weight, name), t), name


def test_state_dict_round_trip_and_bitsandbytes_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = LoRALinearNF4.from_linear(nn.Linear(64, 48), r=4, blocksize=32)
    nn.init.normal_(layer.lora_B)
    sd = layer.state_dict()
    assert set(sd) == {
        "bias",
        "lora_A",
        "lora_B",
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    }
    save_file(sd, tmp_path / "layer.safetensors")
    fresh = LoRALinearNF4(64, 48, r=4)
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x)) and fresh.nf4_weight.blocksize == 32


def test_state_dict_loads_into_bitsandbytes_and_back():
    linear = nn.Linear(128, 64)
    ours = LinearNF4.from_linear(linear)
    theirs = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")
    # bitsandbytes' checkpoint into ours
    loaded = LinearNF4(128, 64)
    loaded.load_state_dict(theirs.state_dict())
    assert torch.equal(loaded.nf4_weight.packed, ours.nf4_weight.packed)
    x = torch.randn(5, 128)
    w = nf4.dequantize(ours.nf4_weight, torch.float32).double()
    for y in (loaded(x), theirs(x)):
        assert_linear_within_float32(y, x, w, linear.bias)
    # ours into bitsandbytes (the way transformers loads a pre-quantized 4-bit checkpoint)
    sd = ours.state_dict()
    back = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compute_dtype=torch.float32)
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    back.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=back)
    back.bias = nn.Parameter(sd["bias"])
    for y in (back(x), ours(x)):
        assert_linear_within_float32(y, x, w, linear.bias)


def test_load_refuses_a_mismatched_checkpoint():
    sd = LinearNF4.from_linear(nn.Linear(64, 48)).state_dict()
    with pytest.raises(RuntimeError, match=r"weight has shape \[48, 64\], this module expects \[32, 64\]"):
        LinearNF4(64, 32, bias=False).load_state_dict({k: v for k, v in sd.items() if k != "bias"})
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match=r"weight.absmax: expected uint8 \[48\]"):
        LinearNF4(64, 48).load_state_dict(sd)
    missing = LinearNF4(64, 48).load_state_dict({"bias": torch.zeros(48)}, strict=False)
    assert missing.missing_keys == ["weight"]


def test_casts_and_moves_never_touch_the_format():
    layer = LoRALinearNF4.from_linear(nn.Linear(64, 32), r=4, double_quant=False)
    before = {k: v.clone() for k, v in layer.nf4_weight.to_bnb_state_dict().items()}
    layer.half()
    assert layer.lora_A.dtype == torch.float16 and layer.nf4_weight.absmax.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in layer.nf4_weight.to_bnb_state_dict().items())
    layer.to(torch.bfloat16).to("cpu").float()
    assert all(torch.equal(before[k], v) for k, v in layer.nf4_weight.to_bnb_state_dict().items())
    assert layer.to("meta").weight.device.type == "meta"


def _build(cls, double_quant, **kwargs):
    extra = dict(r=4) if cls is LoRALinearNF4 else {}
    return cls(64, 48, double_quant=double_quant, **extra, **kwargs)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("cls", [LinearNF4, LoRALinearNF4], ids=["base", "lora"])
def test_builds_on_meta_under_any_default_dtype_then_loads(cls, double_quant):
    """How loaders build a model (transformers: on meta, under the load dtype), then fill it in."""
    torch.manual_seed(0)
    src = _build(cls, double_quant)
    src.load_state_dict(LinearNF4.from_linear(nn.Linear(64, 48), double_quant=double_quant).state_dict(), strict=False)
    if cls is LoRALinearNF4:
        nn.init.normal_(src.lora_B)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            layer = _build(cls, double_quant)
    finally:
        torch.set_default_dtype(default)
    assert layer.weight.device.type == "meta" and layer.nf4_weight.dtype == torch.bfloat16
    assert layer.bias.dtype == torch.bfloat16 and layer.nf4_weight.code.dtype == torch.float32
    adapter = {"lora_A", "lora_B"} if cls is LoRALinearNF4 else set()
    meta_sd = layer.state_dict()  # no values for a quant state on meta: the weight a loader should bring
    assert set(meta_sd) == {"weight", "bias"} | adapter
    assert meta_sd["weight"].shape == (48, 64) and meta_sd["weight"].dtype == torch.bfloat16
    layer.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(3, 64)
    assert layer.weight.device.type == "cpu" and torch.equal(layer(x), src(x))
    assert set(layer.state_dict()) == set(src.state_dict())
    with torch.device("meta"):
        empty = _build(cls, double_quant)
    empty.to_empty(device="cpu")
    assert all(t.device.type == "cpu" for t in (*empty.parameters(), *empty.buffers()))
    empty.load_state_dict(src.state_dict())
    assert torch.equal(empty(x), src(x))


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_load_state_dict_copies_in_place_and_moves_keep_the_parameters(double_quant):
    """Like nn.Module: loading a state dict of the same layout copies into the existing parameters (an
    optimizer or FSDP2 holds them), and a cast or a move to the same device leaves them as they are."""
    layer = LoRALinearNF4(64, 48, r=4, double_quant=double_quant)
    other = LoRALinearNF4.from_linear(nn.Linear(64, 48), r=4, double_quant=double_quant)
    params = dict(layer.named_parameters())
    layer.load_state_dict(other.state_dict())
    assert all(p is params[n] for n, p in layer.named_parameters())
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), other(x))
    layer.half().to("cpu").float()
    assert layer.weight is params["weight"] and layer.weight_absmax is params["weight_absmax"]
    other32 = LoRALinearNF4.from_linear(nn.Linear(64, 48), r=4, blocksize=32, double_quant=double_quant)
    layer.load_state_dict(other32.state_dict())  # another layout: the pieces are replaced
    assert layer.nf4_weight.blocksize == 32 and torch.equal(layer(x), other32(x))


def test_nothing_lives_in_non_persistent_buffers():
    """transformers replaces every non-persistent buffer by `torch.empty_like` after loading: the weight
    must survive that."""
    layer = LoRALinearNF4.from_linear(nn.Linear(64, 48), r=4)
    x = torch.randn(3, 64)
    before = layer(x)
    assert not layer._non_persistent_buffers_set
    for name in list(layer._non_persistent_buffers_set):  # what transformers does after loading
        setattr(layer, name, torch.empty_like(getattr(layer, name)))
    assert torch.equal(layer(x), before)
    assert {n for n, _ in layer.named_parameters()} == {"weight", "weight_absmax", "bias", "lora_A", "lora_B"}
    assert not any(p.requires_grad for n, p in layer.named_parameters() if not n.startswith("lora_"))


@pytest.mark.gpu
def test_cuda_move_without_requantizing():
    layer = LoRALinearNF4.from_linear(nn.Linear(64, 32), r=4)
    packed = layer.weight.clone()
    layer.cuda()
    assert layer.weight.is_cuda and torch.equal(layer.weight.cpu(), packed)
    assert layer(torch.randn(2, 64, device="cuda")).is_cuda


def test_repr_and_weight_view():
    layer = LoRALinearNF4.from_linear(nn.Linear(64, 32, dtype=torch.bfloat16), r=4, lora_alpha=8)
    text = repr(layer)
    assert "in_features=64, out_features=32, bias=True, blocksize=64, double_quant=True, dtype=bfloat16" in text
    assert "r=4, lora_alpha=8, scaling=2, lora_dropout=0.0, use_rslora=False" in text
    assert layer.nf4_weight.shape == (32, 64) and layer.nf4_weight.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (32 * 64 // 2, 1)  # bitsandbytes' bytes
    assert layer.dequantize_weight().dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(r=0), ValueError, "r must be a positive int"),
        (dict(r=2.5), ValueError, "r must be a positive int"),
        (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoRALinearNF4.from_linear(nn.Linear(8, 8), **kwargs)


def test_bad_input():
    layer = LinearNF4.from_linear(nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"expected input \[\.\.\., 16\], got \[3, 15\]"):
        layer(torch.randn(3, 15))
    with pytest.raises(TypeError, match="expected a floating-point input"):
        layer(torch.ones(3, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="from_linear expects an nn.Linear"):
        LinearNF4.from_linear(nn.Conv1d(1, 1, 1))


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("x", ValueError, r"expected input \[\.\.\., 40\], got \[3, 39\] \(the weight is \[12, 40\]\)"),
        ("lora_A", ValueError, r"expected lora_A \[r, 40\] and lora_B \[12, r\], got \[2, 39\] and \[12, 2\]"),
        ("lora_B", ValueError, r"expected lora_A \[r, 40\] and lora_B \[12, r\], got \[2, 40\] and \[12, 3\]"),
        ("one_of_two", ValueError, "pass lora_A and lora_B together"),
        ("bias", ValueError, r"expected bias \[12\], got \[13\]"),
        ("weight", TypeError, "weight must be an NF4Tensor"),
    ],
)
def test_functional_bad_input_names_the_argument(case, error, message):
    q = nf4.quantize(torch.randn(12, 40))
    args = dict(x=torch.randn(3, 40), weight=q, lora_A=torch.randn(2, 40), lora_B=torch.randn(12, 2))
    args.update(
        {
            "x": dict(x=torch.randn(3, 39)),
            "lora_A": dict(lora_A=torch.randn(2, 39)),
            "lora_B": dict(lora_B=torch.randn(12, 3)),
            "one_of_two": dict(lora_B=None),
            "bias": dict(bias=torch.randn(13)),
            "weight": dict(weight=torch.randn(12, 40)),
        }[case]
    )
    with pytest.raises(error, match=message):
        lora_linear(**args)


def test_functional_api(kernel_device):
    q = nf4.quantize(torch.randn(12, 40)).to(kernel_device)
    x = torch.randn(3, 40, device=kernel_device)
    a, b = torch.randn(2, 40, device=kernel_device), torch.randn(12, 2, device=kernel_device)
    y = lora_linear(x, q, a, b, scaling=0.5)
    assert_linear_within_float32(y, x, nf4.dequantize(q).double(), None, a, b, scaling=0.5)


class _SeenOps(TorchDispatchMode):
    """Records the ops that reach the dispatcher's Python modes (and runs them unchanged)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("m", [1, 40], ids=["decode", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_calls_match_the_custom_ops(kernel_device, monkeypatch, m, dtype):
    """Plain eager calls run the op's body directly (no dispatcher wrapping: `nf4.lora.ops.eager`); with a
    dispatch mode active (what fake tensors, make_fx and export use) the same calls go through the
    `nf4::matmul` custom op. Both give bit-identical outputs and gradients."""
    torch.manual_seed(0)
    layer = LoRALinearNF4.from_linear(nn.Linear(96, 80, dtype=dtype), r=8).to(kernel_device)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(m, 96, dtype=dtype, device=kernel_device)

    def run():
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.float().square().sum().backward()
        with torch.no_grad():
            y_inference = layer(x)
        return y, y_inference, xg.grad, layer.lora_A.grad, layer.lora_B.grad

    def not_called(*args, **kwargs):
        raise AssertionError("a plain eager call went through the custom op")

    with monkeypatch.context() as patch:
        patch.setattr(torch.ops.nf4, "matmul", not_called)
        direct = run()
    mode = _SeenOps()
    with mode:
        through_ops = run()
    assert "nf4.matmul" in mode.ops, mode.ops
    for a, b in zip(direct, through_ops, strict=True):
        assert torch.equal(a, b)


def test_inference_leaves_the_adapter_product_to_the_decode_kernel(kernel_device, monkeypatch):
    """An eager no-grad call at M <= 16 with 16-bit x hands lora_A itself (float32, not cast) to the decode
    kernel, which computes x @ A^T in its streaming pass: no separate GEMV or cast per call."""
    from nf4.kernels import gemv

    seen = []
    launch = gemv.launch

    def recording(*args, **kwargs):
        seen.append(args[7] if len(args) > 7 else kwargs.get("a"))
        return launch(*args, **kwargs)

    monkeypatch.setattr(gemv, "launch", recording)
    torch.manual_seed(0)
    layer = LoRALinearNF4.from_linear(nn.Linear(128, 96, dtype=torch.bfloat16), r=8).to(kernel_device)
    nn.init.normal_(layer.lora_B, std=0.5)
    x = torch.randn(3, 128, dtype=torch.bfloat16, device=kernel_device)
    with torch.no_grad():
        y = layer(x)
    assert len(seen) == 1 and seen[0] is layer.lora_A
    q = layer.nf4_weight
    exact = reference_forward(x.double(), q, layer.lora_A.double(), layer.lora_B.double(), layer.bias.double(),
                              layer.scaling, None, 1.0)  # fmt: skip
    assert (y.double() - exact).abs().max() <= 4 * torch.finfo(torch.bfloat16).eps * exact.abs().max()


def test_dropout_applies_in_training_mode_without_a_gradient(kernel_device):
    """Training mode under no_grad (no xa needed) still drops the adapter's input; eval mode does not."""
    torch.manual_seed(0)
    layer = LoRALinearNF4.from_linear(nn.Linear(64, 32), r=8, lora_dropout=0.5).to(kernel_device)
    nn.init.normal_(layer.lora_B, std=1.0)
    x = torch.randn(4, 64, device=kernel_device)
    with torch.no_grad():
        layer.eval()
        clean = layer(x)
        layer.train()
        dropped = [layer(x) for _ in range(2)]
    assert not torch.equal(dropped[0], clean) and not torch.equal(dropped[0], dropped[1])


def _in_place(y):
    y += 1
    return nn.functional.relu(y, inplace=True)


def _out_of_place(y):
    return nn.functional.relu(y + 1)


@pytest.mark.parametrize("path", ["eager", "op", "compiled"])
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("cls", [LinearNF4, LoRALinearNF4], ids=["base", "lora"])
def test_output_can_be_modified_in_place_like_nn_linear(kernel_device, cls, lead, path):
    """`y = layer(x); y += 1; relu_(y)` gives nn.Linear's semantics: the same values and gradients as the
    out-of-place version (the output was a view of the matmul's result, which autograd refuses to modify
    in place under a custom Function). "op" calls `LoRALinearFunction` itself, "compiled" runs the in-place
    ops inside `torch.compile`."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(64, 32)).to(kernel_device)
    if cls is LoRALinearNF4:
        nn.init.normal_(layer.lora_B, std=0.1)
    lora = (layer.lora_A, layer.lora_B) if cls is LoRALinearNF4 else (None, None)

    def forward(x):
        if path == "op":
            return run_op(x, layer.nf4_weight, *lora, layer.bias, 1.0, None, 1.0)
        return layer(x)

    weights = torch.arange(32.0, device=kernel_device)  # a gradient that differs per output
    x0 = torch.randn(*lead, 64, device=kernel_device)
    results = []
    for then in (_out_of_place, _in_place):
        fn = lambda x, then=then: then(forward(x))  # noqa: E731
        if path == "compiled":
            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
        layer.zero_grad()
        x = x0.clone().requires_grad_(True)
        y = fn(x)
        (y * weights).sum().backward()
        grads = [x.grad] + ([layer.lora_A.grad, layer.lora_B.grad] if cls is LoRALinearNF4 else [])
        results.append([y.detach(), *grads])
    assert (results[0][0] == 0).any() and (results[0][0] > 0).any()  # relu clips some outputs
    for expected, got in zip(*results, strict=True):
        assert torch.equal(got, expected)
    with torch.no_grad():  # without autograd too
        y = forward(x0)
        expected = _out_of_place(y.clone())
        assert torch.equal(_in_place(y), expected)


def _bnb_bf16_model():
    """Two bitsandbytes NF4 layers holding bf16 weights (as transformers loads a bf16 4-bit model), after
    a CPU inference pass: their state has nested_dtype "bfloat16" (`helpers.bnb_cpu_inference`)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).to(torch.bfloat16)
    for i in (0, 2):
        linear = model[i]
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, False, quant_type="nf4", module=layer)
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        model[i] = layer
    model = model.to("cpu")  # bitsandbytes quantizes here
    bnb_cpu_inference(model, torch.randn(2, 128, dtype=torch.bfloat16))
    return model


@pytest.mark.parametrize("convert", ["apply_lora", "quantize_model", "peft"])
def test_converts_a_bitsandbytes_model_after_cpu_inference(convert):
    """apply_lora / quantize_model take a bitsandbytes model (plain or under PEFT) whose layers ran a CPU
    inference pass: each layer keeps bitsandbytes' bytes as stored (nested_dtype "bfloat16") and computes
    with bitsandbytes' dequantized weight."""
    model = _bnb_bf16_model()
    expected = {}
    for name, layer in model.named_children():
        if isinstance(layer, bnb.nn.Linear4bit):
            sd = layer.state_dict()  # undoes the repacking, in the layer too
            assert b'"nested_dtype": "bfloat16"' in bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist())
            state = layer.weight.quant_state
            w = bnb.functional.dequantize_4bit(layer.weight.data, state, quant_type="nf4")
            state.dtype = torch.float32  # the same absmax; what nf4's matmul multiplies by (float32 products)
            w32 = bnb.functional.dequantize_4bit(layer.weight.data, state, quant_type="nf4")
            state.dtype = torch.bfloat16
            expected[name] = sd, w, w32
    if convert == "peft":
        import peft

        importlib.import_module("nf4.hf")  # nf4's PEFT layers
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0", "2"]))
        bnb_cpu_inference(model, torch.randn(2, 128, dtype=torch.bfloat16))  # PEFT's forward repacks too
        apply_lora(model)
        layers = {name: model.base_model.model.get_submodule(name).base_layer for name in expected}
    else:
        {"apply_lora": apply_lora, "quantize_model": quantize_model}[convert](model)
        layers = {name: model.get_submodule(name) for name in expected}
    for name, layer in layers.items():
        assert type(layer) is (LoRALinearNF4 if convert == "apply_lora" else LinearNF4)
        sd, w, w32 = expected[name]
        assert layer.nf4_weight.nested_dtype == torch.bfloat16
        assert torch.equal(layer.dequantize_weight(), w)
        assert torch.equal(layer.dequantize_weight(torch.float32), w32)
        mine = layer.state_dict()
        assert all(same_bnb_entry(k, mine[k], v) for k, v in sd.items())
        x = torch.randn(3, layer.in_features)
        assert_linear_within_float32(layer(x), x, w32.double(), layer.bias)


def _mlp():
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False))


@pytest.mark.parametrize("load", ["assign", "to_empty"])
@pytest.mark.parametrize("convert", ["apply_lora", "quantize_model"])
def test_converts_a_meta_model_and_quantizes_the_weights_when_they_arrive(reference_path, convert, load):
    """A model built on the meta device (how FSDP2 recipes build big models) converts without values; the
    16-bit checkpoint's weights are quantized as they load (into the meta layers with `assign=True`, or
    into the layers `to_empty` materialized): the same bytes as converting the loaded model."""
    torch.manual_seed(0)
    src = _mlp()
    kwargs = dict(r=4, lora_alpha=8) if convert == "apply_lora" else {}
    fn = {"apply_lora": apply_lora, "quantize_model": quantize_model}[convert]
    expected = fn(copy.deepcopy(src), **kwargs)
    with torch.device("meta"):
        model = _mlp()
    fn(model, **kwargs)
    assert type(model[0]) is type(expected[0]) and model[0].weight.device.type == "meta"
    assert model.state_dict()["0.weight"].shape == (48, 64)  # what a loader should bring: the 16-bit weight
    if load == "to_empty":
        model.to_empty(device="cpu")
    missing = model.load_state_dict(src.state_dict(), strict=False, assign=load == "assign").missing_keys
    assert sorted(missing) == ([] if convert == "quantize_model" else ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"])
    got, want = model.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want if "lora_" not in k)
    if convert == "apply_lora":
        assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_a_weight_of_another_shape_is_refused_on_arrival():
    with torch.device("meta"):
        model = quantize_model(_mlp())
    sd = {**_mlp().state_dict(), "0.weight": torch.zeros(48, 63)}
    with pytest.raises(
        RuntimeError, match=r"0.weight: the checkpoint's weight has shape \[48, 63\], this module expects \[48, 64\]"
    ):
        model.load_state_dict(sd, assign=True)
