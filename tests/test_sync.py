"""No device-to-host read on the forward or backward path of the layers
(benchmarks/results/2026-11-29-h200/README.md, finding 3).

A read of a tensor's value on the host (`.item()`, `.tolist()`, `bool(t)`, `float(t)`, `int(t)`,
`torch.equal`) waits for the GPU and makes CUDA-graph capture fail. Here those calls raise when they
come from the package's own code, and a converted layer runs forward and backward through the kernel
path (the interpreter without a GPU) and the CPU path.
"""

import contextlib
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from nf4.lora import LinearNF4, LoRALinearNF4

PACKAGE_DIRS = tuple(str(Path(__file__).resolve().parent.parent / d) for d in ("nf4", "kernels", "lora"))


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Within the block, every host read of a tensor value from inside the package raises `HostRead`."""

    def guard(name, original):
        def wrapper(*args, **kwargs):
            caller = inspect.currentframe().f_back.f_code.co_filename
            if caller.startswith(PACKAGE_DIRS):
                raise HostRead(f"{name} called from {caller}")
            return original(*args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, guard(f"Tensor.{name}", getattr(torch.Tensor, name)))
        patch.setattr(torch, "equal", guard("torch.equal", torch.equal))
        yield


def test_the_guard_catches_a_host_read_from_the_package():
    # what the pair-table cache did on every matmul call before: torch.equal, then bool
    code = compile("bool(torch.equal(table, table))", PACKAGE_DIRS[1] + "/matmul.py", "eval")
    with no_host_reads(), pytest.raises(HostRead):
        eval(code, {"torch": torch, "table": torch.zeros(2)})
    assert eval(code, {"torch": torch, "table": torch.zeros(2)})  # outside the block: allowed


@pytest.mark.parametrize("m", [1, 5, 40], ids=lambda m: f"M={m}")
@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_forward_and_backward_read_nothing_back(kernel_device, monkeypatch, path, m):
    device = kernel_device
    if path == "reference":
        import nf4.dispatch

        monkeypatch.setattr(nf4.dispatch, "INTERPRET", False)
        device = torch.device("cpu")
    torch.manual_seed(0)
    base = nn.Linear(96, 48)
    layer = LoRALinearNF4.from_linear(base, r=8, lora_dropout=0.1).to(device)
    frozen = LinearNF4.from_linear(base).to(device)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(m, 96, device=device, requires_grad=True)
    layer.train()
    y = layer(x) + frozen(x)  # the first call of a shape may choose a configuration (timed on a GPU)
    y.sum().backward()
    with no_host_reads():  # the steady state
        y = layer(x) + frozen(x)
        y.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None and layer.lora_B.grad is not None
