"""Resumable checkpoints: written whole or not at all, read without unpickling, checked before use.

``checkpoint-<step>/`` holds the trained part (``model_setup.save_trained``), ``trainer_state.pt`` (the
trained weights, optimizer, scheduler, every rank's RNG state, the loss history; tensors and plain Python
values only, so it loads with ``torch.load(weights_only=True)``) and ``run_args.json`` (the run's id and
the arguments that decide the trained weights, which a resumed run must repeat).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import model_setup
import numpy as np
import torch
import torch.distributed as dist
from run_folder import RunError, numbered_checkpoints

from lorafast.atomic import atomic_directory

STATE_NAME = "trainer_state.pt"
ARGS_NAME = "run_args.json"


@dataclass
class Checkpoint:
    """A checkpoint read back: its folder, ``run_args.json`` and ``trainer_state.pt``."""

    directory: Path
    run_args: dict
    state: dict

    @property
    def step(self) -> int:
        return self.state["step"]


# --- RNG state as tensors and plain values --------------------------------------------------------


def rng_state() -> dict:
    """This process's Python, NumPy, torch (and CUDA) RNG states, as tensors and plain values."""
    version, python_keys, gauss = random.getstate()
    kind, numpy_keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(python_keys, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(numpy_keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, python_keys, gauss = state["python"]
    random.setstate((version, tuple(python_keys.tolist()), gauss))
    kind, numpy_keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, numpy_keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing --------------------------------------------------------------------------------------


def save_checkpoint(model, optimizer, scheduler, args, ctx, step, history, tokens_seen, train_seconds, run_args):
    """Write ``checkpoint-<step>/`` (it appears only complete), then delete this run's older ones beyond
    ``--keep-checkpoints``. Every rank calls it (each contributes its RNG state); rank 0 writes."""
    states = [None] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if ctx.main:
        state = {
            "step": step,
            "trainable": model_setup.trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": states,
            "history": list(history),
            "tokens_seen": tokens_seen,
            "train_seconds": train_seconds,
        }
        with atomic_directory(args.output_dir / f"checkpoint-{step}") as directory:
            model_setup.save_trained(model, args.method, directory)
            torch.save(state, directory / STATE_NAME)
            (directory / ARGS_NAME).write_text(json.dumps(run_args, indent=2) + "\n")
        ours = [p for p in numbered_checkpoints(args.output_dir) if _run_id(p) == run_args["run_id"]]
        for old in ours[: -args.keep_checkpoints]:
            shutil.rmtree(old)
    ctx.barrier()


def _run_id(directory: Path) -> str | None:
    try:
        return json.loads((directory / ARGS_NAME).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


# --- reading --------------------------------------------------------------------------------------


def read_checkpoint(directory: Path) -> Checkpoint:
    """Read and check one checkpoint folder.

    Raises:
        ValueError (or the loaders' own errors): the folder is incomplete, damaged or not a checkpoint of
            this script; nothing in it is executed (``weights_only=True``).
    """
    run_args = json.loads((directory / ARGS_NAME).read_text())
    if not isinstance(run_args, dict) or not isinstance(run_args.get("args"), dict):
        raise ValueError(f"{ARGS_NAME} holds no run arguments")
    state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
    step = int(directory.name.rpartition("-")[2])
    if not isinstance(state, dict) or state.get("step") != step:
        raise ValueError(f"{STATE_NAME} is not the state of step {step}")
    history = state.get("history")
    if not isinstance(history, list) or len(history) != step or not all(math.isfinite(x) for x in history):
        raise ValueError(f"{STATE_NAME} has no finite loss for each of its {step} steps")
    tensors = [*state["trainable"].values(), *_tensors(state["optimizer"])]
    if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
        raise ValueError(f"{STATE_NAME} holds NaN or infinite weights or optimizer moments")
    return Checkpoint(directory, run_args, state)


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in _tensors(value)]
    return []


def newest_loadable(output_dir: Path, warn: bool = True) -> Checkpoint:
    """The newest ``checkpoint-<step>`` that reads back whole; each one skipped is named in a one-line warning.

    Raises:
        RunError: if there is none.
    """
    candidates = numbered_checkpoints(output_dir)
    if not candidates:
        raise RunError(f"--resume: no checkpoint-<step> folder in {output_dir}")
    reasons = []
    for directory in reversed(candidates):
        try:
            return read_checkpoint(directory)
        except Exception as exc:  # any damage: truncated, crafted, NaN, missing file
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            reasons.append(f"{directory.name} ({reason})")
            if warn:
                print(f"warning: skipping {directory.name}, which cannot be loaded: {reason}", file=sys.stderr)
    raise RunError(f"--resume: no checkpoint in {output_dir} can be loaded: {'; '.join(reasons)}")


def check_same_run(checkpoint: Checkpoint, run_args: dict) -> None:
    """Raise RunError naming every argument that differs from the ones ``checkpoint`` was written with."""
    saved, now = checkpoint.run_args["args"], run_args["args"]
    changed = [
        f"--{name.replace('_', '-')} {saved.get(name)!r} (now {now.get(name)!r})"
        for name in sorted(set(saved) | set(now))
        if saved.get(name) != now.get(name)
    ]
    if checkpoint.run_args.get("world_size") != run_args["world_size"]:
        changed.append(f"processes {checkpoint.run_args.get('world_size')} (now {run_args['world_size']})")
    if changed:
        raise RunError(
            f"--resume: {checkpoint.directory} was written with other arguments: {', '.join(changed)}; resume with "
            "the same ones, or start afresh with --overwrite-output-dir"
        )


def restore(checkpoint: Checkpoint, model, optimizer, scheduler, rank: int) -> None:
    """Put the checkpoint's weights, optimizer, scheduler and this rank's RNG state in place."""
    state = checkpoint.state
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    wrong = sorted(n for n in set(params) | set(saved) if n not in params or n not in saved)
    wrong += sorted(n for n in set(params) & set(saved) if saved[n].shape != params[n].shape)
    if wrong:
        raise RunError(f"--resume: {checkpoint.directory} does not fit the model's trained parameters: {wrong[:5]}")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rank])
