"""Pretrained bases built once per corpus into a cache folder (``$LORAFAST_CACHE`` or ``~/.cache/lorafast``) and
reused by later runs: what ``finetune.py --model pretrained:<preset>`` loads."""

from __future__ import annotations

import os
from pathlib import Path

import pretrain
import sumpubmed


def cache_root() -> Path:
    """Where pretrained bases are cached: ``$LORAFAST_CACHE`` or ``~/.cache/lorafast``."""
    return Path(os.environ.get("LORAFAST_CACHE", Path.home() / ".cache" / "lorafast"))


def cached_base(preset_name: str, documents: list[sumpubmed.Document], seed: int = 0) -> Path:
    """The folder of the pretrained base for ``documents``' training split: built on first use, then reused.

    An interrupted build resumes from its checkpoint on the next call.
    """
    if preset_name not in pretrain.PRESETS:
        raise ValueError(f"unknown pretraining preset {preset_name!r}; choose from {sorted(pretrain.PRESETS)}")
    steps = pretrain.PRESETS[preset_name].steps
    fingerprint = pretrain.corpus_fingerprint(documents, preset_name, steps, seed)
    folder = cache_root() / f"pretrained-{preset_name}-{fingerprint}"
    if (folder / "pretrain.json").is_file():
        print(f"pretrained base: reusing {folder}")
        return folder
    print(f"pretrained base: building {folder} (once; later runs reuse it)")
    pretrain.pretrain(documents, folder, preset_name, seed=seed, resume=(folder / "checkpoint" / "state.pt").is_file())
    return folder
