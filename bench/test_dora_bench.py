"""DoRA layer benchmark: lorafast DoRA against lorafast LoRA, PEFT DoRA and PEFT DoRA after patch_peft, on the
same input and base weight, interleaved as in ``test_layer_bench``: forward and forward+backward time and the
activation bytes each keeps for backward (``lorafast.profiling.saved_activation_bytes``).

CPU: fp32 at 768², n=8192, r=8, dropout 0 (the targets: ≥1.5× faster than PEFT DoRA, ≤1.25× lorafast LoRA, fewer
saved bytes than PEFT DoRA); CUDA: bf16, the Triton kernels (g in the fused GEMM's epilogue).
"""

import os

import pytest
import torch
from harness import (
    FROZEN,
    LORAFAST,
    Timer,
    assert_matches_reference,
    base_reference,
    forward,
    forward_backward,
    lora_reference,
    saved_bytes,
    summarize,
    timed_rounds,
)
from peft import LoraConfig, get_peft_model
from report import Target
from torch import nn

from conftest import DEVICE, DRY_RUN, DTYPE
from lorafast import FusedLoRALinear, patch_peft

PEFT_DORA, PATCHED_DORA, LORAFAST_DORA = "PEFT DoRA", "PEFT DoRA + patch_peft", "lorafast DoRA"
if DRY_RUN:
    CASES, ROUNDS = [(64, 64, 64, 16, 0.0)], 1
elif DEVICE.type == "cuda":
    CASES, ROUNDS = [(4096, 4096, 8192, 16, 0.0), (768, 768, 8192, 8, 0.0)], 30
else:
    CASES, ROUNDS = [(768, 768, 8192, 8, 0.0)], int(os.environ.get("LORAFAST_DORA_ROUNDS", "12"))


def _candidates(d_in, d_out, r, dropout):
    """``{name: module}``: frozen linear, PEFT DoRA, patched PEFT DoRA, lorafast LoRA, lorafast DoRA; one base
    weight, the same non-zero adapter and magnitude in all."""
    base = nn.Linear(d_in, d_out, device=DEVICE, dtype=DTYPE)

    def peft_dora():
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0"], use_dora=True)
        return get_peft_model(nn.Sequential(base), config, autocast_adapter_dtype=False)

    peft = peft_dora().base_model.model[0]
    patched = patch_peft(peft_dora()).base_model.model[0]
    lora = FusedLoRALinear.from_linear(base, r=r, alpha=2 * r, dropout=dropout)
    dora = FusedLoRALinear.from_linear(base, r=r, alpha=2 * r, dropout=dropout, use_dora=True)
    with torch.no_grad():
        nn.init.normal_(lora.lora_B, std=0.02)
        dora.lora_A.copy_(lora.lora_A)
        dora.lora_B.copy_(lora.lora_B)
        dora.lora_magnitude.mul_(1.1)
        for layer in (peft, patched):
            layer.lora_A["default"].weight.copy_(lora.lora_A)
            layer.lora_B["default"].weight.copy_(lora.lora_B)
            layer.lora_magnitude_vector["default"].weight.copy_(dora.lora_magnitude)
    modules = {FROZEN: base, PEFT_DORA: peft, PATCHED_DORA: patched, LORAFAST: lora, LORAFAST_DORA: dora}
    return {name: module.train() for name, module in modules.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-n{c[2]}-r{c[3]}-p{c[4]}")
def test_dora_layer(benchmark, report, case):
    d_in, d_out, tokens, r, dropout = case
    torch.manual_seed(0)
    candidates = _candidates(d_in, d_out, r, dropout)
    x = torch.randn(tokens, d_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad_y = torch.randn(tokens, d_out, device=DEVICE, dtype=DTYPE)
    lora, dora = candidates[LORAFAST], candidates[LORAFAST_DORA]
    dora_ref = lora_reference(dora.weight, dora.bias, dora.lora_A, dora.lora_B, dora.scaling, dora.lora_magnitude)
    references = {FROZEN: base_reference(lora.weight, lora.bias), PEFT_DORA: dora_ref, PATCHED_DORA: dora_ref,
                  LORAFAST: lora_reference(lora.weight, lora.bias, lora.lora_A, lora.lora_B, lora.scaling),
                  LORAFAST_DORA: dora_ref}  # fmt: skip
    assert_matches_reference(candidates, references, x, grad_y)
    runs = {}
    for name, module in candidates.items():
        runs[f"{name}|fwd"] = forward(module, x)
        runs[f"{name}|fwd+bwd"] = forward_backward(module, x, grad_y)
    timer = Timer(DEVICE)
    for run in runs.values():  # first calls (autotuning on CUDA) outside the timing
        run()
    times = timed_rounds(benchmark, runs, timer, ROUNDS, 0 if DRY_RUN else 1)
    baselines = (f"{FROZEN}|fwd", f"{FROZEN}|fwd+bwd", f"{PEFT_DORA}|fwd+bwd", f"{LORAFAST}|fwd+bwd")
    timing = summarize(times, baselines=baselines)
    rows = {}
    for name, module in candidates.items():
        rows[name] = {
            "d_in": d_in, "d_out": d_out, "tokens": tokens, "r": r, "dropout": dropout, "layer": name,
            "fwd_ms": timing[f"{name}|fwd"]["seconds"] * 1e3,
            "fwd_bwd_ms": timing[f"{name}|fwd+bwd"]["seconds"] * 1e3,
            "fwd_vs_frozen": timing[f"{name}|fwd"][f"vs {FROZEN}|fwd"],
            "fwd_bwd_vs_frozen": timing[f"{name}|fwd+bwd"][f"vs {FROZEN}|fwd+bwd"],
            "fwd_bwd_vs_peft": timing[f"{name}|fwd+bwd"][f"vs {PEFT_DORA}|fwd+bwd"],  # here: vs PEFT DoRA
            "saved_bytes": saved_bytes(module, x),
            "peak_bytes": None,
        }  # fmt: skip
        report.layer_rows.append(rows[name])
        benchmark.extra_info[name] = {k: v for k, v in rows[name].items() if k not in ("d_in", "d_out", "tokens")}
    ours = timing[f"{LORAFAST_DORA}|fwd+bwd"]
    where = f"{d_in}→{d_out}, n={tokens}, r={r}, dropout {dropout}"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    tag = DEVICE.type.upper()
    report.targets += [
        Target(f"{tag} PEFT DoRA fwd+bwd / lorafast DoRA ({where}{load})", 1 / ours[f"vs {PEFT_DORA}|fwd+bwd"], 1.5,
               at_most=False),
        Target(f"{tag} lorafast DoRA / lorafast LoRA fwd+bwd ({where})", ours[f"vs {LORAFAST}|fwd+bwd"], 1.25),
        Target(f"{tag} lorafast DoRA saved MiB, PEFT DoRA's as limit ({where})",
               rows[LORAFAST_DORA]["saved_bytes"] / 2**20, round(rows[PEFT_DORA]["saved_bytes"] / 2**20, 2)),
    ]  # fmt: skip
