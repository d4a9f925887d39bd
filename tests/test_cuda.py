"""The compiled Triton kernels on a CUDA GPU, run by ``bench/gpu.sh`` (the default CPU run does not collect this file).

Run with ``TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py``: the rest of the suite runs the
kernels through the interpreter, which cannot share a process with compiled kernels.
``bash bench/gpu.sh --dry-run`` runs this file on a CPU machine with every kernel through the interpreter on CPU
tensors and smaller shapes, so that the GPU run's first minute measures instead of crashing.
"""

import pytest
import torch

from conftest import TOLERANCES, reference_lora
from lorafast import FusedLoRALinear, kernels, lora_linear
from lorafast.backend import resolve_backend
from lorafast.dropout import draw_seed
from lorafast.kernels import gemm_choice
from lorafast.kernels.entry import KernelLaunchError
from lorafast.kernels.fused_lora_matmul import fused_lora_matmul_tuned
from lorafast.profiling import saved_activation_bytes

DEVICE = torch.device("cpu" if kernels.INTERPRETED else "cuda")
pytestmark = pytest.mark.skipif(
    not kernels.INTERPRETED and not torch.cuda.is_available(),
    reason="needs a CUDA GPU (or TRITON_INTERPRET=1: the dry run on CPU tensors)",
)

if DEVICE.type == "cuda":
    SHAPES = [(37, 70, 50, 3), (1000, 768, 3072, 8), (8192, 4096, 4096, 16)]
    SQUARE, SAVED_SHAPE, CONFIG_SHAPE = (4096, 4096, 4096), (4096, 1024), (300, 520, 260, 24)
else:  # the interpreter runs a program at a time: the same cases, smaller
    SHAPES = [(37, 70, 50, 3), (130, 96, 160, 8)]
    SQUARE, SAVED_SHAPE, CONFIG_SHAPE = (130, 96, 96), (256, 128), (40, 72, 48, 24)


@pytest.fixture(autouse=True)
def one_config_per_kernel(monkeypatch):
    """Correctness does not need autotuning; it would compile every config for every shape. The Triton backend
    (auto's choice on CUDA) on CPU tensors too."""
    monkeypatch.setenv("LORAFAST_AUTOTUNE", "0")
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")


def _inputs(n, d_in, d_out, r, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=DEVICE) * scale).to(dtype)
    return (
        make(n, d_in),
        make(d_out, d_in, scale=d_in**-0.5),
        make(d_out),
        make(r, d_in, scale=d_in**-0.5),
        make(d_out, r),
    )


@pytest.mark.parametrize("gemm", gemm_choice.PATHS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_on_cuda(shape, dtype, dropout_p, gemm, monkeypatch):
    """Forward and gradients on both GEMM paths (fused Triton; cuBLAS beside the epilogue kernel)."""
    monkeypatch.setenv("LORAFAST_GEMM", gemm)
    n, d_in, d_out, r = shape
    x, w, b, a, bb = _inputs(n, d_in, d_out, r, dtype)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    torch.manual_seed(5)
    y = lora_linear(x, w, b, a, bb, 2.0, dropout_p=dropout_p, training=True)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), gy)
    torch.manual_seed(5)
    keep = kernels.dropout_keep_mask(draw_seed(), (n, d_in), dropout_p, DEVICE) if dropout_p else None
    _assert_matches_reference((x, w, b, a, bb), y, grads, gy, keep, dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dora_matches_reference_on_cuda(dtype, dropout_p):
    """DoRA on the compiled kernels (g in the fused GEMM's epilogue): y and dX, dA, dB, dm against g·(LoRA without
    bias) + b in fp32 with the same seed, g = m/‖W0 + s·BA‖ from float64."""
    from lorafast.dora import dora_linear

    n, d_in, d_out, r = SHAPES[-1]
    x, w, b, a, bb = _inputs(n, d_in, d_out, r, dtype)
    m = torch.linalg.vector_norm(w.double(), dim=1).mul_(1.2).float().requires_grad_()
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    torch.manual_seed(5)
    y = dora_linear(x, w, b, a, bb, m, 2.0, dropout_p, training=True)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb, m), gy)
    torch.manual_seed(5)
    keep = kernels.dropout_keep_mask(draw_seed(), (n, d_in), dropout_p, DEVICE) if dropout_p else None
    ref = [t.detach().float().requires_grad_() for t in (x, a, bb, m)]
    norm = torch.linalg.vector_norm(w.double() + 2.0 * bb.double() @ a.double(), dim=1).float()
    z = reference_lora(ref[0], w.float(), None, ref[1], ref[2], 2.0, keep=keep, p=dropout_p)
    y_ref = ref[3] / norm * z + b.float()
    grads_ref = torch.autograd.grad(y_ref, ref, gy.float())
    atol, rtol = TOLERANCES[torch.float16 if dtype == torch.float32 else dtype]  # fp32 may run as tf32
    for got, want in zip((y, *grads), (y_ref, *grads_ref), strict=True):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want, atol=atol * scale, rtol=rtol)


def test_compiled_dora_layer_matches_eager_on_cuda():
    """torch.compile(fullgraph=True) of a bf16 DoRA layer: the forward kernel runs as ``lorafast::dora_forward``
    between inductor's fused neighbours; output and the gradients of x, A, B, m equal eager's."""
    torch._dynamo.reset()
    n, d_in, d_out, r = SHAPES[1]
    torch.manual_seed(0)
    layer = FusedLoRALinear(d_in, d_out, r=r, use_dora=True, device=DEVICE, dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    model = torch.nn.Sequential(torch.nn.LayerNorm(d_in, device=DEVICE, dtype=torch.bfloat16), layer, torch.nn.GELU())
    x = torch.randn(n, d_in, device=DEVICE, dtype=torch.bfloat16)
    runs = []
    for call in (model, torch.compile(model, fullgraph=True)):
        x_ = x.clone().requires_grad_()
        y = call(x_)
        y.float().square().sum().backward()
        runs.append((y.detach(), x_.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad))
        layer.zero_grad(set_to_none=True)
    atol, rtol = TOLERANCES[torch.bfloat16]
    for got, want in zip(*runs, strict=True):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want.float(), atol=atol * scale, rtol=rtol)


def _assert_matches_reference(inputs, y, grads, gy, keep, dropout_p, scaling=2.0):
    x, w, b, a, bb = inputs
    ref = [t.detach().float().requires_grad_() for t in (x, a, bb)]
    y_ref = reference_lora(ref[0], w.float(), b.float(), ref[1], ref[2], scaling, keep=keep, p=dropout_p)
    grads_ref = torch.autograd.grad(y_ref, ref, gy.float())
    atol, rtol = TOLERANCES[torch.float16 if x.dtype == torch.float32 else x.dtype]  # fp32 may run as tf32
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want, atol=atol * scale, rtol=rtol)


def test_auto_measures_both_gemm_paths_once_and_keeps_the_faster(tmp_path, monkeypatch):
    """``LORAFAST_GEMM=auto``: the forward's and dX's first calls time both candidates, the faster is kept and
    written to the cache file, and a second call measures nothing; the result is right whichever path won."""
    import time

    monkeypatch.delenv("LORAFAST_GEMM", raising=False)
    timed = []

    def timer(fn):
        timed.append(fn)
        if DEVICE.type == "cuda":
            return gemm_choice.cuda_timer(fn)
        begin = time.perf_counter()  # the interpreter: the measuring path runs, its figures mean nothing
        fn()
        return time.perf_counter() - begin

    monkeypatch.setattr(gemm_choice, "MEASURED_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(gemm_choice, "_CHOOSER", gemm_choice.GemmChooser(tmp_path / "choices.json", timer))
    n, d_in, d_out, r = SHAPES[-1]
    inputs = _inputs(n, d_in, d_out, r, torch.bfloat16)
    x, w, b, a, bb = inputs
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    gy = torch.randn(n, d_out, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(2):
        torch.manual_seed(5)
        y = lora_linear(leaves[0], w, b, leaves[1], leaves[2], 2.0, dropout_p=0.1, training=True)
        grads = torch.autograd.grad(y, leaves, gy)
        assert len(timed) == 4  # two candidates each for the forward and the dX GEMM, on the first call only
    torch.manual_seed(5)
    keep = kernels.dropout_keep_mask(draw_seed(), (n, d_in), 0.1, DEVICE)
    _assert_matches_reference(inputs, y, grads, gy, keep, 0.1)
    keys = [
        gemm_choice.gemm_key("forward", x, w.t(), x[:, :r], b, 0.0),
        gemm_choice.gemm_key("dx", gy, w, gy[:, :r], None, 0.1),
    ]
    for key in keys:
        choice = gemm_choice.recorded_choice(key)
        assert choice["path"] == min(choice["seconds"], key=choice["seconds"].get)
        assert set(choice["seconds"]) == set(gemm_choice.PATHS)
        print(
            f"{key.op}: {choice['path']} ({', '.join(f'{p} {s * 1e3:.3f} ms' for p, s in choice['seconds'].items())})"
        )
    assert (tmp_path / "choices.json").is_file()


@pytest.mark.parametrize("config", fused_lora_matmul_tuned.configs, ids=str)
def test_every_config_compiles_and_is_correct(config):
    x, w, b, a, bb = _inputs(*CONFIG_SHAPE, torch.bfloat16)
    y, xa = kernels.fused_lora_forward(x, w, b, a, bb, 1.5, config=config)
    xa_want = x.float() @ a.float().T
    want = x.float() @ w.float().T + 1.5 * xa_want @ bb.float().T + b.float()
    torch.testing.assert_close(xa.float(), xa_want, atol=5e-2 * xa_want.abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(y.float(), want, atol=5e-2 * want.abs().max().item(), rtol=2e-2)


def test_autotuned_kernels_are_correct(monkeypatch):
    monkeypatch.setenv("LORAFAST_AUTOTUNE", "1")
    x, w, b, a, bb = _inputs(*((2048, 1024, 1024) if DEVICE.type == "cuda" else (64, 96, 80)), 16, torch.bfloat16)
    y = lora_linear(x, w, b, a, bb, 2.0)
    want = x.float() @ w.float().T + 2.0 * (x.float() @ a.float().T) @ bb.float().T + b.float()
    torch.testing.assert_close(y.float(), want, atol=5e-2 * want.abs().max().item(), rtol=2e-2)


def test_auto_backend_is_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("LORAFAST_BACKEND", raising=False)
    assert resolve_backend(DEVICE, torch.bfloat16) == ("triton" if DEVICE.type == "cuda" else "torch")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_bytes_on_cuda(dropout):
    n, d = SAVED_SHAPE
    x = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    layer = FusedLoRALinear(d, d, r=16, dropout=dropout, device=DEVICE, dtype=torch.bfloat16).train()
    saved = saved_activation_bytes(lambda: layer(x), exclude=list(layer.parameters()))
    # x and xa (n, r), plus the fp32 factors cast to bf16 for the call: (r, d) and (d, r), no token-sized extra
    factors = 2 * 16 * d * x.element_size()
    assert saved <= x.numel() * x.element_size() + n * 16 * x.element_size() + factors


@pytest.mark.parametrize("gemm", gemm_choice.PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 70, 50), SQUARE])
def test_mixed_adapter_kernels_match_the_torch_path_on_cuda(shape, dtype, gemm, monkeypatch):
    """The compiled segment kernels against the PyTorch mixed path, on unsorted ids with base-only rows, on both GEMM
    paths (fused Triton; cuBLAS beside the epilogue kernel)."""
    from lorafast import multi_lora_linear

    monkeypatch.setenv("LORAFAST_GEMM", gemm)

    n, d_in, d_out = shape
    g = torch.Generator(device=DEVICE).manual_seed(3)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=DEVICE) * scale).to(dtype)
    x, w, b = make(n, d_in), make(d_out, d_in, scale=d_in**-0.5), make(d_out)
    lora_A, lora_B = make(8, 16, d_in, scale=d_in**-0.5), make(8, d_out, 16)
    ids = torch.randint(-1, 8, (n,), generator=g, device=DEVICE)
    gy = make(n, d_out)
    results = []
    for backend, to in (("triton", dtype), ("torch", torch.float32)):  # reference: fp32 on the rounded inputs
        monkeypatch.setenv("LORAFAST_BACKEND", backend)
        leaves = [t.detach().to(to).requires_grad_() for t in (x, lora_A, lora_B)]
        scalings = [2.0, 0.5, 1.0, 3.0, 1.5, 2.5, 0.25, 4.0]
        y = multi_lora_linear(leaves[0], w.to(to), b.to(to), leaves[1], leaves[2], scalings, ids)
        results.append((y, *torch.autograd.grad(y, leaves, gy.to(to))))
    atol, rtol = TOLERANCES[torch.float16 if dtype == torch.float32 else dtype]  # fp32 may run as tf32
    for got, want in zip(*results):
        assert got.dtype == dtype
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want, atol=atol * scale, rtol=rtol)


def test_fallback_to_the_pytorch_path_on_cuda(monkeypatch):
    """``auto`` with the fused GEMM made to fail as a too-big config does (``OutOfResources``): one warning, then the
    PyTorch path's forward and gradients; a forced ``triton`` raises naming ``LORAFAST_BACKEND=torch``."""
    from triton.runtime.errors import OutOfResources

    from lorafast import backend
    from lorafast.kernels import fused_lora_matmul

    class TooBig:  # the plain and the autotuned kernel: every launch raises before running
        __name__ = "fused_lora_matmul_kernel"
        configs, early_config_prune = fused_lora_matmul.fused_lora_matmul_tuned.configs, None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise OutOfResources(245760, 232448, "shared memory")

            return run

    monkeypatch.setattr(fused_lora_matmul, "fused_lora_matmul_kernel", TooBig())
    monkeypatch.setattr(fused_lora_matmul, "fused_lora_matmul_tuned", TooBig())
    monkeypatch.setattr(backend, "AUTO_TRITON_DEVICE_TYPES", {"cuda", DEVICE.type})
    monkeypatch.setenv("LORAFAST_BACKEND", "auto")
    backend.forget_failures()
    n, d_in, d_out, r = SHAPES[1]
    inputs = _inputs(n, d_in, d_out, r, torch.bfloat16)
    x, w, b, a, bb = inputs
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    try:
        with pytest.warns(backend.KernelFallbackWarning, match="fused_lora_matmul_kernel"):
            y = lora_linear(leaves[0], w, b, leaves[1], leaves[2], 2.0)
        gy = torch.randn_like(y)
        _assert_matches_reference(inputs, y, torch.autograd.grad(y, leaves, gy), gy, None, 0.0)
        monkeypatch.setenv("LORAFAST_BACKEND", "triton")
        with pytest.raises(KernelLaunchError, match="LORAFAST_BACKEND=torch"):
            lora_linear(x, w, b, a, bb, 2.0)
    finally:
        backend.forget_failures()


def test_dora_backward_does_not_wait_for_the_gpu(monkeypatch):
    """After a warm-up step (autotuning and the GEMM choice time on the host), a DoRA training step runs with
    ``torch.cuda.set_sync_debug_mode("error")``: no ``bool(tensor)`` or copy to pageable host memory (on CPU tensors,
    the dry run, the same steps without the check)."""
    from lorafast.dora import dora_linear

    monkeypatch.delenv("LORAFAST_GEMM", raising=False)
    n, d_in, d_out, r = SHAPES[1]
    x, w, b, a, bb = _inputs(n, d_in, d_out, r, torch.bfloat16)
    m = torch.linalg.vector_norm(w.float(), dim=1).requires_grad_()
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    for checked in (False, DEVICE.type == "cuda"):
        if checked:
            torch.cuda.set_sync_debug_mode("error")
        try:
            y = dora_linear(x, w, b, a, bb, m, 2.0)
            grads = torch.autograd.grad(y, (x, a, bb, m), torch.ones_like(y))
        finally:
            if checked:
                torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(g).all() for g in grads)
