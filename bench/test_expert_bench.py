"""Expert LoRA benchmark: transformers' experts stack (Qwen3-MoE's) with LoRA on gate_up_proj and down_proj, four
ways on the same weights, routing and adapter, interleaved as in ``test_layer_bench``:

- frozen experts (transformers' own ``grouped_mm`` forward; backward computes dX only),
- PEFT ``target_parameters`` (``lora.ParamWrapper``: W + s·B·A for every expert, each forward),
- the same PEFT model after ``patch_peft``,
- lorafast (``apply_lora(target_parameters=...)``).

Rows: the experts layer fwd+bwd (CPU: 32 experts, hidden 512, intermediate 256, top-2 of 2,048 tokens, r = 16; GPU,
bf16: PEFT PR #3577's 128 experts, hidden 2048, intermediate 768, top-8 of 4,096 tokens, r = 16; the targets:
lorafast ≥ 2× faster than PEFT, fewer saved bytes, no tensor as large as an expert stack), and one training step
(forward + backward from the input embeddings) of a small Qwen3-MoE. Time, activation bytes saved for backward
and, for lorafast, the largest tensor any op writes relative to the E×out×in stack.
"""

import copy
import os

import torch
from harness import FROZEN, LORAFAST, Timer, summarize, timed_rounds
from peft import LoraConfig, get_peft_model
from report import Target
from torch import nn

from conftest import DEVICE, DRY_RUN, DTYPE
from lorafast import apply_lora, patch_peft
from lorafast.expert_memory import largest_write
from lorafast.profiling import saved_activation_bytes

PEFT_EXPERTS, PATCHED_EXPERTS = "PEFT target_parameters", "PEFT target_parameters + patch_peft"
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
# (experts, hidden, intermediate, top_k, tokens, r), (hidden, experts, intermediate, tokens)
if DRY_RUN:
    LAYER, MODEL, ROUNDS = (4, 32, 16, 2, 64, 4), (32, 4, 16, 32), 1
elif DEVICE.type == "cuda":  # PEFT PR #3577's shape (top-8, as Qwen3-30B-A3B routes)
    LAYER, MODEL, ROUNDS = (128, 2048, 768, 8, 4096, 16), (1024, 64, 256, 4096), 30
else:
    LAYER, MODEL = (32, 512, 256, 2, 2048, 16), (128, 8, 64, 512)
    ROUNDS = int(os.environ.get("LORAFAST_EXPERT_ROUNDS", "8"))


def _qwen3_moe_config(hidden, experts, intermediate, top_k, layers=2):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * intermediate, moe_intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=1024,
    )  # fmt: skip


def _randomize_factors(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _four_ways(make, r):
    """``{name: model}``: frozen, PEFT, patched PEFT and lorafast, on one set of weights and one adapter (PEFT's
    random factors, written into lorafast's through PEFT's files layout: same parameter order and values)."""
    base = make()
    peft_config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], target_parameters=TARGETS)
    peft = get_peft_model(copy.deepcopy(base), peft_config, autocast_adapter_dtype=False)
    _randomize_factors(peft)
    patched = patch_peft(copy.deepcopy(peft))
    ours = apply_lora(copy.deepcopy(base), target_parameters=TARGETS, r=r, alpha=2 * r)
    _randomize_factors(ours)
    for p in base.parameters():
        p.requires_grad_(False)
    return {FROZEN: base, PEFT_EXPERTS: peft, PATCHED_EXPERTS: patched, LORAFAST: ours}


def _timed(runs, benchmark):
    timer = Timer(DEVICE)
    for run in runs.values():
        run()
    times = timed_rounds(benchmark, runs, timer, ROUNDS, 0 if DRY_RUN else 1)
    return summarize(times, baselines=(FROZEN, PEFT_EXPERTS))


def test_expert_layer(benchmark, report):
    experts, hidden, intermediate, top_k, tokens, r = LAYER
    config = _qwen3_moe_config(hidden, experts, intermediate, top_k)
    config._experts_implementation = "grouped_mm"  # what a model's experts run (a standalone module: eager's loop)

    def make():
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        torch.manual_seed(0)
        block = nn.Module()
        block.experts = Qwen3MoeExperts(config).to(DEVICE, DTYPE)
        with torch.no_grad():
            for p in block.experts.parameters():
                p.normal_(0, 0.02)
        return block

    candidates = {name: m.experts if name in (FROZEN, LORAFAST) else m.base_model.model.experts
                  for name, m in _four_ways(make, r).items()}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, DTYPE).requires_grad_()
    index = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k].to(DEVICE)
    weights = torch.rand(tokens, top_k, generator=g).softmax(dim=1).to(DEVICE, DTYPE)
    grad_y = torch.randn(tokens, hidden, generator=g).to(DEVICE, DTYPE)

    def fwd_bwd(module):
        def run():
            module(x, index, weights).backward(grad_y)
            x.grad = None
            for p in module.parameters():
                p.grad = None

        return run

    timing = _timed({name: fwd_bwd(m) for name, m in candidates.items()}, benchmark)
    saved = {
        name: saved_activation_bytes(lambda m=m: m(x, index, weights), exclude=list(m.parameters()))
        for name, m in candidates.items()
    }
    largest = largest_write(fwd_bwd(candidates[LORAFAST]))
    stack = experts * hidden * 2 * intermediate  # gate_up_proj, the larger stack
    where = f"{experts} experts, hidden {hidden}, intermediate {intermediate}, top-{top_k} of {tokens}, r={r}"
    for name in candidates:
        print(
            f"{name:40s} fwd+bwd {timing[name]['seconds'] * 1e3:8.2f} ms  vs frozen {timing[name][f'vs {FROZEN}']:5.2f}"
            f"  vs PEFT {timing[name][f'vs {PEFT_EXPERTS}']:5.2f}  saved {saved[name] / 2**20:7.2f} MiB"
        )
        benchmark.extra_info[name] = {"fwd_bwd_ms": timing[name]["seconds"] * 1e3, "saved_bytes": saved[name]}
    print(f"lorafast's largest tensor: {largest / stack:.3f} of an expert stack ({where})")
    tag = DEVICE.type.upper()
    report.targets += [
        Target(f"{tag} PEFT target_parameters fwd+bwd / lorafast ({where})",
               1 / timing[LORAFAST][f"vs {PEFT_EXPERTS}"], 2.0, at_most=False),
        Target(f"{tag} lorafast experts saved MiB, PEFT's as limit ({where})",
               saved[LORAFAST] / 2**20, round(saved[PEFT_EXPERTS] / 2**20, 2)),
        Target(f"{tag} lorafast's largest tensor / E×out×in ({where})", largest / stack, 0.999),
    ]  # fmt: skip


def test_tiny_moe_training_step(benchmark, report):
    hidden, experts, intermediate, tokens = MODEL
    config = _qwen3_moe_config(hidden, experts, intermediate, top_k=2)

    def make():
        from transformers import Qwen3MoeForCausalLM

        torch.manual_seed(0)
        return Qwen3MoeForCausalLM(config).to(DEVICE, DTYPE)

    candidates = _four_ways(make, r=8)
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, tokens, hidden, generator=g).to(DEVICE, DTYPE).requires_grad_()
    labels = torch.randint(0, 256, (1, tokens), generator=g).to(DEVICE)

    def step(model):
        def run():
            model(inputs_embeds=embeds, labels=labels).loss.backward()
            embeds.grad = None
            model.zero_grad(set_to_none=True)

        return model.train() and run

    timing = _timed({name: step(m) for name, m in candidates.items()}, benchmark)
    where = f"Qwen3-MoE 2 layers, hidden {hidden}, {experts} experts of {intermediate}, {tokens} tokens, r=8"
    for name in candidates:
        print(
            f"{name:40s} step {timing[name]['seconds'] * 1e3:8.2f} ms  vs frozen {timing[name][f'vs {FROZEN}']:5.2f}"
            f"  vs PEFT {timing[name][f'vs {PEFT_EXPERTS}']:5.2f}"
        )
        benchmark.extra_info[name] = {"step_ms": timing[name]["seconds"] * 1e3}
    report.targets.append(
        Target(f"{DEVICE.type.upper()} PEFT target_parameters step / lorafast ({where})",
               1 / timing[LORAFAST][f"vs {PEFT_EXPERTS}"], 1.0, at_most=False)
    )  # fmt: skip
