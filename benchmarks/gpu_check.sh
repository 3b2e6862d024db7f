#!/usr/bin/env bash
# GPU check in one go, under 8 minutes on one GPU, no network, no FAISS needed:
#   1. the GPU-marked tests (pytest -m gpu);
#   2. training throughput of resnet18 x 48 at 256 px: the original's configuration (fp32, branches in
#      a loop, batch 10) against ours (bf16, channels-last, grouped branches, fused Adam, batch 32),
#      the loop in bf16, and a CUDA-graph replay of the step; images/s, MFU against the bf16 matmul
#      measured in the same run (and against PEAK_TFLOPS_BF16, the datasheet, if set), and the
#      speed-up over the original's configuration.
# Usage: bash benchmarks/gpu_check.sh [python]
#        DRY_RUN=1 bash benchmarks/gpu_check.sh [python]   # on the CPU with tiny sizes: every step, no GPU
set -uo pipefail  # a failing test is reported at the end; the timings still run
cd "$(dirname "$0")/.."
PY=${1:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DRY_RUN=${DRY_RUN:-0}
START=$(date +%s)

if [ "$DRY_RUN" = 1 ]; then
  echo "== dry run on the CPU: tiny sizes, the GPU tests are collected and skipped"
  SIZES=(--ensemble_size 3 --image_size 32 --matmul_size 256 --device cpu)
  STEPS=(--rounds 2 --steps 1 --warmup 1)
  ORIGINAL=b2 OURS=b4
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device visible')"  || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  SIZES=(--ensemble_size 48 --image_size 256 --device cuda)
  STEPS=(--rounds 3 --steps 5 --warmup 3)
  ORIGINAL=b10 OURS=b32
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

echo "== GPU-marked tests"
# Only the files that hold GPU tests, with the project's pytest options switched off, so that
# packages the GPU machine may lack (FAISS, pytorch-metric-learning, xdist) are never imported.
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
timeout 180 "$PY" -m pytest -q -o addopts="" -p no:cacheprovider -m gpu -rs "${GPU_TESTS[@]}"
TESTS_STATUS=$?

echo "== training throughput, resnet18 x ${SIZES[1]} at ${SIZES[3]} px"
VARIANTS="loop+$ORIGINAL"  # the original's configuration: fp32, branches one by one, PyTorch's default Adam
VARIANTS+=",grouped+$ORIGINAL"  # fp32 grouped: what --branch_batching auto picks without --amp
VARIANTS+=",grouped+bf16+cl+adam-fused+$OURS"
VARIANTS+=",loop+bf16+cl+adam-fused+$OURS"
VARIANTS+=",loop+bf16+cl+adam-fused+$OURS+graph"
VARIANTS+=",grouped+bf16+cl+adam-fused+$OURS+graph"
timeout 330 "$PY" benchmarks/train_throughput.py --model_type resnet18 "${SIZES[@]}" "${STEPS[@]}" --sequential \
  --variants "$VARIANTS" ${PEAK_TFLOPS_BF16:+--peak_tflops "$PEAK_TFLOPS_BF16"}
BENCH_STATUS=$?
echo "== done in $(( $(date +%s) - START )) s: GPU tests exit $TESTS_STATUS, throughput exit $BENCH_STATUS"
[ "$TESTS_STATUS" = 0 ] && [ "$BENCH_STATUS" = 0 ]
