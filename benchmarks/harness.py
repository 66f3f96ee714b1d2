"""The shared benchmark harness: timing, kernel breakdowns, the environment record, JSON lines, tables.

Timing on a GPU: every measurement carries two times, and the L2 cache is flushed before every call (a
256 MB buffer is zeroed: 4x the H200's 60 MB L2, so no weight or activation is served from the L2).
- `median_ms` (with `p20_ms`, `p80_ms`): GPU time per call, from CUDA graphs. One graph holds `calls` x
  (flush, call), another `calls` x flush alone; their replays alternate, each timed with CUDA events,
  and a sample is (call graph's replay - the flush graph's median replay) / calls. Capture follows
  torch.cuda.graphs' rules: warm-up on a side stream, capture on a side stream, memory in a pool of the
  graph's own; the warm-up of the eager timing has run first, so caches and compiled kernels exist.
- `eager_ms`: CUDA events around one eager call, recorded after the flush has finished (the stream is
  synchronised), so the CPU cost of launching the call is in it: what a user without graphs sees.
Where a call cannot be captured (it reads the device from the host, which `torch.cuda.set_sync_debug_mode`
shows before any capture is tried, or the capture fails), `median_ms` is the eager time, `graph` is False,
`graph_error` says why, and a line is printed. On the CPU both times are `time.perf_counter` around the
call, after warm-up (`graph` False, no error).

Benchmarks never assert: they print a table and write one JSON object per measurement, each carrying
the environment (device, versions, git commit, date). On a GPU `Results.kernel_breakdown` adds
torch.profiler's top kernels of one call for the paths worth explaining.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GRAPH_REPLAY_MS = 10.0
"""Aim for graph replays of about this long (whole calls), so that graph-launch cost is negligible."""


@dataclass
class Timing:
    """One measurement, times in milliseconds per call (see the module docstring)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    eager_ms: float
    graph: bool
    graph_error: str | None = None
    flush_ms: float | None = None  # the L2 flush's own time per call, subtracted from the graph time
    calls_per_replay: int | None = None


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile)."""
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return statistics.median(s), pick(0.2), pick(0.8)


def _sample(measure, repeats: int, min_seconds: float) -> list:
    """`measure()` at least `repeats` times, and until `min_seconds` have passed (at most 200 times)."""
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start < min_seconds and len(samples) < 200):
        samples.append(measure())
    return samples


def _describe(exc: BaseException) -> str:
    """The first error of a chain (a failed capture raises again when its context is left), its first line,
    and the innermost frame outside torch: where the call went wrong."""
    while exc.__context__ is not None:
        exc = exc.__context__
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}{where}"


class Timer:
    """Times callables on one device; `quick` cuts warm-up and repeats (smoke runs)."""

    def __init__(self, device: torch.device, quick: bool = False):
        self.device = device
        self.quick = quick
        self.gpu = device.type == "cuda"
        self._flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device) if self.gpu else None
        self._flush_graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def __call__(self, fn, warmup: int = 3, repeats: int = 15, min_seconds: float = 0.0) -> Timing:
        if self.quick:
            warmup, repeats, min_seconds = 1, 2, 0.0
        for _ in range(warmup):
            fn()
        eager, p20, p80 = _quantiles(samples := _sample(lambda: self._eager_ms(fn), repeats, min_seconds))
        if not self.gpu:
            return Timing(eager, p20, p80, len(samples), eager_ms=eager, graph=False)
        calls = 2 ** min(7, max(0, math.floor(math.log2(max(1.0, GRAPH_REPLAY_MS / eager)))))
        try:
            self._check_no_host_sync(fn)
            graph, flush = self._capture(fn, calls), self._flush_graph(calls)
        except Exception as exc:  # noqa: BLE001 - any failure to capture: report the eager time and why
            return Timing(eager, p20, p80, len(samples), eager_ms=eager, graph=False, graph_error=_describe(exc))
        for g in (flush, graph):
            self._replay_ms(g)  # the first replay of a graph uploads it
        pairs = _sample(lambda: (self._replay_ms(flush), self._replay_ms(graph)), repeats, min_seconds)
        flush_ms = statistics.median(f for f, _ in pairs)
        median, p20, p80 = _quantiles([(c - flush_ms) / calls for _, c in pairs])
        return Timing(median, p20, p80, len(pairs), eager, True, flush_ms=flush_ms / calls, calls_per_replay=calls)

    def _eager_ms(self, fn) -> float:
        if not self.gpu:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        self._flush.zero_()
        torch.cuda.synchronize(self.device)  # the GPU idles at `start`: the launch cost is timed too
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    @staticmethod
    def _check_no_host_sync(fn) -> None:
        """One call with synchronising CUDA operations turned into errors: a call that reads the device from
        the host cannot be captured, and trying would leave the allocator mid-capture."""
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    def _capture(self, fn, calls: int) -> torch.cuda.CUDAGraph:
        """A CUDA graph of `calls` x (L2 flush, `fn()`); `fn=None`: of the flushes alone."""

        def body():
            self._flush.zero_()
            if fn is not None:
                fn()

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
        try:
            # The outer stream context restores the caller's stream if capture fails: torch.cuda.graph leaves
            # its own stream context only after a successful capture_end.
            with torch.cuda.stream(side), torch.cuda.graph(graph, pool=pool, stream=side):
                for _ in range(calls):
                    body()
        except Exception:
            self._release_failed_capture(pool)
            raise
        return graph

    def _release_failed_capture(self, pool) -> None:
        """torch's capture_end stops routing allocations into the graph's pool only after a successful
        cudaStreamEndCapture, and a graph frees its pool only once instantiated. Left so, the allocator
        counts the capture as under way, and the next torch.cuda.empty_cache() (every capture begins with
        one) fails an internal assert. End and release the pool as torch.cuda.use_mem_pool does."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        with contextlib.suppress(RuntimeError):  # capture_end got as far as ending it
            torch._C._cuda_endAllocateToPool(index, pool)
        torch._C._cuda_releasePool(index, pool)
        torch.cuda.synchronize(self.device)

    def _flush_graph(self, calls: int) -> torch.cuda.CUDAGraph:
        if calls not in self._flush_graphs:
            self._flush_graphs[calls] = self._capture(None, calls)
        return self._flush_graphs[calls]

    def _replay_ms(self, graph: torch.cuda.CUDAGraph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def copy_bandwidth(timer: Timer, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    nbytes = nbytes if timer.gpu else nbytes // 8
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=timer.device).normal_()
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict:
    """Where and with what a measurement was taken."""
    import triton

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        name = f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bnb_version,
        "python": platform.python_version(),
        "commit": os.environ.get("NF4_COMMIT") or _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Results:
    """Collects measurements and kernel breakdowns; writes JSON lines."""

    env: dict
    records: list[dict] = field(default_factory=list)
    breakdowns: list[str] = field(default_factory=list)

    def add(self, bench: str, case: dict, impl: str, timing: Timing | None, **metrics) -> dict:
        record = {
            "bench": bench,
            **case,
            "impl": impl,
            **(asdict(timing) if timing else {}),
            **metrics,
            "env": self.env,
        }
        if record.get("graph_error"):
            print(f"NO CUDA GRAPH for {bench} {impl} {case}: median_ms is the eager time; {record['graph_error']}")
        self.records.append(record)
        return record

    def write_jsonl(self, path: Path, mode: str = "a") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, mode) as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")

    def kernel_breakdown(self, title: str, fn, top: int = 8) -> None:
        """torch.profiler's `top` GPU kernels (and copies) of one call of `fn`, by total time, as a table
        appended to `breakdowns`. GPU only: on the CPU `breakdown_text` says it was skipped."""
        if self.env["device_type"] != "cuda":
            return
        from torch.profiler import ProfilerActivity, profile

        try:
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            kernels: dict[str, list] = {}
            for event in prof.events():
                if event.device_type == torch.autograd.DeviceType.CUDA:
                    entry = kernels.setdefault(event.name, [0.0, 0])
                    entry[0] += event.time_range.elapsed_us() / 1e3
                    entry[1] += 1
        except Exception as exc:  # noqa: BLE001 - a profiler that fails must not end the benchmark
            self.breakdowns.append(f"## {title}\nprofiler failed: {_describe(exc)}")
            return
        total = sum(ms for ms, _ in kernels.values())
        launches = sum(n for _, n in kernels.values())
        lines = [f"## {title}", f"{launches} launches of {len(kernels)} kernels/copies, {total:.4f} ms of GPU time"]
        lines.append(f"{'GPU ms':>8}  {'calls':>5}  {'share':>5}  kernel")
        for name, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"{ms:8.4f}  {n:5d}  {ms / total if total else 0:5.0%}  {name[:110]}")
        self.breakdowns.append("\n".join(lines))

    def breakdown_text(self) -> str:
        if self.env["device_type"] != "cuda":
            return "kernel breakdown: skipped (CPU run: torch.profiler's CUDA kernel times need a GPU)"
        return "\n\n".join(["# kernel breakdown: top GPU kernels of one eager call (torch.profiler)", *self.breakdowns])


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Fixed-width table: `columns` = (header, key, format spec); missing values print as '-', shapes
    (lists) as 4096x4096."""

    def cell(row, key, spec):
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, (list, tuple)):
            return "x".join(map(str, value))
        return format(value, spec) if spec else str(value)

    body = [[cell(r, k, s) for _, k, s in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (h, _, _) in enumerate(columns)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line([h for h, _, _ in columns]), line(["-" * w for w in widths])] + [line(b) for b in body])


def banner(env: dict) -> str:
    kind = "GPU run" if env["device_type"] == "cuda" else "CPU run (no GPU: CPU paths, smaller shapes)"
    return (
        f"== {kind} on {env['device']} | torch {env['torch']}, triton {env['triton']}, "
        f"bitsandbytes {env['bitsandbytes']} | commit {env['commit']} | {env['date']}"
    )


def bnb_available(device: torch.device) -> bool:
    """bitsandbytes imports and runs a 4-bit quantize on `device`."""
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64, device=device), blocksize=64, quant_type="nf4")
        return True
    except Exception:  # noqa: BLE001 - any failure: report the baseline as unavailable
        return False


def bench_main(doc: str, run, table, argv=None, add_arguments=None) -> None:
    """The command line every benchmark script shares: `[--quick] [--out results.jsonl]`; a script's own
    options (`add_arguments(parser)`) reach its `run` as keyword arguments."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke test)")
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    extra = {k: v for k, v in vars(args).items() if k not in ("quick", "out")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = Results(environment(device))
    print(banner(results.env))
    print(table(run(device, args.quick, results, **extra)))
    print("\n" + results.breakdown_text())
    if args.out:
        results.write_jsonl(args.out)
