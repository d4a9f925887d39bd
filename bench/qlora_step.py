"""QLoRA training steps of a small random Llama loaded in 4-bit NF4 (double quant) through transformers'
``BitsAndBytesConfig``: PEFT QLoRA, PEFT + ``patch_peft`` and lorafast's ``apply_lora``, all linear layers, r=16;
each also with DoRA (``<method>-dora``: ``use_dora=True``).

Used by ``test_qlora_bench.py`` (timing, interleaved in one process) and, as a script, to measure one method's
peak memory in a process of its own (on CPU a process's peak resident memory is the only clean peak):

    python bench/qlora_step.py --method lorafast --dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_step import peak_resident_bytes

METHODS = ("peft", "patched", "lorafast")
DORA_METHODS = tuple(f"{m}-dora" for m in METHODS)
R, ALPHA = 16, 32
# CPU: a Llama small enough for 2 cores; CUDA: a 0.4B-parameter shape, where dequantization and memory matter.
SHAPES = {
    "cpu": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 2, "batch": 4, "tokens": 128},
    "cuda": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 8, "batch": 8, "tokens": 1024},
    "dry run": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "batch": 2, "tokens": 16},
}
VOCAB = 4096


def plan(device: torch.device) -> str:
    """The key of ``SHAPES`` for ``device``: ``"dry run"`` under ``LORAFAST_BENCH_DRY_RUN=1`` (``gpu.sh --dry-run``)."""
    return "dry run" if os.environ.get("LORAFAST_BENCH_DRY_RUN") == "1" else device.type


def save_base(directory: Path, device: torch.device) -> Path:
    """A seeded random Llama of ``device``'s shape, saved for quantized loading."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES[plan(device)]
    if not (directory / "config.json").is_file():
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
            num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=8, num_key_value_heads=4,
            max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def build(method: str, directory: Path, device: torch.device):
    """The 4-bit model with ``method``'s LoRA (DoRA for ``<method>-dora``) on every linear layer, and its AdamW."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import lorafast

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quant, device_map=device.type if device.type == "cpu" else 0, dtype=compute
    )
    torch.manual_seed(1)
    use_dora = method.endswith("-dora")
    method = method.removesuffix("-dora")
    if method == "lorafast":
        model = lorafast.apply_lora(model, "all-linear", r=R, alpha=ALPHA, use_dora=use_dora)
    else:
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", use_dora=use_dora)
        model = get_peft_model(model, config)
        if method == "patched":
            lorafast.patch_peft(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def make_batch(device: torch.device) -> dict[str, torch.Tensor]:
    shape = SHAPES[plan(device)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (shape["batch"], shape["tokens"]), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def train_step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS + DORA_METHODS, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, optimizer = build(args.method, save_base(args.dir, device), device)
    batch = make_batch(device)
    for _ in range(args.steps):
        train_step(model, optimizer, batch)
    print(json.dumps({"peak_rss_bytes": peak_resident_bytes()}))


if __name__ == "__main__":
    main()
