"""The expert kernels themselves (Triton's interpreter on CPU) against a float64 per-expert loop: forward and dX over
uneven segments (one longer than a row block), an empty expert, both weight layouts, bias, fp32 and bf16."""

import pytest
import torch
import triton

from lorafast.kernels.adapter_segments import BLOCK_M
from lorafast.kernels.expert_lora_matmul import expert_dx, expert_forward, expert_segments

COUNTS = [3, 0, BLOCK_M + 6, 1]
E, R, IN, OUT = len(COUNTS), 3, 40, 24  # r pads to 16; in, out not block multiples
CONFIGS = [  # the first config (run when not autotuning) and a narrow one
    None,
    triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_stages=2, num_warps=4),
]


def _float64_loop(x, grad_y, weight, bias, lora_A, lora_B, scaling, transposed):
    """``(y, xa, dX, g)`` expert by expert in float64."""
    ys, xas, dxs, gs, start = [], [], [], [], 0
    for e, count in enumerate(COUNTS):
        xe, ge = x[start : start + count].double(), grad_y[start : start + count].double()
        w = weight[e].double().T if transposed else weight[e].double()
        a, b = lora_A[e].double(), lora_B[e].double()
        xas.append(xe @ a.T)
        ys.append(xe @ w.T + scaling * xas[-1] @ b.T + (0 if bias is None else bias[e].double()))
        gs.append(ge @ b)
        dxs.append(ge @ w + scaling * gs[-1] @ a)
        start += count
    return [torch.cat(t) for t in (ys, xas, dxs, gs)]


@pytest.mark.parametrize("config", CONFIGS, ids=["first", "narrow"])
@pytest.mark.parametrize("transposed", [False, True], ids=["E_out_in", "E_in_out"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_expert_kernels_match_float64_loop(config, transposed, dtype, tol):
    g = torch.Generator().manual_seed(0)
    rows = sum(COUNTS)
    weight = torch.randn(E, *((IN, OUT) if transposed else (OUT, IN)), generator=g).to(dtype)
    bias = torch.randn(E, OUT, generator=g).to(dtype)
    lora_A, lora_B = torch.randn(E, R, IN, generator=g).to(dtype), torch.randn(E, OUT, R, generator=g).to(dtype)
    x, grad_y = torch.randn(rows, IN, generator=g).to(dtype), torch.randn(rows, OUT, generator=g).to(dtype)
    segments = expert_segments(COUNTS, x.device)
    y, xa = expert_forward(x, weight, bias, lora_A, lora_B, 0.5, segments, transposed, config)
    dx, g_out = expert_dx(grad_y, weight, lora_A, lora_B, 0.5, segments, transposed, config)
    for got, want in zip((y, xa, dx, g_out), _float64_loop(x, grad_y, weight, bias, lora_A, lora_B, 0.5, transposed)):
        assert got.dtype == dtype
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)


def test_empty_input_launches_nothing():
    x = torch.randn(0, IN)
    segments = expert_segments([0] * E, x.device)
    y, xa = expert_forward(
        x, torch.randn(E, OUT, IN), None, torch.randn(E, R, IN), torch.randn(E, OUT, R), 1.0, segments
    )
    assert y.shape == (0, OUT) and xa.shape == (0, R)
