"""Layer benchmarks: frozen nn.Linear, PEFT LoRA, PEFT after patch_peft and FusedLoRALinear on the same
input, interleaved.

Each case times forward and forward+backward of the four candidates in rotating rounds (the
pytest-benchmark figure is one such round), and records the activation bytes each keeps for
backward, the kernels one forward+backward launches, its first call (autotuning included) and,
on CUDA, its peak memory. CPU: fp32, the PyTorch path; CUDA: bf16, the Triton kernels.
"""

import itertools
import os

import pytest
import torch
from harness import (
    FROZEN,
    LORAFAST,
    PATCHED,
    PEFT,
    Timer,
    forward,
    forward_backward,
    interleaved,
    kernel_launches,
    make_candidates,
    peak_cuda_bytes,
    saved_bytes,
    summarize,
)
from report import Target

from conftest import DEVICE, DTYPE

BART = [(768, 768), (768, 3072), (3072, 768)]
LLM = [(4096, 4096), (4096, 11008)]
RANKS, DROPOUTS = (8, 16, 64), (0.0, 0.1)

if DEVICE.type == "cuda":
    TARGET_CASE = (4096, 4096, 8192, 16)
    # Every new shape and rank autotunes every kernel; the full grid (LORAFAST_BENCH_FULL=1) compiles
    # for longer than one GPU lease allows.
    if os.environ.get("LORAFAST_BENCH_FULL") == "1":
        CASES = [(*s, 8192, r, p) for s, r, p in itertools.product(BART + LLM, RANKS, DROPOUTS)]
    else:
        CASES = [(768, 768, 8192, 8, p) for p in DROPOUTS] + [(4096, 11008, 8192, 16, 0.0), (4096, 4096, 8192, 64, 0.0)]
    ROUNDS = 30
else:  # sized so that the CPU suite, model benchmarks included, ends in about 10 minutes on 2 cores
    TARGET_CASE = (768, 768, 8192, 8)
    CASES = [(*s, 2048, r, p) for s, r, p in itertools.product(BART, RANKS, DROPOUTS)]
    CASES += [(*s, 256, 16, p) for s, p in itertools.product(LLM, DROPOUTS)]
    ROUNDS = 4
TARGET_CASES = [(*TARGET_CASE[:3], TARGET_CASE[3], p) for p in DROPOUTS]
CASES = TARGET_CASES + [c for c in CASES if c not in TARGET_CASES]


def _case_id(case):
    d_in, d_out, tokens, r, p = case
    return f"{d_in}x{d_out}-n{tokens}-r{r}-p{p}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_layer(benchmark, report, case):
    d_in, d_out, tokens, r, dropout = case
    torch.manual_seed(0)
    candidates = make_candidates(d_in, d_out, r, 2 * r, dropout, DTYPE, DEVICE)
    x = torch.randn(tokens, d_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad_y = torch.randn(tokens, d_out, device=DEVICE, dtype=DTYPE)
    runs = {}
    for name, module in candidates.items():
        runs[f"{name}|fwd"] = forward(module, x)
        runs[f"{name}|fwd+bwd"] = forward_backward(module, x, grad_y)
    timer = Timer(DEVICE)
    # The first call of a new shape: on CUDA it autotunes and compiles the kernels (a tuned
    # choice cached on disk by an earlier process is reused).
    first_call = {name: timer(runs[f"{name}|fwd+bwd"]) for name in candidates}
    rounds = 3 * ROUNDS if case in TARGET_CASES else ROUNDS
    times = {name: [] for name in runs}

    def one_round():
        for name, ts in interleaved(runs, 1, timer, warmup=0).items():
            times[name] += ts

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=2, iterations=1)
    timing = summarize(times, baselines=(f"{FROZEN}|fwd", f"{FROZEN}|fwd+bwd", f"{PEFT}|fwd+bwd"))
    for name, module in candidates.items():
        row = {
            "d_in": d_in, "d_out": d_out, "tokens": tokens, "r": r, "dropout": dropout, "layer": name,
            "fwd_ms": timing[f"{name}|fwd"]["seconds"] * 1e3,
            "fwd_bwd_ms": timing[f"{name}|fwd+bwd"]["seconds"] * 1e3,
            "fwd_vs_frozen": timing[f"{name}|fwd"][f"vs {FROZEN}|fwd"],
            "fwd_bwd_vs_frozen": timing[f"{name}|fwd+bwd"][f"vs {FROZEN}|fwd+bwd"],
            "fwd_bwd_vs_peft": timing[f"{name}|fwd+bwd"][f"vs {PEFT}|fwd+bwd"],
            "saved_bytes": saved_bytes(module, x),
            "peak_bytes": peak_cuda_bytes(forward_backward(module, x, grad_y), DEVICE),
            "launches": kernel_launches(forward_backward(module, x, grad_y), DEVICE),
            "first_call_s": first_call[name],
        }  # fmt: skip
        report.layer_rows.append(row)
        benchmark.extra_info[name] = {k: v for k, v in row.items() if k not in ("d_in", "d_out", "tokens", "r")}
    ours = report.layer_rows[-1]
    assert ours["layer"] == LORAFAST
    if case in TARGET_CASES:
        rows = {row["layer"]: row for row in report.layer_rows[-len(candidates) :]}
        _record_targets(report, case, rows, x)


def _record_targets(report, case, rows, x):
    d_in, d_out, tokens, r, dropout = case
    where = f"{d_in}→{d_out}, n={tokens}, r={r}, dropout {dropout}"
    x_bytes = x.numel() * x.element_size()
    ours = rows[LORAFAST]
    add = report.targets.append
    # patch_peft runs the same fused function inside PEFT's layer: the same speed within noise
    patched_vs_ours = rows[PATCHED]["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
    add(Target(f"{DEVICE.type.upper()} fwd+bwd patch_peft / lorafast ({where})", patched_vs_ours, 1.10))
    if DEVICE.type == "cuda":
        add(Target(f"GPU fwd / frozen ({where})", ours["fwd_vs_frozen"], 1.05))
        add(Target(f"GPU fwd+bwd / frozen ({where})", ours["fwd_bwd_vs_frozen"], 1.12 if dropout else 1.10))
        add(Target(f"GPU PEFT fwd+bwd / lorafast ({where})", 1 / ours["fwd_bwd_vs_peft"], 1.35, at_most=False))
        frozen_peak = rows[FROZEN]["peak_bytes"]
        limit = (frozen_peak + x_bytes + tokens * r * x.element_size()) / 2**20
        add(Target(f"GPU peak MiB ({where})", ours["peak_bytes"] / 2**20, round(limit, 1)))
        peft_launches = rows[PEFT]["launches"]
        add(Target(f"GPU kernel launches fwd+bwd, PEFT's as limit ({where})", ours["launches"], peft_launches))
    else:
        add(Target(f"CPU fwd+bwd / frozen ({where})", ours["fwd_bwd_vs_frozen"], 1.30 if dropout else 1.10))
        budget = round((x_bytes + tokens * r * 4) / 2**20, 2)
        add(Target(f"CPU saved MiB ({where})", ours["saved_bytes"] / 2**20, budget))
