"""The output folder of a fine-tuning run: what a previous run left there, its log, and its numbered checkpoints.

A fresh run never mixes with a previous one: it refuses a folder holding a previous run's outputs unless
told to replace them (``--overwrite-output-dir``), and then deletes only the files a run writes, after its
inputs have been checked.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from lorafast.atomic import write_atomically

LOG_NAME = "log.jsonl"
# What a run writes besides its checkpoints (tokenizer/ is reused, so it does not mark a previous run).
RUN_FILES = (LOG_NAME, "metrics.json", "predictions.jsonl", "loss_curve.png", "adapter", "model", "merged")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY = ".*.tmp-*"  # left by a write that was killed (lorafast.atomic's temporary names)


class RunError(Exception):
    """An expected problem with the run's inputs or folder: reported as one ``error:`` line, exit code 2."""


def numbered_checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders, oldest step first; other names (``checkpoint-best``) are ignored."""
    found = [(int(m[1]), p) for p in output_dir.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def previous_run_outputs(output_dir: Path) -> list[str]:
    """Names in ``output_dir`` that a previous run wrote (checkpoints, log, metrics, adapter, ...)."""
    if not output_dir.is_dir():
        return []
    return [p.name for p in numbered_checkpoints(output_dir)] + [n for n in RUN_FILES if (output_dir / n).exists()]


def refuse_previous_run(output_dir: Path, overwrite: bool) -> None:
    """Raise RunError if ``output_dir`` holds a previous run and ``overwrite`` is off (nothing is touched)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunError(f"--output-dir {output_dir} is a file, not a folder")
    found = previous_run_outputs(output_dir)
    if found and not overwrite:
        raise RunError(
            f"--output-dir {output_dir} holds a previous run ({', '.join(found[:4])}); pass --resume to continue it "
            "or --overwrite-output-dir to replace it"
        )


def clear_previous_run(output_dir: Path) -> None:
    """Delete what a previous run wrote in ``output_dir`` (with its tokenizer); other files stay."""
    for name in [*previous_run_outputs(output_dir), "tokenizer"]:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def remove_temporaries(output_dir: Path) -> None:
    """Delete the temporary files and folders of writes that a killed run left unfinished."""
    for path in output_dir.glob(_TEMPORARY):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def read_log(output_dir: Path) -> list[dict]:
    """The records of ``log.jsonl``; a last line cut short by a killed run is left out."""
    path = output_dir / LOG_NAME
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def trim_log(output_dir: Path, step: int) -> None:
    """Keep only the log records up to ``step`` (what a resumed run continues from); replaced atomically."""
    kept = [r for r in read_log(output_dir) if r.get("step", 0) <= step]
    write_atomically(output_dir / LOG_NAME, "".join(json.dumps(r) + "\n" for r in kept))


def append_log(output_dir: Path, record: dict) -> None:
    """Add one record to ``log.jsonl``."""
    with open(output_dir / LOG_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")
