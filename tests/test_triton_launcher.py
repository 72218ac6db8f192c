"""kernels/triton_launcher.py: which calls launch a kept compiled kernel directly, and with what.

The Triton kernels themselves run through it in tests/test_paged_attention.py (under the
interpreter here, natively on a GPU: benchmarks/device_check.sh); here a recording stand-in for
a ``@triton.jit`` function checks the launcher's own logic: the key, the argument order, the
eviction and the fall-back."""
import pytest
import torch

from kvdrive_compile.kernels import triton_launcher
from kvdrive_compile.kernels.triton_launcher import DIRECT_LAUNCH_ENV, CachedLauncher


class Recorder:
    """Stands in for a ``@triton.jit`` function: ``fn[grid](*args, **kw)`` records the call as
    Triton's binder path and returns a compiled kernel whose ``[grid](*args)`` records a direct
    launch, as Triton's ``CompiledKernel`` does."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK", "MODE"]

    def __init__(self, fail_direct=False, returns_kernel=True):
        self.calls = []
        self.fail_direct = fail_direct
        self.returns_kernel = returns_kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("bind", grid, args, kwargs))
            return Compiled(self) if self.returns_kernel else None
        return run


class Compiled:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def runner(*args):
            if self.fn.fail_direct:
                raise TypeError("function takes exactly 9 arguments (11 given)")
            self.fn.calls.append(("direct", (grid[0], grid[1], grid[2]), args))    # as Triton's runner reads it
        return runner


@pytest.fixture(autouse=True)
def native(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(DIRECT_LAUNCH_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def launch(launcher, x, n=64, scale=0.5, block=16, grid=(4, 2)):
    launcher(grid, (x, n, scale), {"MODE": "ieee", "BLOCK": block}, {"num_warps": 4})


def test_second_call_with_the_same_key_launches_directly_with_constexprs_in_signature_order():
    fn = Recorder()
    launcher = CachedLauncher(fn)
    x = torch.zeros(64)
    launch(launcher, x)
    launch(launcher, torch.ones(64), scale=0.25, grid=(8, 1))    # new tensor, new float: same kernel
    assert fn.calls[0] == ("bind", (4, 2), (x, 64, 0.5), {"MODE": "ieee", "BLOCK": 16, "num_warps": 4})
    kind, grid, args = fn.calls[1]
    assert (kind, grid) == ("direct", (8, 1, 1))
    assert args[1:] == (64, 0.25, 16, "ieee") and torch.equal(args[0], torch.ones(64))
    assert launcher.direct_launches == 1 and launcher.fallback_reason is None


@pytest.mark.parametrize("change", ["int", "dtype", "alignment", "constexpr", "device"])
def test_what_triton_specializes_on_gets_its_own_kernel(change, monkeypatch):
    fn = Recorder()
    launcher = CachedLauncher(fn)
    x = torch.zeros(64)
    launch(launcher, x)
    if change == "int":
        launch(launcher, x, n=65)
    elif change == "dtype":
        launch(launcher, x.half())
    elif change == "alignment":
        launch(launcher, x[1:])                  # 4 bytes past a 16-byte boundary
    elif change == "constexpr":
        launch(launcher, x, block=32)
    else:
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        launch(launcher, x)
    assert [c[0] for c in fn.calls] == ["bind", "bind"]
    launch(launcher, x[1:] if change == "alignment" else x.half() if change == "dtype" else x,
           n=65 if change == "int" else 64, block=32 if change == "constexpr" else 16)
    assert fn.calls[-1][0] == "direct"


def test_least_recently_used_kernel_is_dropped_past_capacity():
    fn = Recorder()
    launcher = CachedLauncher(fn, capacity=2)
    x = torch.zeros(64)
    for n in (1, 2, 3):
        launch(launcher, x, n=n)
    launch(launcher, x, n=1)                     # dropped: bound again
    launch(launcher, x, n=3)                     # kept
    assert [c[0] for c in fn.calls] == ["bind"] * 4 + ["direct"]


def test_a_failing_direct_launch_falls_back_for_good_and_says_why():
    fn = Recorder(fail_direct=True)
    launcher = CachedLauncher(fn)
    x = torch.zeros(64)
    launch(launcher, x)
    with pytest.warns(RuntimeWarning, match="9 arguments"):
        launch(launcher, x)
    launch(launcher, x)
    assert [c[0] for c in fn.calls] == ["bind", "bind", "bind"]      # the failed call relaunched
    assert "9 arguments" in launcher.fallback_reason and not launcher.direct


def test_a_launch_that_returns_no_kernel_falls_back():
    fn = Recorder(returns_kernel=False)
    launcher = CachedLauncher(fn)
    with pytest.warns(RuntimeWarning, match="cannot be launched again"):
        launch(launcher, torch.zeros(64))
    launch(launcher, torch.zeros(64))
    assert [c[0] for c in fn.calls] == ["bind", "bind"]


@pytest.mark.parametrize("env", [(DIRECT_LAUNCH_ENV, "0"), ("TRITON_INTERPRET", "1")])
def test_interpreter_and_switch_off_always_bind(env, monkeypatch):
    monkeypatch.setenv(*env)
    fn = Recorder()
    launcher = CachedLauncher(fn)
    for _ in range(3):
        launch(launcher, torch.zeros(64))
    assert [c[0] for c in fn.calls] == ["bind"] * 3 and launcher.fallback_reason is None


def test_one_launcher_per_kernel():
    fn = Recorder()
    assert triton_launcher.launcher_for(fn) is triton_launcher.launcher_for(fn)
    assert triton_launcher.launcher_for(Recorder()) is not triton_launcher.launcher_for(fn)
