"""DoRA: the norm identity, dora_linear on both backends against float64 references and central differences,
FusedLoRALinear(use_dora=True), merge/unmerge."""

import pytest
import torch

from conftest import assert_close_scaled
from conftest import keep_mask as backend_keep_mask
from lorafast import FusedLoRALinear, apply_lora, lora_layers
from lorafast.dora import base_row_norms_sq, dora_linear, dora_weight_norm
from lorafast.dropout import draw_seed, keep_mask


def _operands(n=21, in_f=40, out_f=24, r=4, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(out_f, in_f, generator=g, dtype=dtype) / in_f**0.5
    b = torch.randn(out_f, generator=g, dtype=dtype) if bias else None
    a = (torch.randn(r, in_f, generator=g, dtype=dtype) / in_f**0.5).requires_grad_()
    bb = (torch.randn(out_f, r, generator=g, dtype=dtype) * 0.3).requires_grad_()
    m = (torch.rand(out_f, generator=g, dtype=dtype) + 0.5).requires_grad_()
    return x, weight, b, a, bb, m


def _reference(x, weight, bias, a, b, m, scaling, keep=None, p=0.0):
    """Naive float64 DoRA: g = m/‖W0 + s·BA‖_row (detached), y = g ⊙ (x·W0ᵀ + s·drop(x)·Aᵀ·Bᵀ) + b."""
    x, weight, a, b, m = (t.double() for t in (x, weight, a, b, m))
    norm = torch.linalg.vector_norm(weight + scaling * b @ a, dim=1).detach()
    dropped = x if keep is None else x * keep.double() / (1.0 - p)
    y = (m / norm) * (x @ weight.t() + scaling * (dropped @ a.t()) @ b.t())
    return y if bias is None else y + bias.double()


def test_norm_identity_matches_the_explicit_row_norm():
    _, weight, _, a, b, _ = _operands(dtype=torch.float64)
    want = torch.linalg.vector_norm(weight + 1.7 * b @ a, dim=1)
    torch.testing.assert_close(dora_weight_norm(weight, a, b, 1.7), want, atol=1e-12, rtol=1e-12)
    w32, a32, b32 = weight.float(), a.float(), b.float()
    torch.testing.assert_close(dora_weight_norm(w32, a32, b32, 1.7).double(), want, atol=1e-5, rtol=1e-5)


def test_base_norms_are_cached_and_follow_in_place_changes():
    weight = torch.randn(6, 5)
    first = base_row_norms_sq(weight)
    assert base_row_norms_sq(weight) is first  # cached
    weight.mul_(2.0)  # bumps the version: recomputed
    torch.testing.assert_close(base_row_norms_sq(weight), 4.0 * first)
    t = base_row_norms_sq(weight.t().t())  # a view of the same weight: its own layout key, same values
    torch.testing.assert_close(t, 4.0 * first)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("n", [21, 64])  # fewer rows than in_features (g scales y), more (g folded into W0, B)
def test_matches_float64_reference_with_the_same_mask(backend, bias, p, n):
    """y, dX, dA, dB, dm against float64 DoRA written here, on the backend's own mask (Triton's Philox, the
    PyTorch path's SFC64: each checked against its NumPy definition in test_kernels.py / test_dropout.py)."""
    x, weight, b, a, bb, m = _operands(n=n, bias=bias)
    torch.manual_seed(11)
    y = dora_linear(x, weight, b, a, bb, m, 1.5, p, training=True)
    torch.manual_seed(11)
    keep = backend_keep_mask(backend, draw_seed(), x.shape, p) if p else None
    want = _reference(x, weight, b, a, bb, m, 1.5, keep, p)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, bb, m), grad)
    expected = torch.autograd.grad(want, (x, a, bb, m), grad.double())
    assert_close_scaled(y, want.detach())
    for g, e in zip(got, expected, strict=True):
        assert_close_scaled(g, e)


def test_dropout_gradients_equal_central_differences():
    """float64, dropout 0.3: lorafast's dA, dB, dm, dX equal central differences of the same function (its mask,
    the norm held constant as the detached norm is)."""
    x, weight, b, a, bb, m = _operands(n=7, in_f=6, out_f=5, r=2, dtype=torch.float64)
    p, s = 0.3, 1.25
    torch.manual_seed(3)
    y = dora_linear(x, weight, b, a, bb, m, s, p, training=True)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, bb, m), grad)
    torch.manual_seed(3)
    keep = keep_mask(draw_seed(), x.shape, p)
    assert 0 < keep.sum() < keep.numel()
    norm = torch.linalg.vector_norm(weight + s * bb @ a, dim=1).detach()

    def loss(x, a, bb, m):
        return ((m / norm * (x @ weight.t() + s * ((x * keep / (1 - p)) @ a.t()) @ bb.t()) + b) * grad).sum()

    for want_grad, numeric in zip(got, central_differences(loss, (x, a, bb, m)), strict=True):
        torch.testing.assert_close(want_grad, numeric, atol=1e-7, rtol=1e-6)


def central_differences(loss, point, h=1e-6):
    """``∂loss/∂t`` for each tensor t of ``point`` by central differences (float64)."""
    point = [t.detach().clone() for t in point]
    grads = []
    for i in range(len(point)):
        numeric = torch.empty_like(point[i])
        for j in range(point[i].numel()):
            up = [t.clone() for t in point]
            down = [t.clone() for t in point]
            up[i].view(-1)[j] += h
            down[i].view(-1)[j] -= h
            numeric.view(-1)[j] = (loss(*up) - loss(*down)) / (2 * h)
        grads.append(numeric)
    return grads


def test_magnitude_zero_keeps_an_exact_gradient():
    x, weight, b, a, bb, m = _operands(dtype=torch.float64)
    with torch.no_grad():
        m[3] = 0.0
    y = dora_linear(x, weight, b, a, bb, m, 2.0)
    want = _reference(x, weight, b, a, bb, m, 2.0)
    grad = torch.randn_like(y)
    got_m = torch.autograd.grad(y, m, grad)[0]
    torch.testing.assert_close(got_m, torch.autograd.grad(want, m, grad)[0], atol=1e-10, rtol=1e-10)


def test_bad_magnitude_is_named():
    x, weight, b, a, bb, m = _operands()
    with pytest.raises(ValueError, match="magnitude must have shape"):
        dora_linear(x, weight, b, a, bb, m[:-1], 1.0)
    with pytest.raises(ValueError, match="magnitude must be a 1-D"):
        dora_linear(x, weight, b, a, bb, m[None], 1.0)


def test_layer_starts_as_the_base_layer_with_peft_magnitude_and_merges():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10)
    want_m = torch.linalg.vector_norm(linear.weight.detach(), dim=1)
    layer = FusedLoRALinear.from_linear(linear, r=4, alpha=8, use_dora=True)
    assert "use_dora=True" in repr(layer)
    torch.testing.assert_close(layer.lora_magnitude.detach(), want_m)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1.3)
    weight0 = layer.weight.detach().clone()
    want = _reference(x, weight0, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, 2.0)
    torch.testing.assert_close(layer(x).double(), want.detach(), atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer.eval()(x).double(), want.detach(), atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), weight0, atol=1e-6, rtol=1e-5)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_magnitude"}
    plain = torch.nn.Linear(12, 10)
    layer.load_state_dict(plain.state_dict())  # a base checkpoint still loads strictly


def test_apply_lora_with_dora_trains_the_magnitude():
    from conftest import tiny_bart

    model = apply_lora(tiny_bart(), r=4, use_dora=True)
    layers = dict(lora_layers(model))
    assert layers and all(layer.use_dora for layer in layers.values())
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude"}
