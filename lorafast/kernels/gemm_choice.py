"""Which GEMM computes a LoRA matmul: the fused Triton kernel or cuBLAS beside a small Triton epilogue, by measurement.

On CUDA the first call for a :class:`GemmKey` times both candidates (as Triton's autotuner times its configs) and
keeps the faster (a candidate that cannot compile or launch loses); the choice is kept in-process and in a JSON file
beside Triton's autotune cache (``triton.knobs.cache.dir``, i.e. ``TRITON_CACHE_DIR`` or ``~/.triton/cache``), so
later processes and ranks reuse it; under CUDA graph capture a choice already made is reused, never measured.
``LORAFAST_GEMM=auto|triton|cublas`` (read on every call) forces a path; ``auto`` measures on CUDA and takes the
Triton kernel in the interpreter, whose timings mean nothing.

A launcher adopts the choice with :func:`gemm_key` and :func:`choose_path`::

    key = gemm_key("forward", u, v, up, bias, dropout_p)
    path = choose_path(key, {"triton": lambda: ..., "cublas": lambda: ...}, u.device)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import statistics
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..atomic import write_atomically
from .entry import launch_failure
from .launch import rank_block, token_bucket

PATHS = ("triton", "cublas")
MODES = ("auto", *PATHS)
ENV_VAR = "LORAFAST_GEMM"

Timer = Callable[[Callable[[], object]], float]
# Where ``auto`` measures; tests add "cpu" (with a CPU timer) to run the measuring path through the interpreter.
MEASURED_DEVICE_TYPES = {"cuda"}


def forced_path() -> str | None:
    """The path ``LORAFAST_GEMM`` forces, or None for ``auto`` (the default); ValueError for anything else."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {', '.join(MODES)}")
    return None if mode == "auto" else mode


@dataclasses.dataclass(frozen=True)
class GemmKey:
    """What a GEMM path choice depends on: the operation, token bucket, sizes, padded rank, dtype, bias, dropout
    and the device's name."""

    op: str
    m_bucket: int
    n: int
    k: int
    r_pad: int
    dtype: str
    bias: bool
    dropout: bool
    device: str

    def text(self) -> str:
        return "|".join(str(v) for v in dataclasses.astuple(self))


def gemm_key(op: str, u: torch.Tensor, v: torch.Tensor, up: torch.Tensor, bias, dropout_p: float) -> GemmKey:
    """The key of ``C = U·V + b + s·keep ⊙ (UP·Q)``: U ``(M, K)``, V ``(K, N)``, UP ``(M, R)``."""
    return GemmKey(
        op,
        token_bucket(u.shape[0]),
        v.shape[1],
        u.shape[1],
        rank_block(up.shape[1]),
        str(u.dtype).removeprefix("torch."),
        bias is not None,
        dropout_p > 0.0,
        device_name(u.device),
    )


def device_name(device: torch.device) -> str:
    """The GPU's name (``NVIDIA H100 80GB HBM3``), or the device type where there is none."""
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def cuda_timer(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of ``fn`` on the current CUDA stream, after ``warmup`` calls (which include autotuning)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def default_cache_file() -> Path:
    """The choices' file beside Triton's autotune cache, one per torch and Triton version."""
    import triton

    versions = re.sub(r"[^A-Za-z0-9.]+", "_", f"torch{torch.__version__}-triton{triton.__version__}")
    return Path(triton.knobs.cache.dir) / "lorafast" / f"gemm_choices-{versions}.json"


class GemmChooser:
    """Picks and remembers the faster path per key: in-process, then the file, then by timing each candidate."""

    def __init__(self, cache_file: Path | None, timer: Timer):
        self.cache_file = cache_file
        self.timer = timer
        self.choices: dict[str, dict] = {}  # key text -> {"path": name, "seconds": {name: seconds}}
        self._lock = threading.Lock()
        self._warned: set[str] = set()  # each kind of problem is reported once

    def choose(self, key: GemmKey, candidates: Mapping[str, Callable[[], object]]) -> str:
        """The forced path, else the remembered one, else the candidate the timer finds fastest.

        A candidate that cannot compile or launch (``entry.launch_failure``) loses; its reason is kept under
        ``"failed"``. When every candidate fails, the first one's error is raised (nothing is remembered).
        """
        forced = forced_path()
        if forced is not None:
            return forced
        text = key.text()
        entry = self.choices.get(text)
        if entry is None:
            entry = self._read().get(text)
            if not _valid(entry, candidates):
                entry = self._measure(candidates)
                self._write(text, entry)
            self.choices[text] = entry
        return entry["path"]

    def cached(self, key: GemmKey) -> str | None:
        """The path remembered for ``key`` (in-process, then the file), or None; never measures."""
        entry = self.choices.get(key.text()) or self._read().get(key.text())
        return entry["path"] if _valid(entry, PATHS) else None

    def _measure(self, candidates: Mapping[str, Callable[[], object]]) -> dict:
        seconds, failed, first_error = {}, {}, None
        for name, fn in candidates.items():
            try:
                seconds[name] = float(self.timer(fn))
            except Exception as exc:
                reason = launch_failure(exc)
                if reason is None:
                    raise
                failed[name], first_error = reason, first_error or exc
        if not seconds:
            raise first_error
        entry = {"path": min(seconds, key=seconds.get), "seconds": seconds}
        return entry | ({"failed": failed} if failed else {})

    def _read(self) -> dict:
        """The file's choices; {} when it is missing, unreadable or corrupt (it is rewritten on the next choice)."""
        if self.cache_file is None:
            return {}
        try:
            data = json.loads(self.cache_file.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError) as exc:
            self._warn("read", f"ignoring the unreadable GEMM choice cache {self.cache_file} ({exc})")
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, text: str, entry: dict) -> None:
        if self.cache_file is None:
            return
        with self._lock:  # merged with what other processes wrote meanwhile; the last writer of a key wins
            try:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                data = {k: v for k, v in self._read().items() if _valid(v, PATHS)}
                data[text] = entry
                write_atomically(self.cache_file, json.dumps(data, indent=1, sort_keys=True))
            except OSError as exc:
                self._warn("write", f"could not write the GEMM choice cache {self.cache_file} ({exc}); kept in memory")

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def _valid(entry, candidates) -> bool:
    return isinstance(entry, dict) and entry.get("path") in candidates and isinstance(entry.get("seconds"), dict)


_CHOOSER: GemmChooser | None = None


def chooser() -> GemmChooser:
    """The process's chooser: CUDA-event timing, the file beside Triton's cache."""
    global _CHOOSER
    if _CHOOSER is None:
        _CHOOSER = GemmChooser(default_cache_file(), cuda_timer)
    return _CHOOSER


def set_chooser(new: GemmChooser | None) -> None:
    """Replace the process's chooser (None: the default on next use), e.g. with an injected timer or file."""
    global _CHOOSER
    _CHOOSER = new


def choose_path(key: GemmKey, candidates: Mapping[str, Callable[[], object]], device: torch.device) -> str:
    """``"triton"`` or ``"cublas"`` for a call on ``device``: forced by ``LORAFAST_GEMM``, else measured on CUDA;
    under CUDA graph capture (where nothing may be timed) the choice already made for ``key``, else ``"triton"``."""
    forced = forced_path()
    if forced is not None:
        return forced
    if device.type not in MEASURED_DEVICE_TYPES:
        return "triton"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return chooser().cached(key) or "triton"
    return chooser().choose(key, candidates)


def recorded_choice(key: GemmKey) -> dict | None:
    """``{"path", "seconds"}`` this process chose or read for ``key``, or None (benchmark reports)."""
    return None if _CHOOSER is None else _CHOOSER.choices.get(key.text())
