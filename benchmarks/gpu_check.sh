#!/usr/bin/env bash
# GPU check, at most 8 minutes, no network: the GPU-marked tests, then training throughput of
# resnet18 x 48 at 256 px in fp32 and bf16 at the largest batch that fits, with FLOP utilisation.
# Usage: bash benchmarks/gpu_check.sh [python]   (PEAK_TFLOPS_FP32 / PEAK_TFLOPS_BF16 add datasheet MFU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device visible')"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"

echo "== GPU-marked tests"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/

bench() {  # $1 amp, $2 peak TFLOP/s or empty
  timeout 150 "$PY" benchmarks/train_throughput.py --model_type resnet18 --ensemble_size 48 --image_size 256 \
    --batch_size 0 --amp "$1" --batching loop,grouped --channels_last --steps 5 --warmup 2 \
    ${2:+--peak_tflops "$2"}
}
echo "== resnet18 x 48 @ 256 px, fp32"
bench off "${PEAK_TFLOPS_FP32:-}"
echo "== resnet18 x 48 @ 256 px, bf16"
bench bf16 "${PEAK_TFLOPS_BF16:-}"
