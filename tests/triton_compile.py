"""Compile Triton kernels for an H100 (sm_90) without a GPU, in a fresh process: the interpreter
(what CI runs) accepts code the compiler rejects (types, dot shapes, layouts, shared memory)."""
import os
import re
import subprocess
import sys

import pytest

PRELUDE = """
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
target = GPUTarget("cuda", 90, 32)
"""


def compile_for_h100(script: str) -> None:
    """Run PRELUDE + script (which prints "compiled" at the end) without TRITON_INTERPRET, which
    makes triton interpret its own library functions for good once seen at import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PRELUDE + script], env=env, capture_output=True, text=True)
    if done.returncode and re.search(r"No module named|ptxas\S* (was )?not found|No such file", done.stderr):
        pytest.skip(f"this triton cannot compile for sm_90 here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
