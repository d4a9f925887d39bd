"""expert_lora_linear: LoRA on a stack of experts, against a float64 per-expert loop written here."""

import pytest
import torch

import lorafast.dropout
import lorafast.expert_function
import lorafast.kernels.expert_lora_matmul
from lorafast.expert_function import expert_lora_linear, expert_seed
from lorafast.expert_memory import largest_write

COUNTS = [3, 0, 5, 1]  # uneven segments and an empty expert
E, R, IN, OUT = len(COUNTS), 3, 7, 6


def _inputs(dtype=torch.float32, transposed=False, bias=False, seed=0, dims=(R, IN, OUT)):
    R, IN, OUT = dims  # the module's names, other sizes
    g = torch.Generator().manual_seed(seed)
    rows = sum(COUNTS)
    weight = torch.randn(E, *((IN, OUT) if transposed else (OUT, IN)), generator=g, dtype=torch.float64)
    tensors = {
        "x": torch.randn(rows, IN, generator=g, dtype=torch.float64),
        "weight": weight,
        "lora_A": torch.randn(E, R, IN, generator=g, dtype=torch.float64),
        "lora_B": torch.randn(E, OUT, R, generator=g, dtype=torch.float64),
        "bias": torch.randn(E, OUT, generator=g, dtype=torch.float64) if bias else None,
    }
    return {k: None if v is None else v.to(dtype) for k, v in tensors.items()}


def _reference(x, weight, lora_A, lora_B, scaling, bias=None, transposed=False, keeps=None, p=0.0):
    """Float64 loop over experts: ``x_e·W_eᵀ + b_e + s·(drop(x_e)·A_eᵀ)·B_eᵀ``, under plain autograd."""
    outs, start = [], 0
    for e, count in enumerate(COUNTS):
        xe = x[start : start + count].double()
        w = weight[e].double().T if transposed else weight[e].double()
        dropped = xe if keeps is None else xe * keeps[e].double() / (1.0 - p)
        ye = xe @ w.T + scaling * (dropped @ lora_A[e].double().T) @ lora_B[e].double().T
        outs.append(ye if bias is None else ye + bias[e].double())
        start += count
    return torch.cat(outs)


def _grads(y, leaves, seed=1):
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((y.double() * grad_y).sum(), leaves)


@pytest.mark.parametrize("transposed", [False, True], ids=["E_out_in", "E_in_out"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_forward_and_backward_match_float64_loop(transposed, bias):
    t = _inputs(torch.float32, transposed, bias)
    leaves = [t[k].requires_grad_() for k in ("x", "lora_A", "lora_B")]
    y = expert_lora_linear(
        t["x"], COUNTS, t["weight"], t["lora_A"], t["lora_B"], 0.5, bias=t["bias"], transposed=transposed
    )
    ref_leaves = [v.detach().double().requires_grad_() for v in leaves]
    ref = _reference(ref_leaves[0], t["weight"], *ref_leaves[1:], 0.5, t["bias"], transposed)
    assert y.dtype == torch.float32 and y.shape == (sum(COUNTS), OUT)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)
    for got, want in zip(_grads(y, leaves), _grads(ref, ref_leaves)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    # the empty expert's factors get exactly zero gradient
    grad_a, grad_b = torch.autograd.grad(
        expert_lora_linear(t["x"], COUNTS, t["weight"], *leaves[1:], 0.5, transposed=transposed).sum(), leaves[1:]
    )
    assert grad_a[1].abs().max() == 0 and grad_b[1].abs().max() == 0


ALIGNED = (4, 8, 12)  # (r, in, out) whose rows are 16-byte multiples in fp32: grouped_mm and the kernels run them


@pytest.mark.parametrize("path", ["grouped", "triton", "loop"])
@pytest.mark.parametrize("transposed", [False, True], ids=["E_out_in", "E_in_out"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_every_path_matches_float64_loop(path, transposed, bias, monkeypatch):
    """CPU without dropout runs grouped_mm, the triton backend the expert kernels (interpreted), and rows that are
    not 16-byte multiples the per-expert loop; each is checked to have run."""
    calls = []
    module = lorafast.kernels.expert_lora_matmul if path == "triton" else lorafast.expert_function
    name = "expert_forward" if path == "triton" else "grouped_forward"
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("LORAFAST_BACKEND", "triton" if path == "triton" else "torch")
    dims = (R, IN, OUT) if path == "loop" else ALIGNED
    t = _inputs(torch.float32, transposed, bias, dims=dims)
    leaves = [t[k].requires_grad_() for k in ("x", "lora_A", "lora_B")]
    y = expert_lora_linear(t["x"], COUNTS, t["weight"], *leaves[1:], 0.5, bias=t["bias"], transposed=transposed)
    assert len(calls) == (0 if path == "loop" else 1)
    ref_leaves = [v.detach().double().requires_grad_() for v in leaves]
    ref = _reference(ref_leaves[0], t["weight"], *ref_leaves[1:], 0.5, t["bias"], transposed)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)
    grads = _grads(y, leaves)
    for got, want in zip(grads, _grads(ref, ref_leaves)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    assert grads[1][1].abs().max() == 0 and grads[2][1].abs().max() == 0  # the empty expert


def test_dropout_masks_each_expert_with_the_dense_paths_mask_of_its_own_seed():
    t = _inputs(torch.float64)
    p, scaling = 0.3, 2.0
    torch.manual_seed(5)
    seed = lorafast.dropout.draw_seed()
    torch.manual_seed(5)
    y = expert_lora_linear(t["x"], COUNTS, t["weight"], t["lora_A"], t["lora_B"], scaling, p, training=True)
    keeps = [
        lorafast.dropout.keep_mask(expert_seed(seed, e, E), (c, IN), p) if c else torch.ones(0, IN, dtype=torch.bool)
        for e, c in enumerate(COUNTS)
    ]
    dropped = torch.cat(keeps).float().mean().item()
    assert 0.0 < dropped < 1.0  # some kept, some dropped
    ref = _reference(t["x"], t["weight"], t["lora_A"], t["lora_B"], scaling, keeps=keeps, p=p)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    # eval mode: no dropout
    y_eval = expert_lora_linear(t["x"], COUNTS, t["weight"], t["lora_A"], t["lora_B"], scaling, p, training=False)
    torch.testing.assert_close(y_eval, _reference(t["x"], t["weight"], t["lora_A"], t["lora_B"], scaling))


@pytest.mark.parametrize("transposed", [False, True], ids=["E_out_in", "E_in_out"])
def test_dropout_gradients_equal_central_differences(transposed):
    t = _inputs(torch.float64, transposed)
    leaves = [t[k].requires_grad_() for k in ("x", "lora_A", "lora_B")]

    def run(x, lora_A, lora_B):
        torch.manual_seed(11)  # the same masks on every evaluation
        return expert_lora_linear(x, COUNTS, t["weight"], lora_A, lora_B, 0.7, 0.1, True, transposed=transposed)

    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_no_expert_stack_sized_tensor_in_forward_or_backward(path):
    """The per-expert loop (with dropout) and grouped_mm (aligned rows, no dropout) write nothing as large as W."""
    dims, p = ((R, IN, OUT), 0.1) if path == "loop" else (ALIGNED, 0.0)
    t = _inputs(torch.float32, dims=dims)
    leaves = [t[k].requires_grad_() for k in ("x", "lora_A", "lora_B")]

    def step():
        expert_lora_linear(t["x"], COUNTS, t["weight"], *leaves[1:], 0.5, p, True).sum().backward()

    largest = largest_write(step)
    out_features = t["weight"].shape[1]
    assert 0 < largest <= max(t["x"].numel(), sum(COUNTS) * out_features, t["lora_A"].numel(), t["lora_B"].numel())
    assert largest < t["weight"].numel()  # E·out·in: 168 (loop), 384 (grouped)


def _call(**changes):
    t = _inputs(torch.float32)
    args = {"x": t["x"], "counts": COUNTS, "weight": t["weight"], "lora_A": t["lora_A"], "lora_B": t["lora_B"]}
    args.update(changes)
    return expert_lora_linear(args["x"], args["counts"], args["weight"], args["lora_A"], args["lora_B"], 1.0, **{
        k: v for k, v in changes.items() if k in ("dropout_p", "training", "bias", "transposed")
    })  # fmt: skip


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"counts": [3, 0, 5]}, "counts has 3 entries but the weight holds 4 experts"),
        ({"counts": [3, 0, 5, 2]}, "counts sum to 10 but x has 9 rows"),
        ({"counts": [4, -1, 5, 1]}, "non-negative ints"),
        ({"counts": torch.tensor([3.0, 0, 5, 1])}, "1-D integer tensor"),
        ({"weight": torch.randn(OUT, IN)}, "3-D stack of expert weights"),
        ({"weight": torch.randn(E, OUT, IN + 1)}, "x must have shape"),
        ({"lora_A": torch.randn(E + 1, R, IN)}, "lora_A must have shape"),
        ({"lora_B": torch.randn(E, OUT, R + 1)}, "lora_B must have shape"),
        ({"lora_B": torch.randn(E, OUT, R, dtype=torch.float64)}, "dtype mismatch"),
        ({"bias": torch.randn(OUT)}, "bias must have shape"),
        ({"dropout_p": 1.0}, r"dropout probability must be a number in \[0, 1\)"),
        ({"weight": torch.randn(E, OUT, IN, requires_grad=True)}, "weight requires grad"),
        ({"transposed": True}, "x must have shape"),
    ],
)
def test_bad_input_is_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        _call(**changes)


def test_ranks_the_kernel_would_spill_take_the_pytorch_path(monkeypatch):
    calls = []
    real = lorafast.kernels.expert_lora_matmul.expert_forward
    monkeypatch.setattr(lorafast.kernels.expert_lora_matmul, "expert_forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")
    for r, expected in ((64, 1), (68, 0)):  # fp32: up to 64
        t = _inputs(torch.float32, dims=(r, 8, 12))
        y = expert_lora_linear(t["x"], COUNTS, t["weight"], t["lora_A"], t["lora_B"], 0.5)
        ref = _reference(t["x"], t["weight"], t["lora_A"], t["lora_B"], 0.5)
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)
        assert len(calls) == expected
        calls.clear()
