"""Checks of the fine-tuning script's arguments: numeric ranges, and which arguments a resumed run must repeat."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_AT_LEAST_0 = (lambda v: v >= 0, "at least 0")
_POSITIVE = (lambda v: v > 0, "greater than 0")
_PROBABILITY = (lambda v: 0 <= v < 1, "in [0, 1)")

# Every numeric argument: (test, what it must be). None (an optional argument left out) is not checked.
RANGES = {
    "max_docs": _AT_LEAST_1,
    "eval_docs": _AT_LEAST_0,
    "max_source_length": _AT_LEAST_1,
    "max_target_length": _AT_LEAST_1,
    "model_dropout": _PROBABILITY,
    "r": _AT_LEAST_1,
    "alpha": _POSITIVE,
    "dropout": _PROBABILITY,
    "epochs": _AT_LEAST_1,
    "max_steps": _AT_LEAST_1,
    "batch_size": _AT_LEAST_1,
    "grad_accum": _AT_LEAST_1,
    "lr": _POSITIVE,
    "weight_decay": _AT_LEAST_0,
    "warmup_steps": _AT_LEAST_0,
    "max_grad_norm": _AT_LEAST_0,
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "eval_every": _AT_LEAST_0,
    "save_every": _AT_LEAST_0,
    "keep_checkpoints": _AT_LEAST_1,
    "num_beams": _AT_LEAST_1,
    "gen_max_tokens": _AT_LEAST_1,
    "eval_batch_size": _AT_LEAST_1,
    "samples": _AT_LEAST_0,
    "no_repeat_ngram_size": _AT_LEAST_0,
    "gen_min_tokens": _AT_LEAST_0,
    "length_penalty": (lambda v: True, "a number"),  # any finite exponent: <1 favours short beams, >1 long ones
}

# The arguments that decide the trained weights: a resumed run must be given the same ones.
SAME_ON_RESUME = (
    "data", "target", "max_docs", "max_source_length", "max_target_length",
    "model", "model_dropout", "method", "r", "alpha", "dropout", "target_modules",
    "epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "max_grad_norm", "seed",
)  # fmt: skip


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` (exit code 2) for the first numeric argument out of its range or not finite."""
    for name, (within, expected) in RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        option = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"argument {option}: must be a finite number, got {value}")
        if not within(value):
            parser.error(f"argument {option}: must be {expected}, got {value}")


def run_arguments(args: argparse.Namespace) -> dict:
    """The :data:`SAME_ON_RESUME` arguments as JSON values; local paths made absolute."""

    def normalized(name):
        value = getattr(args, name, None)
        if name in ("data", "model") and Path(str(value)).exists():
            return str(Path(str(value)).resolve())
        return value

    return {name: normalized(name) for name in SAME_ON_RESUME}
