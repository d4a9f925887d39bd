"""Measuring LoRA layers side by side: the candidates, their float64 references, interleaved timing, memory, and

Candidates share one frozen base weight: a frozen ``nn.Linear`` (its backward computes dX only),
Hugging Face PEFT's LoRA ``Linear``, the same PEFT layer after ``lorafast.patch_peft`` and lorafast's
``FusedLoRALinear``, with the same adapter.
Every timing round runs each candidate once, in a rotating order, so that a noisy machine slows
them alike; figures are medians over rounds, and ratios are medians of per-round ratios.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lorafast import FusedLoRALinear, patch_peft
from lorafast.profiling import saved_activation_bytes

FROZEN, PEFT, PATCHED, LORAFAST = "frozen nn.Linear", "PEFT LoRA", "PEFT + patch_peft", "lorafast"


def make_candidates(d_in: int, d_out: int, r: int, alpha: float, dropout: float, dtype, device) -> dict:
    """``{name: module}`` for the frozen linear, PEFT LoRA, patched PEFT LoRA and lorafast, in training mode."""
    from peft import LoraConfig, get_peft_model

    def peft_layer():
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"])
        # autocast_adapter_dtype=False keeps PEFT's factors in the layer's dtype, like lorafast's
        return get_peft_model(nn.Sequential(base), config, autocast_adapter_dtype=False)

    base = nn.Linear(d_in, d_out, device=device, dtype=dtype)
    peft = peft_layer().base_model.model[0]
    patched = patch_peft(peft_layer()).base_model.model[0]
    ours = FusedLoRALinear.from_linear(base, r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():  # the same non-zero adapter in all three
        nn.init.normal_(ours.lora_B, std=0.02)
        for layer in (peft, patched):
            layer.lora_A["default"].weight.copy_(ours.lora_A)
            layer.lora_B["default"].weight.copy_(ours.lora_B)
    return {FROZEN: base.train(), PEFT: peft.train(), PATCHED: patched.train(), LORAFAST: ours.train()}


def candidate_references(candidates: dict[str, nn.Module]) -> dict[str, Callable]:
    """The float64 references of :func:`make_candidates`' modules, for :func:`assert_matches_reference`."""
    ours = candidates[LORAFAST]
    lora = lora_reference(ours.weight, ours.bias, ours.lora_A, ours.lora_B, ours.scaling)
    return {FROZEN: base_reference(ours.weight, ours.bias), PEFT: lora, PATCHED: lora, LORAFAST: lora}


# Each trainable parameter by what it is, whatever its owner calls it (PEFT: lora_A.default.weight, ...)
_PARAMETER_KINDS = ("lora_A", "lora_B", "magnitude")


def lora_reference(weight, bias, lora_A, lora_B, scaling: float, magnitude=None) -> Callable:
    """float64 LoRA (DoRA with ``magnitude``) of weight ``(out, in)``, bias, A ``(r, in)``, B ``(out, r)``, dropout off:
    ``reference(x64) -> (y64 (n, out), {kind: float64 leaf})`` (kinds as in ``_PARAMETER_KINDS``). DoRA's row norm is
    detached, as in lorafast and PEFT."""
    w64 = weight.detach().double()
    b64 = None if bias is None else bias.detach().double()

    def reference(x64):
        leaves = {"lora_A": lora_A.detach().double().requires_grad_(), "lora_B": lora_B.detach().double()}
        leaves["lora_B"].requires_grad_()
        y = x64 @ w64.T + scaling * (x64 @ leaves["lora_A"].T) @ leaves["lora_B"].T
        if magnitude is not None:
            leaves["magnitude"] = magnitude.detach().double().requires_grad_()
            norm = torch.linalg.vector_norm(w64 + scaling * leaves["lora_B"] @ leaves["lora_A"], dim=1).detach()
            y = leaves["magnitude"] / norm * y
        return (y if b64 is None else y + b64), leaves

    return reference


def base_reference(weight, bias) -> Callable:
    """float64 ``x·Wᵀ + b`` of a frozen layer, as :func:`lora_reference` gives it (no trainable leaves)."""
    w64, b64 = weight.detach().double(), None if bias is None else bias.detach().double()

    def reference(x64):
        return (x64 @ w64.T if b64 is None else x64 @ w64.T + b64), {}

    return reference


def assert_matches_reference(
    modules: dict[str, nn.Module], references: dict[str, Callable], x: torch.Tensor, grad_y: torch.Tensor
) -> None:
    """Before anything is timed: each module's output and the gradients of x and of its trainable parameters
    equal its float64 reference's (:func:`lora_reference`), by relative norm error (1e-4 in fp32, 3e-2 in 16 bits).

    Modules run in eval mode (dropout off; the gradients still flow), then return to the mode they were in.
    AssertionError names the module and the tensor.
    """
    limit = 1e-4 if x.dtype in (torch.float32, torch.float64) else 3e-2
    for name, module in modules.items():
        training = module.training
        module.eval()
        try:
            x_in = x.detach().clone().requires_grad_()
            params = {n: p for n, p in module.named_parameters() if p.requires_grad}
            y = module(x_in)
            got = torch.autograd.grad(y, [x_in, *params.values()], grad_y)
        finally:
            module.train(training)
        x64 = x.detach().double().requires_grad_()
        y64, leaves = references[name](x64)
        kinds = [next(k for k in _PARAMETER_KINDS if k in n) for n in params]
        want = torch.autograd.grad(y64, [x64, *(leaves[k] for k in kinds)], grad_y.double())
        for what, a, b in zip(("output", "dX", *kinds), (y, *got), (y64, *want), strict=True):
            error = ((a.double() - b).norm() / b.norm()).item()
            assert error < limit, f"{name}: {what} is {error:.2e} off its float64 reference (limit {limit})"


def assert_same_loss(models: dict, batch: dict, rel: float) -> None:
    """Before a training step is timed: every model's loss on ``batch`` (eval mode, no grad) equals the first's
    within ``rel``; the adapters start as PEFT's (B = 0), so each model still computes its base model's loss."""
    losses = {}
    for name, model in models.items():
        training = model.training
        with torch.no_grad():
            losses[name] = model.eval()(**batch).loss.item()
        model.train(training)
    first = next(iter(losses.values()))
    for name, loss in losses.items():
        assert abs(loss - first) <= rel * abs(first), f"{name}: loss {loss} differs from {first} (rel {rel})"


def isolated_peak_cuda_bytes(build: Callable[[], Callable[[], None]], device: torch.device, steps: int = 2) -> int:
    """Peak allocated CUDA memory of ``steps`` calls of ``build()``'s step (``build`` makes a model and its optimizer
    and returns its training step; optimizer state appears in the first step) above what was allocated before the
    build: the model's own weights count, loading transients and other models do not. Call it with no other model
    resident; the model is freed again before it returns."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    step = build()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


class Timer:
    """Wall time of a callable: CUDA events on a GPU, ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def forward_backward(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> Callable[[], None]:
    """One training forward and backward; gradients are dropped so that none accumulate."""

    def run() -> None:
        module(x).backward(grad_y)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return run


def forced_gemm(path: str, run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with ``LORAFAST_GEMM=path`` (``triton`` or ``cublas``) while it runs."""

    def forced() -> None:
        before = os.environ.get("LORAFAST_GEMM")
        os.environ["LORAFAST_GEMM"] = path
        try:
            run()
        finally:
            if before is None:
                del os.environ["LORAFAST_GEMM"]
            else:
                os.environ["LORAFAST_GEMM"] = before

    return forced


def forward(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training forward (the graph is built, then dropped)."""
    return lambda: module(x)


def interleaved(runs: dict[str, Callable[[], None]], rounds: int, timer: Timer, warmup: int = 2) -> dict[str, list]:
    """Seconds per round for each named run, the runs rotating their order from round to round."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            times[name].append(timer(runs[name]))
    return times


def timed_rounds(benchmark, runs: dict[str, Callable[[], None]], timer: Timer, rounds: int, warmup_rounds: int) -> dict:
    """Seconds per run: each pytest-benchmark round (warm-up rounds too) times every run once, the order rotating
    from round to round as :func:`interleaved`'s does, so a noisy machine slows the runs alike."""
    names = list(runs)
    times = {name: [] for name in names}
    done = 0

    def one_round():
        nonlocal done
        shift = done % len(names)
        done += 1
        for name in names[shift:] + names[:shift]:
            times[name].append(timer(runs[name]))

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return times


def summarize(times: dict[str, list[float]], baselines: tuple[str, ...]) -> dict[str, dict]:
    """Median seconds per run and the median per-round ratio of each run to each baseline."""
    out = {}
    for name, ts in times.items():
        row = {"seconds": statistics.median(ts)}
        for base in baselines:
            row[f"vs {base}"] = statistics.median(t / b for t, b in zip(ts, times[base]))
        out[name] = row
    return out


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Activation bytes ``module`` keeps for backward on x (parameters excluded)."""
    return saved_activation_bytes(lambda: module(x), exclude=list(module.parameters()))


def peak_cuda_bytes(run: Callable[[], None], device: torch.device) -> int | None:
    """Peak allocated CUDA memory during ``run`` above what was allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# ATen ops that launch no device kernel: allocations and metadata-only ops (views are found by schema).
_NO_KERNEL_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh"}


class _LaunchCounter(TorchDispatchMode):
    """Counts the ATen ops of a CPU run that would launch a device kernel, and lorafast's Triton
    launches (one each; the interpreter's own tensor work inside a launch is not counted)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.in_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if not self.in_triton and not func.is_view and name not in _NO_KERNEL_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counting_triton_launches(counter: _LaunchCounter):
    """Route lorafast's kernel launches through ``counter`` while the block runs."""
    import sys

    from lorafast.kernels import launch as launch_module

    original = launch_module.launch

    def counted(*args, **kwargs):
        counter.count += 1
        counter.in_triton, was = True, counter.in_triton
        try:
            return original(*args, **kwargs)
        finally:
            counter.in_triton = was

    patched = [
        m
        for n, m in list(sys.modules.items())
        if n.startswith("lorafast.kernels.") and getattr(m, "launch", None) is original
    ]
    for module in patched:
        module.launch = counted
    try:
        yield
    finally:
        for module in patched:
            module.launch = original


def kernel_launches(run: Callable[[], None], device: torch.device) -> int:
    """Device kernels one call of ``run`` launches: CUDA kernels from the profiler on a GPU; on
    CPU the ATen ops that would launch one plus lorafast's (interpreted) Triton launches."""
    run()  # warm: autotuning and compilation launch kernels of their own
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    counter = _LaunchCounter()
    with _counting_triton_launches(counter), counter:
        run()
    return counter.count


def machine(device: torch.device) -> str:
    """The processor or GPU, thread count and library versions, for reports."""
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name() or platform.machine()
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}, triton {triton.__version__}"


def _cpu_name() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
