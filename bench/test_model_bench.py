"""Model benchmarks: a BART-base-shaped model (random weights) trained on real SumPubMed batches.

- training tokens/s of full fine-tuning, PEFT LoRA and lorafast LoRA (q,v and all linear layers,
  dropout 0 and 0.1), the configurations' steps interleaved in one process;
- their peak memory: CUDA's peak allocation, or on CPU each configuration's peak resident memory in
  a process of its own;
- the adapter's size against the full checkpoint's, and the merged model's inference latency
  against the plain base model's (merging must cost nothing).
"""

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from harness import Timer, assert_same_loss, isolated_peak_cuda_bytes, summarize, timed_rounds
from model_step import CONFIGS, batch_tokens, build, make_batch, make_tokenizer, peak_resident_bytes, train_step
from report import Target

import lorafast
from conftest import DEVICE, DRY_RUN, GPU_PLAN

BENCH = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tokenizer_dir():
    with tempfile.TemporaryDirectory() as tmp:
        yield make_tokenizer(Path(tmp))


def _name(config):
    method, targets, dropout = config
    return "full" if method == "full" else f"{method} {targets} p={dropout}"


def _peak_bytes(config, tokenizer_dir, batch) -> int:
    """``config``'s training-step peak: on CUDA above the allocation before its model was built, with no other model
    resident; on CPU its process's peak resident memory, in a process of its own."""
    if DEVICE.type == "cuda":

        def build_step():
            model, optimizer = build(config, tokenizer_dir, DEVICE)
            return lambda: train_step(model, optimizer, batch)

        return isolated_peak_cuda_bytes(build_step, DEVICE)
    if DRY_RUN:  # no CUDA peak on CPU, and no time for a process per configuration: a stand-in figure
        return peak_resident_bytes()
    method, targets, dropout = config
    command = [sys.executable, str(BENCH / "model_step.py"), "--method", method, "--targets", targets,
               "--dropout", str(dropout), "--tokenizer", str(tokenizer_dir)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def test_training_step(benchmark, report, tokenizer_dir):
    batch = make_batch(tokenizer_dir, DEVICE)
    tokens = batch_tokens(batch)
    models = {config: (*build(config, tokenizer_dir, DEVICE), batch) for config in CONFIGS}
    assert_same_loss({c: m for c, (m, _, _) in models.items()}, batch, 1e-4 if DEVICE.type == "cpu" else 1e-2)
    runs = {config: (lambda m=m, o=o: train_step(m, o, batch)) for config, (m, o, _) in models.items()}
    rounds = 1 if DRY_RUN else 10 if GPU_PLAN else 2
    times = timed_rounds(benchmark, runs, Timer(DEVICE), rounds, 0 if DRY_RUN else 1)
    timing = summarize(times, baselines=(CONFIGS[0],))
    trainable = {c: sum(p.numel() for p in m.parameters() if p.requires_grad) for c, (m, _, _) in models.items()}
    models.clear(), runs.clear()  # one model resident at a time while peaks are measured
    peaks = {config: _peak_bytes(config, tokenizer_dir, batch) for config in CONFIGS}
    for config in CONFIGS:
        method, targets, dropout = config
        peft = ("peft", targets, dropout)
        row = {
            "method": method, "targets": "all" if method == "full" else targets, "dropout": dropout,
            "trainable": trainable[config],
            "step_s": timing[config]["seconds"], "tokens_per_s": tokens / timing[config]["seconds"],
            "vs_full": timing[CONFIGS[0]]["seconds"] / timing[config]["seconds"],
            "vs_peft": timing[peft]["seconds"] / timing[config]["seconds"] if method == "lorafast" else None,
            "peak_bytes": peaks[config],
        }  # fmt: skip
        report.model_rows.append(row)
        benchmark.extra_info[_name(config)] = row
        if method == "lorafast":
            report.targets.append(Target(f"peak memory lorafast / PEFT ({targets}, p={dropout})",
                                         peaks[config] / peaks[peft], 1.0))  # fmt: skip
    speedup = lambda a, b: timing[b]["seconds"] / timing[a]["seconds"]  # noqa: E731
    report.targets.append(
        Target("tokens/s lorafast / PEFT (all linear, p=0.1)", speedup(("lorafast", "all", 0.1), ("peft", "all", 0.1)),
               1.2, at_most=False)
    )  # fmt: skip
    for dropout in (0.0, 0.1):
        report.targets.append(
            Target(f"tokens/s lorafast (q,v, p={dropout}) / full fine-tuning",
                   speedup(("lorafast", "q,v", dropout), CONFIGS[0]), 1.5, at_most=False)
        )  # fmt: skip
    report.notes.append(
        f"training step: batch {batch['input_ids'].shape[0]} × {batch['input_ids'].shape[1]} source + "
        f"{batch['labels'].shape[1]} target tokens ({tokens} tokens), AdamW, r=8, alpha=16; "
        + ("peak = CUDA max allocated" if DEVICE.type == "cuda" else "peak = the process's peak resident memory")
    )


def test_adapter_size_and_merged_latency(benchmark, report, tokenizer_dir):
    batch = make_batch(tokenizer_dir, DEVICE)
    model, _ = build(("lorafast", "q,v", 0.0), tokenizer_dir, DEVICE)
    with torch.no_grad():
        for _, layer in lorafast.lora_layers(model):
            layer.lora_B.normal_(std=0.01)
    plain, _ = build(("full", "all", 0.0), tokenizer_dir, DEVICE)  # the same seeded base, no adapters
    with tempfile.TemporaryDirectory() as tmp:
        lorafast.save_adapter(model, Path(tmp) / "adapter")
        merged = lorafast.merge_lora(copy.deepcopy(model))
        merged.save_pretrained(Path(tmp) / "full")
        adapter_bytes = sum(f.stat().st_size for f in (Path(tmp) / "adapter").iterdir())
        full_bytes = sum(f.stat().st_size for f in (Path(tmp) / "full").iterdir())
    report.notes.append(
        f"adapter (PEFT format, r=8 on q,v): {adapter_bytes:,} B; full checkpoint: {full_bytes:,} B "
        f"(1/{full_bytes / adapter_bytes:,.0f})"
    )
    merged.eval(), plain.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        runs = {"merged": lambda: merged(**inputs), "base": lambda: plain(**inputs)}
        rounds = 1 if DRY_RUN else 20 if GPU_PLAN else 5
        times = timed_rounds(benchmark, runs, Timer(DEVICE), rounds, 0 if DRY_RUN else 1)
    ratio = summarize(times, baselines=("base",))["merged"]["vs base"]
    report.targets.append(Target("inference latency merged / base model", ratio, 1.05))
    assert adapter_bytes < full_bytes / (10 if DRY_RUN else 100)  # the dry run's tiny model: 1/77
