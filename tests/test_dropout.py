"""LoRA dropout: eval is no dropout, backward uses forward's mask, the rate is right, seeds reproduce."""

import math

import pytest
import torch

from conftest import keep_mask, make_inputs, reference_lora
from lorafast import FusedLoRALinear, lora_linear
from lorafast.dropout import draw_seed


def test_eval_mode_equals_no_dropout(backend):
    x, w, b, a, bb = make_inputs((2, 11), 40, 30, 4)
    expected = lora_linear(x, w, b, a, bb, 2.0)
    torch.testing.assert_close(lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=False), expected)
    layer = FusedLoRALinear(40, 30, r=4, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    layer.eval()
    torch.testing.assert_close(layer(x), lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 4.0))


@pytest.mark.parametrize("shape", [((53,), 70, 45, 3), ((4, 33), 129, 64, 8)])
def test_backward_uses_the_forward_mask(backend, shape):
    """Forward and every gradient equal a reference that is handed the same mask."""
    n_shape, d_in, d_out, r = shape
    p = 0.3
    x, w, b, a, bb = make_inputs(n_shape, d_in, d_out, r)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    torch.manual_seed(2024)
    y = lora_linear(x, w, b, a, bb, 2.0, dropout_p=p, training=True)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), gy)

    torch.manual_seed(2024)
    seed = draw_seed()  # the seed lora_linear drew
    rows = math.prod(n_shape)
    keep = keep_mask(backend, seed, (rows, d_in), p).reshape(*n_shape, d_in)
    assert 0 < keep.sum() < keep.numel()
    x_r, a_r, b_r = (t.detach().double().requires_grad_() for t in (x, a, bb))
    y_ref = reference_lora(x_r, w.double(), b.double(), a_r, b_r, 2.0, keep=keep, p=p)
    grads_ref = torch.autograd.grad(y_ref, (x_r, a_r, b_r), gy.double())
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
