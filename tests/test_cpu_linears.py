"""kernels/cpu_linear.py and the cpu_linears pass: a CPU graph's few-row linear layers by a numba
kernel where it measured faster than the BLAS for the shape; the same values as ``F.linear``
either way, measured once per shape, and only where the op is safe (CPU, inference, fp32)."""
import pytest
import torch
import torch.nn.functional as F

import kvdrive_compile
from kvdrive_compile.kernels import cpu_linear


@pytest.fixture
def decide(monkeypatch):
    """Force the decision of every shape (True: the numba kernel), without measuring."""
    def force(kernel: bool):
        monkeypatch.setattr(cpu_linear, "use_kernel", lambda *key: kernel)
    return force


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("lead,k,n,bias", [((1,), 5, 7, False), ((4,), 64, 48, True), ((3, 1), 33, 17, True),
                                           ((2, 5), 16, 1, False), ((64,), 8, 9, True), ((4,), 576, 1000, True)])
def test_same_values_as_f_linear(decide, kernel, lead, k, n, bias):
    decide(kernel)
    g = torch.Generator().manual_seed(hash((lead, k, n)) % 1000)
    x = torch.randn(*lead, k, generator=g)
    w, b = torch.randn(n, k, generator=g), (torch.randn(n, generator=g) if bias else None)
    out = cpu_linear.linear(x, w, b)
    assert out.shape == (*lead, n) and out.is_contiguous()
    exact = F.linear(x.double(), w.double(), None if b is None else b.double()).float()
    tol = dict(rtol=1e-5, atol=2e-6 * k ** 0.5)                 # fp32 sums of k products, any order
    torch.testing.assert_close(out, exact, **tol)
    torch.testing.assert_close(F.linear(x, w, b), exact, **tol)
    torch.testing.assert_close(cpu_linear.linear_op(x, w, b), exact, **tol)


def test_non_contiguous_inputs_other_dtypes_and_special_values(decide, monkeypatch):
    decide(True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=g).t()                  # [4, 24], strided
    w = torch.randn(24, 10, generator=g).t()                 # [10, 24], strided (a tied, transposed weight)
    ran = []
    run = cpu_linear._run
    monkeypatch.setattr(cpu_linear, "_run", lambda *a: ran.append(a) or run(*a))
    torch.testing.assert_close(cpu_linear.linear(x, w.contiguous()), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert len(ran) == 1                                     # strided x: the kernel, on a contiguous copy
    calls = []
    monkeypatch.setattr(cpu_linear, "_run", lambda *a: calls.append(a))
    for xx, ww in ((x, w), (x.double(), w.contiguous().double()), (x.bfloat16(), w.contiguous().bfloat16())):
        assert torch.equal(cpu_linear.linear(xx, ww), F.linear(xx, ww))        # F.linear's own call
    assert not calls
    monkeypatch.undo()
    decide(True)
    x, w = torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g)
    x[0, 3], x[1, 5], w[6, 2] = float("nan"), float("inf"), float("-inf")
    torch.testing.assert_close(cpu_linear.linear(x, w), F.linear(x, w), equal_nan=True)


def test_many_rows_take_the_usual_call_unmeasured(monkeypatch):
    def fail(*a):
        raise AssertionError("measured a shape over MAX_ROWS rows")
    monkeypatch.setattr(cpu_linear, "_measure", fail)
    x, w = torch.randn(cpu_linear.MAX_ROWS + 1, 8), torch.randn(6, 8)
    assert torch.equal(cpu_linear.linear(x, w), F.linear(x, w))


def test_each_shape_is_measured_once(monkeypatch):
    seen = []
    monkeypatch.setattr(cpu_linear, "_chosen", {})
    monkeypatch.setattr(cpu_linear, "_measure", lambda *key: seen.append(key) or len(seen) % 2 == 1)
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    for _ in range(3):
        cpu_linear.linear(x, w)
        cpu_linear.linear(x[:2], w)
    assert seen == [(3, 8, 5), (2, 8, 5)]
    threads = cpu_linear.get_num_threads()
    assert cpu_linear.chosen() == {(3, 8, 5, threads): True, (2, 8, 5, threads): False}


def test_the_measurement_times_both_calls_on_bounded_memory(monkeypatch):
    """A real measurement: a bool, on at most _STREAM_BYTES of weights however big the layer."""
    made = []
    real_randn = torch.randn
    monkeypatch.setattr(cpu_linear, "_STREAM_BYTES", 1 << 20)
    monkeypatch.setattr(torch, "randn", lambda *a, **kw: made.append(real_randn(*a, **kw)) or made[-1])
    assert isinstance(cpu_linear._measure(4, 256, 50_000), bool)                    # one weight: 51 MB
    weights = made[0]
    assert weights.numel() * 4 <= 1 << 20 and weights.shape[-1] == 256
    made.clear()
    cpu_linear._measure(2, 16, 16)                                                 # tiny: copies capped
    assert made[0].shape[0] == cpu_linear._MAX_COPIES


def test_fake_tensors_are_not_measured(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(cpu_linear, "_measure", lambda *a: pytest.fail("measured a fake tensor"))
    with FakeTensorMode():
        out = cpu_linear.linear(torch.empty(4, 8), torch.empty(6, 8))
    assert out.shape == (4, 6)


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + F.linear(x, self.up.weight[:16])


@pytest.mark.parametrize("compile_rest", ["eager", "inductor"])
def test_the_pass_rewrites_inference_graphs_only(compile_rest):
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(3, 1, 16)
    with torch.no_grad():
        ref = model(x)
        for how, expect in (("auto", 3), ("aten", 0)):
            torch._dynamo.reset()
            kvdrive_compile.counters.reset()
            out = torch.compile(model, backend="kvdrive", options={"cpu_linears": how, "compile_rest": compile_rest})(x)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            assert kvdrive_compile.counters.cpu_linears == expect, how
    torch._dynamo.reset()
    kvdrive_compile.counters.reset()
    out = torch.compile(model, backend="kvdrive", options={"compile_rest": compile_rest})(x)     # grad enabled
    out.sum().backward()
    assert kvdrive_compile.counters.cpu_linears == 0 and model.up.weight.grad is not None
    torch._dynamo.reset()
    with torch.no_grad():                                                                      # fp64: as traced
        model.double()
        out = torch.compile(model, backend="kvdrive", options={"compile_rest": compile_rest})(x.double())
        model.float()
    torch.testing.assert_close(out, ref.double(), rtol=1e-5, atol=1e-5)
    assert kvdrive_compile.counters.cpu_linears == 0
    torch._dynamo.reset()


def test_the_option_is_checked():
    with pytest.raises(ValueError, match=r"cpu_linears='fast': choose one of \['auto', 'aten'\]"):
        kvdrive_compile.options.parse_options({"cpu_linears": "fast"})
