#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in steps that each fit one device command (under 8 minutes; the device tool
# stops a command at 10). Run the steps in the order below, most important first, one or two per command:
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh tests             # logs and JSON land in $OUT
#   OUT=/some/dir bash benchmarks/gpu_session.sh e2e-core
#
# Steps (the minutes are estimates until a GPU session writes the measured ones into benchmarks/RESULTS.md):
#   tests         every kernel test on the GPU (at Bamboo-7B shapes there)                                 (~5 min)
#   tests-rest    every op, model/generation and AOTInductor test on the GPU, then every gpu-marked test (~5 min)
#   e2e-core      7B decode, batch 1: dense eager, dense torch.compile + CUDA graphs, predictor 15% cap k  (~6 min)
#   e2e-more      7B decode, batch 1: exact, predictor ~15% threshold only (grids sized to every neuron)   (~5 min)
#   e2e-fractions 7B decode, batch 1: predictor 10% and 25%, cap k                                          (~5 min)
#   e2e-batch4    7B decode, batch 4: dense compiled, exact (dense FFN past BAMBOO_SPARSE_MAX_ROWS), 15% (~6 min)
#   e2e-fixed     7B decode, batch 1, on the fixed-grid kernels: exact, predictor ~15% threshold only     (~5 min)
#   kernel        one FFN layer at 7B shapes, batch 1-16, 5-50% of neurons (benchmarks/ffn_kernel.py)     (~3 min)
#   austen        austen-small (trained, calibrated predictors; it fits in L2: launch-bound rows)         (~4 min)
#   ort-part      keep the onnxruntime-gpu wheel part carried in .ortgpu/ in /tmp (one 60 MB part per call)
#   ort           ONNX Runtime CUDA EP rows (benchmarks/onnxruntime_rows.py) once all parts are in /tmp  (~4 min)
#
# A 30-minute session fits about five commands: tests, e2e-core, kernel, e2e-more, e2e-fixed (each with ort-part
# and the next wheel part carried, so that a sixth command can run ort); the rest in a later session.
# Each e2e step writes its own JSON (rewritten after every row, so a step cut at a time limit keeps its rows);
# join them here afterwards:
#   python benchmarks/decode_e2e.py --merge e2e_core.json e2e_more.json ... --json benchmarks/results/decode_e2e.json \
#       --plot benchmarks/results/decode_e2e.png
# Each 7B variant compiles anew (CUDA graphs bake the kernels' grids: nothing carries over between predictors or
# batch sizes); a step holds at most three compiled variants.
#
# onnxruntime-gpu (the device has no network; its wheel is 255 MB, one command carries at most 64 MiB): here,
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       onnxruntime-gpu==1.31.1 -d /tmp/ortwheel && (cd /tmp/ortwheel && split -b 60000000 onnxruntime_gpu-*.whl part.)
# then before each call put one part alone in .ortgpu/ (git-ignored), carry it, and add the step ort-part; /tmp
# on the device survives while the machine stays warm. The ort step joins the parts, installs the wheel into
# /tmp/site (never beside the CPU onnxruntime: it goes first on PYTHONPATH) and calls onnxruntime.preload_dlls().
# Rehearsal on a CPU (no GPU needed; checks the wiring, the times mean nothing): REHEARSE=1 OUT=/tmp/gs bash
# benchmarks/gpu_session.sh e2e-core e2e-batch4 kernel austen ort   (smoke sizes, CPU, Triton's interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
SMOKE_E2E=() SMOKE_KERNEL=() SMOKE_ORT=()
if [ "${REHEARSE:-0}" = 1 ]; then
    SMOKE_E2E=(--smoke --config tiny --prompt 8 --new 4 --repeats 1)
    SMOKE_KERNEL=(--smoke --batches 1 4 --fractions 0.15 --layers 1 --reps 1)
    SMOKE_ORT=(--smoke --batch 1 --fractions 0.15 --reps 2 --decode-layers 1 --new 4 --prompt 8)
    export TRITON_INTERPRET=1
    nvidia-smi() { echo "rehearsal: no GPU"; }
fi
[ $# -gt 0 ] || { sed -n '2,24p' "$0"; exit 2; }

facts() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
}

e2e() {  # name, then decode_e2e.py arguments; 460 s at most so the command returns with its files
    local name=$1; shift
    timeout 460 python benchmarks/decode_e2e.py --config bamboo-7b --prompt 128 --new 256 "$@" "${SMOKE_E2E[@]}" \
        --json "$OUT/$name.json" --plot "" 2>&1 | tee "$OUT/$name.log" | grep -v "^\[" | tail -20
}

step() {
    local started=$SECONDS
    case "$1" in
    tests)  # the kernel suite switches to Bamboo-7B shapes on a GPU
        timeout 420 python -m pytest -q -p no:cacheprovider --timeout 240 -m "gpu or not slow" tests/kernels 2>&1 \
            | tee "$OUT/gpu_tests_kernels.log" | tail -15
        ;;
    tests-rest)
        timeout 300 python -m pytest -q -p no:cacheprovider --timeout 240 -m "gpu or not slow" \
            tests/ops tests/models tests/test_aoti.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
        timeout 150 python -m pytest -q -p no:cacheprovider --timeout 120 -m gpu tests --ignore=tests/kernels \
            --ignore=tests/ops --ignore=tests/models --ignore=tests/test_aoti.py 2>&1 | tee "$OUT/gpu_tests_marked.log" | tail -8
        ;;
    e2e-core) e2e e2e_core --batch 1 --variants eager compiled predictor --fractions 0.15 ;;
    e2e-more) e2e e2e_more --batch 1 --variants exact threshold --fractions 0.15 ;;
    e2e-fractions) e2e e2e_fractions --batch 1 --variants predictor --fractions 0.10 0.25 ;;
    e2e-fixed) e2e e2e_fixed --batch 1 --variants exact threshold --fractions 0.15 --ffn-kernels fixed-grid ;;
    e2e-batch4) e2e e2e_batch4 --batch 4 --variants compiled exact predictor --fractions 0.15 ;;
    kernel)
        timeout 400 python benchmarks/ffn_kernel.py "${SMOKE_KERNEL[@]}" --json "$OUT/ffn_kernel.json" 2>&1 | tee "$OUT/ffn_kernel.log" | tail -45
        ;;
    austen)
        timeout 400 python benchmarks/decode_e2e.py --pretrained austen-small --batch 1 4 \
            --predictors benchmarks/results/austen_small_predictors.safetensors \
            --variants eager compiled exact predictor "${SMOKE_E2E[@]:0:1}" --prompt 128 --new 256 \
            "${SMOKE_E2E[@]:3}" --json "$OUT/decode_e2e_austen_small.json" --plot "" 2>&1 \
            | tee "$OUT/decode_e2e_austen_small.log" | grep -v "^\[" | tail -14
        ;;
    ort-part)
        mkdir -p /tmp/ortparts && cp .ortgpu/part.* /tmp/ortparts/ && ls -l /tmp/ortparts
        ;;
    ort)
        if [ "${REHEARSE:-0}" != 1 ] && [ ! -d /tmp/site/onnxruntime ]; then
            cat /tmp/ortparts/part.* > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl &&
                python -m pip install -q --no-deps --no-index --target /tmp/site \
                    /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl || return 1
        fi
        PYTHONPATH="/tmp/site:$PYTHONPATH" timeout 400 python benchmarks/onnxruntime_rows.py "${SMOKE_ORT[@]}" \
            --json "$OUT/onnxruntime.json" 2>&1 | tee "$OUT/onnxruntime.log" | tail -30
        ;;
    *) echo "unknown step $1 (see the top of $0)"; return 2 ;;
    esac
    echo "step $1: $((SECONDS - started)) s" | tee -a "$OUT/steps.txt"
}

facts
for name in "$@"; do
    step "$name"
done
