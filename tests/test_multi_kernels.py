"""The mixed-adapter (one adapter per row) Triton kernels, through Triton's interpreter, against a
naive row-by-row float64 reference, for every config their autotuners can pick, with and without
per-adapter LoRA dropout."""

import pytest
import torch
import triton

from conftest import TOLERANCES, require_interpreter
from lorafast import kernels
from lorafast.kernels.adapter_segments import UNUSED_BLOCK, adapter_segments, num_row_blocks, num_row_chunks
from lorafast.kernels.fused_lora_matmul import fused_lora_matmul_tuned
from lorafast.kernels.lora_weight_grad import SMALL_TILES as GRAD_SMALL_TILES
from lorafast.kernels.multi_dropout_xa import SMALL_TILES as XA_SMALL_TILES
from lorafast.kernels.multi_dropout_xa import multi_dropout_xa_tuned
from lorafast.kernels.multi_lora_matmul import BLOCK_M, multi_lora_matmul_tuned
from lorafast.kernels.multi_lora_weight_grad import multi_lora_weight_grad_tuned

require_interpreter()

GEMM_CONFIGS = multi_lora_matmul_tuned.configs
GRAD_CONFIGS = multi_lora_weight_grad_tuned.configs
XA_CONFIGS = multi_dropout_xa_tuned.configs
ids = lambda c: "-".join(f"{k}{v}" for k, v in c.kwargs.items()) + f"-w{c.num_warps}-s{c.num_stages}"
ALL_GRADS = (True, True, True)


def make_adapters(num_adapters, ranks, in_f, out_f, dtype=torch.float32, bias=True, seed=0):
    """W0, b and K stacked adapters zero-padded to R = max(ranks), with scalings ``(K,)`` float32."""
    g = torch.Generator().manual_seed(seed)
    R = max(ranks)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) if bias else None
    lora_A = torch.zeros(num_adapters, R, in_f)
    lora_B = torch.zeros(num_adapters, out_f, R)
    for k, r in enumerate(ranks):
        lora_A[k, :r] = torch.randn(r, in_f, generator=g) / in_f**0.5
        lora_B[k, :, :r] = torch.randn(out_f, r, generator=g) / r**0.5
    scalings = torch.linspace(0.5, 2.0, num_adapters) * torch.tensor([1.0, -1.0]).repeat(num_adapters)[:num_adapters]
    to = lambda t: None if t is None else t.to(dtype)
    return to(weight), to(b), to(lora_A), to(lora_B), scalings


def make_ids(n, num_adapters, kind, seed=0):
    """``(n,)`` int64 unsorted ids: "mixed" (−1 and every adapter but the last), "all_base", "one"."""
    g = torch.Generator().manual_seed(seed)
    if kind == "all_base":
        return torch.full((n,), -1, dtype=torch.int64)
    if kind == "one":  # a single adapter in the middle of the stack, no base rows
        return torch.full((n,), num_adapters // 2, dtype=torch.int64)
    high = max(num_adapters - 1, 1)  # the last adapter (K > 1) gets no rows
    ids = torch.randint(-1, high, (n,), generator=g)
    ids[: high + 1] = torch.arange(-1, high)[torch.randperm(high + 1, generator=g)]
    return ids


def dropout_scale(row_adapter, dropout, seed, shape):
    """``(n, in)`` float64 ``keep_i / (1 − p_k)`` of each row i (k = row_adapter[i]; ones where k = −1).

    keep_i is row i of the single-adapter Triton mask for adapter k's p: ``dropout_keep_mask(seed, shape, p_k)``.
    """
    scale = torch.ones(shape, dtype=torch.float64)
    for k, p in enumerate(dropout.tolist()):
        rows = row_adapter == k
        keep = kernels.dropout_keep_mask(seed, shape, p, device="cpu")
        scale[rows] = keep[rows].double() / (1.0 - p)
    return scale


def reference(x, weight, bias, lora_A, lora_B, scalings, row_adapter, grad_y, dropout=None, seed=0):
    """Naive mixed-adapter LoRA, row by row in float64 under autograd: ``(y, xa, dX, dA, dB)``.

    With ``dropout`` ``(K,)``, row i of adapter k sees ``drop(x)_i = x_i ⊙ keep_i / (1 − p_k)``.
    """
    x, lora_A, lora_B = (t.detach().double().requires_grad_() for t in (x, lora_A, lora_B))
    weight = weight.double()
    drop = None if dropout is None else dropout_scale(row_adapter, dropout, seed, tuple(x.shape))
    ys, xas = [], []
    for i, k in enumerate(row_adapter.tolist()):
        y_i = x[i] @ weight.T + (0.0 if bias is None else bias.double())
        x_i = x[i] if drop is None else x[i] * drop[i]
        xa_i = lora_A[k] @ x_i if k >= 0 else x.new_zeros(lora_A.shape[1])
        if k >= 0:
            y_i = y_i + scalings[k].item() * (lora_B[k] @ xa_i)
        ys.append(y_i)
        xas.append(xa_i)
    y = torch.stack(ys)
    y.backward(grad_y.double())
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in (x, lora_A, lora_B)]  # all rows k = −1
    return y.detach(), torch.stack(xas).detach(), *grads


def _close(actual, expected, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol)


def _case(num_adapters, ranks, kind="mixed", n=37, in_f=70, out_f=50, dtype=torch.float32, bias=True, seed=0):
    weight, b, lora_A, lora_B, scalings = make_adapters(num_adapters, ranks, in_f, out_f, dtype, bias, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, in_f, generator=g).to(dtype)
    grad_y = torch.randn(n, out_f, generator=g).to(dtype)
    return x, weight, b, lora_A, lora_B, scalings, make_ids(n, num_adapters, kind, seed), grad_y


# --- the block table ---------------------------------------------------------------------------


@pytest.mark.parametrize("block_m", [1, 4, 64])
@pytest.mark.parametrize(
    "row_adapter",
    [
        torch.tensor([2, -1, 0, 2, 2, 1, -1, 0, 2]),
        torch.full((10,), -1),
        torch.tensor([1] * 9),  # adapters 0 and 2 without rows
        make_ids(37, 8, "mixed"),
        torch.zeros(0, dtype=torch.int64),
    ],
    ids=["small", "all_base", "one_adapter", "mixed", "empty"],
)
def test_block_table_covers_every_row_once(row_adapter, block_m):
    K = 3 if row_adapter.numel() < 20 else 8
    seg = adapter_segments(row_adapter, K, block_m)
    n = row_adapter.shape[0]
    assert seg.num_blocks == num_row_blocks(n, K, block_m) == -(-n // block_m) + K + 1
    # order: stable sort by adapter, base rows first; bounds: each adapter's slice of it.
    assert torch.equal(seg.order, torch.sort(row_adapter, stable=True).indices)
    counts = torch.bincount(row_adapter + 1, minlength=K + 1)
    assert torch.equal(seg.bounds, torch.cumsum(counts, 0))
    # block table: every row in exactly one slot, of a block of its adapter, in sorted order.
    slots = seg.block_rows.view(-1, block_m).long()
    real = slots >= 0
    assert torch.equal(torch.sort(slots[real]).values, torch.arange(n))
    assert torch.equal(slots[real], seg.order)
    block_of_slot = seg.block_adapter.long()[:, None].expand_as(slots)
    assert torch.equal(block_of_slot[real], row_adapter[slots[real]])
    # padding only at a segment's end; no row in unused blocks, which all come last.
    assert all(torch.equal(r, r.sort(descending=True).values) for r in real.int())
    unused = seg.block_adapter == UNUSED_BLOCK
    assert not real[unused].any()
    assert torch.equal(unused, unused.sort().values)
    assert int((~unused).sum()) == sum(-(-int(c) // block_m) for c in counts)


def test_ids_out_of_range_count_as_base():
    seg = adapter_segments(torch.tensor([0, 5, -3, 1]), 2, 4)
    assert seg.bounds.tolist() == [2, 3, 4]
    assert seg.block_adapter.tolist()[:3] == [-1, 0, 1]


# --- every config of each kernel ------------------------------------------------------------------

# (K, ranks zero-padded to R = max, kind of ids, bias)
CONFIG_CASES = [(3, (3, 8, 5), "mixed", True), (8, (4, 1, 6, 2, 5, 3, 7, 5), "mixed", False)]


def test_a_config_with_other_rows_per_block_is_refused():
    x, w, b, a, bb, s, row_adapter, gy = _case(3, [2, 4, 3])
    config = triton.Config({**GEMM_CONFIGS[0].kwargs, "BLOCK_M": BLOCK_M // 2}, num_warps=4)
    with pytest.raises(ValueError, match="BLOCK_M"):
        kernels.fused_multi_lora_forward(x, w, b, a, bb, s, row_adapter, config=config)
    with pytest.raises(ValueError, match="BLOCK_M"):
        kernels.fused_multi_lora_dx(gy, w, a, bb, s, row_adapter, config=config)


@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=ids)
@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: f"K{c[0]}")
def test_forward_every_config(config, case):
    x, w, b, a, bb, s, row_adapter, gy = _case(*case[:3], bias=case[3])
    y, xa = kernels.fused_multi_lora_forward(x, w, b, a, bb, s, row_adapter, config=config)
    y_ref, xa_ref, *_ = reference(x, w, b, a, bb, s, row_adapter, gy)
    _close(xa, xa_ref)
    _close(y, y_ref)
    assert not xa[row_adapter < 0].any()


@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=ids)
@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: f"K{c[0]}")
def test_dx_every_config(config, case):
    x, w, b, a, bb, s, row_adapter, gy = _case(*case[:3], bias=case[3])
    dx, g = kernels.fused_multi_lora_dx(gy, w, a, bb, s, row_adapter, config=config)
    _, _, dx_ref, _, _ = reference(x, w, b, a, bb, s, row_adapter, gy)
    k = row_adapter.clamp(min=0)
    g_ref = torch.einsum("no,nor->nr", gy.double(), bb.double()[k]) * (row_adapter >= 0)[:, None]
    _close(g, g_ref)
    _close(dx, dx_ref)


@pytest.mark.parametrize("config", GRAD_CONFIGS, ids=ids)
@pytest.mark.parametrize("chunk_rows", [None, 16])
def test_weight_grads_every_config(config, chunk_rows):
    x, w, b, a, bb, s, row_adapter, gy = _case(8, (4, 1, 6, 2, 5, 3, 7, 5), n=131)
    _, xa, _, da_ref, db_ref = reference(x, w, b, a, bb, s, row_adapter, gy)
    k = row_adapter.clamp(min=0)
    g = (torch.einsum("no,nor->nr", gy.double(), bb.double()[k]) * (row_adapter >= 0)[:, None]).float()
    da = kernels.multi_lora_weight_grad(x, g, s, row_adapter, transpose=True, chunk_rows=chunk_rows, config=config)
    db = kernels.multi_lora_weight_grad(gy, xa.float(), s, row_adapter, chunk_rows=chunk_rows, config=config)
    assert da.shape == a.shape and db.shape == bb.shape
    _close(da, da_ref)
    _close(db, db_ref)
    assert not da[-1].any() and not db[-1].any()  # the last adapter has no rows


@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
@pytest.mark.parametrize("kind", ["skewed", "one", "all_base"])
def test_chunk_table_cuts_each_adapters_sorted_rows_in_order(kind, chunk_rows):
    K, n = 4, 53
    row_adapter = _skewed_ids(n, K) if kind == "skewed" else make_ids(n, K, kind)
    seg = adapter_segments(row_adapter, K, BLOCK_M, chunk_rows)
    chunks = seg.chunks
    assert chunks.chunk_rows == chunk_rows and chunks.num_chunks == num_row_chunks(n, K, chunk_rows)
    counts = torch.bincount(row_adapter + 1, minlength=K + 1)[1:]
    per_adapter = (counts + chunk_rows - 1) // chunk_rows
    assert torch.equal(chunks.chunk_bounds, torch.cat([torch.zeros(1, dtype=torch.int64), per_adapter.cumsum(0)]))
    used = chunks.chunk_adapter.long()
    assert torch.equal(used[: int(per_adapter.sum())], torch.repeat_interleave(torch.arange(K), per_adapter))
    assert (used[int(per_adapter.sum()) :] == UNUSED_BLOCK).all()


def _skewed_ids(n, num_adapters, seed=0):
    """90% of the rows on adapter 0, the rest on the last adapter and the base, shuffled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, dtype=torch.int64)
    tail = n - (9 * n) // 10
    ids[:tail] = torch.tensor([num_adapters - 1, -1]).repeat(tail)[:tail]
    return ids[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("kind", ["skewed", "one", "all_base"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
def test_weight_grads_split_over_row_chunks(kind, dropout):
    """Skewed (90/10), single-adapter and all-base batches, the rows cut into many chunks: exact and deterministic."""
    x, w, b, a, bb, s, _, gy = _case(3, DROP_RANKS, n=131)
    row_adapter = _skewed_ids(131, 3) if kind == "skewed" else make_ids(131, 3, kind)
    p = DROPOUT if dropout else None
    _, xa, _, da_ref, db_ref = reference(x, w, b, a, bb, s, row_adapter, gy, p, SEED)
    g = _g_ref(gy, bb, row_adapter).float()
    results = []
    for chunk_rows in (7, 7, 40, None):
        da = kernels.multi_lora_weight_grad(
            x, g, s, row_adapter, transpose=True, chunk_rows=chunk_rows, dropout=p, seed=SEED
        )
        db = kernels.multi_lora_weight_grad(gy, xa.float(), s, row_adapter, chunk_rows=chunk_rows)
        _close(da, da_ref)
        _close(db, db_ref)
        results.append((da, db))
    assert all(torch.equal(x, y) for x, y in zip(results[0], results[1]))  # the same chunks: bitwise the same
    if kind == "all_base":
        assert not results[0][0].any() and not results[0][1].any()


# --- the composed forward and backward ---------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        (1, (3,), "mixed", True),
        (3, (3, 8, 5), "mixed", False),
        (8, (4, 1, 6, 2, 5, 3, 7, 5), "mixed", True),
        (3, (20, 7, 13), "all_base", True),
        (8, (1,) * 8, "one", False),
    ],
    ids=["K1", "K3", "K8", "all_base", "one_adapter_of_8"],
)
def test_multi_lora_matches_reference(case):
    x, w, b, a, bb, s, row_adapter, gy = _case(*case[:3], bias=case[3])
    y, xa = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter)
    dx, da, db = kernels.multi_lora_backward(gy, x, xa, w, a, bb, s, row_adapter, ALL_GRADS)
    for actual, expected in zip((y, xa, dx, da, db), reference(x, w, b, a, bb, s, row_adapter, gy)):
        assert actual.dtype == x.dtype and actual.shape == expected.shape
        _close(actual, expected)
    # Adapters without rows get exactly zero gradients.
    empty = torch.bincount(row_adapter + 1, minlength=len(case[1]) + 1)[1:] == 0
    assert not da[empty].any() and not db[empty].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x, w, b, a, bb, s, row_adapter, gy = _case(3, (3, 8, 5), dtype=dtype)
    y, xa = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter)
    dx, da, db = kernels.multi_lora_backward(gy, x, xa, w, a, bb, s, row_adapter, ALL_GRADS)
    for actual, expected in zip((y, xa, dx, da, db), reference(x, w, b, a, bb, s, row_adapter, gy)):
        assert actual.dtype == dtype
        _close(actual, expected, dtype)


def test_strided_inputs():
    """A column slice of x, a transposed dY, W0 and the stacks in other layouts: strides, never copies."""
    x_c, w_c, b, a_c, bb_c, s, row_adapter, gy_c = _case(3, (3, 8, 5))
    x = torch.zeros(37, 80)
    x[:, 5:75] = x_c
    x = x[:, 5:75]
    gy = gy_c.T.contiguous().T
    w = w_c.T.contiguous().T
    a = a_c.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    bb = bb_c.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert not any(t.is_contiguous() for t in (x, gy, w, a, bb))
    y, xa = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter)
    dx, da, db = kernels.multi_lora_backward(gy, x, xa, w, a, bb, s, row_adapter, ALL_GRADS)
    for actual, expected in zip((y, xa, dx, da, db), reference(x_c, w_c, b, a_c, bb_c, s, row_adapter, gy_c)):
        _close(actual, expected)


@pytest.mark.parametrize("needs_grad", [(True, False, False), (False, True, False), (False, False, True)])
def test_only_the_gradients_asked_for(needs_grad):
    x, w, b, a, bb, s, row_adapter, gy = _case(3, (3, 8, 5))
    _, xa = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter)
    grads = kernels.multi_lora_backward(gy, x, xa, w, a, bb, s, row_adapter, needs_grad)
    for wanted, actual, expected in zip(needs_grad, grads, reference(x, w, b, a, bb, s, row_adapter, gy)[2:]):
        if wanted:
            _close(actual, expected)
        else:
            assert actual is None
    assert kernels.multi_lora_backward(gy, x, xa, w, a, bb, s, row_adapter, (False,) * 3) == (None, None, None)


@pytest.mark.parametrize("dropout", [None, torch.tensor([0.1, 0.0, 0.3])], ids=["no_dropout", "dropout"])
def test_each_adapters_own_factors_read_in_place(dropout):
    """The library's entries take K separate A_k ``(r_k, in)`` and B_k ``(out, r_k)`` of their own ranks and strides
    (no padded stack) and return each adapter's own gradients."""
    x, w, b, a, bb, s, row_adapter, gy = _case(3, (3, 8, 5))
    row_adapter = make_ids(37, 4, "mixed")  # every adapter has rows
    ranks = (3, 8, 5)
    lora_A = [a[k, :r].clone() for k, r in enumerate(ranks)]
    lora_B = [bb[k, :, :r].t().contiguous().t() for k, r in enumerate(ranks)]  # column-major B's
    lora_A[1] = lora_A[1].t().contiguous().t()  # and one column-major A
    seed = 77 if dropout is None else SEED
    y, xa = kernels.multi_lora_linear.forward(x, w, b, lora_A, lora_B, s, row_adapter, dropout, seed)
    dx, da, db = kernels.multi_lora_linear.backward(
        gy, x, xa, w, lora_A, lora_B, s, row_adapter, ALL_GRADS, dropout, seed
    )
    y_ref, xa_ref, dx_ref, da_ref, db_ref = reference(x, w, b, a, bb, s, row_adapter, gy, dropout, seed)
    for actual, expected in ((y, y_ref), (xa, xa_ref), (dx, dx_ref)):
        _close(actual, expected)
    for k, r in enumerate(ranks):
        assert da[k].shape == (r, 70) and db[k].shape == (50, r)
        _close(da[k], da_ref[k, :r])
        _close(db[k], db_ref[k, :, :r])


@pytest.mark.parametrize("R", [1, 256])
def test_rank_extremes(R):
    x, w, b, a, bb, s, row_adapter, gy = _case(2, (R, max(1, R // 3)), n=20, in_f=40, out_f=30)
    y, xa = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter)
    y_ref, xa_ref, *_ = reference(x, w, b, a, bb, s, row_adapter, gy)
    _close(xa, xa_ref)
    _close(y, y_ref)


def test_empty_batch():
    x, w, b, a, bb, s, row_adapter, _ = _case(3, (3, 8, 5), "all_base", n=0)
    y, xa = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter)
    assert y.shape == (0, 50) and xa.shape == (0, 8)
    dx, da, db = kernels.multi_lora_backward(y, x, xa, w, a, bb, s, row_adapter, ALL_GRADS)
    assert dx.shape == (0, 70) and not da.any() and not db.any()


# --- launcher errors ----------------------------------------------------------------------------------


def test_launcher_errors():
    x, w, b, a, bb, s, row_adapter, gy = _case(3, (3, 8, 5))
    fwd = kernels.fused_multi_lora_forward
    with pytest.raises(ValueError, match=r"weight has shape \(50, 69\), expected \(50, 70\)"):
        fwd(x, w[:, :69], b, a, bb, s, row_adapter)
    with pytest.raises(ValueError, match=r"lora_B is torch\.float16 but the input is torch\.float32"):
        fwd(x, w, b, a, bb.half(), s, row_adapter)
    with pytest.raises(ValueError, match=r"lora_B has shape \(3, 50, 7\), expected \(3, 50, 8\)"):
        fwd(x, w, b, a, bb[..., :7], s, row_adapter)
    with pytest.raises(ValueError, match="lora_A must be 3-D"):
        fwd(x, w, b, a[0], bb, s, row_adapter)
    with pytest.raises(ValueError, match=r"row_adapter has shape \(36,\), expected one id per row: \(37,\)"):
        fwd(x, w, b, a, bb, s, row_adapter[:36])
    with pytest.raises(ValueError, match=r"row_adapter is torch\.float32"):
        fwd(x, w, b, a, bb, s, row_adapter.float())
    with pytest.raises(ValueError, match="scalings has 2 values but there are 3 stacked adapters"):
        fwd(x, w, b, a, bb, s[:2], row_adapter)
    with pytest.raises(ValueError, match=r"scalings is torch\.float64"):
        fwd(x, w, b, a, bb, s.double(), row_adapter)
    with pytest.raises(ValueError, match="x must be 2-D"):
        fwd(x[None], w, b, a, bb, s, row_adapter)
    with pytest.raises(ValueError, match="rank r=257"):
        fwd(x, w, b, torch.zeros(3, 257, 70), torch.zeros(3, 50, 257), s, row_adapter)
    with pytest.raises(ValueError, match="config has BLOCK_M=128"):
        fwd(x, w, b, a, bb, s, row_adapter, config=fused_lora_matmul_tuned.configs[0])
    with pytest.raises(ValueError, match=r"segments\.order has shape \(36,\)"):
        fwd(x, w, b, a, bb, s, row_adapter, segments=adapter_segments(row_adapter[:36], 3, BLOCK_M))
    with pytest.raises(ValueError, match="segments were built for block_m=16"):
        fwd(x, w, b, a, bb, s, row_adapter, segments=adapter_segments(row_adapter, 3, 16))
    with pytest.raises(ValueError, match=r"weight has shape \(50, 70\), expected \(49, 70\)"):
        kernels.fused_multi_lora_dx(gy[:, :49], w, a, bb, s, row_adapter)
    with pytest.raises(ValueError, match=r"v has shape \(36, 8\), expected \(37, 8\)"):
        kernels.multi_lora_weight_grad(x, torch.zeros(36, 8), s, row_adapter)
    with pytest.raises(ValueError, match="chunk_rows=0 must be at least 1"):
        kernels.multi_lora_weight_grad(x, torch.zeros(37, 8), s, row_adapter, chunk_rows=0)


# --- per-adapter dropout -------------------------------------------------------------------------------

DROPOUT = torch.tensor([0.1, 0.0, 0.3])  # adapter 1 without dropout
SEED = 1_234_567_891
DROP_RANKS = (3, 8, 5)


def _dropout_case(dtype=torch.float32, bias=True, n=37, in_f=70, out_f=50):
    """K = 3 adapters of ranks 3, 8, 5 with DROPOUT; unsorted ids covering −1 and all three adapters."""
    case = list(_case(3, DROP_RANKS, n=n, in_f=in_f, out_f=out_f, dtype=dtype, bias=bias))
    case[6] = make_ids(n, 4, "mixed")  # ids in [-1, 3): every adapter of the 3 has rows
    assert set(case[6].tolist()) == {-1, 0, 1, 2}
    return case


def _g_ref(gy, bb, row_adapter):
    k = row_adapter.clamp(min=0)
    return torch.einsum("no,nor->nr", gy.double(), bb.double()[k]) * (row_adapter >= 0)[:, None]


@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=ids)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_dropout_forward_every_config(config, bias):
    x, w, b, a, bb, s, row_adapter, gy = _dropout_case(bias=bias)
    y, xa = kernels.fused_multi_lora_forward(x, w, b, a, bb, s, row_adapter, config=config, dropout=DROPOUT, seed=SEED)
    y_ref, xa_ref, *_ = reference(x, w, b, a, bb, s, row_adapter, gy, DROPOUT, SEED)
    _close(xa, xa_ref)
    _close(y, y_ref)
    assert not xa[row_adapter < 0].any()


@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=ids)
def test_dropout_dx_every_config(config):
    x, w, b, a, bb, s, row_adapter, gy = _dropout_case()
    dx, g = kernels.fused_multi_lora_dx(gy, w, a, bb, s, row_adapter, config=config, dropout=DROPOUT, seed=SEED)
    _, _, dx_ref, _, _ = reference(x, w, b, a, bb, s, row_adapter, gy, DROPOUT, SEED)
    _close(g, _g_ref(gy, bb, row_adapter))
    _close(dx, dx_ref)
    # g alone does not depend on the dropout.
    none, g_only = kernels.fused_multi_lora_dx(
        gy, w, a, bb, s, row_adapter, with_dx=False, config=config, dropout=DROPOUT, seed=SEED
    )
    assert none is None and torch.equal(g_only, g)


@pytest.mark.parametrize("config", XA_CONFIGS, ids=ids)
def test_dropout_xa_every_config(config):
    x, w, b, a, bb, s, row_adapter, gy = _dropout_case()
    xa = kernels.multi_dropout_xa(x, a, row_adapter, DROPOUT, SEED, config=config)
    _, xa_ref, *_ = reference(x, w, b, a, bb, s, row_adapter, gy, DROPOUT, SEED)
    _close(xa, xa_ref)
    assert not xa[row_adapter < 0].any()


@pytest.mark.parametrize("config", GRAD_CONFIGS, ids=ids)
@pytest.mark.parametrize("chunk_rows", [None, 16])
def test_dropout_weight_grads_every_config(config, chunk_rows):
    x, w, b, a, bb, s, row_adapter, gy = _dropout_case(n=131)
    _, xa, _, da_ref, db_ref = reference(x, w, b, a, bb, s, row_adapter, gy, DROPOUT, SEED)
    g = _g_ref(gy, bb, row_adapter).float()
    da = kernels.multi_lora_weight_grad(
        x, g, s, row_adapter, transpose=True, chunk_rows=chunk_rows, config=config, dropout=DROPOUT, seed=SEED
    )
    db = kernels.multi_lora_weight_grad(gy, xa.float(), s, row_adapter, chunk_rows=chunk_rows, config=config)
    _close(da, da_ref)
    _close(db, db_ref)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_multi_lora_dropout_matches_reference(dtype, bias):
    x, w, b, a, bb, s, row_adapter, gy = _dropout_case(dtype, bias)
    y, xa = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter, dropout=DROPOUT, seed=SEED)
    grads = kernels.multi_lora_backward(gy, x, xa, w, a, bb, s, row_adapter, ALL_GRADS, dropout=DROPOUT, seed=SEED)
    expected = reference(x, w, b, a, bb, s, row_adapter, gy, DROPOUT, SEED)
    for actual, ref in zip((y, xa, *grads), expected):
        assert actual.dtype == dtype and actual.shape == ref.shape
        _close(actual, ref, dtype)
    # Another seed, other masks.
    y_other, _ = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter, dropout=DROPOUT, seed=SEED + 1)
    assert not torch.equal(y_other, y)


@pytest.mark.parametrize("seed", [7, 2**31 - 2, 2**40 + 3])
def test_dropout_mask_is_the_single_adapter_mask(seed):
    """With A_k = I (in = R = 16) and x = 1, xa is the mask itself: ``xa_i = keep_i / (1 − p_k)``."""
    n, in_f = 37, 16
    row_adapter = make_ids(n, 4, "mixed")
    a = torch.eye(in_f).repeat(3, 1, 1)
    xa = kernels.multi_dropout_xa(torch.ones(n, in_f), a, row_adapter, DROPOUT, seed)
    expected = dropout_scale(row_adapter, DROPOUT, seed, (n, in_f)) * (row_adapter >= 0)[:, None]
    torch.testing.assert_close(xa.double(), expected, atol=1e-6, rtol=1e-6)
    assert (xa[row_adapter == 1] == 1).all()  # p = 0: every element kept, unscaled
    for k in (0, 2):  # some dropped, some kept
        assert (xa[row_adapter == k] == 0).any() and (xa[row_adapter == k] > 1).any()


def test_zero_dropout_is_exactly_no_dropout():
    x, w, b, a, bb, s, row_adapter, gy = _dropout_case()
    outputs = []
    for dropout in (None, torch.zeros(3)):
        y, xa = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter, dropout=dropout, seed=SEED)
        grads = kernels.multi_lora_backward(gy, x, xa, w, a, bb, s, row_adapter, ALL_GRADS, dropout=dropout, seed=SEED)
        outputs.append((y, xa, *grads))
    for without, zero in zip(*outputs):
        assert torch.equal(without, zero)


def test_adapter_without_dropout_is_exact():
    """Rows of an adapter with p = 0 in a dropout launch get exactly the result without dropout."""
    x, w, b, a, bb, s, row_adapter, gy = _dropout_case()
    y, xa = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter, dropout=DROPOUT, seed=SEED)
    dx, da, db = kernels.multi_lora_backward(gy, x, xa, w, a, bb, s, row_adapter, ALL_GRADS, dropout=DROPOUT, seed=SEED)
    y0, xa0 = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter)
    dx0, da0, db0 = kernels.multi_lora_backward(gy, x, xa0, w, a, bb, s, row_adapter, ALL_GRADS)
    exact = (row_adapter == 1) | (row_adapter < 0)
    for with_dropout, without in ((y, y0), (xa, xa0), (dx, dx0)):
        assert torch.equal(with_dropout[exact], without[exact])
        assert not torch.equal(with_dropout, without)
    assert torch.equal(da[1], da0[1]) and torch.equal(db[1], db0[1])


def test_dropout_empty_batch():
    x, w, b, a, bb, s, row_adapter, _ = _case(3, DROP_RANKS, "all_base", n=0)
    y, xa = kernels.multi_lora_forward(x, w, b, a, bb, s, row_adapter, dropout=DROPOUT, seed=SEED)
    assert y.shape == (0, 50) and xa.shape == (0, 8)
    dx, da, db = kernels.multi_lora_backward(y, x, xa, w, a, bb, s, row_adapter, ALL_GRADS, dropout=DROPOUT, seed=SEED)
    assert dx.shape == (0, 70) and not da.any() and not db.any()


def test_dropout_errors():
    x, w, b, a, bb, s, row_adapter, gy = _dropout_case()
    calls = {
        "forward": lambda d, seed=SEED: kernels.fused_multi_lora_forward(
            x, w, b, a, bb, s, row_adapter, dropout=d, seed=seed
        ),
        "dx": lambda d, seed=SEED: kernels.fused_multi_lora_dx(gy, w, a, bb, s, row_adapter, dropout=d, seed=seed),
        "weight_grad": lambda d, seed=SEED: kernels.multi_lora_weight_grad(
            x, torch.zeros(37, 8), s, row_adapter, transpose=True, dropout=d, seed=seed
        ),
        "xa": lambda d, seed=SEED: kernels.multi_dropout_xa(x, a, row_adapter, d, seed),
        "multi_lora_forward": lambda d, seed=SEED: kernels.multi_lora_forward(
            x, w, b, a, bb, s, row_adapter, dropout=d, seed=seed
        ),
    }
    for call in calls.values():
        with pytest.raises(
            ValueError, match=r"dropout has shape \(2,\), expected one drop probability per adapter: \(3,\)"
        ):
            call(DROPOUT[:2])
        with pytest.raises(ValueError, match=r"dropout has shape \(1, 3\)"):
            call(DROPOUT[None])
        with pytest.raises(ValueError, match=r"dropout is torch\.float64; the kernels read torch\.float32"):
            call(DROPOUT.double())
        with pytest.raises(ValueError, match=r"dropout must be None or a \(3,\) torch\.float32 tensor, got list"):
            call([0.1, 0.0, 0.3])
        with pytest.raises(ValueError, match="seed must be a non-negative Python int"):
            call(DROPOUT, seed=-1)
        with pytest.raises(ValueError, match="seed must be a non-negative Python int"):
            call(DROPOUT, seed=3.0)
        with pytest.raises(ValueError, match=r"seed must be .*int.*, got tensor\(3\.\)|got torch\.float32"):
            call(DROPOUT, seed=torch.tensor(3.0))
    with pytest.raises(ValueError, match=r"dropout must be a \(K,\) torch\.float32 tensor here, got None"):
        kernels.multi_dropout_xa(x, a, row_adapter, None, SEED)
    with pytest.raises(ValueError, match="config has BLOCK_M=128"):
        kernels.multi_dropout_xa(x, a, row_adapter, DROPOUT, SEED, config=fused_lora_matmul_tuned.configs[0])


@pytest.mark.parametrize("tuned", [multi_lora_matmul_tuned, multi_dropout_xa_tuned, multi_lora_weight_grad_tuned])
def test_mixed_autotuners_key_on_the_token_bucket(tuned):
    """Each batch-size bucket (``launch.token_bucket``) is tuned on its own."""
    assert "M_BUCKET" in tuned.keys


def test_mixed_kernels_take_small_fp32_tiles():
    fp32, bf16 = torch.empty(0), torch.empty(0, dtype=torch.bfloat16)
    gemm = multi_lora_matmul_tuned.early_config_prune
    cases = (({}, 4, 4), ({"DROPOUT_C": True}, 8, 4), ({"DROPOUT_UP": True}, 4, 3), ({"EQUAL_RANKS": False}, 4, 3))
    for flags, warps, stages in cases:
        kept = gemm(GEMM_CONFIGS, {"u_ptr": fp32, "R_PAD": 64, **flags})
        assert kept and all(c.kwargs["BLOCK_N"] <= 64 and (c.num_warps, c.num_stages) == (warps, stages) for c in kept)
    assert any(c.kwargs["BLOCK_N"] == 128 for c in gemm(GEMM_CONFIGS, {"u_ptr": bf16, "R_PAD": 64}))
    for tuned, pointer, width, small in (
        (multi_dropout_xa_tuned, "x_ptr", "BLOCK_K", XA_SMALL_TILES),
        (multi_lora_weight_grad_tuned, "u_ptr", "BLOCK_P", GRAD_SMALL_TILES),
    ):
        kept = tuned.early_config_prune(tuned.configs, {pointer: fp32})
        assert kept and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs[width] <= 64 for c in kept)
        assert tuned.early_config_prune(tuned.configs, {pointer: bf16}) == small.split(tuned.configs)[0]
