"""Layer benchmarks: frozen nn.Linear, PEFT LoRA, PEFT after patch_peft and FusedLoRALinear on the same
input, interleaved.

Each case times forward and forward+backward of the four candidates in rotating rounds (the
pytest-benchmark figure is one such round), and records the activation bytes each keeps for
backward, the kernels one forward+backward launches, its first call (autotuning included) and,
on CUDA, its peak memory. CPU: fp32, the PyTorch path; CUDA: bf16, the Triton kernels, where lorafast also runs
with each GEMM path forced (``LORAFAST_GEMM=triton|cublas``) beside auto's choice, and the report says which path
auto chose for the forward and dX GEMMs and what each took when it chose.
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
    assert_matches_reference,
    candidate_references,
    forced_gemm,
    forward,
    forward_backward,
    kernel_launches,
    make_candidates,
    peak_cuda_bytes,
    saved_bytes,
    summarize,
    timed_rounds,
)
from report import Target

from conftest import DEVICE, DRY_RUN, DTYPE, GPU_PLAN
from lorafast.kernels import gemm_choice

BART = [(768, 768), (768, 3072), (3072, 768)]
LLM = [(4096, 4096), (4096, 11008)]
RANKS, DROPOUTS = (8, 16, 64), (0.0, 0.1)

if DRY_RUN:  # the GPU plan's cases at the smallest shapes (one of them not a tile multiple), one round
    TARGET_CASE = (64, 64, 64, 16)
    CASES = [(64, 64, 64, 16, p) for p in DROPOUTS] + [(96, 160, 80, 64, 0.0)]
    ROUNDS = 1
elif DEVICE.type == "cuda":
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
    assert_matches_reference(candidates, candidate_references(candidates), x, grad_y)
    runs = {}
    for name, module in candidates.items():
        runs[f"{name}|fwd"] = forward(module, x)
        runs[f"{name}|fwd+bwd"] = forward_backward(module, x, grad_y)
    if GPU_PLAN:  # lorafast on each GEMM path, forced
        for path in gemm_choice.PATHS:
            runs[f"{LORAFAST} {path}|fwd+bwd"] = forced_gemm(path, forward_backward(candidates[LORAFAST], x, grad_y))
    timer = Timer(DEVICE)
    # The first call of a new shape: on CUDA it autotunes and compiles the kernels (a tuned
    # choice cached on disk by an earlier process is reused).
    first_call = {name: timer(runs[f"{name}|fwd+bwd"]) for name in candidates}
    rounds = 3 * ROUNDS if case in TARGET_CASES and not DRY_RUN else ROUNDS
    times = timed_rounds(benchmark, runs, timer, rounds, 0 if DRY_RUN else 2)
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
    if GPU_PLAN:
        report.gemm_rows.append(_gemm_row(case, timing, candidates[LORAFAST], x, grad_y))
        benchmark.extra_info["gemm"] = report.gemm_rows[-1]
    if case in TARGET_CASES:
        rows = {row["layer"]: row for row in report.layer_rows[-len(candidates) :]}
        _record_targets(report, case, rows, x)


def _gemm_row(case, timing, layer, x, grad_y) -> dict:
    """Which GEMM path auto chose for the case's forward and dX (and the timings it chose by), and lorafast's
    fwd+bwd on auto's choice and on each path forced."""
    d_in, d_out, tokens, r, dropout = case
    up = x.new_empty(tokens, r)
    keys = {
        "fwd": gemm_choice.gemm_key("forward", x, layer.weight.t(), up, layer.bias, 0.0),
        "dx": gemm_choice.gemm_key("dx", grad_y, layer.weight, up, None, dropout),
    }
    row = {"d_in": d_in, "d_out": d_out, "tokens": tokens, "r": r, "dropout": dropout}
    row |= {f"{op}_choice": gemm_choice.recorded_choice(key) for op, key in keys.items()}
    for path, name in (("auto", LORAFAST), ("triton", f"{LORAFAST} triton"), ("cublas", f"{LORAFAST} cublas")):
        t = timing[f"{name}|fwd+bwd"]
        row[f"ms_{path}"] = t["seconds"] * 1e3
        row[f"vs_frozen_{path}"] = t[f"vs {FROZEN}|fwd+bwd"]
        row[f"peft_speedup_{path}"] = 1 / t[f"vs {PEFT}|fwd+bwd"]
    return row


def _record_targets(report, case, rows, x):
    d_in, d_out, tokens, r, dropout = case
    where = f"{d_in}→{d_out}, n={tokens}, r={r}, dropout {dropout}"
    x_bytes = x.numel() * x.element_size()
    ours = rows[LORAFAST]
    add = report.targets.append
    # patch_peft runs the same fused function inside PEFT's layer: the same speed within noise
    patched_vs_ours = rows[PATCHED]["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
    add(Target(f"{DEVICE.type.upper()} fwd+bwd patch_peft / lorafast ({where})", patched_vs_ours, 1.10))
    if GPU_PLAN:  # on whichever GEMM path auto chose
        add(Target(f"GPU fwd / frozen ({where})", ours["fwd_vs_frozen"], 1.05))
        add(Target(f"GPU fwd+bwd / frozen ({where})", ours["fwd_bwd_vs_frozen"], 1.12 if dropout else 1.10))
        add(Target(f"GPU PEFT fwd+bwd / lorafast ({where})", 1 / ours["fwd_bwd_vs_peft"], 1.35, at_most=False))
        frozen_peak = rows[FROZEN]["peak_bytes"]
        if frozen_peak is not None:  # None in the dry run on CPU
            limit = (frozen_peak + x_bytes + tokens * r * x.element_size()) / 2**20
            add(Target(f"GPU peak MiB ({where})", ours["peak_bytes"] / 2**20, round(limit, 1)))
        peft_launches = rows[PEFT]["launches"]
        add(Target(f"GPU kernel launches fwd+bwd, PEFT's as limit ({where})", ours["launches"], peft_launches))
    else:
        # Without dropout within 10% of the frozen layer; with dropout 0.1 the mask is regenerated, not stored, and
        # drawing it on 2 cores costs more than the frozen layer's margin: the bar there is PEFT's time.
        if dropout:
            add(Target(f"CPU PEFT fwd+bwd / lorafast ({where})", 1 / ours["fwd_bwd_vs_peft"], 1.5, at_most=False))
        else:
            add(Target(f"CPU fwd+bwd / frozen ({where})", ours["fwd_bwd_vs_frozen"], 1.10))
        budget = round((x_bytes + tokens * r * 4) / 2**20, 2)
        add(Target(f"CPU saved MiB ({where})", ours["saved_bytes"] / 2**20, budget))
