"""LoRA dropout: eval is no dropout, backward uses forward's mask, the rate is right, seeds reproduce."""

import math

import numpy as np
import pytest
import torch

from conftest import assert_close_scaled, keep_mask, make_inputs, reference_lora
from lorafast import FusedLoRALinear, lora_linear
from lorafast.dropout import draw_seed, row_blocks


def test_eval_mode_equals_no_dropout(backend):
    x, w, b, a, bb = make_inputs((2, 11), 40, 30, 4)
    expected = lora_linear(x, w, b, a, bb, 2.0)
    torch.testing.assert_close(lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=False), expected)
    layer = FusedLoRALinear(40, 30, r=4, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    layer.eval()
    torch.testing.assert_close(layer(x), lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 4.0))


def _train_with_dropout(inputs, scaling, p, torch_seed):
    """lora_linear in training under dropout p, right after ``torch.manual_seed(torch_seed)``, on make_inputs'
    ``inputs``: ``(y, grad_y, (dX, dA, dB), the dropout seed it drew)``."""
    x, w, b, a, bb = inputs
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    torch.manual_seed(torch_seed)
    y = lora_linear(x, w, b, a, bb, scaling, dropout_p=p, training=True)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), grad_y)
    torch.manual_seed(torch_seed)
    return y, grad_y, grads, draw_seed()


def _float64_reference(inputs, scaling, keep, p, grad_y):
    """float64 LoRA on ``keep``: ``(y, x, A, B leaves, (dX, dA, dB))``."""
    x, w, b, a, bb = inputs
    x_r, a_r, b_r = (t.detach().double().requires_grad_() for t in (x, a, bb))
    y_ref = reference_lora(x_r, w.double(), b.double(), a_r, b_r, scaling, keep=keep, p=p)
    return y_ref, x_r, a_r, b_r, torch.autograd.grad(y_ref, (x_r, a_r, b_r), grad_y.double())


@pytest.mark.parametrize("shape", [((53,), 70, 45, 3), ((4, 33), 129, 64, 8)])
def test_backward_uses_the_forward_mask(backend, shape):
    """Forward and every gradient equal a reference that is handed the same mask."""
    n_shape, d_in, d_out, r = shape
    p = 0.3
    inputs = make_inputs(n_shape, d_in, d_out, r)
    y, gy, grads, seed = _train_with_dropout(inputs, 2.0, p, torch_seed=2024)
    rows = math.prod(n_shape)
    keep = keep_mask(backend, seed, (rows, d_in), p).reshape(*n_shape, d_in)
    assert 0 < keep.sum() < keep.numel()
    y_ref, x_r, a_r, b_r, grads_ref = _float64_reference(inputs, 2.0, keep, p, gy)
    w, b = inputs[1:3]
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, atol=1e-4 * max(1, want.abs().max().item()), rtol=1e-4)
    # The mask really acts: without it the reference differs.
    assert not torch.allclose(y.double(), reference_lora(x_r, w.double(), b.double(), a_r, b_r, 2.0), atol=1e-3)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_within_statistical_bounds(backend, p):
    """With A = B = I and W = 0 the layer outputs drop(x) itself: count the zeros."""
    d, rows = 64, 600
    eye = torch.eye(d)
    x = torch.ones(rows, d)
    torch.manual_seed(0)
    y = lora_linear(x, torch.zeros(d, d), None, eye, eye, 1.0, dropout_p=p, training=True)
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))  # inverted-dropout scale
    n = y.numel()
    dropped = n - kept.sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(dropped - n * p) < 5 * sigma, (dropped, n * p, sigma)


def test_masks_differ_between_calls_and_reproduce_with_manual_seed(backend):
    x, w, b, a, bb = make_inputs((30,), 24, 24, 4)
    torch.manual_seed(1)
    y1 = lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=True)
    y2 = lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=True)
    torch.manual_seed(1)
    y1_again = lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=True)
    assert not torch.equal(y1, y2)
    assert torch.equal(y1, y1_again)


def test_torch_path_mask_is_independent_of_blocking():
    """The PyTorch path draws a mask block by block; any split reproduces the whole mask."""
    from lorafast.dropout import MaskStream

    whole = keep_mask("torch", 5, (300, 70), 0.3)
    stream = MaskStream(5, 70, 0.3, torch.device("cpu"))
    parts = [stream.next_rows(k) for k in (1, 99, 200)]
    assert torch.equal(torch.cat(parts), whole)
    assert abs(whole.float().mean().item() - 0.7) < 0.02


def sfc64_keep(seed, rows, cols, p):
    """The PyTorch path's mask by its definition, written with NumPy alone: rows drawn in order from
    ``SFC64(seed)``, ``ceil(cols / 4)`` 64-bit draws a row, each four little-endian int16 lanes, the first ``cols``
    lanes kept; an element is kept iff its lane is at least ``round(p·2¹⁶) - 2¹⁵``."""
    draws_per_row = -(-cols // 4)
    lanes = np.random.SFC64(seed).random_raw(rows * draws_per_row).astype("<u8").view("<i2")
    lanes = lanes.reshape(rows, 4 * draws_per_row)[:, :cols]
    return torch.from_numpy(lanes >= round(p * 65536) - 32768)


def test_torch_path_mask_matches_its_numpy_definition():
    whole = keep_mask("torch", 12345, (40, 70), 0.3)  # 70 columns: the last draw of each row half used
    assert torch.equal(whole, sfc64_keep(12345, 40, 70, 0.3))


def test_blocked_dropout_forward_and_backward_match_the_numpy_mask(monkeypatch):
    """An input above the PyTorch path's block size (2²⁰ elements, real threshold, 8 columns: three row blocks, the
    last ragged) through lora_linear: y, dX, dA, dB equal float64 math on the NumPy mask, row for row."""
    n, d_in, d_out, r, p = 2 * 131072 + 100, 8, 6, 2, 0.25
    blocks = list(row_blocks(n, d_in))
    assert len(blocks) == 3 and blocks[-1].stop - blocks[-1].start == 100
    monkeypatch.setenv("LORAFAST_BACKEND", "torch")
    inputs = make_inputs((n,), d_in, d_out, r)
    y, gy, grads, seed = _train_with_dropout(inputs, 1.5, p, torch_seed=7)
    keep = sfc64_keep(seed, n, d_in, p)
    for rows in blocks[1:]:  # every block draws rows of its own, not block 0's again
        assert not torch.equal(keep[rows][:100], keep[:100])
    y_ref, *_, grads_ref = _float64_reference(inputs, 1.5, keep, p, gy)
    assert_close_scaled(y, y_ref.detach())
    for got, want in zip(grads, grads_ref, strict=True):
        assert_close_scaled(got, want, rel=1e-4)  # dA, dB sum 2.6e5 rows in fp32
