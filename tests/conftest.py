import os
import sys

# Triton kernels run under the interpreter where there is no GPU; this must be set before
# triton is first imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))          # tests/exactness.py

# one CPU thread per test process when pytest-xdist runs one process per core (``make test``):
# with each process's torch and numba using every core (and kvdrive's CPU-attention worker
# running numba next to torch) the cores are oversubscribed several times over and OpenMP's
# spinning threads steal them from each other. numba's pool is started first (importing the
# kernels does it): starting it resets OpenMP's thread count.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    import numba

    import kvdrive_compile.kernels.cpu_attention  # noqa: F401  (starts numba's pool)

    numba.set_num_threads(1)
    torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    from kvdrive_compile import models

    return models.load("smollm2-135m")


@pytest.fixture(autouse=True)
def _fresh_counters():
    import kvdrive_compile

    torch._dynamo.reset()          # no compiled code (or recompile count) carried between tests
    kvdrive_compile.counters.reset()
    yield
    kvdrive_compile.release_all()
