"""Test set-up: the Triton interpreter on machines without a GPU, hypothesis profiles, shared helpers.

Without a CUDA GPU, `TRITON_INTERPRET=1` is set here, before `nf4` (and so Triton) is imported, and the
kernels run on CPU tensors through the interpreter. With a GPU the kernels run on CUDA tensors. Either
way the `kernel_device` fixture names the device whose tensors take the kernel path, and the torch
reference runs on the CPU.
"""

import os

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # every kernel sets it; silence 3.9's notice

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# benchmarks/mutants.py: the CI examples, not shrunk (a mutant is killed by any failure; shrinking one under the
# interpreter can take a minute)
settings.register_profile("mutation", parent=settings.get_profile("ci"), phases=[Phase.explicit, Phase.generate])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; runs in benchmarks/gpu_check.sh on the GPU machine")
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(skip_gpu)
    # The ahead-of-time compile is the longest file by far (minutes of CPU with an empty Triton cache): first
    # in the order, so that pytest-xdist's loadfile hands it to a worker at once, beside the rest.
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_compile.py")


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """The device whose tensors run the Triton kernels: cuda with a GPU, else cpu (interpreter)."""
    return torch.device("cuda" if GPU else "cpu")


@pytest.fixture
def reference_path(monkeypatch):
    """Make CPU tensors take the torch reference path of the public API for this test."""
    import nf4.dispatch

    monkeypatch.setattr(nf4.dispatch, "INTERPRET", False)


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A tiny random Llama saved in float32 (tests/hf_helpers.py), one per test module."""
    from hf_helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny32"))


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """The same model saved in bfloat16."""
    from hf_helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny16"), dtype=torch.bfloat16)
