"""lora_linear against an independent naive reference, forward and all gradients, both backends."""

import pytest
import torch

from conftest import assert_close_scaled, make_inputs, reference_lora
from lorafast import LoRALinearFunction, lora_linear

SHAPES = [
    # (leading dims of x, in_features, out_features, r)
    ((37,), 70, 50, 1),
    ((5, 9), 33, 65, 3),
    ((64,), 96, 80, 8),
    ((3, 43), 130, 100, 64),
]


def _run(fn, x, lora_A, lora_B, grad_y=None):
    """Output and the gradients of x, A, B for the upstream gradient grad_y."""
    x, lora_A, lora_B = (t.detach().requires_grad_() for t in (x, lora_A, lora_B))
    y = fn(x, lora_A, lora_B)
    if grad_y is None:
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B), grad_y)
    return y, grads, grad_y


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_shape,in_f,out_f,r", SHAPES)
def test_fp32_matches_reference(backend, n_shape, in_f, out_f, r, bias):
    x, w, b, a, bb = make_inputs(n_shape, in_f, out_f, r, bias=bias)
    scaling = 16 / r
    y, grads, gy = _run(lambda x_, a_, b_: lora_linear(x_, w, b, a_, b_, scaling), x, a, bb)
    y_ref, grads_ref, _ = _run(
        lambda x_, a_, b_: reference_lora(x_, w.double(), None if b is None else b.double(), a_, b_, scaling),
        x.double(),
        a.double(),
        bb.double(),
        gy.double(),
    )
    assert y.shape == (*n_shape, out_f) and y.dtype == torch.float32
    assert_close_scaled(y, y_ref, torch.float32)
    for got, want in zip(grads, grads_ref):
        assert_close_scaled(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_shape,in_f,out_f,r", SHAPES[1:3])
def test_half_precision_matches_fp32_reference(backend, n_shape, in_f, out_f, r, dtype):
    x, w, b, a, bb = make_inputs(n_shape, in_f, out_f, r, dtype=dtype)
    y, grads, gy = _run(lambda x_, a_, b_: lora_linear(x_, w, b, a_, b_, 2.0), x, a, bb)
    # The reference gets the same (rounded) inputs, computed in fp32.
    y_ref, grads_ref, _ = _run(
        lambda x_, a_, b_: reference_lora(x_, w.float(), b.float(), a_, b_, 2.0),
        x.float(),
        a.float(),
        bb.float(),
        gy.float(),
    )
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close_scaled(y, y_ref, dtype)
    for got, want in zip(grads, grads_ref):
        assert_close_scaled(got, want, dtype)


def test_non_contiguous_input_and_grad(backend):
    x, w, b, a, bb = make_inputs((40,), 48, 36, 4)
    x_t = x.T.contiguous().T  # same values, column-major
    assert not x_t.is_contiguous()
    gy = torch.randn(36, 40).T  # non-contiguous upstream gradient
    y, grads, _ = _run(lambda x_, a_, b_: lora_linear(x_, w, b, a_, b_, 2.0), x_t, a, bb, gy)
    y_ref, grads_ref, _ = _run(lambda x_, a_, b_: reference_lora(x_, w, b, a_, b_, 2.0), x, a, bb, gy)
    assert_close_scaled(y, y_ref, torch.float32)
    for got, want in zip(grads, grads_ref):
        assert_close_scaled(got, want, torch.float32)


def test_only_requested_gradients(backend):
    """x without grad (first layer) and a frozen B still give the right dA."""
    x, w, b, a, bb = make_inputs((30,), 40, 24, 4)
    a = a.requires_grad_()
    (grad_a,) = torch.autograd.grad(lora_linear(x, w, b, a, bb, 2.0).sum(), (a,))
    a_ref = a.detach().double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(
        reference_lora(x.double(), w.double(), b.double(), a_ref, bb.double(), 2.0).sum(), (a_ref,)
    )
    assert_close_scaled(grad_a, grad_ref, torch.float32)


def test_one_dimensional_input(backend):
    x, w, b, a, bb = make_inputs((), 16, 24, 4)
    assert x.shape == (16,)
    y = lora_linear(x, w, b, a, bb, 2.0)
    assert y.shape == (24,)
    assert_close_scaled(
        y, reference_lora(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0), torch.float32
    )


def test_empty_batch(backend):
    x, w, b, a, bb = make_inputs((0,), 16, 24, 4)
    x.requires_grad_()
    y = lora_linear(x, w, b, a, bb, 2.0)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


def test_scaling_is_a_runtime_value(backend):
    """Two alphas give outputs scaled accordingly (and never a stale compiled constant)."""
    x, w, _, a, bb = make_inputs((20,), 32, 32, 4)
    base = x @ w.T
    lora_1 = lora_linear(x, w, None, a, bb, 1.0) - base
    lora_3 = lora_linear(x, w, None, a, bb, 3.0) - base
    torch.testing.assert_close(lora_3, 3 * lora_1, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64_torch_path(dropout_p, bias):
    x, w, b, a, bb = make_inputs((4, 3), 7, 5, 2, dtype=torch.float64, bias=bias)
    inputs = (x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_())
    # A fixed seed: gradcheck calls the function many times and needs the same mask each time.
    fn = lambda x_, w_, b_, a_, b2_: LoRALinearFunction.apply(x_, w_, b_, a_, b2_, 1.5, dropout_p, 1234, "torch")
    assert torch.autograd.gradcheck(fn, inputs)
