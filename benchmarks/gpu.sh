#!/usr/bin/env bash
# The benchmark suite on a CUDA machine, in under 6 minutes: `bash benchmarks/gpu.sh [extra run.py options]`.
#
# Made for a bare GPU machine that has python3 with torch, transformers and peft but not the bundled
# pretrained models: MiniLM and SmolLM2-135M are built from their configs (benchmarks/gpu_configs/) with
# random weights, since step time and memory do not depend on the weight values. peftkit is imported from
# src/. Timing synchronises the GPU around every timed call; memory is torch.cuda.max_memory_allocated.
# Processes start slower than steps run there, so every process times more steps (--steps) and the run
# does as many whole repetitions as fit in $BUDGET_S seconds (at most --reps). Measured on an H100 machine
# (2026-11-27): a worker process takes 15-20 s there (imports and CUDA start-up on a fresh image), so one
# repetition of the 18 processes takes ~5 minutes, and 5 repetitions need BUDGET_S=1600 (~27 minutes).
#
# Results: $OUT/gpu-<date>.json (every sample and the summary) and $OUT/gpu.log; $OUT defaults to
# benchmarks/results. Options after the script name go to benchmarks/run.py and win over the defaults
# here, e.g. a logic check on CPU: `OUT=/tmp/x bash benchmarks/gpu.sh --device cpu --weights tiny --reps 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
stamp="$(date -u +%Y%m%d-%H%M)"
log="$OUT/gpu.log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__)'
} 2>&1 | tee "$log"
"$PY" -m benchmarks.run --device cuda --weights random --threads 8 --reps 5 --steps 10 --warmup 3 \
  --budget-s "${BUDGET_S:-320}" --out "$OUT/gpu-$stamp.json" "$@" 2>&1 | tee -a "$log"
