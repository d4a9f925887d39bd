"""The model to fine-tune: a pretrained BART (Hub id or local folder) or a random one, and the method.

``random:tiny`` and ``random:base`` build ``BartForConditionalGeneration`` from a ``BartConfig`` with
random weights (tiny: small and fast, for smoke runs; base: facebook/bart-base's shapes) and a
byte-level BPE tokenizer trained on the training texts, so a run needs no download at all.
``pretrained:tiny`` is a small BART pretrained here with BART's denoising objective on the training
split (``train/pretrain.py``): built into a cache folder on first use, reused afterwards.
"""

from __future__ import annotations

from pathlib import Path

import base_cache
import torch
from bpe_tokenizer import train_tokenizer
from torch import nn
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedTokenizerFast,
)

import lorafast

METHODS = ("lorafast", "peft", "full")
RANDOM_PRESETS = {
    "random:tiny": {
        "d_model": 128, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 256, "decoder_ffn_dim": 256, "vocab_size": 4000,
        "max_position_embeddings": 1024,
    },
    "random:base": {  # facebook/bart-base
        "d_model": 768, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 12,
        "decoder_attention_heads": 12, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072, "vocab_size": 50265,
        "max_position_embeddings": 1024,
    },
}  # fmt: skip
_TOKENIZER_DOCS = 1000  # training texts the random presets' tokenizer learns from
PRETRAINED_PREFIX = "pretrained:"
_BASE_POINTER = "pretrained_base.txt"  # in the run's tokenizer folder: where the cached base is


def ensure_tokenizer(name: str, documents, directory: Path) -> None:
    """Prepare a preset's tokenizer in ``directory`` from the training ``documents``.

    A random preset trains its tokenizer here unless one is there. A ``pretrained:`` preset builds
    (first use) or reuses the cached pretrained base, and ``directory`` records where it is.
    """
    if name.startswith(PRETRAINED_PREFIX):
        folder = base_cache.cached_base(name.removeprefix(PRETRAINED_PREFIX), documents)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _BASE_POINTER).write_text(str(folder))
        return
    if name not in RANDOM_PRESETS or (directory / "tokenizer.json").is_file():
        return
    texts = [t for d in documents[:_TOKENIZER_DOCS] for t in (d.text, d.summary)]
    vocab_size = min(RANDOM_PRESETS[name]["vocab_size"], 16000)
    train_tokenizer(texts, vocab_size).save_pretrained(directory)


def load_model(
    name: str, tokenizer_dir: Path, model_dropout: float | None = None
) -> tuple[nn.Module, PreTrainedTokenizerFast, bool]:
    """``(model, tokenizer, is_random)`` for a Hub id, a local folder or a ``random:`` preset.

    A random preset's tokenizer comes from ``tokenizer_dir`` (see :func:`ensure_tokenizer`); the
    caller seeds torch for its random weights.

    Raises:
        OSError: if a named model cannot be loaded; the message names the offline alternatives.
    """
    if name in RANDOM_PRESETS:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        preset = RANDOM_PRESETS[name] | {"vocab_size": max(RANDOM_PRESETS[name]["vocab_size"], len(tokenizer))}
        config = BartConfig(
            **preset, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2
        )
        if model_dropout is not None:
            config.dropout = model_dropout
        return BartForConditionalGeneration(config), tokenizer, True
    if name.startswith(PRETRAINED_PREFIX):
        pointer = Path(tokenizer_dir) / _BASE_POINTER
        if not pointer.is_file():
            raise FileNotFoundError(f"{name}: call ensure_tokenizer first ({pointer} is missing)")
        name = pointer.read_text()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        kwargs = {} if model_dropout is None else {"dropout": model_dropout}
        model = AutoModelForSeq2SeqLM.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise OSError(
            f"could not load model {name!r} ({exc}). Without network access, give a local folder saved with "
            f"save_pretrained, or one of the random presets {sorted(RANDOM_PRESETS)} (random weights, for "
            "smoke runs and benchmarks), or pretrained:tiny (a small BART pretrained here on the training split)"
        ) from exc
    return model, tokenizer, False


def prepare(model: nn.Module, method: str, r: int, alpha: float, dropout: float, targets: list[str]) -> nn.Module:
    """The model to train with ``method``: lorafast LoRA, PEFT LoRA, or every weight (full)."""
    if method == "lorafast":
        return lorafast.apply_lora(model, target_modules=targets, r=r, alpha=alpha, dropout=dropout)
    if method == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="SEQ_2_SEQ_LM"
        )
        return get_peft_model(model, config)
    if method == "full":
        return model.requires_grad_(True)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def save_trained(model: nn.Module, method: str, directory: Path) -> None:
    """The trained part: a LoRA adapter in PEFT's format, or the whole model for ``full``."""
    if method == "lorafast":
        lorafast.save_adapter(model, directory, task_type="SEQ_2_SEQ_LM")
    else:
        model.save_pretrained(directory)


def merged(model: nn.Module, method: str) -> nn.Module:
    """A plain transformers model with the adapter folded in (the model itself for ``full``)."""
    if method == "lorafast":
        return lorafast.merge_lora(model)
    if method == "peft":
        return model.merge_and_unload()
    return model


def base_model(model: nn.Module, method: str) -> nn.Module:
    """The transformers model inside (PEFT wraps it)."""
    return model.get_base_model() if method == "peft" else model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name, for checkpoints."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
