#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one run, results under OUT (default ./gpu-results):
#
#   bash bench/gpu.sh [RESEARCH_DIR] [WHEEL_DIR]
#
# RESEARCH_DIR: a folder with the research code's StreamLIC_Q.py and qat_utils.py (never committed),
# timed side by side; WHEEL_DIR: wheels to install first where the machine lacks packages (offline).
# Steps: the compiled-vs-eager integer test on the GPU, per-stage step times eager and compiled
# (CUDA graphs), Lightning throughput eager and compiled, the dispatch/kernel counts, and the end-to-end
# training rate from PNG folders vs the patch store (bench/loader.py).
set -euo pipefail
cd "$(dirname "$0")/.."
research=${1:-}
wheels=${2:-}
out=${OUT:-gpu-results}
mkdir -p "$out"
if [[ -n "$wheels" ]]; then
    python -m pip install --no-index --find-links "$wheels" --no-deps "$wheels"/*.whl >"$out/install.log" 2>&1
fi
python -m pip install --no-deps --no-build-isolation -e . >>"$out/install.log" 2>&1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
with_research=()
[[ -n "$research" ]] && with_research=(--research "$research")
STREAMLIC_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_compile.py >"$out/test_compile.txt" 2>&1 || true
python bench/train_step.py --device cuda --settings 8x256,16x256 "${with_research[@]}" >"$out/train_step.txt" 2>&1 || true
python bench/train_step.py --device cuda --settings 8x256,16x256 --compile >"$out/train_step_compiled.txt" 2>&1 || true
python bench/train_throughput.py --accelerator gpu --batch-size 16 --steps 50 --workers 8 \
    >"$out/throughput.txt" 2>&1 || true
python bench/train_throughput.py --accelerator gpu --batch-size 16 --steps 50 --workers 8 --compile \
    >"$out/throughput_compiled.txt" 2>&1 || true
python bench/op_count.py "${with_research[@]}" --compile >"$out/op_count.txt" 2>&1 || true
# the tiny model's training from PNGs vs the patch store on the GPU: the loader's ratio, no longer the CPU step's
OMP_NUM_THREADS=1 python bench/loader.py --accelerator gpu --batch-size 16 --steps 20 >"$out/loader.txt" 2>&1 || true
tail -n 20 "$out"/*.txt
