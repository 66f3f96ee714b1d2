"""One adapted layer's forward + backward on the CPU: nf4 LoRA, nf4 DoRA, and PEFT's LoRA and DoRA on
bitsandbytes (bf16, x 256 rows, r = 16, median of 5 after 2 warm-up calls). Isolates what DoRA adds from
the rest of a model's step (bench_model.py --dora):

    python benchmarks/bench_dora.py 1024 2816     # in_features out_features
"""

import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the CPU torch path, not the kernel interpreter
import bitsandbytes as bnb  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import nf4.hf  # noqa: E402
from nf4.lora import LinearNF4  # noqa: E402

torch.manual_seed(0)
K, N, M = int(sys.argv[1]), int(sys.argv[2]), 256
lin = nn.Linear(K, N, bias=False).bfloat16()


class Net(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def ours(dora):
    q = LinearNF4.from_linear(lin)
    return peft.get_peft_model(Net(q), nf4.hf.lora_config(r=16, lora_alpha=16, target_modules=["proj"], use_dora=dora))


def theirs(dora):
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", device="cpu")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)  # fmt: skip
    layer = layer.to("cpu")
    return peft.get_peft_model(Net(layer), peft.LoraConfig(r=16, lora_alpha=16, target_modules=["proj"], use_dora=dora))


x = torch.randn(M, K, dtype=torch.bfloat16)
res = {}
for name, make in [
    ("nf4 lora", lambda: ours(False)),
    ("nf4 dora", lambda: ours(True)),
    ("bnb+peft lora", lambda: theirs(False)),
    ("bnb+peft dora", lambda: theirs(True)),
]:
    model = make().train()
    xs = x.clone().requires_grad_()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        model(xs).float().square().mean().backward()
        times.append(time.perf_counter() - t)
    res[name] = statistics.median(times[2:])
    print(f"{name:16} {res[name] * 1e3:8.1f} ms", flush=True)
print(f"nf4 dora / nf4 lora {res['nf4 dora'] / res['nf4 lora']:.2f}x; "
      f"bnb+peft dora / nf4 dora {res['bnb+peft dora'] / res['nf4 dora']:.2f}x")  # fmt: skip
