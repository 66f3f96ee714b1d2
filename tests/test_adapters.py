"""Many adapters on one NF4 base (issue 25): `AdapterBank`, `multi_lora_linear`, `MultiLoRALinearNF4`,
the CPU path's segmented gather-matmul and the kernel path (the interpreter without a GPU).

Every mixed-batch row is compared with that row run alone through `lora_linear` with its own adapter, or
with the float64 product of the same dequantized weight: float32's worst-case error of the sums
(`helpers.assert_linear_within_float32`). The NF4 bytes are shared, so the format's own error cancels.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import nf4
from helpers import assert_linear_within_float32, peft_scaling
from nf4.cpu import add_adapter_rows_
from nf4.lora import AdapterBank, MultiLoRALinearNF4, lora_linear, multi_lora_linear
from nf4.reference import adapter_rows_ref

K, N = 64, 48


@pytest.fixture(params=["kernels", "reference"])
def device(request, kernel_device, monkeypatch):
    """The kernel path (CUDA, or the interpreter on the CPU) and the CPU's torch path."""
    if request.param == "reference":
        import nf4.dispatch

        monkeypatch.setattr(nf4.dispatch, "INTERPRET", False)
        return torch.device("cpu")
    return kernel_device


def random_adapters(seed, count, max_rank=8, k=K, n=N):
    """{name: (lora_A, lora_B, scaling)}: random ranks 1..max_rank, alphas, rsLoRA or not."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        r = int(torch.randint(1, max_rank + 1, (), generator=g))
        alpha = float(torch.randint(1, 33, (), generator=g))
        rslora = bool(torch.randint(0, 2, (), generator=g))
        a = torch.randn(r, k, generator=g) / k**0.5
        b = torch.randn(n, r, generator=g)
        out[f"task{i}"] = (a, b, peft_scaling(r, alpha, rslora))
    return out


def multi_layer(adapters, slots=None, max_rank=8, bias=True, seed=0, device="cpu"):
    torch.manual_seed(seed)
    layer = MultiLoRALinearNF4.from_linear(nn.Linear(K, N, bias=bias), slots=slots or max(1, len(adapters)),
                                           max_rank=max_rank).to(device)  # fmt: skip
    for name, (a, b, s) in adapters.items():
        layer.add_adapter(name, a.to(device), b.to(device), s)
    return layer


def test_the_reference_is_the_per_row_definition():
    g = torch.Generator().manual_seed(0)
    x, a, v = (torch.randn(*shape, generator=g) for shape in ((6, 8), (3, 4, 8), (3, 4, 5)))
    scales, index = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2, -1, 0, 2, 1, -1])
    y = adapter_rows_ref(x, a, v, scales, index)
    for m, i in enumerate(index.tolist()):
        expect = (
            torch.zeros(5, dtype=torch.float64)
            if i < 0
            else scales[i] * (x[m].double() @ a[i].double().t()) @ v[i].double()
        )
        assert torch.allclose(y[m].double(), expect, rtol=1e-5, atol=1e-5), m
    assert y.dtype == torch.float32 and torch.equal(y[1], torch.zeros(5))


@given(
    m=st.integers(1, 40),
    slots=st.integers(1, 6),
    rank=st.integers(1, 9),
    base_share=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_the_cpu_segmented_path_equals_the_reference(m, slots, rank, base_share, seed):
    g = torch.Generator().manual_seed(seed)
    x, y0 = torch.randn(m, K, generator=g), torch.randn(m, N, generator=g)
    a, v = torch.randn(slots, rank, K, generator=g), torch.randn(slots, rank, N, generator=g)
    scales = torch.rand(slots, generator=g) * 4 - 2
    index = torch.randint(0, slots, (m,), generator=g)
    index[torch.rand(m, generator=g) < base_share] = -1
    got = add_adapter_rows_(y0.clone(), x, a, v, scales, index)
    expect = y0.double() + adapter_rows_ref(x.double(), a.double(), v.double(), scales.double(), index)
    size = (x.abs() @ a.abs().transpose(1, 2)).abs().amax() * v.abs().amax() * rank * scales.abs().max() + y0.abs()
    assert torch.all((got.double() - expect).abs() <= (K + rank + 2) * torch.finfo(torch.float32).eps * size)


def test_the_cpu_path_leaves_base_rows_and_unused_slots_alone():
    x, y0 = torch.randn(4, K), torch.randn(4, N)
    a = torch.full((3, 2, K), float("nan"))  # slots 0 and 2 hold NaN: read, they would poison the rows
    a[1] = torch.randn(2, K)
    v = torch.randn(3, 2, N)
    y = add_adapter_rows_(y0.clone(), x, a, v, torch.ones(3), torch.tensor([-1, 1, -1, 1]))
    assert torch.equal(y[[0, 2]], y0[[0, 2]]) and torch.isfinite(y).all()
    assert torch.equal(add_adapter_rows_(y0.clone(), x, a, v, torch.ones(3), torch.full((4,), -1)), y0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_row_equals_that_row_alone_with_its_adapter(device, seed, bias):
    adapters = random_adapters(seed, 5)
    layer = multi_layer(adapters, slots=6, bias=bias, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 10)
    names = ["task3", None, "task0", "task3", "task4", "__base__", "task1", "task2", "task3"]  # scattered, base
    x = torch.randn(len(names), 3, K, generator=g).to(device)
    with torch.no_grad():
        y = layer(x, layer.adapter_index(names))
    w = layer.dequantize_weight(torch.float32).double()
    for row, name in enumerate(names):
        extra = {} if name in (None, "__base__") else dict(zip(("a", "b", "scaling"), adapters[name], strict=True))
        assert_linear_within_float32(y[row], x[row], w, layer.bias, **extra)
        if name not in (None, "__base__"):
            a, b, s = adapters[name]
            alone = lora_linear(x[row], layer.nf4_weight, a.to(device), b.to(device), layer.bias, s)
            assert torch.allclose(y[row], alone, rtol=1e-5, atol=1e-5), (row, name)
    assert torch.equal(y[1], layer(x[1:2])[0]) or torch.allclose(y[1], layer(x[1:2])[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_activations_round_like_the_single_adapter_call(device, dtype):
    adapters = random_adapters(3, 3)
    layer = multi_layer(adapters, slots=3, device=device)
    names = ["task1", "task0", None, "task2"]
    x = torch.randn(len(names), 5, K).to(device=device, dtype=dtype)
    with torch.no_grad():
        y = layer(x, layer.adapter_index(names))
    assert y.dtype == dtype
    for row, name in enumerate(names):
        a, b, s = adapters[name] if name else (None, None, 1.0)
        alone = lora_linear(x[row], layer.nf4_weight, None if a is None else a.to(device),
                            None if b is None else b.to(device), layer.bias, s)  # fmt: skip
        # two roundings to the 16-bit dtype at most (base, then the low-rank term) on either side
        ulp = torch.finfo(dtype).eps * alone.float().abs().max()
        assert (y[row].float() - alone.float()).abs().max() <= 4 * ulp, (row, name)


def test_an_index_per_token_and_per_sequence(device):
    adapters = random_adapters(4, 2)
    layer = multi_layer(adapters, device=device)
    x = torch.randn(2, 3, K).to(device)
    per_seq = layer.adapter_index(["task1", "task0"])
    per_token = torch.tensor([[1, 1, 1], [0, 0, 0]], device=device)
    mixed_tokens = torch.tensor([[1, -1, 0], [0, 1, -1]], device=device)
    with torch.no_grad():
        a, b = layer(x, per_seq), layer(x, per_token)
        c = layer(x, mixed_tokens)
        flat = layer(x.reshape(6, K), mixed_tokens.reshape(6))
    assert torch.equal(a, b)
    assert torch.equal(c.reshape(6, N), flat)
    assert torch.equal(c[0, 1], layer(x[0, 1:2])[0]) or torch.allclose(c[0, 1], layer(x[0, 1:2])[0], atol=1e-6)


def test_gradients_flow_to_x_and_bias_through_the_gather(device):
    adapters = random_adapters(5, 3)
    layer = multi_layer(adapters, device=device)
    layer.bias.requires_grad_(True)  # frozen by default; a user may train it
    index = layer.adapter_index(["task2", None, "task0", "task2"])
    x = torch.randn(4, 2, K, device=device, requires_grad=True)
    y = layer(x, index)
    (y * torch.arange(N, device=device)).sum().backward()
    w = layer.dequantize_weight(torch.float32)
    grad = torch.zeros(4, 2, K)
    for row, slot in enumerate(index.tolist()):
        dy = torch.arange(N, dtype=torch.float32).expand(2, N)
        grad[row] = dy @ w.cpu()
        if slot >= 0:
            a, v, s = (t.cpu() for t in (layer.bank.a[slot], layer.bank.v[slot], layer.bank.scales[slot]))
            grad[row] += s * (dy @ v.t()) @ a
    assert torch.allclose(x.grad.cpu(), grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(layer.bias.grad.cpu(), torch.arange(N, dtype=torch.float32) * 8)


def test_the_bank_fills_replaces_and_empties_slots_in_place():
    bank = AdapterBank(K, N, slots=3, max_rank=4)
    storage = [t.data_ptr() for t in (bank.a, bank.v, bank.scales)]
    a, b = torch.randn(2, K), torch.randn(N, 2)
    assert bank.add("x", a, b, 0.5) == 0 and bank.add("y", torch.randn(4, K), torch.randn(N, 4), 2.0) == 1
    assert torch.equal(bank.a[0, :2], a) and torch.equal(bank.a[0, 2:], torch.zeros(2, K))
    assert torch.equal(bank.v[0, :2], b.t()) and torch.equal(bank.v[0, 2:], torch.zeros(2, N))
    assert bank.scales.tolist() == [0.5, 2.0, 0.0] and bank.ranks == [2, 4, 0]
    a2, b2 = torch.randn(1, K), torch.randn(N, 1)
    assert bank.add("y", a2, b2, 1.5) == 1  # replaced in its own slot, by a lower rank: the rest zeroed
    assert torch.equal(bank.a[1, :1], a2) and torch.equal(bank.a[1, 1:], torch.zeros(3, K)) and bank.ranks[1] == 1
    assert torch.equal(bank.v[1, :1], b2.t()) and torch.equal(bank.v[1, 1:], torch.zeros(3, N))
    assert bank.remove("x") == 0 and bank.adapters == {"y": 1} and bank.scales[1] == 1.5 and bank.ranks == [0, 1, 0]
    assert not bank.a[0].any() and not bank.v[0].any() and bank.scales[0] == 0
    assert bank.add("z", a, b, 1.0) == 0  # the first free slot
    assert [t.data_ptr() for t in (bank.a, bank.v, bank.scales)] == storage  # same storage: nothing recompiles
    assert bank.index(["y", None, "__base__", "z"]).tolist() == [1, -1, -1, 0]
    assert bank.index(["y"]).dtype == torch.int32 and bank.index(["y"]).device.type == "cpu"
    meta = AdapterBank(K, N, slots=1, max_rank=1, device="meta")
    meta.names[0] = "m"
    assert meta.index(["m"]).device.type == "meta" and meta.index(["m"], device="cpu").tolist() == [0]


def test_the_bank_refuses_what_it_cannot_hold():
    bank = AdapterBank(K, N, slots=1, max_rank=2)
    bank.add("x", torch.randn(2, K), torch.randn(N, 2), 1.0)
    with pytest.raises(ValueError, match=r"slots are full \(\['x'\]\)"):
        bank.add("y", torch.randn(2, K), torch.randn(N, 2), 1.0)
    with pytest.raises(ValueError, match="rank 3; this bank holds ranks 1..2"):
        bank.add("x", torch.randn(3, K), torch.randn(N, 3), 1.0)
    with pytest.raises(ValueError, match="rank 0; this bank holds ranks 1..2"):
        bank.add("x", torch.randn(0, K), torch.randn(N, 0), 1.0)
    with pytest.raises(ValueError, match=r"expected lora_A \[r, 64\] and lora_B \[48, r\]"):
        bank.add("x", torch.randn(2, K), torch.randn(N, 3), 1.0)
    for bad in ("", "__base__", 3):
        with pytest.raises(ValueError, match="non-empty string"):
            bank.add(bad, torch.randn(2, K), torch.randn(N, 2), 1.0)
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['q'\]; this bank holds \['x'\]"):
        bank.index(["x", "q"])
    with pytest.raises(KeyError, match="no adapter named 'q'"):
        bank.remove("q")
    good = dict(in_features=K, out_features=N, slots=1, max_rank=1)
    for name, bad in (("in_features", 0), ("out_features", -1), ("slots", 0), ("max_rank", 0), ("slots", True)):
        with pytest.raises(ValueError, match=f"^{name} must be a positive int, got {bad!r}"):
            AdapterBank(**dict(good, **{name: bad}))
    with pytest.raises(TypeError, match="floating point"):
        AdapterBank(K, N, 1, 1, dtype=torch.int32)
    assert bank.adapters == {"x": 0} and bank.ranks == [2]  # the refusals changed nothing


def test_a_removed_adapter_adds_nothing_even_through_a_stale_index(device):
    adapters = random_adapters(6, 2)
    layer = multi_layer(adapters, device=device)
    index = layer.adapter_index(["task0", "task1"])
    x = torch.randn(2, 4, K).to(device)
    with torch.no_grad():
        before = layer(x, index)
        layer.remove_adapter("task1")
        after = layer(x, index)
    assert torch.equal(after[0], before[0])
    assert torch.allclose(after[1], layer(x[1]), rtol=0, atol=1e-6) and not torch.allclose(before[1], after[1])


def test_the_bank_survives_a_state_dict_round_trip():
    adapters = random_adapters(7, 3)
    layer = multi_layer(adapters, slots=4)
    layer.remove_adapter("task1")
    fresh = MultiLoRALinearNF4(K, N, slots=4, max_rank=8)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.bank.adapters == {"task0": 0, "task2": 2} and fresh.bank.ranks == layer.bank.ranks
    x, index = torch.randn(3, K), layer.adapter_index(["task2", None, "task0"])
    with torch.no_grad():
        assert torch.equal(fresh(x, index), layer(x, index))
    with pytest.raises(ValueError, match="a state of 4 slots cannot load into a bank of 2"):
        MultiLoRALinearNF4(K, N, slots=2, max_rank=8).load_state_dict(layer.state_dict())


def test_validation_names_the_problem():
    layer = multi_layer(random_adapters(8, 2))
    bank, w, x = layer.bank, layer.nf4_weight, torch.randn(3, 2, K)
    cases = [
        (dict(a_bank=bank.a[0]), ValueError, r"expected a_bank \[S, R, 64\], v_bank \[S, R, 48\] and scales \[S\]"),
        (dict(v_bank=bank.v[:, :, :3]), ValueError, r"v_bank \[S, R, 48\]"),
        (dict(scales=bank.scales[:1]), ValueError, r"scales \[S\]"),
        (dict(index=torch.zeros(3, 3, dtype=torch.long)), ValueError, r"leading shape of x's rows \[3, 2\]"),
        (dict(index=torch.zeros(2, dtype=torch.long)), ValueError, "leading shape"),
        (dict(index=torch.zeros(3)), TypeError, "index must be an integer tensor"),
        (dict(index=torch.zeros(3, dtype=torch.bool)), TypeError, "index must be an integer tensor"),
        (dict(scales=torch.zeros(2, dtype=torch.long)), TypeError, "scales must be floating point"),
        (dict(index=[0, 1, 0]), TypeError, "must be tensors"),
        (dict(index=torch.tensor([0, 2, 0])), RuntimeError, r"index values must lie in \[-1, 2\)"),
        (dict(index=torch.tensor([0, -2, 0])), RuntimeError, r"index values must lie in \[-1, 2\)"),
        (dict(x=torch.randn(3, K + 1)), ValueError, r"expected input \[..., 64\]"),
    ]
    for override, error, match in cases:
        kwargs = dict(x=x, weight=w, a_bank=bank.a, v_bank=bank.v, scales=bank.scales, index=torch.tensor([0, 1, -1]))
        kwargs.update(override)
        with pytest.raises(error, match=match):
            multi_lora_linear(**kwargs)
    with pytest.raises(ValueError, match="MultiLoRALinearNF4"):
        layer(torch.randn(2, K + 1), torch.tensor([0, 0]))


def test_no_index_runs_the_base_layer_and_the_layer_describes_its_bank():
    layer = multi_layer(random_adapters(9, 2), slots=3, max_rank=8)
    x = torch.randn(4, K)
    assert torch.equal(layer(x), nf4.lora.lora_linear(x, layer.nf4_weight, bias=layer.bias))
    assert "slots=3, max_rank=8, dtype=float32, adapters={'task0': 0, 'task1': 1}" in repr(layer)


def test_compiled_calls_go_through_the_op_and_a_new_adapter_does_not_recompile():
    torch._dynamo.reset()
    adapters = random_adapters(10, 3)
    layer = multi_layer({k: adapters[k] for k in ("task0", "task1")}, slots=3)
    index, x = layer.adapter_index(["task1", None, "task0"]), torch.randn(3, 2, K)
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    with torch.no_grad():
        eager = layer(x, index)
        assert torch.equal(compiled(x, index), eager)
        layer.add_adapter("task2", *adapters["task2"])
        index2 = layer.adapter_index(["task2", "task2", "task0"])
        assert torch.equal(compiled(x, index2), layer(x, index2))
    assert len(frames) == 1
    targets = {getattr(n.target, "_qualified_op_name", None) for n in frames[0].graph.nodes}
    assert "nf4::matmul_adapters" in targets


def test_the_custom_op_passes_opcheck():
    layer = multi_layer(random_adapters(11, 2))
    pieces, meta = layer.nf4_weight.decodable().flatten()
    args = (torch.randn(3, K), *pieces.values(), list(meta.shape), meta.dtype, meta.blocksize, meta.double_quant,
            layer.bank.a, layer.bank.v, layer.bank.scales, torch.tensor([1, -1, 0]), layer.bias)  # fmt: skip
    torch.library.opcheck(torch.ops.nf4.matmul_adapters.default, args)


def test_the_kernel_path_reads_nothing_back(kernel_device):
    from test_sync import no_host_reads

    layer = multi_layer(random_adapters(12, 3), device=kernel_device)
    x, index = torch.randn(4, 2, K, device=kernel_device), layer.adapter_index(["task2", None, "task0", "task2"])
    with torch.no_grad():
        expect = layer(x, index)
        with no_host_reads():
            assert torch.equal(layer(x, index), expect)


@given(
    seqs=st.integers(1, 6),
    t=st.integers(2, 7),
    slots=st.integers(1, 5),
    rank=st.integers(1, 9),
    steps=st.lists(st.integers(1, 5), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_one_slot_per_sequence_runs_without_sorting_and_equals_the_reference(seqs, t, slots, rank, steps, seed):
    """Sequences of t rows, one slot each (-1: base only), neighbours on different slots, in any order
    and repeated: `_equal_runs` finds t, the batched path equals the per-row definition, and a -1 run
    never reads the slot it stands in with (slot 0 holds NaN where no sequence uses it)."""
    from nf4.cpu import _equal_runs

    g = torch.Generator().manual_seed(seed)
    m = seqs * t
    x, y0 = torch.randn(m, K, generator=g), torch.randn(m, N, generator=g)
    a, v = torch.randn(slots, rank, K, generator=g), torch.randn(slots, rank, N, generator=g)
    scales = torch.rand(slots, generator=g) * 4 - 2
    per_seq = torch.tensor([(sum(steps[: i + 1]) % (slots + 1)) - 1 for i in range(seqs)])
    per_seq[1:][per_seq[1:] == per_seq[:-1]] = -2  # made distinct from the previous neighbour below
    for i in range(1, seqs):
        if per_seq[i] == -2:
            per_seq[i] = (per_seq[i - 1] + 2) % (slots + 1) - 1
    if slots == 1 and (per_seq[1:] == per_seq[:-1]).any():
        per_seq = torch.tensor([(-1, 0)[i % 2] for i in range(seqs)])
    index = per_seq.repeat_interleave(t)
    assert _equal_runs(index) == (t if seqs > 1 else m)
    if not (per_seq == 0).any():
        a[0] = float("nan")
    got = add_adapter_rows_(y0.clone(), x, a, v, scales, index)
    expect = y0.double() + adapter_rows_ref(x.double(), a.double(), v.double(), scales.double(), index)
    size = (x.abs() @ a.nan_to_num().abs().transpose(1, 2)).amax() * v.abs().amax() * rank * scales.abs().max()
    assert torch.isfinite(got).all() and torch.isfinite(expect).all()
    bound = (K + rank + 2) * torch.finfo(torch.float32).eps * (size + y0.abs())
    assert torch.all((got.double() - expect).abs() <= bound)


def test_runs_are_found_only_where_every_run_has_one_length():
    from nf4.cpu import _equal_runs

    runs = lambda *v: _equal_runs(torch.tensor(v))  # noqa: E731
    assert runs(3, 3, 1, 1, 3, 3) == 2 and runs(0, 0, 0, 0) == 4 and runs(-1, -1, 2, 2) == 2
    assert runs(0, 0, 1, 1, 1, 2) is None  # unequal runs
    assert runs(0, 1, 0, 1) is None and runs(5) is None  # runs of one row: the sorted path
    assert runs(0, 0, 1, 1, 0) is None  # the length does not divide M
    assert runs(0, 0, 1, 2) is None  # the first run's length, not every run's
    assert _equal_runs(torch.tensor([0, 9, 0, 9, 1, 9, 1, 9])[::2]) == 2  # a strided index
