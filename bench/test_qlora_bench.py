"""QLoRA benchmarks (bitsandbytes NF4, double quant): lorafast against PEFT QLoRA, interleaved; each also with DoRA
(lorafast QLoRA-DoRA against PEFT QLoRA-DoRA).

- one layer's forward+backward: PEFT QLoRA (``lora.bnb.Linear4bit``), the same after ``patch_peft``, lorafast's
  ``FusedLoRALinear`` over the quantized base and, for scale, lorafast over the dense weight; time, activation
  bytes kept for backward and, on CUDA, peak memory. CPU: fp32 compute; CUDA: bf16 compute, 4096→4096 and
  4096→11008, n=8192, r=16.
- a small Llama's training step (``qlora_step.py``): time, and peak memory (CUDA max allocated, or on CPU each
  method's peak resident memory in a process of its own).

Skipped where bitsandbytes is not installed.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from harness import (
    Timer,
    assert_matches_reference,
    assert_same_loss,
    forward_backward,
    isolated_peak_cuda_bytes,
    lora_reference,
    peak_cuda_bytes,
    saved_bytes,
    summarize,
    timed_rounds,
)
from report import Target
from torch import nn

from conftest import DEVICE, DRY_RUN

bnb = pytest.importorskip("bitsandbytes", reason="the QLoRA benchmarks need bitsandbytes (pip install lorafast[qlora])")

import lorafast  # noqa: E402

BENCH = Path(__file__).resolve().parent
PEFT_Q, PATCHED_Q, LORAFAST_Q, DENSE = "PEFT QLoRA", "PEFT QLoRA + patch_peft", "lorafast QLoRA", "lorafast dense LoRA"
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
if DEVICE.type == "cuda":
    CASES = [(4096, 4096, 8192, 16), (4096, 11008, 8192, 16)]
    ROUNDS = 20
elif DRY_RUN:  # bash bench/gpu.sh --dry-run: the GPU plan's steps, smallest shapes, one round
    CASES = [(128, 256, 64, 16)]
    ROUNDS = 1
else:
    CASES = [(1024, 2752, 1024, 16)]  # sized to keep the CPU benchmark suite near 10 minutes
    ROUNDS = 4


def _candidates(d_in, d_out, r, dropout=0.0, use_dora=False) -> dict[str, nn.Module]:
    """The four layers over one NF4-quantized weight (its dense copy for DENSE), with the same adapter (DoRA for
    ``use_dora``: the same magnitudes too)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out, bias=False, dtype=DTYPE, device=DEVICE).requires_grad_(False)

    def quantized():
        layer = bnb.nn.Linear4bit(
            d_in, d_out, bias=False, compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4"
        )
        layer.load_state_dict(dense.state_dict())
        return layer.to(DEVICE)

    def peft_layer():
        holder = nn.Sequential(quantized())
        holder.is_loaded_in_4bit = True  # what PEFT reads to wrap the layer as lora.bnb.Linear4bit
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0"], use_dora=use_dora)
        return get_peft_model(holder, config)

    peft = peft_layer().base_model.model[0]
    patched = lorafast.patch_peft(peft_layer()).base_model.model[0]
    ours = lorafast.FusedLoRALinear.from_linear(quantized(), r=r, alpha=2 * r, dropout=dropout, use_dora=use_dora)
    with torch.no_grad():
        dense.weight.copy_(ours.base_weight())  # the same (dequantized) W0
    reference = lorafast.FusedLoRALinear.from_linear(dense, r=r, alpha=2 * r, dropout=dropout, adapter_dtype=DTYPE,
                                                     use_dora=use_dora)  # fmt: skip
    assert type(peft).__name__ == "Linear4bit" and type(patched).__qualname__ == "PeftFusedLinear4bit"
    with torch.no_grad():
        nn.init.normal_(ours.lora_B, std=0.02)
        reference.lora_A.copy_(ours.lora_A), reference.lora_B.copy_(ours.lora_B)
        for layer in (peft, patched):
            layer.lora_A["default"].weight.copy_(ours.lora_A)
            layer.lora_B["default"].weight.copy_(ours.lora_B)
            if use_dora:
                layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude)
        if use_dora:
            reference.lora_magnitude.copy_(ours.lora_magnitude)
    return {PEFT_Q: peft.train(), PATCHED_Q: patched.train(), LORAFAST_Q: ours.train(), DENSE: reference.train()}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-n{c[2]}-r{c[3]}")
def test_qlora_layer(benchmark, report, case, use_dora):
    """Rows as in the module docstring; with ``use_dora`` every layer is DoRA (PEFT QLoRA-DoRA as the baseline)."""
    d_in, d_out, tokens, r = case
    label = "QLoRA-DoRA" if use_dora else "QLoRA"
    candidates = _candidates(d_in, d_out, r, use_dora=use_dora)
    x = torch.randn(tokens, d_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad_y = torch.randn(tokens, d_out, device=DEVICE, dtype=DTYPE)
    dense = candidates[DENSE]  # W0 dequantized: every layer's float64 reference
    magnitude = dense.lora_magnitude if use_dora else None
    reference = lora_reference(dense.weight, None, dense.lora_A, dense.lora_B, dense.scaling, magnitude)
    assert_matches_reference(candidates, dict.fromkeys(candidates, reference), x, grad_y)
    runs = {name: forward_backward(module, x, grad_y) for name, module in candidates.items()}
    times = timed_rounds(benchmark, runs, Timer(DEVICE), ROUNDS, 0 if DRY_RUN else 2)
    timing = summarize(times, baselines=(PEFT_Q, DENSE))
    where = f"{d_in}→{d_out}, n={tokens}, r={r}, {str(DTYPE).removeprefix('torch.')}"
    rows = {}
    for name, module in candidates.items():
        rows[name] = {
            "fwd_bwd_ms": timing[name]["seconds"] * 1e3, "vs_peft_qlora": timing[name][f"vs {PEFT_Q}"],
            "vs_dense_lora": timing[name][f"vs {DENSE}"], "saved_bytes": saved_bytes(module, x),
            "peak_bytes": peak_cuda_bytes(runs[name], DEVICE),
        }  # fmt: skip
        benchmark.extra_info[name] = rows[name]
    ours, peft = rows[LORAFAST_Q], rows[PEFT_Q]
    report.targets.append(Target(f"{DEVICE.type.upper()} {label} fwd+bwd lorafast / PEFT ({where})",
                                 ours["vs_peft_qlora"], 1.0))  # fmt: skip
    # DoRA also keeps y (n, out), shared with the next op, and three (out,) vectors
    budget = (x.numel() + tokens * r + (tokens * d_out + 3 * d_out if use_dora else 0)) * x.element_size()
    limit = "|x| + n·r + |y|" if use_dora else "|x| + n·r"
    report.targets.append(Target(f"{label} saved MiB, {limit} as limit ({where})", ours["saved_bytes"] / 2**20,
                                 budget / 2**20))  # fmt: skip
    note = (
        f"{label} layer {where}: fwd+bwd ms lorafast {ours['fwd_bwd_ms']:.2f}, PEFT {peft['fwd_bwd_ms']:.2f}, "
        f"patch_peft {rows[PATCHED_Q]['fwd_bwd_ms']:.2f}, dense {rows[DENSE]['fwd_bwd_ms']:.2f}; saved for "
        f"backward lorafast {ours['saved_bytes'] / 2**20:.2f} MiB, PEFT {peft['saved_bytes'] / 2**20:.2f} MiB"
    )
    if DEVICE.type == "cuda":
        note += "; peak MiB " + ", ".join(f"{n} {rows[n]['peak_bytes'] / 2**20:.0f}" for n in rows)
        report.targets.append(Target(f"GPU {label} peak memory lorafast / PEFT ({where})",
                                     ours["peak_bytes"] / peft["peak_bytes"], 1.0))  # fmt: skip
    print("\n" + note)
    report.notes.append(note)


def _peak_bytes(method: str, directory: Path, batch) -> int:
    """``method``'s training-step peak: on CUDA above the allocation before its model was built, with no other model
    resident; on CPU its process's peak resident memory, in a process of its own."""
    from qlora_step import build, train_step

    if DEVICE.type == "cuda":

        def build_step():
            model, optimizer = build(method, directory, DEVICE)
            return lambda: train_step(model, optimizer, batch)

        return isolated_peak_cuda_bytes(build_step, DEVICE)
    command = [sys.executable, str(BENCH / "qlora_step.py"), "--method", method, "--dir", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def test_qlora_training_step(benchmark, report):
    from qlora_step import METHODS

    _training_step(benchmark, report, METHODS, "QLoRA")


def test_qlora_dora_training_step(benchmark, report):
    from qlora_step import DORA_METHODS

    _training_step(benchmark, report, DORA_METHODS, "QLoRA-DoRA")


def _training_step(benchmark, report, methods, label):
    """``methods``' steps interleaved (the first is the baseline, then patch_peft, then lorafast): time and peak."""
    from qlora_step import SHAPES, build, make_batch, plan, save_base, train_step

    peft_m, patched_m, lorafast_m = methods
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_base(Path(tmp), DEVICE)
        batch = make_batch(DEVICE)
        built = {method: (*build(method, directory, DEVICE), batch) for method in methods}
        # PEFT's QLoRA-DoRA starts 1.3e-4 (relative) off the base model's loss on CPU, lorafast's on it
        assert_same_loss({m: built[m][0] for m in methods}, batch, 1e-3 if DTYPE == torch.float32 else 1e-2)
        runs = {m: (lambda m=m: train_step(*built[m])) for m in methods}
        rounds = 10 if DEVICE.type == "cuda" else 1 if DRY_RUN else 6
        times = timed_rounds(benchmark, runs, Timer(DEVICE), rounds, 0 if DRY_RUN else 1)
        timing = summarize(times, baselines=(peft_m,))
        built.clear(), runs.clear()  # one model resident at a time while peaks are measured
        peaks = {m: _peak_bytes(m, directory, batch) for m in methods}
    shape = SHAPES[plan(DEVICE)]
    where = (
        f"Llama hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, batch {shape['batch']}×"
        f"{shape['tokens']}, NF4 double quant, all linear r=16"
    )
    for method in methods:
        benchmark.extra_info[method] = {"step_s": timing[method]["seconds"], "peak_bytes": peaks[method]}
    kind = DEVICE.type.upper()
    report.targets.append(Target(f"{kind} {label} step time lorafast / PEFT ({where})",
                                 timing[lorafast_m][f"vs {peft_m}"], 1.0))  # fmt: skip
    report.targets.append(Target(f"{kind} {label} step time patch_peft / PEFT ({where})",
                                 timing[patched_m][f"vs {peft_m}"], 1.0))  # fmt: skip
    report.targets.append(Target(f"{kind} {label} peak memory lorafast / PEFT ({where})",
                                 peaks[lorafast_m] / peaks[peft_m], 1.0))  # fmt: skip
    peak_kind = "CUDA max allocated" if DEVICE.type == "cuda" else "process peak resident memory"
    note = (
        f"{label} step ({where}): s/step "
        + ", ".join(f"{m} {timing[m]['seconds']:.3f}" for m in methods)
        + f"; peak ({peak_kind}) MiB "
        + ", ".join(f"{m} {peaks[m] / 2**20:.0f}" for m in methods)
        + f"; lorafast / PEFT: time {timing[lorafast_m][f'vs {peft_m}']:.2f}×, peak "
        + f"{peaks[lorafast_m] / peaks[peft_m]:.2f}×"
    )
    print("\n" + note)
    report.notes.append(note)
