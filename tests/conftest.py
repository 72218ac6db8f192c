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
