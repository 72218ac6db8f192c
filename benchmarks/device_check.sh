#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool; see benchmarks/README.md): the Triton kernel's
# launch sweep (SKIP_TUNE=1: none), the host cost of one call part by part, its benchmark table with
# the sweep's best launch, the GPU-side correctness tests (the Triton kernels natively, the block
# scores' on fp16 ranges among them, the merge,
# the random-model exactness tests with the model and the device tier on the GPU, and the budgeted
# ones of tests/test_selection.py: the ranking and its top-k on the GPU), then a
# decode step's synchronizing calls and timeline (benchmarks/cuda_sync_points.py; SKIP_SYNC=1: not).
#
# The machine has torch/triton/numba/tabulate but not this package: build its wheel here first
#   echo /.whl/ >> .git/info/exclude; .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl .
# and run with .whl carried:  bash benchmarks/device_check.sh
# Logs land in $OUT (or ./results/device when OUT is unset).
set -uo pipefail
OUT=${OUT:-results/device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
# -P: the repository root must not shadow the installed package (its subpackages live elsewhere)
python3 -P -c "import torch, triton, numba, kvdrive_compile; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__)"
if [ "${SKIP_TUNE:-0}" != 1 ]; then       # SKIP_TUNE=1: the default launch (the last sweep's best)
    timeout 220 python3 -P benchmarks/tune_gpu_attention.py --json "$OUT/launch.json" 2>&1 | tee "$OUT/tune_gpu_attention.txt"
    echo "tune rc=${PIPESTATUS[0]}"
fi
timeout 90 python3 -P benchmarks/bench_gpu_attention.py --host-profile --batches 8 --tokens 4096 --blocks 16 --dtypes float16 \
    2>&1 | tee "$OUT/host_profile.txt"
echo "host profile rc=${PIPESTATUS[0]}"
[ -s "$OUT/launch.json" ] && launch=(--launch "$OUT/launch.json") || launch=()
timeout 170 python3 -P benchmarks/bench_gpu_attention.py "${launch[@]}" "$@" 2>&1 | tee "$OUT/bench_gpu_attention.txt"
echo "bench rc=${PIPESTATUS[0]}"
KVDRIVE_TEST_DEVICE=cuda timeout 260 python3 -P -m pytest -q -x -p no:cacheprovider \
    tests/test_paged_attention.py tests/test_triton_launcher.py tests/test_merge.py tests/test_device_copies.py \
    tests/test_block_scores.py tests/test_hf_models.py tests/test_selection.py 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
echo "pytest rc=${PIPESTATUS[0]}"
if [ "${SKIP_SYNC:-0}" != 1 ]; then       # synchronizing calls per decode step, by line; the CUDA timeline
    timeout 240 python3 -P benchmarks/cuda_sync_points.py --out "$OUT/sync" 2>&1 | tee "$OUT/sync_points.txt" | tail -60
    echo "sync points rc=${PIPESTATUS[0]}"
fi
