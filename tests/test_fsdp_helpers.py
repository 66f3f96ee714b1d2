"""nf4.lora.distributed's helpers: which modules shard as one group, the bytes each rank stores (against
the local shards' sizes computed from the unsharded shapes), the all-gather counter and the rank check,
on a PEFT model and on a model whose root holds parameters (2 gloo ranks on the CPU, tests/fsdp_workers.py)."""

import pytest
import torch
import torch.distributed as dist
from dist_workers import launch
from fsdp_workers import build, helpers
from torch import nn

from nf4.hf.peft import PeftLinearNF4
from nf4.lora import LinearNF4, LoRALinearNF4
from nf4.lora.distributed import AllGatherBytes, is_main_process, local_bytes, nf4_layers, nf4_local_bytes

TIMEOUT = 180
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-helpers")
    launch(helpers, WORLD, out, TIMEOUT)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("kind", ["peft", "root"])
@pytest.mark.slow  # 2 spawned ranks
def test_bytes_per_rank_are_the_local_shards(ranks, kind):
    results = [r[kind] for r in ranks]
    for r in results:
        assert r["local_bytes"] == r["expect_local"] and r["nf4_local_bytes"] == r["expect_nf4"]
        assert r["local_bytes"] < r["whole"]
    assert [r["local_bytes"] for r in results][0] != results[1]["local_bytes"]  # uneven rows: unequal shares


@pytest.mark.parametrize("kind", ["peft", "root"])
@pytest.mark.slow  # 2 spawned ranks
def test_sharded_forward_and_all_gather_count(ranks, kind):
    for r in (x[kind] for x in ranks):
        assert r["error"] <= 2 * 1030 * torch.finfo(torch.float32).eps * r["scale"]
        assert r["calls"] == len(r["sizes"]) > 0 and r["gathered"] == sum(r["sizes"])


@pytest.mark.slow  # 2 spawned ranks
def test_groups_and_main_rank(ranks):
    assert [r["main"] for r in ranks] == [True, False]
    assert ranks[0]["peft"]["groups"] == ["base_model.model.up", "base_model.model.down"]
    assert ranks[0]["root"]["groups"] == ["up", "down"]
    assert all(r[kind]["returned_model"] for r in ranks for kind in ("peft", "root"))
    assert all(
        all(r[kind]["own_groups"]) and len(r[kind]["own_groups"]) == 3 for r in ranks for kind in ("peft", "root")
    )


def test_nf4_layers_takes_the_peft_wrapper_not_its_base():
    model = build("peft")
    found = nf4_layers(model)
    assert [type(m) for m in found] == [PeftLinearNF4, LinearNF4]
    assert found[0].base_layer not in found
    plain = build("root")
    assert [type(m) for m in nf4_layers(plain)] == [LoRALinearNF4, LinearNF4]


def test_bytes_unsharded():
    model = build("root")
    everything = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert local_bytes(model) == everything
    nf4_only = sum(
        t.numel() * t.element_size()
        for m in model.modules()
        if isinstance(m, LinearNF4)
        for t in (m.weight, m.weight_absmax, *m.buffers(recurse=False))
    )
    adapters_and_rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                            if "lora_" in n or "bias" in n or "norm" in n or n == "scale")  # fmt: skip
    assert nf4_local_bytes(model) == nf4_only == everything - adapters_and_rest


def test_all_gather_bytes_counts_and_restores(monkeypatch):
    seen = []

    def fake(output, tensor, group=None):
        seen.append((output, tensor))
        return "done"

    monkeypatch.setattr(dist, "all_gather_into_tensor", fake)
    monkeypatch.delattr(dist, "all_gather_single", raising=False)
    out, inp = torch.empty(6, 4, dtype=torch.uint8), torch.empty(3, 4, dtype=torch.uint8)
    with AllGatherBytes() as counted:
        assert dist.all_gather_into_tensor(out, inp) == "done"
        assert dist.all_gather_into_tensor(torch.empty(5, dtype=torch.float32), inp, group=None) == "done"
    assert counted.bytes == 24 + 20 and counted.calls == 2 and counted.sizes == [24, 20]
    assert seen[0] == (out, inp) and dist.all_gather_into_tensor is fake
    assert not hasattr(dist, "all_gather_single")
    dist.all_gather_into_tensor(out, inp)  # after the block: not counted
    assert counted.calls == 2


def test_all_gather_bytes_lets_exceptions_through_and_restores(monkeypatch):
    real = dist.all_gather_into_tensor
    with pytest.raises(RuntimeError, match="inside the block"), AllGatherBytes():
        assert dist.all_gather_into_tensor is not real
        raise RuntimeError("inside the block")
    assert dist.all_gather_into_tensor is real


def test_main_process_outside_torch_distributed():
    assert not dist.is_initialized() and is_main_process()


def test_local_bytes_of_a_plain_module():
    assert local_bytes(nn.Linear(3, 2)) == (6 + 2) * 4 and nf4_local_bytes(nn.Linear(3, 2)) == 0


def test_nf4_layers_leaves_out_adapted_16_bit_layers_and_bare_wrappers():
    import peft

    import nf4.hf

    model = nn.Sequential(LinearNF4.from_linear(nn.Linear(64, 64)), nn.Linear(64, 64))
    pm = peft.get_peft_model(model, nf4.hf.lora_config(r=2, target_modules=["0", "1"]))
    found = nf4_layers(pm)
    assert len(found) == 1 and isinstance(found[0], PeftLinearNF4)  # PEFT's layer on nn.Linear is not NF4

    class Wrapper(nn.Module):  # a base_layer without adapters: its NF4 layer is the group
        def __init__(self):
            super().__init__()
            self.base_layer = LinearNF4.from_linear(nn.Linear(64, 64))

    wrapped = Wrapper()
    assert nf4_layers(wrapped) == [wrapped.base_layer]
