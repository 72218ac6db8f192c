#!/usr/bin/env bash
# The GPU benchmark in one command: the `gpu-8b` preset of kvdrive_compile.bench (Llama-3.1-8B and
# Qwen3-8B shapes with random bf16 weights made on the GPU, so nothing is downloaded or carried;
# dense Hugging Face eager and compiled, hf-offload, fetch-all, sparse-fetch, shadowkv-like,
# hisparse-like and kvdrive side by side at 32K x 4 and 64K x 8, with the issue's targets) on one
# GPU, about 8 minutes on an H200.
#
#   benchmarks/gpu_bench.sh [extra bench options, e.g. --out DIR --steps 4, or --preset gpu]
#
# It installs nothing. It runs the repo's .venv/bin/python where there is one, else python3; where
# that Python has no kvdrive_compile installed, it runs the checkout itself (through a temporary
# folder of links laid out as pyproject.toml's package-dir maps it: runtime/, kernels/ and passes/
# are subpackages of kvdrive_compile, so PYTHONPATH=. alone cannot import them; Python >= 3.11).
# It stops with a message saying what is missing: a module the bench imports, or a CUDA GPU.
# Results: results/bench/gpu-8b/results.json and PNG plots (or --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_bench: no $PY here: run this where python3 (or the repo's .venv) has torch with CUDA" >&2
    exit 2
fi
if ! "$PY" -P -c pass 2>/dev/null; then
    echo "gpu_bench: $PY is $("$PY" -V 2>&1); this script needs Python >= 3.11 (python -P)" >&2
    exit 2
fi
# -P everywhere: the repository root must not shadow the package (its subpackages live elsewhere)
if ! "$PY" -P -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("kvdrive_compile") else 1)'; then
    SRC=$(mktemp -d "${TMPDIR:-/tmp}/kvdrive-src.XXXXXX")
    trap 'rm -rf "$SRC"' EXIT
    mkdir "$SRC/kvdrive_compile"
    ln -s "$REPO"/kvdrive_compile/* "$SRC/kvdrive_compile/"
    for sub in passes runtime kernels; do ln -s "$REPO/$sub" "$SRC/kvdrive_compile/$sub"; done
    export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_bench: kvdrive_compile is not installed for $PY: running the checkout ($REPO)"
fi
modules="torch triton transformers numba networkx tabulate matplotlib numpy psutil tqdm xxhash"
if ! missing=$("$PY" -P -c '
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
print("; ".join(missing))
sys.exit(1 if missing else 0)' $modules 2>/dev/null); then
    echo "gpu_bench: these modules do not import in $PY: ${missing:-(the check itself failed)}." \
         "Install them into that Python (the project's dependencies, pyproject.toml); this script installs nothing" >&2
    exit 4
fi
if ! "$PY" -P -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    version=$("$PY" -P -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "not importable")
    echo "gpu_bench: no CUDA GPU visible to torch ($version) in $PY: run this on a GPU machine whose" \
         "Python has a CUDA build of torch. On a CPU machine the same code path runs tiny: $PY -m kvdrive_compile.bench --preset gpu-8b-smoke" >&2
    exit 3
fi
unset TRITON_INTERPRET                        # the Triton kernels compile for the GPU here
"$PY" -P -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_bench: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
# a later --preset in "$@" wins (argparse keeps the last)
"$PY" -P -m kvdrive_compile.bench --preset gpu-8b "$@"
