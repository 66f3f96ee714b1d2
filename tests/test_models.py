"""Whole models: a small transformers model (built from a config, no download) converted to NF4 + LoRA."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import nf4
from nf4.lora import LinearNF4, LoRALinearNF4, apply_lora, quantize_model


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def dequantized_copy(model):
    """The same model with every Linear weight replaced by dequantize(quantize(weight))."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module) is nn.Linear:
            module.weight.data = nf4.dequantize(nf4.quantize(module.weight.data))
    return model


def linear_names(model):
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def test_apply_lora_converts_every_linear_and_matches_dequantized_model(kernel_device, ids):
    model = tiny_llama()
    names = linear_names(model)
    expect = dequantized_copy(model)(ids).logits
    apply_lora(model, r=4, lora_alpha=8)
    assert all(isinstance(model.get_submodule(n), LoRALinearNF4) for n in names) and not linear_names(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    model.to(kernel_device)
    with torch.no_grad():
        got = model(ids.to(kernel_device)).logits.cpu()
    assert torch.allclose(got, expect, atol=1e-4, rtol=1e-4), (got - expect).abs().max()


def test_target_modules_by_suffix():
    model = apply_lora(tiny_llama(), r=2, target_modules=["q_proj", "v_proj"])
    converted = [n for n, m in model.named_modules() if isinstance(m, LoRALinearNF4)]
    assert len(converted) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in converted)
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    with pytest.raises(ValueError, match="no nn.Linear .* matches target_modules=\\[.nope.\\]"):
        apply_lora(tiny_llama(), target_modules=["nope"])


def test_apply_lora_again_keeps_the_first_adapters_trainable():
    model = apply_lora(tiny_llama(), r=2, target_modules=["q_proj"])
    apply_lora(model, r=4, target_modules=["v_proj"], double_quant=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 8 and all(
        n.endswith(("q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B")) for n in trainable
    )


def test_training_lowers_the_loss_and_changes_only_lora(reference_path, ids):
    model = apply_lora(tiny_llama(), r=8, lora_alpha=16, lora_dropout=0.05)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses
    after = model.state_dict()
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert all(not torch.equal(lora_before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_one_training_step_on_the_kernel_path(kernel_device, ids):
    model = apply_lora(tiny_llama(), r=4, lora_alpha=8).to(kernel_device)
    reference_model = copy.deepcopy(model)
    for m in (model, reference_model):
        for module in m.modules():
            if isinstance(module, LoRALinearNF4):
                torch.nn.init.normal_(
                    module.lora_B, std=0.02, generator=torch.Generator(module.lora_B.device).manual_seed(2)
                )
    ids = ids.to(kernel_device)
    loss = model(ids, labels=ids).loss
    loss.backward()
    import nf4.dispatch

    saved, nf4.dispatch.INTERPRET = nf4.dispatch.INTERPRET, False
    try:
        ref_model = reference_model.cpu()
        ref_loss = ref_model(ids.cpu(), labels=ids.cpu()).loss
        ref_loss.backward()
    finally:
        nf4.dispatch.INTERPRET = saved
    assert abs(loss.item() - ref_loss.item()) < 1e-4
    grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad.cpu(), grads[name].grad, atol=1e-4, rtol=1e-3), name


def test_quantize_model_for_inference(ids):
    model = tiny_llama()
    expect = dequantized_copy(model)(ids).logits
    quantize_model(model, progress=False)
    assert all(isinstance(model.get_submodule(n), LinearNF4) for n in linear_names(tiny_llama()))
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expect, atol=1e-4, rtol=1e-4)


def test_progress_bar(capsys):
    quantize_model(tiny_llama(), progress=True)
    err = capsys.readouterr().err
    assert "quantize_model [" in err and "15/15" in err


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(reference_path, ids, backend):
    torch._dynamo.reset()
    model = apply_lora(tiny_llama(), r=4, lora_alpha=8)
    for module in model.modules():
        if isinstance(module, LoRALinearNF4):
            torch.nn.init.normal_(module.lora_B, std=0.02)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        assert torch.allclose(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    if backend == "aot_eager":  # the backward traces too
        loss = compiled(ids, labels=ids).loss
        loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.lora_A.grad
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        assert torch.allclose(grad, model.model.layers[0].self_attn.q_proj.lora_A.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 12], ids=lambda t: f"M={2 * t}")
def test_reduce_overhead_captures_a_converted_model_in_cuda_graphs(ids, tokens):
    """benchmarks/results/2026-11-29-h200/README.md, finding 3: a host read on every call made
    CUDA-graph capture fail. M = 2 rows per layer is the decode bucket (split-K), M = 24 the medium tiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = apply_lora(tiny_llama(), r=4, lora_alpha=8).cuda()
    for module in model.modules():
        if isinstance(module, LoRALinearNF4):
            torch.nn.init.normal_(module.lora_B, std=0.02)
    ids = ids[:, :tokens].cuda()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            logits = compiled(ids).logits.clone()
        assert torch.allclose(logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
