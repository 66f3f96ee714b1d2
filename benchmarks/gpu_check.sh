#!/usr/bin/env bash
# The one-shot GPU check. On the GPU machine (no registry; torch, triton, pytest, hypothesis, peft,
# transformers preinstalled; bitsandbytes carried as a wheel in .whl/), from the repository root:
#
#     bash benchmarks/gpu_check.sh            # tests, benchmarks, lookups, model step, static report: < 9 min
#     bash benchmarks/gpu_check.sh --dry-run  # on any machine: every step, tiny, without a GPU
#
# Time budget (one device call of at most 9 minutes, setup included): tests 140 s, benchmarks 140 s,
# per-kernel GPU times 40 s and Nsight Compute's pipe / bank-conflict / clock metrics 60 s where ncu exists
# (bench_kernels.py: the times a static speed model is scored on), the
# table-lookup microbenchmark with the decode kernel of 2d550bfb5869 beside the current one 60 s
# (bench_lookup.py: checks the L1 model of benchmarks/static/sass.py), a whole Llama-3-8B-shaped model's QLoRA step
# at 2048 tokens (bench_model.py: nf4, bitsandbytes + PEFT and 16-bit LoRA at batch 1, then nf4 and
# bitsandbytes + PEFT at the largest batch up to 8 that nf4 trains at; 70 + 40 s), QDoRA's step at batch 1
# (nf4+dora, then PEFT DoRA on bitsandbytes; 40 s, what finishes), a mixed batch of 16 sequences over
# 1/4/16 adapters 40 s (bench_adapters.py, preset small), static report 40 s. Cut to fit:
# the model step runs with gradient checkpointing only (off is `bench_model.py --checkpointing both`) and
# 3 timed steps; 16-bit LoRA is not rerun at the largest batch. Each step is stopped with SIGINT when over
# (pytest still prints its summary line, run_all.py still writes what it measured, bench_model.py has
# written each configuration as it finished), then killed 5 s later. The tests run with `pytest -n 14`
# where pytest-xdist imports (the GPU machine has 16 cores), else serially.
# PYTHON selects the interpreter (default python3; the dry run here: PYTHON=.venv/bin/python).
# Everything it produces goes to $OUT (default ./gpu-check-out), flat, at most 8 files:
# env.txt, pytest.txt, table.txt, results.jsonl, profile.txt (top kernels of the fused paths, then ncu's CSV),
# speedup.png (where matplotlib exists), static_report.txt, log.txt. Steps that fail are reported and
# the next ones still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=0
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
case $PY in /*) ;; */*) PY="$PWD/$PY" ;; esac  # the tests run from $OUT: keep a relative path valid
REPO=$PWD
status=0
step() { echo "== $(date -u +%H:%M:%S) $*"; }
# limit SECONDS CMD...: SIGINT lets pytest and run_all.py report. The budgets are the GPU machine's; a dry
# run's steps are tiny but share a 2-core machine with whatever else runs, so it gets 10x each (its
# caller's own timeout bounds it): a dry run checks that every step works, not how fast.
limit() { local s=$1; shift; [ $DRY = 1 ] && s=$((s * 10)); timeout -s INT -k 5 "$s" "$@"; }

step "import tree (no install: the machine has no registry for a build backend)"
TREE=$(mktemp -d)
cp -r nf4 "$TREE/nf4"
ln -s "$REPO/kernels" "$TREE/nf4/kernels"
ln -s "$REPO/lora" "$TREE/nf4/lora"
export PYTHONPATH="$TREE${PYTHONPATH:+:$PYTHONPATH}"  # no empty entry: that would mean the cwd
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  step "bitsandbytes from .whl/"
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/bitsandbytes-*.whl || status=1
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
export NF4_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# The old decode kernel bench_lookup.py times is built from git; a copy without the history can carry the
# tree instead: `python benchmarks/static/revision.py 2d550bfb5869 .base-2d550bfb5869` (ignored by git).
BASE=2d550bfb5869
[ -d "$REPO/.base-$BASE" ] && BASE="$REPO/.base-$BASE"
HYPOTHESIS_STORAGE_DIRECTORY=$(mktemp -d)  # not in $OUT: only results travel back from the GPU machine
export HYPOTHESIS_STORAGE_DIRECTORY
# Python runs from $OUT: from the repository root, the folder kernels/ would be importable as a
# top-level `kernels` and shadow Hugging Face's package of that name (bitsandbytes imports it).
cd "$OUT"

step "environment"
{
  date -u
  echo "commit $NF4_COMMIT"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
  "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
  "$PY" -c "import nf4, nf4.kernels, nf4.lora; print('nf4 from', nf4.__file__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

WORKERS=14
[ $DRY = 1 ] && WORKERS=2
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n $WORKERS"; else XDIST=""; fi
if [ $DRY = 1 ]; then
  step "tests (dry run: the GPU-marked tests, skipped without a GPU; ${XDIST:-serial: no pytest-xdist})"
  limit 600 "$PY" -m pytest -q -p no:cacheprovider $XDIST -m gpu "$REPO/tests" > "$OUT/pytest.txt" 2>&1
else
  # tests/test_benchmarks.py runs this script's dry run, which the next step supersedes.
  step "tests (the whole suite but test_benchmarks.py; ${XDIST:-serial: no pytest-xdist})"
  limit 140 "$PY" -m pytest -q -p no:cacheprovider $XDIST --durations=15 \
    --ignore="$REPO/tests/test_benchmarks.py" "$REPO/tests" > "$OUT/pytest.txt" 2>&1
fi
rc=$?
tail -5 "$OUT/pytest.txt"
echo "pytest summary: $(grep -E '[0-9]+ (passed|failed|skipped|deselected|errors?)' "$OUT/pytest.txt" | tail -1)"
# pytest exits 5 when every selected test was deselected; with -m gpu and no GPU they are skipped (0)
[ $rc -ne 0 ] && { echo "tests exited $rc"; status=1; }

step "benchmarks"
QUICK=""
[ $DRY = 1 ] && QUICK="--quick"
limit 140 "$PY" "$REPO/benchmarks/run_all.py" $QUICK --out-dir "$OUT" || { echo "benchmarks failed or timed out"; status=1; }

step "per-kernel GPU times, L2 flushed (bench_kernels.py: dequantize, quantize, decode at r = 0 and 16)"
limit 40 "$PY" "$REPO/benchmarks/bench_kernels.py" $QUICK --out "$OUT/results.jsonl" || { echo "kernel timing failed or timed out"; status=1; }
if command -v ncu >/dev/null 2>&1; then
  # ALU / FMA pipe use, shared-memory bank conflicts and wavefronts, the real SM clock, per kernel launch
  step "Nsight Compute metrics of the same kernels (appended to profile.txt)"
  METRICS=gpu__time_duration.sum,smsp__cycles_elapsed.avg.per_second,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active
  METRICS=$METRICS,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active
  METRICS=$METRICS,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum
  METRICS=$METRICS,dram__throughput.avg.pct_of_peak_sustained_elapsed
  { echo; echo "# Nsight Compute (ncu --csv), bench_kernels.py --ncu: 2 calls per case"
    limit 60 ncu --csv --metrics "$METRICS" -k "regex:_(nf4_gemv|quantize|dequantize|shrink|expand)" \
      "$PY" "$REPO/benchmarks/bench_kernels.py" --ncu $QUICK; } >> "$OUT/profile.txt" 2>&1 \
    || echo "ncu failed or timed out (see profile.txt; e.g. no access to the performance counters): not fatal"
else
  step "Nsight Compute: ncu not found, skipped"
fi

step "table lookups (global / shared / registers) and the decode kernel of 2d550bfb5869 beside the current one"
limit 60 "$PY" "$REPO/benchmarks/bench_lookup.py" $QUICK --base "$BASE" --out "$OUT/results.jsonl" || { echo "lookup benchmark failed or timed out"; status=1; }

step "a whole model's QLoRA training step (bench_model.py: nf4 / bitsandbytes + PEFT / 16-bit LoRA)"
if [ $DRY = 1 ]; then MODEL="--preset tiny --warmup 1 --steps 1"; else MODEL="--preset 8b --seq 2048 --warmup 1 --steps 3"; fi
limit 70 "$PY" "$REPO/benchmarks/bench_model.py" $MODEL --batch 1 --checkpointing on --out "$OUT/results.jsonl" \
  || { echo "model benchmark (batch 1) failed or timed out"; status=1; }
limit 40 "$PY" "$REPO/benchmarks/bench_model.py" $MODEL --batch 1 --checkpointing on --stacks nf4+dora,bnb+peft+dora \
  --out "$OUT/results.jsonl" || { echo "QDoRA model benchmark failed or timed out"; status=1; }
limit 40 "$PY" "$REPO/benchmarks/bench_model.py" $MODEL --largest-batch 8 --stacks nf4,bnb+peft --checkpointing on \
  --out "$OUT/results.jsonl" || { echo "model benchmark (largest batch) failed or timed out"; status=1; }

step "many adapters, one mixed batch (bench_adapters.py: nf4 fused / nf4 with PEFT's loop / bitsandbytes + PEFT)"
if [ $DRY = 1 ]; then ADAPTERS="--quick"; else ADAPTERS="--preset small --new-tokens 16"; fi
limit 40 "$PY" "$REPO/benchmarks/bench_adapters.py" $ADAPTERS --out "$OUT/results.jsonl" > "$OUT/adapters.txt" 2>&1 \
  || { echo "adapters benchmark failed or timed out"; status=1; }
cat "$OUT/adapters.txt" >> "$OUT/table.txt" && rm -f "$OUT/adapters.txt"
tail -12 "$OUT/table.txt"

step "static kernel report"
MATCH=""
[ $DRY = 1 ] && MATCH="--match quantize_absmax"
limit 40 "$PY" "$REPO/benchmarks/static_report.py" $MATCH --out "$OUT/static_report.txt" > /dev/null || status=1
tail -1 "$OUT/static_report.txt"

step "done (status $status); files in $OUT:"
ls -la "$OUT"
exit $status
