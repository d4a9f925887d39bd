"""Mixed-adapter batch: K=8 adapters, against one adapter, a loop over adapters and PEFT's mixed batch.

On the same batch of 16 sequences and the same frozen weight, interleaved, with the sequences'
adapters "unsorted" (sequence i uses adapter i mod 8) or, on a GPU, also "skewed" (90/10: all
but two sequences on adapter 0):
- one adapter: every row uses adapter 0 (the single-adapter fused path);
- mixed: one call, each sequence with its own adapter (``MultiLoRALinear`` in an ``adapter_ids``
  block, the ids given on the host as a server holds them);
- loop: what a user would write without it — per adapter, gather its rows, run them, scatter back;
- PEFT: PEFT's own mixed batch (``adapter_names=``, forward only: PEFT refuses it in training);
- mixed with DoRA: the same batch and factors with every other adapter DoRA (its rows scaled by g_k after the
  mixed product), against the plain mixed batch (target: at most 1.25×, the single-adapter DoRA bar).
Forward (serving) and forward+backward (training all eight adapters at once). On a GPU, one
more mixed forward+backward runs under ``torch.cuda.set_sync_debug_mode("error")``: a host
synchronisation in it is reported as a missed target.
"""

import pytest
import torch
from harness import FROZEN, Timer, summarize, timed_rounds
from report import Target

from conftest import DEVICE, DRY_RUN, DTYPE, GPU_PLAN
from lorafast import MultiLoRALinear, adapter_ids

NUM_ADAPTERS, SEQUENCES = 8, 16
if DRY_RUN:  # the GPU plan at the smallest shape, one round
    CASE, ROUNDS, LIMIT, LAYOUTS = (64, 64, 256, 16), 1, 1.2, ("unsorted", "skewed")
elif GPU_PLAN:
    CASE, ROUNDS, LIMIT, LAYOUTS = (4096, 4096, 8192, 16), 30, 1.2, ("unsorted", "skewed")
else:
    CASE, ROUNDS, LIMIT, LAYOUTS = (768, 768, 8192, 8), 6, 1.3, ("unsorted",)
ONE, MIXED, LOOP, PEFT = "one adapter", "mixed (K=8)", "loop over adapters", "PEFT mixed batch"
MIXED_DORA = "mixed (K=8, 4 DoRA)"


def _sequence_ids(layout: str) -> torch.Tensor:
    """``(SEQUENCES,)`` adapter ids on the CPU: "unsorted" (i mod K) or "skewed" (90/10: all but two on 0)."""
    if layout == "unsorted":
        return torch.arange(SEQUENCES) % NUM_ADAPTERS
    ids = torch.zeros(SEQUENCES, dtype=torch.int64)
    ids[[3, 11]] = torch.tensor([5, 2])
    return ids


def _peft_model(layer):
    """PEFT's LoRA on a copy of the layer's base, with the same eight adapters."""
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(layer.in_features, layer.out_features, device=DEVICE, dtype=DTYPE))
    with torch.no_grad():
        base[0].weight.copy_(layer.weight)
        base[0].bias.copy_(layer.bias)
    model = None
    for name in layer.adapter_names:
        r = layer.ranks()[name]
        config = LoraConfig(r=r, lora_alpha=layer.alphas[name], target_modules=["0"])
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        with torch.no_grad():
            model.base_model.model[0].lora_A[name].weight.copy_(layer.lora_A[name])
            model.base_model.model[0].lora_B[name].weight.copy_(layer.lora_B[name])
    return model.eval()


def _layer(d_in, d_out, r):
    layer = MultiLoRALinear.from_linear(torch.nn.Linear(d_in, d_out, device=DEVICE, dtype=DTYPE))
    for k in range(NUM_ADAPTERS):
        layer.add_adapter(f"task{k}", r=r, alpha=2 * r)
        with torch.no_grad():
            layer.lora_B[f"task{k}"].normal_(std=0.02)
    return layer.train()


def _dora_twin(layer):
    """A MultiLoRALinear on the same frozen weight with the same adapters and factors, every other one DoRA (its
    magnitude PEFT's initialisation, scaled so that g ≠ 1)."""
    with torch.device("meta"):
        base = torch.nn.Linear(layer.in_features, layer.out_features)
    base.weight, base.bias = layer.weight, layer.bias
    twin = MultiLoRALinear.from_linear(base)
    for k, name in enumerate(layer.adapter_names):
        twin.add_adapter(name, r=layer.ranks()[name], alpha=layer.alphas[name], use_dora=k % 2 == 1)
        with torch.no_grad():
            twin.lora_A[name].copy_(layer.lora_A[name])
            twin.lora_B[name].copy_(layer.lora_B[name])
            if twin.uses_dora(name):
                twin.lora_magnitude[name].mul_(1.1)
    return twin.train()


def _runs(layer, x, grad_y, seq_ids):
    """``{name|fwd, name|fwd+bwd: callable}`` of the candidates (PEFT: fwd only)."""
    row_ids = seq_ids.repeat_interleave(x.shape[0] // seq_ids.shape[0])
    rows_of = [(row_ids == k).nonzero().flatten().to(DEVICE) for k in range(NUM_ADAPTERS)]
    names = layer.adapter_names
    peft_model = _peft_model(layer)
    row_names = [names[k] for k in row_ids.tolist()]

    def peft():
        return peft_model(x, adapter_names=row_names)

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

    twin = _dora_twin(layer)

    def mixed_dora():
        with adapter_ids(twin, seq_ids):
            return twin(x)

    def loop():
        layer.set_row_adapters(None)
        y = torch.empty(x.shape[0], layer.out_features, device=x.device, dtype=x.dtype)
        for name, rows in zip(names, rows_of):
            layer.set_adapter(name)
            y.index_copy_(0, rows, layer(x[rows]))  # in place, as a user would write it
        return y

    def backward_of(fn):
        def run():
            fn().backward(grad_y)
            x.grad = None
            for p in (*layer.parameters(), *twin.parameters()):
                p.grad = None

        return run

    runs = {}
    for name, fn in ((FROZEN, frozen), (ONE, one), (MIXED, mixed), (MIXED_DORA, mixed_dora), (LOOP, loop)):
        runs[f"{name}|fwd"] = fn
        runs[f"{name}|fwd+bwd"] = backward_of(fn)
    runs[f"{PEFT}|fwd"] = peft
    return runs


def _host_syncs(step) -> int:
    """1 if ``step`` synchronises the host with the GPU (``set_sync_debug_mode("error")`` raises), else 0."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        print(f"host synchronisation in the mixed step: {exc}")
        return 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [CASE], ids=lambda c: f"{c[0]}x{c[1]}-n{c[2]}-r{c[3]}-K{NUM_ADAPTERS}")
def test_mixed_adapter_batch(benchmark, report, case, layout):
    d_in, d_out, tokens, r = case
    torch.manual_seed(0)
    layer = _layer(d_in, d_out, r)
    x = torch.randn(tokens, d_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad_y = torch.randn(tokens, d_out, device=DEVICE, dtype=DTYPE)
    seq_ids = _sequence_ids(layout)
    runs = _runs(layer, x, grad_y, seq_ids)
    with torch.no_grad():  # the candidates compute the same thing
        mixed, loop, peft = runs[f"{MIXED}|fwd"](), runs[f"{LOOP}|fwd"](), runs[f"{PEFT}|fwd"]()
        tolerance = {"atol": 1e-2 if DTYPE != torch.float32 else 1e-4, "rtol": 1e-2}
        torch.testing.assert_close(mixed, loop, **tolerance)
        torch.testing.assert_close(mixed, peft, **tolerance)
    timer = Timer(DEVICE)
    times = timed_rounds(benchmark, runs, timer, ROUNDS, 0 if DRY_RUN else 1)
    layer.set_row_adapters(None)
    device = "GPU" if GPU_PLAN else "CPU"
    case_name = f"{d_in}→{d_out}, n={tokens}, r={r}, K={NUM_ADAPTERS}, {layout}"
    for mode in ("fwd", "fwd+bwd"):
        timing = summarize(
            {k: v for k, v in times.items() if k.endswith(f"|{mode}")},
            baselines=tuple(f"{n}|{mode}" for n in (FROZEN, ONE, LOOP)),
        )
        for name in (FROZEN, ONE, MIXED, MIXED_DORA, LOOP, PEFT):
            t = timing.get(f"{name}|{mode}")
            if t is None:
                continue
            report.multi_rows.append(
                {"case": case_name, "mode": mode, "layer": name}
                | {"ms": t["seconds"] * 1e3, "vs_frozen": t[f"vs {FROZEN}|{mode}"], "vs_one": t[f"vs {ONE}|{mode}"]}
                | {"vs_loop": t[f"vs {LOOP}|{mode}"]}
            )
        ours = timing[f"{MIXED}|{mode}"]
        where = f"{case_name}, {mode}"
        report.targets.append(Target(f"{device} mixed batch / one adapter ({where})", ours[f"vs {ONE}|{mode}"], LIMIT))
        report.targets.append(
            Target(f"{device} mixed batch / loop over adapters ({where})", ours[f"vs {LOOP}|{mode}"], 1.0)
        )
        dora = summarize({k: times[k] for k in (f"{MIXED}|{mode}", f"{MIXED_DORA}|{mode}")}, (f"{MIXED}|{mode}",))
        report.targets.append(
            Target(f"{device} mixed batch with DoRA / plain mixed batch ({where})",
                   dora[f"{MIXED_DORA}|{mode}"][f"vs {MIXED}|{mode}"], 1.25)
        )  # fmt: skip
        if mode == "fwd":
            vs_peft = summarize({k: times[k] for k in (f"{MIXED}|fwd", f"{PEFT}|fwd")}, (f"{PEFT}|fwd",))
            speedup = 1.0 / vs_peft[f"{MIXED}|fwd"][f"vs {PEFT}|fwd"]
            report.targets.append(
                Target(f"{device} mixed batch speed-up over PEFT's mixed batch ({where})", speedup, 2.0, at_most=False)
            )
    if DEVICE.type == "cuda":
        for name in (MIXED, MIXED_DORA):
            syncs = _host_syncs(runs[f"{name}|fwd+bwd"])
            report.targets.append(Target(f"GPU host synchronisations in a {name} fwd+bwd step ({case_name})", syncs, 0))
    benchmark.extra_info.update({row["layer"] + "|" + row["mode"]: row["ms"] for row in report.multi_rows})
