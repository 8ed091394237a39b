#!/usr/bin/env bash
# OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#
# The GPU check in one run of at most GPU_CHECK_BUDGET_S seconds (default 470): the GPU tests, the four kernel
# benchmarks, the retention benchmarks on a ~1e8-parameter model in bf16-mixed, and the default `fit`.
# Untimed steps (tests, peak memory, the fit) share the GPU first; the timed benchmarks then run one at a time,
# most important first, each cut to the budget that is left. Everything lands in $OUT:
#
#   gpu_check.jsonl   one line per step: step, rc (124: cut at its limit), seconds, limit_s, and the machine
#                     (device, torch, triton, python, date); the first line describes the machine alone
#   steps.log         every step's output, one after another
#   kernels.jsonl  retention_overhead.jsonl  retention_memory.jsonl   the benchmarks' rows
#   fit_metrics.json  the default fit's report (accuracy matrix)
#
# GPU_CHECK_STEPS runs only the steps it names (e.g. "retention_memory retention_overhead"), for a device session
# that measures what an earlier one had no time for (on an H200 the whole list takes about 12 minutes: see
# benchmarks/LOG.md, 2026-12-04). The sizes are variables so that the plumbing can be tried on a CPU:
#   GPU_CHECK_SIZES="1e5" GPU_CHECK_HIDDEN=64 GPU_CHECK_LAYERS=1 GPU_CHECK_BUDGET_S=120 OUT=/tmp/gc bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
SIZES=${GPU_CHECK_SIZES:-1e8 1e9}
HIDDEN=${GPU_CHECK_HIDDEN:-1024}  # x 8 layers: 1.0e8 parameters
LAYERS=${GPU_CHECK_LAYERS:-8}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
START=$(date +%s)

MACHINE=$($PYTHON - <<'EOF'
import datetime, json, platform, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
cuda = torch.cuda.is_available()
print(json.dumps({
    "device": torch.cuda.get_device_name() if cuda else f"cpu: {platform.machine()}",
    "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
    "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
})[1:-1])
EOF
)
echo "{\"step\": \"machine\", $MACHINE}" > "$OUT/gpu_check.jsonl"
{ echo "== machine: $MACHINE"; nvidia-smi 2>&1 | head -15; } > "$OUT/steps.log"

# step NAME LIMIT_S COMMAND...: runs COMMAND for at most LIMIT_S seconds (less if the budget is nearly spent),
# appends its output to steps.log and its line to gpu_check.jsonl
step() {
  local name=$1 limit=$2
  shift 2
  [[ -z ${GPU_CHECK_STEPS:-} || " $GPU_CHECK_STEPS " == *" $name "* ]] || return 0
  local left=$((BUDGET - ($(date +%s) - START)))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"limit_s\": $limit, \"note\": \"skipped: budget spent\", $MACHINE}" >> "$OUT/gpu_check.jsonl"
    return
  fi
  local t0 rc ms seconds
  t0=$(date +%s%N)
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  seconds=$((ms / 1000)).$(printf %03d $((ms % 1000)))
  { echo; echo "== $name (rc $rc, ${seconds} s, limit ${limit} s): $*"; cat "$WORK/$name.log"; } >> "$OUT/steps.log"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $seconds, \"limit_s\": $limit, $MACHINE}" >> "$OUT/gpu_check.jsonl"
}

# Untimed, side by side: the kernel tests on CUDA tensors (the `gpu`-marked ones among them), peak memory
# per retention method (one fresh process each), the default fit (its wall time shares the GPU), and the
# torch.compile baselines compiled once at every size and dtype, so that the timed runs below find them in
# inductor's cache instead of spending their budget compiling (their rows are not kept).
step tests 170 $PYTHON -m pytest tests/kernels tests/benchmarks/test_bench_smoke.py -m "not slow" -q -p no:cacheprovider -rs &
step retention_memory 170 $PYTHON benchmarks/bench_retention_memory.py --hidden-size "$HIDDEN" --num-layers "$LAYERS" \
  --precision bf16-mixed --methods ewc agem gem --results "$OUT/retention_memory.jsonl" &
step fit 170 $PYTHON -m hft_lightning fit --trainer.default_root_dir "$WORK/fit" &
step compile_warmup 170 bash -c "for op in ewc fisher; do $PYTHON benchmarks/bench_\$op.py --sizes $SIZES --dtypes fp32 bf16 \
  --providers compile --repeats 1 --results $WORK/warmup.jsonl || exit; done" &
wait
cp "$WORK/fit/report/metrics.json" "$OUT/fit_metrics.json" 2>/dev/null

# Timed, one at a time, the goals first. GEM's host quadprog baseline takes seconds per call: 3 repeats at 1e8.
K=(--dtypes fp32 bf16 --results "$OUT/kernels.jsonl")
step bench_ewc 130 $PYTHON benchmarks/bench_ewc.py --sizes $SIZES --repeats 10 "${K[@]}"
step bench_gem_project 60 $PYTHON benchmarks/bench_gem_project.py --sizes ${SIZES%% *} --k 8 --repeats 3 "${K[@]}"
step retention_overhead 130 $PYTHON benchmarks/bench_retention_overhead.py --hidden-size "$HIDDEN" --num-layers "$LAYERS" \
  --precision bf16-mixed --methods ewc agem_ref_every_10 gem_ref_every_10 --steps 20 --rounds 2 \
  --results "$OUT/retention_overhead.jsonl"
step bench_fisher 70 $PYTHON benchmarks/bench_fisher.py --sizes $SIZES --repeats 10 "${K[@]}"
step bench_gem_dots 40 $PYTHON benchmarks/bench_gem_dots.py --sizes $SIZES --k 8 --repeats 10 "${K[@]}"
step bench_gem_project_large 40 $PYTHON benchmarks/bench_gem_project.py --sizes ${SIZES##* } --k 8 --repeats 10 \
  --providers triton torch "${K[@]}"
rm -rf "$WORK"
echo "done in $(($(date +%s) - START)) s; results in $OUT"
