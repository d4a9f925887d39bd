"""The mixed-adapter GEMM's two paths (fused Triton kernel; cuBLAS beside the kernel's K = 0 epilogue) through the
interpreter: the same outputs and gradients as a float64 reference, with and without dropout, whichever
``LORAFAST_GEMM`` forces; and ``auto``'s choice for the ``multi_forward`` and ``multi_dx`` keys."""

import json

import pytest
import torch
from test_multi_lora_linear import rows_alone, run_mixed

from conftest import assert_close_scaled, keep_mask, make_adapter_list, require_interpreter
from lorafast.dropout import draw_seed
from lorafast.kernels import gemm_choice
from lorafast.kernels.adapter_segments import adapter_segments
from lorafast.kernels.multi_factors import A_COL, B_COL, stacked_factors
from lorafast.kernels.multi_lora_matmul import cublas_multi_lora_matmul, multi_lora_matmul

require_interpreter()

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
N, IN_F, OUT_F, NUM_ADAPTERS = 41, 70, 50, 3
DROPOUT = [0.2, 0.0, 0.3]  # an adapter with p = 0 beside two with dropout


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")


def _problem(dtype):
    """x, W0, b, adapters of mixed ranks (leaves in ``dtype``), unsorted ids with base-only rows, dY."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, IN_F, generator=g)
    weight = torch.randn(OUT_F, IN_F, generator=g) / IN_F**0.5
    bias = torch.randn(OUT_F, generator=g)
    ids = torch.randint(-1, NUM_ADAPTERS, (N,), generator=g)
    ids[:2] = -1
    grad_y = torch.randn(N, OUT_F, generator=g)
    adapters = [
        (a.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_(), s)
        for a, b, s in make_adapter_list(NUM_ADAPTERS, IN_F, OUT_F, seed=11)
    ]
    return [t.to(dtype) for t in (x, weight, bias)], adapters, ids, grad_y.to(dtype)


@pytest.mark.parametrize("path", gemm_choice.PATHS)
@pytest.mark.parametrize("dropout", [None, DROPOUT])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_paths_match_float64(path, dropout, dtype, monkeypatch):
    monkeypatch.setenv("LORAFAST_GEMM", path)
    (x, weight, bias), adapters, ids, grad_y = _problem(dtype)
    torch.manual_seed(4)
    y, grad_x, grads = run_mixed(x, weight, bias, adapters, ids, grad_y, dropout=dropout)
    torch.manual_seed(4)
    seed = draw_seed()
    masks = [keep_mask("triton", seed, (N, IN_F), p) if p else None for p in dropout] if dropout else None
    wide = [(a.detach().double(), b.detach().double(), s) for a, b, s in adapters]
    y_ref, grad_x_ref, grads_ref = rows_alone(
        x.double(), weight.double(), bias.double(), wide, ids, grad_y.double(), masks=masks, dropout=dropout
    )
    assert y.dtype == dtype and grad_x.dtype == dtype
    assert_close_scaled(y, y_ref, rel=TOLERANCE[dtype])
    assert_close_scaled(grad_x, grad_x_ref, rel=TOLERANCE[dtype])
    for got, want in zip(grads, grads_ref):
        for g_got, g_want in zip(got, want):
            assert g_got.dtype == dtype
            assert_close_scaled(g_got, g_want, rel=TOLERANCE[dtype])


@pytest.mark.parametrize("p_col", [A_COL, B_COL], ids=["forward", "dx"])
def test_cublas_candidate_equals_the_fused_kernel(p_col):
    """The K = 0 epilogue on the given UP plus addmm is the fused kernel's C (dX's mask included), for every row."""
    (x, weight, bias), adapters, ids, grad_y = _problem(torch.float32)
    factors = stacked_factors(*(torch.stack(t) for t in _padded(adapters)))
    scalings = torch.tensor([s for _, _, s in adapters], dtype=torch.float32)
    segments = adapter_segments(ids, NUM_ADAPTERS, 64)
    dropout = torch.tensor(DROPOUT) if p_col == B_COL else None
    u, v, b = (x, weight.t(), bias) if p_col == A_COL else (grad_y, weight, None)
    run = lambda seed: multi_lora_matmul(u, v, factors, p_col, b, scalings, segments, True, None, dropout, seed)
    fused, up = run(7)
    composite = cublas_multi_lora_matmul(u, v, factors, p_col, b, scalings, segments, dropout, 7, up.clone())
    torch.testing.assert_close(composite, fused, atol=1e-5, rtol=1e-5)
    if dropout is not None:  # the mask follows the seed
        other = cublas_multi_lora_matmul(u, v, factors, p_col, b, scalings, segments, dropout, 8, up.clone())
        assert not torch.equal(other, composite)
        torch.testing.assert_close(other, run(8)[0], atol=1e-5, rtol=1e-5)


def _padded(adapters):
    """Zero-padded ``[A_k (R, in)]``, ``[B_k (out, R)]``."""
    rank = max(a.shape[0] for a, _, _ in adapters)
    pad = torch.nn.functional.pad
    return [pad(a.detach(), (0, 0, 0, rank - a.shape[0])) for a, _, _ in adapters], [
        pad(b.detach(), (0, rank - b.shape[1])) for _, b, _ in adapters
    ]


@pytest.mark.parametrize("faster", gemm_choice.PATHS)
def test_auto_times_both_multi_paths_once_caches_and_runs_the_faster(faster, tmp_path, monkeypatch):
    """``auto`` with an injected timer: the mixed forward's and dX's first calls time both candidates, keep the faster
    (in-process and in the file, keys ``multi_forward``/``multi_dx``), a second call times nothing, results right."""
    monkeypatch.delenv("LORAFAST_GEMM", raising=False)
    ran = []

    def timer(fn):
        ran.append(fn.__name__)  # the launcher's candidates: "fused" (triton), "composite" (cublas)
        fn()
        path = "triton" if fn.__name__ == "fused" else "cublas"
        return 1.0 if path == faster else 2.0

    cache = tmp_path / "choices.json"
    monkeypatch.setattr(gemm_choice, "MEASURED_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(gemm_choice, "_CHOOSER", gemm_choice.GemmChooser(cache, timer))
    (x, weight, bias), adapters, ids, grad_y = _problem(torch.float32)
    for _ in range(2):
        torch.manual_seed(4)
        y, grad_x, grads = run_mixed(x, weight, bias, adapters, ids, grad_y, dropout=DROPOUT)
        assert sorted(ran) == ["composite", "composite", "fused", "fused"]  # first call only
    saved = json.loads(cache.read_text())
    ops = {text.split("|")[0]: entry for text, entry in saved.items()}
    assert set(ops) == {"multi_forward", "multi_dx"}
    for entry in ops.values():
        assert entry["path"] == faster and set(entry["seconds"]) == set(gemm_choice.PATHS)
    torch.manual_seed(4)
    seed = draw_seed()
    masks = [keep_mask("triton", seed, (N, IN_F), p) if p else None for p in DROPOUT]
    y_ref, grad_x_ref, grads_ref = rows_alone(x, weight, bias, adapters, ids, grad_y, masks=masks, dropout=DROPOUT)
    flat = lambda per_adapter: [g for pair in per_adapter for g in pair]
    for got, want in zip([y, grad_x, *flat(grads)], [y_ref, grad_x_ref, *flat(grads_ref)]):
        assert_close_scaled(got, want, rel=TOLERANCE[torch.float32])
