"""Mixed-adapter LoRA linear: a batch mixing adapters equals each adapter's rows run alone."""

import pytest
import torch
import torch.nn.functional as F

import lorafast.kernels
from conftest import assert_close_scaled, keep_mask, make_adapter_list, reference_lora
from lorafast import MultiLoRALinear, multi_lora_linear, multi_torch_backend
from lorafast.dropout import draw_seed
from lorafast.multi_torch_backend import multi_lora_backward, multi_lora_forward


def stack(adapters):
    """Zero-padded stacks ``(K, R, in)``, ``(K, out, R)`` built under autograd from the leaves."""
    rank = max(a.shape[0] for a, _, _ in adapters)
    lora_A = torch.stack([F.pad(a, (0, 0, 0, rank - a.shape[0])) for a, _, _ in adapters])
    lora_B = torch.stack([F.pad(b, (0, rank - b.shape[1])) for _, b, _ in adapters])
    return lora_A, lora_B, [s for _, _, s in adapters]


def rows_alone(x, weight, bias, adapters, ids, grad_y, masks=None, dropout=None):
    """The reference: each adapter's rows (and the base-only rows) run alone through plain autograd.

    ``masks[k]`` (the keep mask of the whole x for adapter k's p, ``dropout[k]``) masks its rows.
    Returns y and the gradients of x and every A_k, B_k, from separate leaf copies per adapter.
    """
    x = x.detach()
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    grad_x = torch.zeros_like(x)
    grads = []
    for k in range(-1, len(adapters)):
        rows = ids == k
        xk = x[rows].clone().requires_grad_()
        if k < 0:
            yk = xk @ weight.T + (0 if bias is None else bias)
            leaves = []
        else:
            a, b, s = (t.detach().clone().requires_grad_() if torch.is_tensor(t) else t for t in adapters[k])
            p = dropout[k] if dropout else 0.0
            keep = masks[k][rows] if p else None
            yk = reference_lora(xk, weight, bias, a, b, s, keep=keep, p=p)
            leaves = [a, b]
        if rows.any():
            yk.backward(grad_y[rows])
            grad_x[rows] = xk.grad
        y[rows] = yk.detach()
        if k >= 0:
            grads.append([t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves])
    return y, grad_x, grads


def run_mixed(x, weight, bias, adapters, ids, grad_y, dropout=None):
    """y and gradients of x and every A_k, B_k from one mixed-batch call."""
    x = x.detach().clone().requires_grad_()
    for a, b, _ in adapters:
        a.grad = b.grad = None
    lora_A, lora_B, scalings = stack(adapters)
    y = multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, ids, dropout_p=dropout, training=True)
    y.backward(grad_y)
    return y.detach(), x.grad, [[a.grad, b.grad] for a, b, _ in adapters]


@pytest.mark.parametrize("num_adapters", [1, 3, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_mixed_batch_equals_each_adapters_rows_alone(backend, num_adapters, bias):
    g = torch.Generator().manual_seed(num_adapters)
    n, in_f, out_f = 45, 70, 50
    x = torch.randn(n, in_f, generator=g)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) if bias else None
    adapters = make_adapter_list(num_adapters, in_f, out_f, seed=num_adapters)
    ids = torch.randint(-1, num_adapters, (n,), generator=g)  # unsorted, with base-only rows
    ids[:2] = -1
    grad_y = torch.randn(n, out_f, generator=g)

    y, grad_x, grads = run_mixed(x, weight, b, adapters, ids, grad_y)
    y_ref, grad_x_ref, grads_ref = rows_alone(x, weight, b, adapters, ids, grad_y)
    assert_close_scaled(y, y_ref, torch.float32)
    assert_close_scaled(grad_x, grad_x_ref, torch.float32)
    for got, want in zip(grads, grads_ref):
        for g_got, g_want in zip(got, want):
            assert_close_scaled(g_got, g_want, torch.float32)


@pytest.mark.parametrize("bias", [True, False])
def test_mixed_batch_with_dropout_equals_rows_alone_under_the_same_masks(backend, bias):
    """Each adapter's rows are masked as the one-adapter layer masks them for its p (same seed)."""
    g = torch.Generator().manual_seed(21)
    n, in_f, out_f = 37, 70, 50
    x = torch.randn(n, in_f, generator=g)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) if bias else None
    adapters = make_adapter_list(3, in_f, out_f, seed=21)
    ids = torch.randint(-1, 3, (n,), generator=g)
    grad_y = torch.randn(n, out_f, generator=g)
    dropout = [0.1, 0.0, 0.3]
    torch.manual_seed(8)
    y, grad_x, grads = run_mixed(x, weight, b, adapters, ids, grad_y, dropout=dropout)
    torch.manual_seed(8)
    seed = draw_seed()
    masks = [keep_mask(backend, seed, (n, in_f), p) if p else None for p in dropout]
    y_ref, grad_x_ref, grads_ref = rows_alone(x, weight, b, adapters, ids, grad_y, masks=masks, dropout=dropout)
    assert_close_scaled(y, y_ref, torch.float32)
    assert_close_scaled(grad_x, grad_x_ref, torch.float32)
    for got, want in zip(grads, grads_ref):
        for g_got, g_want in zip(got, want):
            assert_close_scaled(g_got, g_want, torch.float32)
    dropped = (~masks[2][ids == 2]).float().mean().item()
    assert 0.2 < dropped < 0.4  # p = 0.3 on adapter 2's rows
    no_dropout = run_mixed(x, weight, b, adapters, ids, grad_y, dropout=[0.0, 0.0, 0.0])
    y_plain, _, _ = rows_alone(x, weight, b, adapters, ids, grad_y)
    assert_close_scaled(no_dropout[0], y_plain, torch.float32)


def test_adapter_without_rows_gets_zero_gradient(backend):
    g = torch.Generator().manual_seed(5)
    x, weight = torch.randn(20, 24, generator=g), torch.randn(16, 24, generator=g)
    adapters = make_adapter_list(3, 24, 16)
    ids = torch.tensor([0, 2] * 10)
    _, _, grads = run_mixed(x, weight, None, adapters, ids, torch.randn(20, 16, generator=g))
    assert torch.count_nonzero(grads[1][0]) == 0 and torch.count_nonzero(grads[1][1]) == 0
    assert torch.count_nonzero(grads[0][0]) > 0 and torch.count_nonzero(grads[2][1]) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_fp32_reference(backend, dtype):
    g = torch.Generator().manual_seed(7)
    n, in_f, out_f = 33, 40, 36
    x, weight, b = torch.randn(n, in_f, generator=g), torch.randn(out_f, in_f, generator=g) / 7, torch.randn(out_f)
    adapters = make_adapter_list(3, in_f, out_f)
    ids = torch.randint(-1, 3, (n,), generator=g)
    grad_y = torch.randn(n, out_f, generator=g)
    # the reference runs in fp32 on the inputs rounded to dtype
    rounded = [
        (a.detach().to(dtype).float().requires_grad_(), bb.detach().to(dtype).float(), s) for a, bb, s in adapters
    ]
    rnd = lambda t: t.to(dtype).float()
    y_ref, grad_x_ref, grads_ref = rows_alone(rnd(x), rnd(weight), rnd(b), rounded, ids, rnd(grad_y))
    low = [(a.detach().to(dtype).requires_grad_(), bb.detach().to(dtype).requires_grad_(), s) for a, bb, s in adapters]
    y, grad_x, grads = run_mixed(x.to(dtype), weight.to(dtype), b.to(dtype), low, ids, grad_y.to(dtype))
    assert y.dtype == dtype and grad_x.dtype == dtype
    assert_close_scaled(y, y_ref, dtype)
    assert_close_scaled(grad_x, grad_x_ref, dtype)
    for got, want in zip(grads, grads_ref):
        for g_got, g_want in zip(got, want):
            assert_close_scaled(g_got, g_want, dtype)


def test_per_sequence_ids_on_3d_input_and_non_contiguous_x(backend):
    g = torch.Generator().manual_seed(9)
    seqs, length, in_f, out_f = 5, 7, 24, 20
    x = torch.randn(length, seqs, in_f, generator=g).transpose(0, 1)  # (seqs, length, in), non-contiguous
    weight, b = torch.randn(out_f, in_f, generator=g) / 5, torch.randn(out_f, generator=g)
    adapters = make_adapter_list(3, in_f, out_f)
    seq_ids = torch.tensor([2, -1, 0, 2, 1])
    grad_y = torch.randn(seqs, length, out_f, generator=g)
    y, grad_x, grads = run_mixed(x, weight, b, adapters, seq_ids, grad_y)
    row_ids = seq_ids[:, None].expand(seqs, length).reshape(-1)
    y_ref, grad_x_ref, grads_ref = rows_alone(
        x.reshape(-1, in_f), weight, b, adapters, row_ids, grad_y.reshape(-1, out_f)
    )
    assert y.shape == (seqs, length, out_f) and grad_x.shape == x.shape
    assert_close_scaled(y.reshape(-1, out_f), y_ref, torch.float32)
    assert_close_scaled(grad_x.reshape(-1, in_f), grad_x_ref, torch.float32)
    for got, want in zip(grads, grads_ref):
        for g_got, g_want in zip(got, want):
            assert_close_scaled(g_got, g_want, torch.float32)


def test_gradcheck_float64_torch_path():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight, b = torch.randn(5, 6, dtype=torch.float64, generator=g), torch.randn(5, dtype=torch.float64)
    lora_A = torch.randn(3, 2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    lora_B = torch.randn(3, 5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 1])
    fn = lambda x, a, bb: multi_lora_linear(x, weight, b, a, bb, [0.5, 2.0, 1.25], ids)
    assert torch.autograd.gradcheck(fn, (x, lora_A, lora_B))


def test_saved_for_backward_is_x_once_plus_rank_columns():
    """Like the one-adapter layer: x itself (not a copy or a gathered x), xa (n, R) and the row ids."""
    from lorafast.profiling import saved_activation_bytes

    n, in_f, out_f = 64, 48, 40
    x = torch.randn(n, in_f)
    weight = torch.randn(out_f, in_f)
    adapters = make_adapter_list(4, in_f, out_f)
    lora_A, lora_B, scalings = stack(adapters)
    ids = torch.randint(-1, 4, (n,))
    run = lambda: multi_lora_linear(x, weight, None, lora_A, lora_B, scalings, ids)
    saved = saved_activation_bytes(run, exclude=[weight, lora_A, lora_B])  # weights: parameter-sized
    rank = lora_A.shape[1]
    assert saved <= x.nbytes + n * rank * 4 + n * 8 + 4 * 4  # x, xa, row ids (int64), scalings


def test_torch_backend_functions_match_the_triton_contract_shapes():
    n, in_f, out_f, k, r = 10, 12, 8, 3, 4
    x, w = torch.randn(n, in_f), torch.randn(out_f, in_f)
    lora_A, lora_B = torch.randn(k, r, in_f), torch.randn(k, out_f, r)
    scalings, ids = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0, 1])
    y, xa = multi_lora_forward(x, w, None, lora_A, lora_B, scalings, ids)
    assert y.shape == (n, out_f) and xa.shape == (n, r)
    assert torch.equal(xa[3], torch.zeros(r)) and torch.equal(xa[7], torch.zeros(r))
    dx, da, db = multi_lora_backward(torch.randn(n, out_f), x, xa, w, lora_A, lora_B, scalings, ids, (True, True, True))
    assert dx.shape == x.shape and da.shape == lora_A.shape and db.shape == lora_B.shape
    assert multi_lora_backward(torch.randn(n, out_f), x, xa, w, lora_A, lora_B, scalings, ids, (False,) * 3) == (
        None,
        None,
        None,
    )


# --- the layer --------------------------------------------------------------------------------------


def test_layer_add_select_list_remove_adapters():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16)
    layer = MultiLoRALinear.from_linear(base)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    x = torch.randn(6, 24)
    torch.testing.assert_close(layer(x), base(x))  # no adapter: the base layer
    layer.add_adapter("a", r=4, alpha=8)
    layer.add_adapter("b", r=2, alpha=3)
    assert layer.adapter_names == ["a", "b"] and layer.ranks() == {"a": 4, "b": 2}
    assert layer.scaling("b") == 1.5
    torch.testing.assert_close(layer(x), base(x))  # B starts at zero
    with torch.no_grad():
        layer.lora_B["a"].normal_()
        layer.lora_B["b"].normal_()
    layer.set_adapter("b")
    want = reference_lora(x, base.weight, base.bias, layer.lora_A["b"], layer.lora_B["b"], 1.5)
    torch.testing.assert_close(layer(x), want)
    layer.set_row_adapters(torch.tensor([1, 0, -1, 1, 0, 0]))
    mixed = layer(x)
    a = reference_lora(x, base.weight, base.bias, layer.lora_A["a"], layer.lora_B["a"], 2.0)
    torch.testing.assert_close(mixed[[1, 4, 5]], a[[1, 4, 5]])
    torch.testing.assert_close(mixed[[0, 3]], want[[0, 3]])
    torch.testing.assert_close(mixed[2], base(x)[2])
    layer.set_row_adapters(None)
    layer.remove_adapter("b")
    assert layer.adapter_names == ["a"] and layer.active_adapter is None
    keys = set(layer.state_dict())
    assert keys == {"weight", "bias", "lora_A.a", "lora_B.a"}


def test_layer_mixed_batch_trains_every_adapter_from_its_own_rows():
    torch.manual_seed(1)
    layer = MultiLoRALinear.from_linear(torch.nn.Linear(20, 12))
    for name, r in (("a", 3), ("b", 5)):
        layer.add_adapter(name, r=r, alpha=4)
        with torch.no_grad():
            layer.lora_B[name].normal_()
    x = torch.randn(3, 4, 20)
    layer.set_row_adapters(torch.tensor([1, 0, 1]))
    layer(x).square().sum().backward()
    mixed = {n: (layer.lora_A[n].grad.clone(), layer.lora_B[n].grad.clone()) for n in ("a", "b")}
    layer.set_row_adapters(None)
    for name, rows in (("a", [1]), ("b", [0, 2])):
        layer.zero_grad()
        layer.set_adapter(name)
        layer(x[rows]).square().sum().backward()
        torch.testing.assert_close(mixed[name][0], layer.lora_A[name].grad)
        torch.testing.assert_close(mixed[name][1], layer.lora_B[name].grad)


def test_errors():
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    lora_A, lora_B = torch.randn(2, 3, 6), torch.randn(2, 5, 3)
    ok = torch.tensor([0, 1, -1, 0])
    with pytest.raises(ValueError, match="out of range"):
        multi_lora_linear(x, w, None, lora_A, lora_B, [1.0, 1.0], torch.tensor([0, 2, 0, 0]))
    with pytest.raises(ValueError, match="out of range"):
        multi_lora_linear(x, w, None, lora_A, lora_B, [1.0, 1.0], torch.tensor([0, -2, 0, 0]))
    with pytest.raises(ValueError, match="fit neither"):
        multi_lora_linear(x, w, None, lora_A, lora_B, [1.0, 1.0], torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="integer tensor"):
        multi_lora_linear(x, w, None, lora_A, lora_B, [1.0, 1.0], ok.float())
    with pytest.raises(ValueError, match="one number per adapter"):
        multi_lora_linear(x, w, None, lora_A, lora_B, [1.0], ok)
    with pytest.raises(ValueError, match="lora_B must have shape"):
        multi_lora_linear(x, w, None, lora_A, lora_B[:, :, :2], [1.0, 1.0], ok)
    with pytest.raises(ValueError, match=r"lora_A must be K >= 1 stacked"):
        multi_lora_linear(x, w, None, lora_A[0], lora_B, [1.0, 1.0], ok)
    with pytest.raises(ValueError, match="dtype mismatch"):
        multi_lora_linear(x, w, None, lora_A.double(), lora_B, [1.0, 1.0], ok)
    with pytest.raises(ValueError, match="finite"):
        multi_lora_linear(x, w, None, lora_A, lora_B, [1.0, float("nan")], ok)

    layer = MultiLoRALinear(6, 5)
    layer.add_adapter("a", r=2)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a", r=2)
    with pytest.raises(ValueError, match="without '\\.'"):
        layer.add_adapter("a.b", r=2)
    with pytest.raises(ValueError, match="no adapter named 'z'"):
        layer.set_adapter("z")
    with pytest.raises(ValueError, match="out of range"):
        layer.set_row_adapters(torch.tensor([0, 1]))
    layer.set_row_adapters(torch.tensor([0, -1, 0]))
    with pytest.raises(ValueError, match="do not fit an input"):
        layer(torch.randn(4, 6))
    with pytest.raises(ValueError, match="one probability per adapter"):
        multi_lora_linear(x, w, None, lora_A, lora_B, [1.0, 1.0], ok, dropout_p=[0.1], training=True)
    with pytest.raises(ValueError, match=r"dropout probability must be a number in \[0, 1\)"):
        multi_lora_linear(x, w, None, lora_A, lora_B, [1.0, 1.0], ok, dropout_p=[0.1, 1.0], training=True)


def test_backends_agree_that_unchecked_ids_out_of_range_mean_no_adapter():
    """Ids on a GPU are not range-checked (that would synchronise): both backends read one outside [-1, K) as −1."""
    x, w, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
    lora_A, lora_B, scalings = torch.randn(2, 3, 6), torch.randn(2, 5, 3), torch.tensor([1.0, 2.0])
    row_adapter = torch.tensor([1, 2, -4, 0])
    base = x @ w.T + b
    for impl in (multi_torch_backend, lorafast.kernels):
        y, xa = impl.multi_lora_forward(x, w, b, lora_A, lora_B, scalings, row_adapter)
        torch.testing.assert_close(y[1:3], base[1:3])
        assert not xa[1:3].any()
        torch.testing.assert_close(y[0], base[0] + 2.0 * lora_B[1] @ (lora_A[1] @ x[0]))


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_torch_compile_of_a_mixed_batch_matches_eager(use_dora):
    """Adapter "a" plain or DoRA (its rows' column scale after the mixed product), "b" plain, base rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
    for i in (0, 2):
        model[i] = MultiLoRALinear.from_linear(model[i])
        for name, r, dora in (("a", 2, use_dora), ("b", 4, False)):
            model[i].add_adapter(name, r=r, use_dora=dora)
            with torch.no_grad():
                model[i].lora_B[name].normal_()
        model[i].set_row_adapters(torch.tensor([0, 1, -1]))
    x = torch.randn(3, 5, 16)
    results = []
    for run in (model, torch.compile(model)):
        model.zero_grad()
        xs = x.clone().requires_grad_()
        y = run(xs)
        y.square().sum().backward()
        grads = [model[0].lora_A["a"].grad.clone(), model[2].lora_B["b"].grad.clone()]
        if use_dora:
            grads.append(model[0].lora_magnitude["a"].grad.clone())
        results.append((y.detach(), xs.grad, *grads))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
