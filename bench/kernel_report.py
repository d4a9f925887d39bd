"""Offline report of the Triton kernels: registers, spills and shared memory per config (Hopper), or per architecture.

``python bench/kernel_report.py`` compiles every lorafast kernel and every autotune config for
sm_90a (H100/H200) on any machine, no GPU needed, and prints per config the registers, spill
stores/loads (bytes per thread, from ``ptxas -v``), shared memory and the main loop's wgmma and
cp.async instructions (PTX inside a loop: a label with a backward branch to it), beside the Triton
tutorial matmul (03-matrix-multiplication) built the same way for the same tile. A kernel that spills
more than that plain GEMM at the same tile leaves tensor-core throughput on the table; a GEMM config
(forward, dX) whose main loop issues a different wgmma count than the tutorial's has lost its shape
(flagged for 2-byte inputs: fp32 follows torch's TF32 setting, off by default, and then issues no wgmma).

The launchers themselves build each kernel's arguments (CPU tensors of a realistic layer shape
stand in for CUDA ones), so the kernels are specialised exactly as Triton's JIT would specialise
them on a GPU (``tt.divisibility=16`` on aligned pointers and strides, unit strides constant).
Absolute figures from an offline build may differ from a live GPU's; the comparison with the
tutorial kernel built the same way is what counts.

Options: ``--dtype``, ``--rank`` and ``--kernel`` restrict the sweep; ``--widest`` keeps each
kernel's widest tiles only (the quick check of ``tests/test_kernel_report.py``). The exit status
is 1 when a config spills more than the tutorial matmul or needs more shared memory than an
H100 has.

``--arch [ARCH ...]`` (sm_80, sm_86, sm_89, sm_90a: all by default; gfx90a, gfx942 by name) reports instead, per
launch and architecture, the configs the launch's prune keeps for that GPU's shared memory per block and which of
them fit it, their shared memory taken from Triton's own pipeline to LLVM IR for that target (no ptxas); the
cuBLAS composite's K = 0 epilogue launches are included. It sweeps bf16, fp16 and fp32 at ranks 8 to 256 unless
``--dtype``/``--rank`` say otherwise, ``--shape`` sets the layer, and ``--quick`` keeps a few representative
launches (the large-rank worst cases; CI). On a ROCm target it checks that every launch's first config passes
Triton's front end (to LLVM IR; shared memory is reported, not checked against the LDS). The exit status is 1
when a launch keeps no config that fits a CUDA architecture, or a kernel fails a target's front end.

Must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; its default

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler.compiler import ir
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block of an H100/H200
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A layer shape of a 7B-class model; all sizes multiples of 16 as in practice.
TOKENS, IN_FEATURES, OUT_FEATURES = 1024, 4096, 4096


def bundled_ptxas() -> Path | None:
    """The ptxas shipped in Triton's wheel that accepts the PTX this Triton emits, or None."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one first: it reads newer PTX versions
        path = bin_dir / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one compiled config needs per thread / per block."""

    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    shared: int  # bytes per block
    loop_wgmma: int = 0  # PTX instructions inside the kernel's loops
    loop_cp_async: int = 0


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher issues it: the plain and autotuned kernels and the arguments."""

    kernel: object
    configs: tuple  # those the autotuner would try for these arguments (after its pruning for an H100)
    args: tuple
    tuned: object = None  # the autotuned kernel
    pinned: triton.Config | None = None  # the config the launcher gives (no autotuning)

    @property
    def named_args(self) -> dict:
        return dict(zip(self.kernel.arg_names, self.args))

    @property
    def tried(self) -> tuple:
        """The pinned config, else those the autotuner would try on an H100."""
        return (self.pinned,) if self.pinned is not None else self.configs

    def kept(self, shared_limit: int) -> tuple:
        """The configs the launch would try on a GPU with ``shared_limit`` bytes of shared memory per block
        (none where its prune raises ``OutOfResources``)."""
        if self.pinned is not None:
            return (self.pinned,)
        try:
            return tuple(self.tuned.early_config_prune.prune(self.tuned.configs, self.named_args, shared_limit))
        except OutOfResources:
            return ()


def _ptxas_resources(ptx: str, ptxas: Path) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    info = out.stderr + out.stdout
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return registers, int(spills.group(1)), int(spills.group(2))


def _source(kernel, args: tuple, config: triton.Config, target: GPUTarget):
    """``(backend, ASTSource, options)`` of ``kernel`` specialised for ``args`` and ``config`` on ``target``."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = config.all_kwargs()
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return backend, ASTSource(kernel, signature, constexprs, attrs), options


def front_end_shared_memory(kernel, args: tuple, config: triton.Config, target: GPUTarget) -> int:
    """Shared memory per block (bytes) of ``kernel`` for ``target``, from Triton's pipeline up to LLVM IR (as
    ``triton.compile`` runs it, without the assembler); raises what the front end raises."""
    backend, src, options = _source(kernel, args, config, target)
    options = backend.parse_options(dict(options.__dict__, **src.parse_options()))
    stages = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    codegen = backend.get_codegen_implementation(options)
    module = src.make_ir(target, options, codegen, backend.get_module_map(), context)
    metadata = {"target": target, **options.__dict__}
    for name in ("ttir", "ttgir", "llir"):
        module = stages[name](module, metadata)
    return metadata["shared"]


def compile_for_hopper(kernel, args: tuple, config: triton.Config, ptxas: Path) -> Resources:
    """Compile ``kernel`` for sm_90a with the launch arguments ``args`` and ``config``."""
    _, src, options = _source(kernel, args, config, HOPPER)
    compiled = triton.compile(src, target=HOPPER, options=options.__dict__)
    registers, stores, loads = _ptxas_resources(compiled.asm["ptx"], ptxas)
    return Resources(registers, stores, loads, compiled.metadata.shared, *main_loop_counts(compiled.asm["ptx"]))


def main_loop_counts(ptx: str) -> tuple[int, int]:
    """``(wgmma, cp.async)`` instructions of the PTX's main loop: of the innermost loops (a label and a later
    branch back to it, no loop inside), the one with the most wgmma; ``(0, 0)`` without loops."""
    lines = ptx.splitlines()
    labels, loops = {}, []
    for i, line in enumerate(lines):
        label = re.match(r"\s*(\$L__BB\d+_\d+):", line)
        if label:
            labels[label.group(1)] = i
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)", line)
        if branch and branch.group(1) in labels:
            loops.append((labels[branch.group(1)], i))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    counts = [
        (
            sum("wgmma.mma_async" in line for line in lines[a : b + 1]),
            sum(re.search(r"\bcp\.async\.c[ag]\.", line) is not None for line in lines[a : b + 1]),
        )
        for a, b in innermost
    ]
    return max(counts, default=(0, 0))


@triton.jit
def tutorial_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):  # fmt: skip
    """The Triton tutorial's matmul (03-matrix-multiplication, no activation): the yardstick."""
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_am = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)) % M
    offs_bn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)) % N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
    accumulator = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_SIZE_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_SIZE_K, other=0.0)
        accumulator = tl.dot(a, b, accumulator)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk
    c = accumulator.to(c_ptr.dtype.element_ty)
    offs_cm = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    c_ptrs = c_ptr + stride_cm * offs_cm[:, None] + stride_cn * offs_cn[None, :]
    tl.store(c_ptrs, c, mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


def output_tile(config: triton.Config, r_pad: int) -> tuple[int, int, int]:
    """``(tile_m, tile_n, tile_k)`` of a config: the output tile and the reduction step of its dots."""
    kw = config.kwargs
    if "BLOCK_N" in kw:  # the big GEMMs
        return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    if "BLOCK_P" in kw:  # weight gradients: (BLOCK_P, R_PAD) reduced over BLOCK_M tokens
        return kw["BLOCK_P"], r_pad, kw["BLOCK_M"]
    return kw["BLOCK_M"], r_pad, kw["BLOCK_K"]  # rank-r projections


@functools.cache
def tutorial_resources(dtype: torch.dtype, tile: tuple[int, int, int], stages: int, warps: int) -> Resources:
    """The tutorial matmul compiled for ``tile`` with the same stages and warps."""
    bm, bn, bk = tile
    a = torch.empty(TOKENS, IN_FEATURES, dtype=dtype)
    b = torch.empty(IN_FEATURES, OUT_FEATURES, dtype=dtype)
    c = torch.empty(TOKENS, OUT_FEATURES, dtype=dtype)
    args = (a, b, c, TOKENS, OUT_FEATURES, IN_FEATURES, *a.stride(), *b.stride(), *c.stride())
    config = triton.Config(
        {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 8},
        num_stages=stages,
        num_warps=warps,
    )
    return compile_for_hopper(tutorial_matmul_kernel, args, config, bundled_ptxas())


@contextlib.contextmanager
def captured_launches() -> Iterator[list[Launch]]:
    """Record the launches the kernel launchers issue instead of running them (CPU tensors allowed)."""
    import lorafast.kernels as kernels
    from lorafast.kernels import launch as launch_module

    launches: list[Launch] = []

    def record(kernel, tuned_kernel, grid, args, config):
        configs = tuned_kernel.configs
        if tuned_kernel.early_config_prune is not None:
            configs = tuned_kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)))
        launches.append(Launch(kernel, tuple(configs), tuple(args), tuned_kernel, config))

    multi_grad_module = importlib.import_module("lorafast.kernels.multi_lora_weight_grad")  # not the function

    class NotLaunched:  # a kernel launched directly (not through ``launch``): skipped
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    fakes = {
        launch_module.launch: record,
        launch_module.check_device: lambda *args: None,
        multi_grad_module.chunk_sum_kernel: NotLaunched(),  # a plain reduction, not part of the report
    }
    originals = []
    for name, module in list(sys.modules.items()):
        if not name.startswith(kernels.__name__ + "."):
            continue
        for attr in ("launch", "check_device", "chunk_sum_kernel"):
            fake = fakes.get(getattr(module, attr, None))
            if fake is not None:
                originals.append((module, attr, getattr(module, attr)))
                setattr(module, attr, fake)
    try:
        yield launches
    finally:
        for module, attr, original in originals:
            setattr(module, attr, original)


def _one_adapter_cases(dtype, r) -> dict[str, Callable[[], object]]:
    from lorafast import kernels

    x = torch.empty(TOKENS, IN_FEATURES, dtype=dtype)
    dy = torch.empty(TOKENS, OUT_FEATURES, dtype=dtype)
    w = torch.empty(OUT_FEATURES, IN_FEATURES, dtype=dtype)
    bias = torch.empty(OUT_FEATURES, dtype=dtype)
    a = torch.empty(r, IN_FEATURES, dtype=dtype)
    b = torch.empty(OUT_FEATURES, r, dtype=dtype)
    xa = torch.empty(TOKENS, r, dtype=dtype)
    g = torch.empty(OUT_FEATURES, dtype=torch.float32)  # DoRA's column scale
    return {
        "forward": lambda: kernels.lora_forward(x, w, bias, a, b, 2.0, 0.0, 0),
        "forward, dropout": lambda: kernels.lora_forward(x, w, bias, a, b, 2.0, 0.1, 7),
        "forward, DoRA": lambda: kernels.dora_forward(x, w, bias, a, b, 2.0, 0.0, 0, g),
        "dX": lambda: kernels.fused_lora_dx(dy, w, a, b, 2.0),
        "dX, dropout": lambda: kernels.fused_lora_dx(dy, w, a, b, 2.0, 0.1, 7),
        "dA, dropout": lambda: kernels.lora_weight_grad(x, xa, 2.0, 0.1, 7, split=1),
        "dB": lambda: kernels.lora_weight_grad(dy, xa, 2.0, split=1),
    }


def _multi_adapter_cases(dtype, r) -> dict[str, Callable[[], object]]:
    from lorafast import kernels

    n_adapters = 4
    x = torch.empty(TOKENS, IN_FEATURES, dtype=dtype)
    dy = torch.empty(TOKENS, OUT_FEATURES, dtype=dtype)
    w = torch.empty(OUT_FEATURES, IN_FEATURES, dtype=dtype)
    bias = torch.empty(OUT_FEATURES, dtype=dtype)
    a = torch.empty(n_adapters, r, IN_FEATURES, dtype=dtype)
    b = torch.empty(n_adapters, OUT_FEATURES, r, dtype=dtype)
    g = torch.empty(TOKENS, r, dtype=dtype)
    scalings = torch.full((n_adapters,), 2.0)
    dropout = torch.full((n_adapters,), 0.1)
    ids = torch.arange(TOKENS) % n_adapters
    return {
        "multi forward": lambda: kernels.fused_multi_lora_forward(x, w, bias, a, b, scalings, ids),
        "multi forward, dropout": lambda: kernels.fused_multi_lora_forward(
            x, w, bias, a, b, scalings, ids, dropout=dropout, seed=7
        ),
        "multi dX, dropout": lambda: kernels.fused_multi_lora_dx(dy, w, a, b, scalings, ids, dropout=dropout, seed=7),
        "multi dA, dropout": lambda: kernels.multi_lora_weight_grad(
            x, g, scalings, ids, transpose=True, dropout=dropout, seed=7
        ),
        "multi dB": lambda: kernels.multi_lora_weight_grad(dy, g, scalings, ids),
        # each adapter's own factors, of unequal ranks (as a MultiLoRALinear holds them): forward and backward
        "multi fwd+bwd, mixed ranks": lambda: _mixed_ranks_step(x, dy, w, bias, r, scalings, dropout, ids),
    }


def _mixed_ranks_step(x, dy, w, bias, r, scalings, dropout, ids):
    """The library's mixed-adapter forward and backward over separate factors of ranks r, r/2, r, r/4."""
    from lorafast.kernels import multi_lora_linear

    ranks = [r, max(1, r // 2), r, max(1, r // 4)]
    lora_A = [torch.empty(k, IN_FEATURES, dtype=x.dtype) for k in ranks]
    lora_B = [torch.empty(OUT_FEATURES, k, dtype=x.dtype) for k in ranks]
    _, xa = multi_lora_linear.forward(x, w, bias, lora_A, lora_B, scalings, ids, dropout, 7)
    multi_lora_linear.backward(dy, x, xa, w, lora_A, lora_B, scalings, ids, (True, True, True), dropout, 7)


@contextlib.contextmanager
def _cublas_path() -> Iterator[None]:
    """The launchers take the cuBLAS composite (``LORAFAST_GEMM=cublas``) with its GEMM skipped (CPU stand-ins)."""
    saved_env, saved_addmm = os.environ.get("LORAFAST_GEMM"), torch.addmm
    os.environ["LORAFAST_GEMM"] = "cublas"
    torch.addmm = lambda c, u, v, out=None: c
    try:
        yield
    finally:
        torch.addmm = saved_addmm
        if saved_env is None:
            del os.environ["LORAFAST_GEMM"]
        else:
            os.environ["LORAFAST_GEMM"] = saved_env


def _epilogue_cases(cases: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
    """The GEMM cases again through the cuBLAS composite: its K = 0 epilogue launches (a pinned config)."""

    def composite(run):
        def run_composite():
            with _cublas_path():
                run()

        return run_composite

    gemms = ("forward", "dX", "multi forward", "multi dX")
    return {f"{name} [cuBLAS]": composite(run) for name, run in cases.items() if name.split(",")[0] in gemms}


@dataclasses.dataclass(frozen=True)
class Row:
    case: str
    kernel: str
    dtype: str
    r_pad: int
    config: triton.Config
    ours: Resources
    tutorial: Resources

    @property
    def spills_more(self) -> bool:
        return self.ours.spill_stores > self.tutorial.spill_stores

    @property
    def too_much_shared(self) -> bool:
        return self.ours.shared > HOPPER_SHARED_BYTES

    @property
    def is_gemm(self) -> bool:
        return "BLOCK_N" in self.config.kwargs

    @property
    def main_loop_differs(self) -> bool:
        """A 2-byte GEMM config whose main loop issues a different wgmma count than the tutorial's."""
        return self.is_gemm and self.dtype != "fp32" and self.ours.loop_wgmma != self.tutorial.loop_wgmma


def _widest(configs: tuple, r_pad: int) -> list[triton.Config]:
    """The configs with the largest output tile (ties: all of them)."""
    area = [output_tile(c, r_pad)[0] * output_tile(c, r_pad)[1] for c in configs]
    return [c for c, a in zip(configs, area, strict=True) if a == max(area)]


def report_rows(dtypes, ranks, kernel_filter: str = "", widest: bool = False, progress=None) -> Iterator[Row]:
    """Compile every selected (case, launch, config) and yield its row."""
    from lorafast.kernels.launch import rank_block

    ptxas = bundled_ptxas()
    seen = set()
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for r in ranks:
            r_pad = rank_block(r)
            cases = {**_one_adapter_cases(dtype, r), **_multi_adapter_cases(dtype, r)}
            for case, run in cases.items():
                if kernel_filter and kernel_filter not in case:
                    continue
                with captured_launches() as launches:
                    run()
                for launch in launches:
                    configs = _widest(launch.configs, r_pad) if widest else launch.configs
                    for config in configs:
                        name = launch.kernel.__name__
                        key = (name, dtype_name, r_pad, str(config), _constexpr_key(launch))
                        if key in seen:  # one kernel launched the same way by two cases
                            continue
                        seen.add(key)
                        ours = compile_for_hopper(launch.kernel, launch.args, config, ptxas)
                        tile = output_tile(config, r_pad)
                        tutorial = tutorial_resources(dtype, tile, config.num_stages, config.num_warps)
                        if progress is not None:
                            progress.update()
                        yield Row(case, name, dtype_name, r_pad, config, ours, tutorial)


def _constexpr_key(launch: Launch) -> tuple:
    return tuple(a for a in launch.args if isinstance(a, (bool, str)))


def format_row(row: Row) -> str:
    tile = "×".join(map(str, output_tile(row.config, row.r_pad)))
    flag = " SPILLS MORE" if row.spills_more else ""
    flag += " SHARED > H100" if row.too_much_shared else ""
    flag += " MAIN LOOP ≠ TUTORIAL" if row.main_loop_differs else ""
    loop = lambda r: f"{r.loop_wgmma} / {r.loop_cp_async}" if row.is_gemm else "–"  # noqa: E731
    return (
        f"| {row.case} | {row.kernel} | {row.dtype} | {row.r_pad} | {tile}, {row.config.num_stages}, "
        f"{row.config.num_warps} | {row.ours.registers} | {row.ours.spill_stores} / {row.ours.spill_loads} | "
        f"{row.ours.shared // 1024} | {loop(row.ours)} | {row.tutorial.registers} | {row.tutorial.spill_stores} | "
        f"{loop(row.tutorial)} |{flag}"
    )


HEADER = (
    "| case | kernel | dtype | R_PAD | tile (M×N×K), stages, warps | regs | spill st / ld (B) | smem (KiB) "
    "| main loop wgmma / cp.async | tutorial regs | tutorial spill st (B) | tutorial main loop wgmma / cp.async | |"
    "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


@dataclasses.dataclass(frozen=True)
class Arch:
    """A GPU architecture the arch report checks: Triton's target and the shared memory per block it offers."""

    target: GPUTarget
    shared_limit: int

    @property
    def is_cuda(self) -> bool:
        return self.target.backend == "cuda"


def _architectures() -> dict[str, Arch]:
    from lorafast.kernels.shared_memory import SHARED_MEMORY_PER_BLOCK as LIMITS

    hip_lds = 64 * 1024  # MI200 / MI300 (the arch report does not check it)
    return {
        "sm_80": Arch(GPUTarget("cuda", 80, 32), LIMITS["sm_80"]),
        "sm_86": Arch(GPUTarget("cuda", 86, 32), LIMITS["sm_86"]),
        "sm_89": Arch(GPUTarget("cuda", 89, 32), LIMITS["sm_89"]),
        "sm_90a": Arch(GPUTarget("cuda", 90, 32), LIMITS["sm_90"]),
        "gfx90a": Arch(GPUTarget("hip", "gfx90a", 64), hip_lds),
        "gfx942": Arch(GPUTarget("hip", "gfx942", 64), hip_lds),
    }


CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a")
HIP_ARCHS = ("gfx90a", "gfx942")


@dataclasses.dataclass(frozen=True)
class ArchRow:
    """One launch on one architecture: its kept configs with their shared memory (None: the front end failed)."""

    case: str
    kernel: str
    dtype: str
    r_pad: int
    flags: str
    arch: str
    shared_limit: int
    kept: tuple  # ((config, shared bytes or None), ...)
    error: str = ""  # the front end's error, if any

    @property
    def fitting(self) -> list:
        return [c for c, shared in self.kept if shared is not None and shared <= self.shared_limit]

    @property
    def ok(self) -> bool:
        """A CUDA launch keeps a config that fits; a ROCm launch passes the front end."""
        return not self.error and (bool(self.fitting) or not self.arch.startswith("sm_"))


QUICK_CASES = ("forward, dropout", "dA, dropout", "forward, dropout [cuBLAS]", "multi dA, dropout")


def arch_rows(dtypes, ranks, archs, kernel_filter: str = "", quick: bool = False, progress=None) -> Iterator[ArchRow]:
    """Compile every kept config of every selected (case, launch) for each of ``archs`` and yield a row per
    launch and architecture (a launch issued the same way by two cases once)."""
    from lorafast.kernels.launch import rank_block

    architectures = _architectures()
    seen = set()
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for r in ranks:
            cases = {**_one_adapter_cases(dtype, r), **_multi_adapter_cases(dtype, r)}
            cases.update(_epilogue_cases(cases))
            for case, run in cases.items():
                if (kernel_filter and kernel_filter not in case) or (quick and case not in QUICK_CASES):
                    continue
                with captured_launches() as launches:
                    run()
                for launch in launches:
                    name = launch.kernel.__name__
                    key = (name, dtype_name, rank_block(r), str(launch.pinned), _constexpr_key(launch))
                    if key in seen:
                        continue
                    seen.add(key)
                    flags = ", ".join(f"{k}={v}" for k, v in launch.named_args.items() if isinstance(v, bool) and v)
                    for arch_name in archs:
                        arch = architectures[arch_name]
                        # a ROCm target: the configs a launch tries first, through the front end
                        kept = launch.kept(arch.shared_limit) if arch.is_cuda else launch.tried[:1]
                        compiled, error = [], ""
                        for config in kept:
                            try:
                                shared = front_end_shared_memory(launch.kernel, launch.args, config, arch.target)
                            except Exception as exc:  # reported, and the exit status says it
                                last_line = ([""] + [line for line in str(exc).splitlines() if line.strip()])[-1]
                                shared, error = None, f"{type(exc).__name__}: {last_line.strip()[:200]}"
                            compiled.append((config, shared))
                            if progress is not None:
                                progress.update()
                        yield ArchRow(
                            case, name, dtype_name, rank_block(r), flags, arch_name, arch.shared_limit,
                            tuple(compiled), error,
                        )  # fmt: skip


def _tile(config: triton.Config) -> str:
    kw = config.kwargs
    sizes = "×".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_K") if k in kw)
    return f"{sizes}/{config.num_stages}/{config.num_warps}"


def format_arch_row(row: ArchRow) -> str:
    kept = ", ".join(f"{_tile(c)}: {'–' if s is None else s // 1024}" for c, s in row.kept) or "none"
    verdict = "ok" if row.ok else ("FRONT END FAILS " + row.error if row.error else "NO CONFIG FITS")
    return (
        f"| {row.case} | {row.kernel} | {row.dtype} | {row.r_pad} | {row.flags} | {row.arch} | {kept} | "
        f"{len(row.fitting)} | {verdict} |"
    )


ARCH_HEADER = (
    "| case | kernel | dtype | R_PAD | flags | arch | kept configs (BLOCKs/stages/warps: smem KiB) | fitting | |"
    "\n|---|---|---|---|---|---|---|---|---|"
)


def arch_report(opts) -> int:
    """Print the arch report; 1 if a launch has no fitting config on a CUDA arch or fails a front end."""
    from tqdm import tqdm

    archs = opts.arch or list(CUDA_ARCHS)
    dtypes = opts.dtype or (["bf16", "fp32"] if opts.quick else list(DTYPES))
    ranks = opts.rank or ([256] if opts.quick else [8, 16, 32, 64, 128, 256])
    with tqdm(desc=f"compiling for {', '.join(archs)}", unit="config", file=sys.stderr) as progress:
        rows = list(arch_rows(dtypes, ranks, archs, opts.kernel, opts.quick, progress))
    print(ARCH_HEADER)
    for row in rows:
        print(format_arch_row(row))
    launches = len({(r.case, r.kernel, r.dtype, r.r_pad, r.flags) for r in rows})
    print(f"\n{launches} launches ({', '.join(dtypes)}; ranks {', '.join(map(str, ranks))}; "
          f"{TOKENS} tokens × {IN_FEATURES} → {OUT_FEATURES}).")  # fmt: skip
    for arch in archs:
        failing = [r for r in rows if r.arch == arch and not r.ok]
        what = "fail the front end" if arch in HIP_ARCHS else "keep no config that fits"
        limit = next(r.shared_limit for r in rows if r.arch == arch) if rows else 0
        print(f"{arch} ({limit // 1024} KiB): {len(failing)} launches {what}.")
    return 0 if all(r.ok for r in rows) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="default: bf16 and fp32")
    parser.add_argument("--rank", type=int, action="append", help="LoRA rank(s) (default: 16 and 64)")
    parser.add_argument("--kernel", default="", help="only the cases whose name contains this")
    parser.add_argument("--widest", action="store_true", help="each kernel's widest tiles only")
    parser.add_argument(
        "--arch",
        nargs="*",
        choices=[*CUDA_ARCHS, *HIP_ARCHS],
        help=f"report which kept configs fit these architectures (no value: {', '.join(CUDA_ARCHS)})",
    )
    parser.add_argument("--quick", action="store_true", help="with --arch: a few representative launches (CI)")
    parser.add_argument(
        "--shape", nargs=3, type=int, metavar=("TOKENS", "IN", "OUT"), help="the layer (default: 1024 4096 4096)"
    )
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    if opts.shape:
        global TOKENS, IN_FEATURES, OUT_FEATURES
        TOKENS, IN_FEATURES, OUT_FEATURES = opts.shape
    if opts.arch is not None:
        return arch_report(opts)
    if bundled_ptxas() is None:
        parser.error("Triton's bundled ptxas (triton/backends/nvidia/bin) is missing")
    from tqdm import tqdm

    rows = []
    with tqdm(desc="compiling for sm_90a", unit="config", file=sys.stderr) as progress:
        rows = list(
            report_rows(opts.dtype or ["bf16", "fp32"], opts.rank or [16, 64], opts.kernel, opts.widest, progress)
        )
    print(HEADER)
    for row in rows:
        print(format_row(row))
    spilling = sum(row.spills_more for row in rows)
    oversized = sum(row.too_much_shared for row in rows)
    differing = sum(row.main_loop_differs for row in rows)
    gemms = sum(row.is_gemm and row.dtype != "fp32" for row in rows)
    print(f"\n{spilling} of {len(rows)} configs spill more than the tutorial matmul at the same tile; "
          f"{oversized} need more shared memory than an H100 ({HOPPER_SHARED_BYTES // 1024} KiB); "
          f"{differing} of {gemms} 2-byte GEMM configs issue a different wgmma count in the main loop "
          "than the tutorial's.")  # fmt: skip
    return 1 if spilling or oversized else 0


if __name__ == "__main__":
    sys.exit(main())
