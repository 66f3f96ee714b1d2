"""The LinearNF4 / LoRALinearNF4 modules (lora/modules.py): outputs, dropout modes, bitsandbytes-format
state dicts, meta-device building and loading, device moves, arguments."""

import math

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import nf4
from helpers import (
    assert_linear_within_float32,
)
from nf4.lora import (
    LinearNF4,
    LoRALinearNF4,
)


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
