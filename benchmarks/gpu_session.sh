#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one go: the GPU tests, the end-to-end decode benchmark (with ONNX
# Runtime CUDA rows when onnxruntime-gpu is importable) and the ONNX Runtime FFN/decode-step rows.
#
#   OUT=results/ bash benchmarks/gpu_session.sh            # logs, JSON and PNGs land in $OUT
#
# onnxruntime-gpu: install it instead of onnxruntime (never both). Where its wheel cannot be installed normally
# (no network), put the unpacked wheel on PYTHONPATH, e.g. `pip install --no-deps --target /tmp/site
# onnxruntime_gpu-*.whl` then `PYTHONPATH=/tmp/site`; the benchmarks call onnxruntime.preload_dlls() so the
# CUDA EP uses the CUDA libraries that came with torch.
# Time: the 7B decode benchmark compiles each variant (a minute or two each); where one command may run only a
# few minutes, run the three steps as separate commands (or split decode_e2e.py with --variants / --batch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
export PYTHONPATH=".:${PYTHONPATH:-}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
python benchmarks/decode_e2e.py --batch 1 4 --fractions 0.10 0.15 0.25 \
    --ort-layers 8 --json "$OUT/decode_e2e.json" --plot "$OUT/decode_e2e.png" 2>&1 | tee "$OUT/decode_e2e.log" | tail -30
python benchmarks/decode_e2e.py --pretrained austen-small --batch 1 4 --fractions 0.15 --variants eager compiled exact predictor \
    --json "$OUT/decode_e2e_austen_small.json" --plot "$OUT/decode_e2e_austen_small.png" 2>&1 | tee "$OUT/decode_e2e_austen_small.log" | tail -12
if python -c "import onnxruntime as o; o.preload_dlls(); assert 'CUDAExecutionProvider' in o.get_available_providers()"; then
    python benchmarks/onnxruntime_rows.py --json "$OUT/onnxruntime.json" 2>&1 | tee "$OUT/onnxruntime.log" | tail -30
else
    echo "onnxruntime-gpu is not importable: no ORT CUDA rows" | tee "$OUT/onnxruntime.log"
fi
