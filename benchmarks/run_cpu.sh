#!/usr/bin/env bash
# All CPU rows of benchmarks/RESULTS.md in one run: SFT and DPO (recipe vs plain trl) and the pretraining overhead
# (yulanmini vs plain Llama), each as interleaved repetitions in fresh processes. Run it on a quiet machine: the
# ratios survive a busy one, the absolute numbers do not. JSON of every run lands in $OUT_DIR.
#
#   bash benchmarks/run_cpu.sh          # estimated 8 min on 2 idle cores (the trl baselines take 5 of them);
#                                       # measured 31 min on a busy one (load 5-9)
#   ONLY=sft bash benchmarks/run_cpu.sh # only the SFT comparison (the issue's CPU target), estimated 4 min
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-outputs/benchmarks}
mkdir -p "$OUT_DIR"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
START=$(date +%s)
run() { [ -z "${ONLY:-}" ] || [ "$ONLY" = "$1" ]; }
if run sft; then
  # against trl's defaults (bf16 autocast, activation checkpointing, no packing), then against trl as a knowledgeable
  # user sets it up on a CPU (fp32, no checkpointing, its own bfd packing with padding-free batches), and both sides in
  # bf16 autocast (the fastest on a CPU with bf16 units)
  for setup in defaults tuned tuned-bf16; do
    "$PY" -m benchmarks.sft_throughput --reps 3 --steps 4 --warmup-steps 1 --examples 400 --trl-setup "$setup" \
      --write-results --json "$OUT_DIR/sft_cpu_trl_$setup.json"
  done
fi
if run dpo; then
  "$PY" -m benchmarks.dpo_throughput --reps 2 --steps 3 --warmup-steps 1 --examples 200 --write-results \
    --json "$OUT_DIR/dpo_cpu.json"
fi
if run pretrain; then
  "$PY" -m benchmarks.pretrain_overhead --reps 3 --steps 6 --warmup-steps 1 --write-results \
    --json "$OUT_DIR/pretrain_cpu.json"
fi
if run eval; then
  "$PY" -m benchmarks.eval_throughput --reps 3 --limit 200 --batch-size 16 --write-results --json "$OUT_DIR/eval_cpu.json"
fi
echo "benchmarks/run_cpu.sh: $(( $(date +%s) - START )) s; rows appended to benchmarks/RESULTS.md"
