"""Model conversion (`nf4.lora.apply_lora`, `quantize_model`, nf4/lora/convert.py): which layers convert
(PEFT's suffix rule on whole name components), the bytes they get, the flags they keep (training mode,
requires_grad), and the bitsandbytes and PEFT paths. Outputs are compared with `x @ dequant(W)^T + b`
computed here in float64: float32 sums over K = 64 at the output's scale."""

import copy
import datetime
import importlib

import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn

import nf4
from helpers import assert_linear_within_float32, bnb_cpu_inference, same_bnb_entry
from nf4.hf.peft import PeftLinearNF4
from nf4.lora import LinearNF4, LoRALinearNF4, apply_lora, quantize_model
from nf4.lora.convert import bnb_weight, from_bnb

K = 64


@pytest.fixture(autouse=True)
def _reference(reference_path):
    """The torch path on the CPU (the kernels are tested against it elsewhere)."""


def stack(n=12, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(K, K) for _ in range(n)])


def close(a, b):
    return (a - b).abs().max() <= 2 * K * torch.finfo(torch.float32).eps * b.abs().max() + 1e-6


def same_bytes(q, r):
    a, b = q.to_bnb_state_dict(), r.to_bnb_state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def converted(model, cls=LinearNF4):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def test_target_names_match_whole_components_only():
    model = stack()
    apply_lora(model, target_modules=["0"])
    assert converted(model) == ["0"] and type(model[10]) is nn.Linear
    model = stack()
    quantize_model(model, target_modules="1")  # a string is one name, not its characters
    assert converted(model) == ["1"] and type(model[11]) is nn.Linear
    nested = nn.Module()
    nested.enc = nn.Module()
    nested.enc.query, nested.enc.xquery, nested.query_proj = nn.Linear(K, K), nn.Linear(K, K), nn.Linear(K, K)
    apply_lora(nested, target_modules=["query"])
    assert converted(nested) == ["enc.query"]
    with pytest.raises(ValueError, match=r"matches target_modules=\['nope'\]; linear layers here: \['0', '1'"):
        apply_lora(stack(), target_modules=["nope"])


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, False)])
def test_every_linear_converts_to_the_bytes_nf4_quantize_gives(blocksize, double_quant):
    model = stack(3)
    weights = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in model]
    quantize_model(model, blocksize=blocksize, double_quant=double_quant)
    assert converted(model) == ["0", "1", "2"] and not converted(model, LoRALinearNF4)
    x = torch.randn(5, K)
    for layer, (w, b) in zip(model, weights, strict=True):
        q = nf4.quantize(w, blocksize, double_quant)
        assert same_bytes(layer.nf4_weight, q) and torch.equal(layer.bias, b)
        assert layer.nf4_meta.blocksize == blocksize and layer.nf4_meta.double_quant == double_quant
        want = (x.double() @ nf4.dequantize(q).double().T + b.double()).float()
        assert close(layer(x), want)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("rslora", [False, True])
def test_apply_lora_passes_its_adapter_settings(rslora):
    model = stack(2)
    apply_lora(model, r=4, lora_alpha=12, lora_dropout=0.25, use_rslora=rslora, target_modules=["1"])
    layer = model[1]
    assert isinstance(layer, LoRALinearNF4) and type(model[0]) is nn.Linear
    assert layer.r == 4 and layer.lora_A.shape == (4, K) and layer.lora_B.shape == (K, 4)
    assert layer.scaling == (12 / 2 if rslora else 12 / 4) and layer.lora_dropout == 0.25
    assert not torch.any(layer.lora_B)  # PEFT's init: the adapter starts as a no-op


def test_only_adapters_train_and_earlier_adapters_keep_their_flag():
    model = nn.Sequential(nn.Linear(K, K), nn.LayerNorm(K), nn.Linear(K, K), nn.Linear(K, K))
    apply_lora(model, target_modules=["0"])
    model[0].lora_B.requires_grad_(False)  # the user froze half of the first adapter
    apply_lora(model, target_modules=["2"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "2.lora_A", "2.lora_B"]
    assert type(model[3]) is nn.Linear and not model[3].weight.requires_grad  # frozen, not converted


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conversion_keeps_each_layers_training_mode(mode):
    model = stack(2)
    getattr(model, mode)()
    apply_lora(model, lora_dropout=0.5, target_modules=["0"])
    quantize_model(model, target_modules=["1"])
    assert [m.training for m in model] == [mode == "train"] * 2
    if mode == "eval":  # dropout off: the output is deterministic
        torch.nn.init.normal_(model[0].lora_B)
        x = torch.randn(4, K)
        assert torch.equal(model(x), model(x))
    layer = bnb.nn.Linear4bit(K, K, quant_type="nf4").to("cpu")
    getattr(layer, mode)()
    assert from_bnb(layer, "x").training == (mode == "train")


def bnb_model(quant_type="nf4", head=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        bnb.nn.Linear4bit(K, K, quant_type=quant_type, compute_dtype=torch.float32),
        bnb.nn.Linear4bit(K, K, bias=False, quant_type=quant_type, compress_statistics=False),
    )
    if head:
        model.append(nn.Linear(K, 16))
    return model


def test_bitsandbytes_layers_keep_their_bytes_and_the_head_stays_unless_named():
    model = bnb_model().to("cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_model(model)
    assert converted(model) == ["0", "1"] and type(model[2]) is nn.Linear
    after = model.state_dict()
    assert set(after) == set(before) and all(same_bnb_entry(k, after[k], before[k]) for k in before)
    assert model[0].nf4_meta.double_quant and not model[1].nf4_meta.double_quant and model[1].bias is None
    assert torch.equal(model[0].bias, before["0.bias"]) and not any(p.requires_grad for p in model.parameters())
    adapted = apply_lora(bnb_model().to("cpu"), r=2)
    assert sorted(n for n, p in adapted.named_parameters() if p.requires_grad) == [
        "0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B"
    ]  # fmt: skip
    named = bnb_model().to("cpu")
    quantize_model(named, target_modules=["0", "2"])
    assert converted(named) == ["0", "2"] and isinstance(named[1], bnb.nn.Linear4bit)


def test_a_bitsandbytes_layer_not_yet_quantized_is_quantized_as_bitsandbytes_would():
    model = bnb_model(head=False)  # on no device yet: 16-bit weights, no quant state
    model[1].weight.blocksize = 128  # Params4bit's own setting, read before quantizing
    weights = [m.weight.detach().clone() for m in model]
    mine = [bnb_weight(m, str(i)) for i, m in enumerate(model)]
    theirs = [bnb_weight(m, str(i)) for i, m in enumerate(model.to("cpu"))]  # quantized by bitsandbytes
    for w, a, b, dq, blocksize in zip(weights, mine, theirs, (True, False), (64, 128), strict=True):
        assert same_bytes(a, nf4.quantize(w, blocksize, dq))
        # bitsandbytes' codes and absmax; its nested offset (a mean) may differ in the last float32 bit
        a, b = a.to_bnb_state_dict(), b.to_bnb_state_dict()
        assert all(torch.equal(a[k], b[k]) for k in ("weight", "weight.absmax"))


def test_fp4_layers_are_refused_by_name():
    with pytest.raises(ValueError, match=r"^0: bitsandbytes' Linear4bit with quant_type='fp4'"):
        quantize_model(bnb_model("fp4"))
    with pytest.raises(ValueError, match=r"^0: .*"):
        quantize_model(bnb_model("fp4").to("cpu"))


def test_peft_model_converts_its_lora_layers_keeping_the_adapters_and_its_linear_layers():
    model = stack(3)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.eval()
    adapters = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    x = torch.randn(3, K)
    expect = pm(x)
    weights = {i: model[i].base_layer.weight.detach().clone() for i in (0, 1)}
    quantize_model(pm)
    inner = pm.base_model.model
    assert all(isinstance(inner[i], PeftLinearNF4) for i in (0, 1)) and type(inner[2]) is nn.Linear
    assert {n: p for n, p in pm.named_parameters() if "lora_" in n} == adapters  # the same Parameter objects
    assert all(p.requires_grad for p in adapters.values()) and not inner[2].weight.requires_grad
    assert not inner[0].training  # kept from the PEFT layer
    for i in (0, 1):
        assert same_bytes(inner[i].base_layer.nf4_weight, nf4.quantize(weights[i]))
    # the update is small against W: the outputs differ from the 16-bit model's by the NF4 rounding only
    assert (pm(x) - expect).abs().max() < 0.1 * expect.abs().max()


@pytest.mark.parametrize("convert", [apply_lora, quantize_model])
def test_a_model_that_is_itself_a_linear_is_refused_untouched(convert):
    """The root cannot be replaced in place: a clear error, not a child named "" added to the Linear."""
    model = nn.Linear(K, K)
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"the model itself is a Linear.*LinearNF4.from_linear"):
        convert(model)
    assert dict(model.named_modules()) == before and model.weight.requires_grad


def test_a_peft_model_without_nf4_hf_names_the_import(monkeypatch):
    """The PEFT layer's converter lives in nf4.hf (registered on import): without it, a PEFT model is
    refused before anything is frozen or replaced."""
    import nf4.lora.convert as convert_module

    model = peft.get_peft_model(nn.Sequential(nn.Linear(K, K)), peft.LoraConfig(r=2, target_modules=["0"]))
    monkeypatch.setattr(convert_module, "_peft_converter", None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match=r"import nf4.hf"):
        apply_lora(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert type(model.base_model.model[0].base_layer) is nn.Linear


def test_a_wrapper_with_a_base_layer_but_no_adapter_is_not_a_peft_layer():
    class Wrapper(nn.Module):  # e.g. a custom hook module around a Linear, not PEFT's LoRA layer
        def __init__(self):
            super().__init__()
            self.base_layer = nn.Linear(K, K)

        def forward(self, x):
            return self.base_layer(x)

    model = nn.Sequential(Wrapper(), nn.Linear(K, K))
    apply_lora(model, r=2)
    assert converted(model, LoRALinearNF4) == ["0.base_layer", "1"] and type(model[0]) is Wrapper


def test_a_peft_models_linear_layers_stay_even_when_named():
    pm = peft.get_peft_model(stack(3), peft.LoraConfig(r=2, target_modules=["0"]))
    quantize_model(pm, target_modules=["0", "2"])
    inner = pm.base_model.model
    assert isinstance(inner[0], PeftLinearNF4) and type(inner[1]) is nn.Linear and type(inner[2]) is nn.Linear


def test_defaults_return_value_and_progress(capsys):
    model = stack(2)
    assert apply_lora(model, target_modules=["0"], progress=True) is model
    layer = model[0]
    assert (layer.r, layer.scaling, layer.lora_dropout, layer.use_rslora) == (16, 1.0, 0.0, False)
    assert (layer.nf4_meta.blocksize, layer.nf4_meta.double_quant) == (64, True)
    assert quantize_model(model, progress=True) is model
    assert (model[1].nf4_meta.blocksize, model[1].nf4_meta.double_quant) == (64, True)
    err = capsys.readouterr().err
    assert "apply_lora [" + "#" * 30 + "] 1/1" in err and "quantize_model [" + "#" * 30 + "] 1/1" in err


def test_a_peft_model_on_bitsandbytes_gets_adapters_from_peft_only():
    pm = peft.get_peft_model(bnb_model().to("cpu"), peft.LoraConfig(r=2, target_modules=["0"]))
    apply_lora(pm, r=8)
    inner = pm.base_model.model
    assert isinstance(inner[0], PeftLinearNF4) and inner[0].r["default"] == 2
    assert type(inner[1]) is LinearNF4 and type(inner[2]) is nn.Linear  # no adapter of apply_lora's own


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


def test_a_meta_model_keeps_the_asked_format_the_dtype_and_the_mode(reference_path):
    """On the meta device the layers are built with the blocksize and double quantization asked for, the
    original weight's dtype and the layer's train/eval mode; the bytes then match converting the loaded
    model with the same settings."""
    torch.manual_seed(0)
    src = _mlp().to(torch.bfloat16).eval()
    expected = quantize_model(copy.deepcopy(src), blocksize=128, double_quant=False)
    with torch.device("meta"):
        model = _mlp().to(torch.bfloat16).eval()
    quantize_model(model, blocksize=128, double_quant=False)
    layer = model[0]
    assert (layer.nf4_meta.blocksize, layer.nf4_meta.double_quant, layer.nf4_meta.dtype) == (128, False, torch.bfloat16)
    assert not layer.training and not model[2].training
    model.load_state_dict(src.state_dict(), assign=True)
    got, want = model.state_dict(), expected.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "dq"])
def test_a_bitsandbytes_layer_on_meta_keeps_its_own_settings(compress_statistics):
    """bitsandbytes' Linear4bit built on meta (not quantized yet) converts with its own blocksize,
    compress_statistics and 16-bit dtype, whatever quantize_model is asked: bitsandbytes would quantize
    the arriving weight that way."""
    with torch.device("meta"):
        model = nn.Sequential(bnb.nn.Linear4bit(K, 32, quant_type="nf4", compress_statistics=compress_statistics,
                                                quant_storage=torch.uint8, compute_dtype=torch.bfloat16))  # fmt: skip
        model[0].weight = bnb.nn.Params4bit(torch.empty(32, K, dtype=torch.bfloat16), requires_grad=False,
                                            blocksize=128, compress_statistics=compress_statistics,
                                            quant_type="nf4")  # fmt: skip
    model.train(False)
    quantize_model(model, blocksize=64, double_quant=not compress_statistics)
    layer = model[0]
    assert type(layer) is LinearNF4 and layer.weight.device.type == "meta" and not layer.training
    meta = layer.nf4_meta
    assert (meta.blocksize, meta.double_quant, meta.dtype) == (128, compress_statistics, torch.bfloat16)


def test_a_model_sharded_first_is_refused_untouched(tmp_path):
    """fully_shard, then convert: refused with the order to follow, before any layer is replaced or
    frozen (a one-process gloo group is enough to make DTensor parameters)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        model = nn.Sequential(nn.Linear(K, K), nn.ReLU(), nn.Linear(K, K))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        for convert in (apply_lora, quantize_model):
            with pytest.raises(ValueError, match=r"already sharded with FSDP2.*convert first, then shard"):
                convert(model)
        assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters())
        # a DTensor weight without FSDP2 (tensor parallel's layout) is refused the same way
        from torch.distributed.tensor import Replicate, distribute_tensor

        plain = nn.Sequential(nn.Linear(K, K))
        weight = distribute_tensor(plain[0].weight.detach(), init_device_mesh("cpu", (1,)), [Replicate()])
        plain[0].weight = nn.Parameter(weight)
        with pytest.raises(ValueError, match=r"already sharded"):
            quantize_model(plain)
    finally:
        dist.destroy_process_group()
