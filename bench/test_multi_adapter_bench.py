"""Mixed-adapter batch: K=8 adapters, rows spread evenly, against one adapter and a loop over adapters.

On the same batch (16 sequences; sequence i uses adapter i mod 8, so rows are unsorted) and the
same frozen weight, interleaved:
- one adapter: every row uses adapter 0 (the single-adapter fused path);
- mixed: one call, each sequence with its own adapter (``MultiLoRALinear`` in an ``adapter_ids`` block);
- loop: what a user would write without it — per adapter, gather its rows, run them, scatter back.
Forward (serving) and forward+backward (training all eight adapters at once).
"""

import pytest
import torch
from harness import FROZEN, Timer, interleaved, summarize
from report import Target

from conftest import DEVICE, DTYPE
from lorafast import MultiLoRALinear, adapter_ids

NUM_ADAPTERS, SEQUENCES = 8, 16
if DEVICE.type == "cuda":
    CASE, ROUNDS, LIMIT = (4096, 4096, 8192, 16), 30, 1.2
else:
    CASE, ROUNDS, LIMIT = (768, 768, 8192, 8), 6, 1.3
ONE, MIXED, LOOP = "one adapter", "mixed (K=8)", "loop over adapters"


def _layer(d_in, d_out, r):
    layer = MultiLoRALinear.from_linear(torch.nn.Linear(d_in, d_out, device=DEVICE, dtype=DTYPE))
    for k in range(NUM_ADAPTERS):
        layer.add_adapter(f"task{k}", r=r, alpha=2 * r)
        with torch.no_grad():
            layer.lora_B[f"task{k}"].normal_(std=0.02)
    return layer.train()


def _runs(layer, x, grad_y, seq_ids):
    """``{name|fwd, name|fwd+bwd: callable}`` of the candidates."""
    row_ids = seq_ids.repeat_interleave(x.shape[0] // seq_ids.shape[0])
    rows_of = [(row_ids == k).nonzero().flatten() for k in range(NUM_ADAPTERS)]
    names = layer.adapter_names

    def frozen():
        layer.set_row_adapters(None)
        layer.set_adapter(None)
        return layer(x)

    def one():
        layer.set_row_adapters(None)
        layer.set_adapter(names[0])
        return layer(x)

    def mixed():  # one adapter_ids block per batch, as a server would run it
        with adapter_ids(layer, seq_ids):
            return layer(x)

    def loop():
        layer.set_row_adapters(None)
        y = torch.empty(x.shape[0], layer.out_features, device=x.device, dtype=x.dtype)
        for name, rows in zip(names, rows_of):
            layer.set_adapter(name)
            y = y.index_copy(0, rows, layer(x[rows]))
        return y

    def backward_of(fn):
        def run():
            fn().backward(grad_y)
            x.grad = None
            for p in layer.parameters():
                p.grad = None

        return run

    runs = {}
    for name, fn in ((FROZEN, frozen), (ONE, one), (MIXED, mixed), (LOOP, loop)):
        runs[f"{name}|fwd"] = fn
        runs[f"{name}|fwd+bwd"] = backward_of(fn)
    return runs


@pytest.mark.parametrize("case", [CASE], ids=lambda c: f"{c[0]}x{c[1]}-n{c[2]}-r{c[3]}-K{NUM_ADAPTERS}")
def test_mixed_adapter_batch(benchmark, report, case):
    d_in, d_out, tokens, r = case
    torch.manual_seed(0)
    layer = _layer(d_in, d_out, r)
    x = torch.randn(tokens, d_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad_y = torch.randn(tokens, d_out, device=DEVICE, dtype=DTYPE)
    seq_ids = torch.arange(SEQUENCES, device=DEVICE) % NUM_ADAPTERS
    runs = _runs(layer, x, grad_y, seq_ids)
    with torch.no_grad():  # the candidates compute the same thing
        mixed, loop = runs[f"{MIXED}|fwd"](), runs[f"{LOOP}|fwd"]()
        torch.testing.assert_close(mixed, loop, atol=1e-2 if DTYPE != torch.float32 else 1e-4, rtol=1e-2)
    timer = Timer(DEVICE)
    times = {name: [] for name in runs}

    def one_round():
        for name, ts in interleaved(runs, 1, timer, warmup=0).items():
            times[name] += ts

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    layer.set_row_adapters(None)
    for mode in ("fwd", "fwd+bwd"):
        timing = summarize(
            {k: v for k, v in times.items() if k.endswith(f"|{mode}")},
            baselines=tuple(f"{n}|{mode}" for n in (FROZEN, ONE, LOOP)),
        )
        for name in (FROZEN, ONE, MIXED, LOOP):
            t = timing[f"{name}|{mode}"]
            report.multi_rows.append(
                {"case": f"{d_in}→{d_out}, n={tokens}, r={r}, K={NUM_ADAPTERS}", "mode": mode, "layer": name}
                | {"ms": t["seconds"] * 1e3, "vs_frozen": t[f"vs {FROZEN}|{mode}"], "vs_one": t[f"vs {ONE}|{mode}"]}
                | {"vs_loop": t[f"vs {LOOP}|{mode}"]}
            )
        ours = timing[f"{MIXED}|{mode}"]
        where = f"{d_in}→{d_out}, n={tokens}, r={r}, K={NUM_ADAPTERS}, {mode}"
        device = "GPU" if DEVICE.type == "cuda" else "CPU"
        report.targets.append(Target(f"{device} mixed batch / one adapter ({where})", ours[f"vs {ONE}|{mode}"], LIMIT))
        report.targets.append(
            Target(f"{device} mixed batch / loop over adapters ({where})", ours[f"vs {LOOP}|{mode}"], 1.0)
        )
    benchmark.extra_info.update({row["layer"] + "|" + row["mode"]: row["ms"] for row in report.multi_rows})
