"""``auto``'s fallback to the PyTorch path when a Triton kernel cannot compile or launch, and the device guard.

``auto`` takes the Triton kernels on CUDA only; these tests add "cpu" to ``backend.AUTO_TRITON_DEVICE_TYPES`` so that
``auto`` runs the kernels through Triton's interpreter, and replace one kernel with one that raises as Triton does
before a launch (``OutOfResources``, ``CompilationError``). Results are compared with float64 math written here.
"""

import importlib
import subprocess
import warnings

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import AutotunerError, OutOfResources

from conftest import assert_close_scaled, make_inputs, reference_lora
from lorafast import backend, lora_linear, multi_lora_linear
from lorafast.backend import KernelFallbackWarning
from lorafast.dora import dora_linear
from lorafast.dropout import draw_seed
from lorafast.dropout import keep_mask as torch_keep_mask
from lorafast.kernels import entry, fused_lora_matmul, multi_lora_matmul
from lorafast.kernels import launch as launch_module
from lorafast.kernels.entry import KernelLaunchError

# the package exports functions so named
lora_weight_grad = importlib.import_module("lorafast.kernels.lora_weight_grad")
multi_lora_weight_grad = importlib.import_module("lorafast.kernels.multi_lora_weight_grad")

N, IN, OUT, R = 24, 32, 40, 4


class FailingKernel:
    """Stands for a Triton kernel whose every launch raises ``error`` before running; counts the attempts."""

    def __init__(self, name, error):
        self.__name__, self.error, self.calls = name, error, 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls += 1
            raise self.error

        return run


@pytest.fixture(autouse=True)
def auto_on_cpu(monkeypatch):
    """``auto`` semantics with the interpreted kernels on CPU, and no failure remembered from another test."""
    monkeypatch.setattr(backend, "AUTO_TRITON_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setenv("LORAFAST_BACKEND", "auto")
    monkeypatch.delenv("LORAFAST_GEMM", raising=False)
    backend.forget_failures()
    yield
    backend.forget_failures()


def fail(monkeypatch, module, name, error):
    kernel = FailingKernel(name, error)
    monkeypatch.setattr(module, name, kernel)
    return kernel


def out_of_shared_memory():
    return OutOfResources(245760, 232448, "shared memory")


def leaves(n=N, dtype=torch.float32, seed=0):
    x, w, b, a, bb = make_inputs((n,), IN, OUT, R, dtype, seed=seed)
    return x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_()


def reference_step(x, w, b, a, bb, scaling, gy, keep=None, p=0.0):
    """y and (dX, dA, dB) of the LoRA linear in float64 autograd."""
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    y = reference_lora(leaves64[0], w.double(), b.double(), leaves64[1], leaves64[2], scaling, keep, p)
    return y, torch.autograd.grad(y, leaves64, gy.double())


def step(x, w, b, a, bb, scaling=2.0, **kwargs):
    y = lora_linear(x, w, b, a, bb, scaling, **kwargs)
    gy = torch.randn_like(y)
    return y, torch.autograd.grad(y, (x, a, bb), gy), gy


def assert_matches(y, grads, expected_y, expected_grads):
    assert_close_scaled(y, expected_y)
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close_scaled(got, want)


def fallback_warnings(record):
    return [w for w in record if issubclass(w.category, KernelFallbackWarning)]


def step_and_warnings(x, w, b, a, bb, **kwargs):
    """:func:`step`'s ``(y, grads, gy)`` and the ``KernelFallbackWarning``s it gave."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y, grads, gy = step(x, w, b, a, bb, **kwargs)
    return y, grads, gy, fallback_warnings(record)


def test_fallback_out_of_resources_runs_pytorch_path_once_per_key(monkeypatch):
    kernel = fail(monkeypatch, fused_lora_matmul, "fused_lora_matmul_kernel", out_of_shared_memory())
    x, w, b, a, bb = leaves()
    y, grads, gy, [warning] = step_and_warnings(x, w, b, a, bb)
    assert_matches(y, grads, *reference_step(x, w, b, a, bb, 2.0, gy))
    message = str(warning.message)
    for part in ("fused_lora_matmul_kernel", f"x ({N}, {IN}) float32", "shared memory", "LORAFAST_BACKEND=torch"):
        assert part in message
    attempts = kernel.calls
    assert attempts >= 1

    # Same key (token bucket, sizes, rank, dtype, dropout): the PyTorch path at once, no retry, no warning.
    x2, *_ = leaves(n=N - 3, seed=1)
    y2, grads2, gy2, warned = step_and_warnings(x2, w, b, a, bb)
    assert kernel.calls == attempts and not warned
    assert_matches(y2, grads2, *reference_step(x2, w, b, a, bb, 2.0, gy2))

    # Another token bucket is another key: tried again, warned again.
    x3, *_ = leaves(n=4 * N, seed=2)
    with pytest.warns(KernelFallbackWarning):
        step(x3, w, b, a, bb)
    assert kernel.calls > attempts


def test_fallback_keeps_the_pytorch_paths_dropout_mask(monkeypatch):
    """With dropout, the redone call draws the PyTorch path's mask from the same seed torch's generator gives."""
    fail(monkeypatch, fused_lora_matmul, "fused_lora_matmul_kernel", out_of_shared_memory())
    x, w, b, a, bb = leaves()
    torch.manual_seed(7)
    with pytest.warns(KernelFallbackWarning):
        y, grads, gy = step(x, w, b, a, bb, dropout_p=0.25, training=True)
    torch.manual_seed(7)
    keep = torch_keep_mask(draw_seed(), (N, IN), 0.25).double()
    assert_matches(y, grads, *reference_step(x, w, b, a, bb, 2.0, gy, keep, 0.25))


def test_fallback_forced_triton_raises_naming_the_torch_backend(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")
    error = CompilationError(None, None, "tf32 is not supported on gfx90a")
    fail(monkeypatch, fused_lora_matmul, "fused_lora_matmul_kernel", error)
    x, w, b, a, bb = leaves()
    with pytest.raises(KernelLaunchError, match="LORAFAST_BACKEND=torch") as caught:
        lora_linear(x, w, b, a, bb, 2.0)
    assert caught.value.kernel == "fused_lora_matmul_kernel" and "gfx90a" in caught.value.reason
    assert not backend.failed(backend.fallback_key(N, IN, OUT, R, torch.float32, False, False, x.device))


def test_fallback_compilation_error_in_dora_forward(monkeypatch):
    fail(monkeypatch, fused_lora_matmul, "fused_lora_matmul_kernel", CompilationError(None, None, "no tf32"))
    x, w, b, a, bb = leaves()
    m = (torch.rand(OUT) + 0.5).requires_grad_()
    with pytest.warns(KernelFallbackWarning, match="CompilationError"):
        y = dora_linear(x, w, b, a, bb, m, 2.0)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb, m), gy)
    x64, a64, bb64, m64 = (t.detach().double().requires_grad_() for t in (x, a, bb, m))
    norm = (w.double() + 2.0 * bb64.detach() @ a64.detach()).norm(dim=1)
    y64 = (m64 / norm) * (x64 @ w.double().T + 2.0 * (x64 @ a64.T) @ bb64.T) + b.double()
    expected = torch.autograd.grad(y64, (x64, a64, bb64, m64), gy.double())
    assert_matches(y, grads, y64, expected)


def mixed_step():
    """A mixed batch of 2 adapters (and base rows) through ``multi_lora_linear``: ``(y, grads)`` and the float64
    ``(y, grads)`` of the same leaves."""
    x, w, b, _, _ = leaves()
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(2, R, IN, generator=g) / IN**0.5).requires_grad_()
    bb = torch.randn(2, OUT, R, generator=g).requires_grad_()
    ids = torch.tensor([0, 1, -1] * (N // 3))
    y = multi_lora_linear(x, w, b, a, bb, [2.0, 0.5], ids)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), gy)
    x64, a64, bb64 = (t.detach().double().requires_grad_() for t in (x, a, bb))
    delta = torch.zeros(N, OUT, dtype=torch.float64)
    for k, s in enumerate([2.0, 0.5]):
        rows = (ids == k).double()[:, None]
        delta = delta + rows * s * (x64 @ a64[k].T) @ bb64[k].T
    y64 = x64 @ w.double().T + b.double() + delta
    return y, grads, y64, torch.autograd.grad(y64, (x64, a64, bb64), gy.double())


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_fallback_mixed_adapters(monkeypatch, where):
    """The mixed GEMM fails from the forward on, or only dA/dB's reduction in backward: the PyTorch path's results."""
    if where == "forward":
        fail(monkeypatch, multi_lora_matmul, "multi_lora_matmul_kernel", out_of_shared_memory())
    else:
        fail(monkeypatch, multi_lora_weight_grad, "multi_lora_weight_grad_kernel", out_of_shared_memory())
    with pytest.warns(KernelFallbackWarning, match=f"multi_lora_{'matmul' if where == 'forward' else 'weight_grad'}"):
        y, grads, y64, grads64 = mixed_step()
    assert_matches(y, grads, y64, grads64)


def test_fallback_in_backward_without_dropout_gives_the_pytorch_gradients(monkeypatch):
    """The forward ran on Triton; dA/dB's kernel fails: the PyTorch backward from the saved xa, one warning."""
    kernel = fail(monkeypatch, lora_weight_grad, "lora_weight_grad_kernel", out_of_shared_memory())
    x, w, b, a, bb = leaves()
    y, grads, gy, [warning] = step_and_warnings(x, w, b, a, bb)
    assert "lora_weight_grad_kernel" in str(warning.message)
    assert_matches(y, grads, *reference_step(x, w, b, a, bb, 2.0, gy))
    attempts = kernel.calls
    step(x, w, b, a, bb)  # the key failed: forward and backward on the PyTorch path
    assert kernel.calls == attempts


def test_fallback_in_backward_under_dropout_raises_then_later_calls_run_pytorch(monkeypatch):
    """The forward's Triton mask cannot be redrawn by the PyTorch path: a clear error, then the next call of that
    key runs the PyTorch path from its forward on."""
    kernel = fail(monkeypatch, lora_weight_grad, "lora_weight_grad_kernel", out_of_shared_memory())
    x, w, b, a, bb = leaves()
    with pytest.warns(KernelFallbackWarning), pytest.raises(KernelLaunchError, match=r"dropout.*LORAFAST_BACKEND"):
        step(x, w, b, a, bb, dropout_p=0.25, training=True)
    attempts = kernel.calls
    torch.manual_seed(11)
    y, grads, gy = step(x, w, b, a, bb, dropout_p=0.25, training=True)
    assert kernel.calls == attempts
    torch.manual_seed(11)
    keep = torch_keep_mask(draw_seed(), (N, IN), 0.25).double()
    assert_matches(y, grads, *reference_step(x, w, b, a, bb, 2.0, gy, keep, 0.25))


def test_fallback_warns_once_per_key():
    key = backend.fallback_key(N, IN, OUT, R, torch.float32, False, False, torch.device("cpu"))
    error = KernelLaunchError("the LoRA forward", "k", "x (1, 1)", "why")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        backend.record_failure(key, error)
        backend.record_failure(key, error)
    assert len(fallback_warnings(record)) == 1 and backend.failed(key)


def test_fallback_leaves_other_errors_alone(monkeypatch):
    """A bug is no launch failure: it is raised as it is, under auto too, and nothing is remembered."""
    fail(monkeypatch, fused_lora_matmul, "fused_lora_matmul_kernel", ZeroDivisionError("a bug"))
    x, w, b, a, bb = leaves()
    with pytest.raises(ZeroDivisionError):
        lora_linear(x, w, b, a, bb, 2.0)
    assert not backend._FAILED


@pytest.mark.parametrize(
    "error",
    [
        out_of_shared_memory(),
        CompilationError(None, None, "bad"),
        AutotunerError("No valid autotuner configs after pruning"),  # every config pruned
        subprocess.CalledProcessError(1, ["gcc", "driver.c"]),
        RuntimeError("Failed to find C compiler. Please specify via CC environment variable"),
        RuntimeError("Triton Error [CUDA]: device kernel image is invalid"),
        AssertionError("libcuda.so cannot found!\nPlease make sure GPU is set up"),
    ],
)
def test_fallback_launch_failures_are_recognised(error):
    assert entry.launch_failure(error)


@pytest.mark.parametrize(
    "error",
    [ValueError("x"), RuntimeError("shape mismatch"), torch.OutOfMemoryError("Triton Error [CUDA]"), KeyError()],
)
def test_fallback_other_errors_are_not_launch_failures(error):
    assert entry.launch_failure(error) is None


def test_every_launch_runs_inside_the_tensors_device_guard(monkeypatch):
    """Forward and backward enter the guard once each, with the tensors' device, and launch only inside it."""
    entered, inside = [], [False]

    class Guard:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            inside[0] = True

        def __exit__(self, *exc):
            inside[0] = False

    launches = []
    real_launch = launch_module._launch

    def checked_launch(*args):
        launches.append(inside[0])
        return real_launch(*args)

    monkeypatch.setattr(entry, "device_guard", Guard)
    monkeypatch.setattr(launch_module, "_launch", checked_launch)
    x, w, b, a, bb = leaves()
    step(x, w, b, a, bb, dropout_p=0.25, training=True)
    assert entered == [x.device, x.device]
    assert len(launches) >= 4 and all(launches)


def test_device_guard_selects_the_tensors_cuda_device():
    guard = entry.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(entry.device_guard(torch.device("cpu")), torch.cuda.device)


def test_fallback_without_autotuning_takes_the_first_kept_config_that_fits(monkeypatch):
    """``LORAFAST_AUTOTUNE=0`` on a GPU: the configs the autotuner's pruning keeps, in order, the first that fits; all
    too big: Triton's error, with the kernel's name for the entry's message."""
    import triton

    configs = [triton.Config({"BLOCK": b}) for b in (256, 128, 64, 32)]
    tried = []

    class Kernel:
        __name__, arg_names = "some_kernel", ["x_ptr", "N"]

        def __getitem__(self, grid):
            def run(*args, BLOCK, **kwargs):
                tried.append(BLOCK)
                if BLOCK > limit:
                    raise out_of_shared_memory()

            return run

    class Tuned:
        def __init__(self):
            self.configs = configs

        @staticmethod
        def early_config_prune(configs, named):
            assert named == {"x_ptr": "x", "N": 7}
            return [c for c in configs if c.kwargs["BLOCK"] != 128]  # keeps 256, 64, 32

    monkeypatch.setattr(launch_module, "INTERPRETED", False)
    monkeypatch.setenv("LORAFAST_AUTOTUNE", "0")
    limit = 64
    launch_module.launch(Kernel(), Tuned(), lambda meta: (1,), ("x", 7), None)
    assert tried == [256, 64]
    tried.clear()
    limit = 16
    with pytest.raises(OutOfResources) as caught:
        launch_module.launch(Kernel(), Tuned(), lambda meta: (1,), ("x", 7), None)
    assert tried == [256, 64, 32] and caught.value.lorafast_kernel == "some_kernel"
