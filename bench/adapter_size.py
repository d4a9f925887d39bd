"""Adapter size against the full checkpoint for a BART-base-shaped model (the LoRA paper's storage claim).

    python bench/adapter_size.py [--r 8] [--targets q_proj v_proj]

Builds BART-base shapes from ``BartConfig`` (random weights; nothing is downloaded), applies lorafast
LoRA, writes the adapter with ``save_adapter`` and the full model with ``save_pretrained`` to a
temporary folder and prints parameter counts and file sizes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration

from lorafast import apply_lora, parameter_counts, save_adapter

BART_BASE = dict(
    vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
)  # fmt: skip


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(**BART_BASE))
    with tempfile.TemporaryDirectory() as tmp:
        full, adapter = Path(tmp) / "full", Path(tmp) / "adapter"
        model.save_pretrained(full)
        counts = parameter_counts(apply_lora(model, target_modules=args.targets, r=args.r))
        save_adapter(model, adapter)
        full_bytes, adapter_bytes = folder_bytes(full), folder_bytes(adapter)
    print(counts)
    print(f"full checkpoint (save_pretrained): {full_bytes:,} B")
    print(f"adapter (save_adapter, PEFT format): {adapter_bytes:,} B = 1/{full_bytes / adapter_bytes:,.0f} of it")


if __name__ == "__main__":
    main()
