"""How long a cold Triton cache takes to compile the kernel variants ``bench/gpu.sh``'s steps build, measured offline.

Two phases, as ``bench/gpu.sh --dry-run`` runs its steps (``TRITON_INTERPRET=1 LORAFAST_BACKEND=triton
LORAFAST_BENCH_DRY_RUN=1``, checkout on ``PYTHONPATH``):

    python bench/cold_compile.py record tests.jsonl tests/test_cuda.py
    python bench/cold_compile.py record bench.jsonl --benchmark --ignore bench/test_qlora_bench.py bench
    python bench/cold_compile.py record qlora.jsonl --benchmark bench/test_qlora_bench.py
    TRITON_INTERPRET=0 python bench/cold_compile.py compile tests.jsonl bench.jsonl qlora.jsonl

``record`` runs pytest on a step with every ``launch`` of the kernel launchers recorded (kernel, argument dtypes,
shapes and strides, scalars, the pinned config or how the config is chosen). ``compile`` rebuilds each launch's
arguments as CPU tensors and builds, with ``triton.compile`` for sm_90 into an empty cache, every variant a GPU run of
that step would compile: for an autotuned launch every config the autotuner keeps, pruned as for a large layer (the
token bucket and N at their maximum, which keeps the most tiles: an upper bound); under ``LORAFAST_AUTOTUNE=0``
(tests/test_cuda.py) the configs the autotuner keeps, in order, until one fits an H100's shared memory (as ``launch``
does); a pinned config alone.
Variants are counted once over all steps, in order (Triton's cache keeps them across steps). It prints the count and
CPU seconds (this process and ptxas: what a compile takes on an idle core; wall time beside) per step and kernel.
The dry run's shapes are small; a variant depends on shapes only through divisibility by 16 and the pruning, so the
count holds for the GPU run's shapes. Kernels launched outside ``launch`` (the dropout mask
helper, the mixed-adapter gradient's chunk sum) are not counted.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import sys
import tempfile
import time

HOPPER_SHARED_BYTES = 227 * 1024


def _encode(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": [str(value.dtype).removeprefix("torch."), list(value.shape), list(value.stride())]}
    return {"value": value}


def record(path: str, pytest_args: list[str]) -> int:
    """Run pytest on ``pytest_args`` in this process, appending every launch to ``path`` (JSON lines)."""
    import pytest

    class Recorder:
        def pytest_configure(self, config):
            import lorafast.kernels  # noqa: F401 (imports every launcher module)

            for name, module in list(sys.modules.items()):
                real = getattr(module, "launch", None)
                if name.startswith("lorafast.kernels.") and callable(real) and name != "lorafast.kernels.launch":
                    module.launch = self.recording(real)

        def recording(self, real):
            def launch(kernel, tuned_kernel, grid, args, config):
                if config is not None:
                    how = {"pinned": [config.kwargs, config.num_warps, config.num_stages]}
                elif os.environ.get("LORAFAST_AUTOTUNE", "1") == "0":
                    how = {"first_fit": True}
                else:
                    how = {"autotuned": True}
                entry = {"kernel": [kernel.fn.__module__, kernel.fn.__name__], "args": [_encode(a) for a in args]}
                with open(path, "a") as out:
                    out.write(json.dumps(entry | how) + "\n")
                return real(kernel, tuned_kernel, grid, args, config)

            return launch

    return pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args], plugins=[Recorder()])


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas): what a compile costs on an idle core."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _variants(entry):
    """``(kernel, args, configs, first_fit)`` of a recorded launch, its arguments rebuilt on CPU."""
    import torch
    import triton
    from triton.runtime.autotuner import Autotuner

    module = importlib.import_module(entry["kernel"][0])
    kernel = getattr(module, entry["kernel"][1])
    tuned = next(v for v in vars(module).values() if isinstance(v, Autotuner) and v.fn is kernel)
    args = tuple(
        torch.empty_strided(a["tensor"][1], a["tensor"][2], dtype=getattr(torch, a["tensor"][0]))
        if "tensor" in a
        else a["value"]
        for a in entry["args"]
    )
    if "pinned" in entry:
        kwargs, warps, stages = entry["pinned"]
        return kernel, args, [triton.Config(kwargs, num_warps=warps, num_stages=stages)], False
    named = dict(zip(kernel.arg_names, args))
    prune = tuned.early_config_prune or (lambda configs, named: configs)
    if "first_fit" in entry:  # as launch() without autotuning: the kept configs in order, until one fits
        return kernel, args, list(prune(tuned.configs, named) or tuned.configs), True
    named.update({k: 1 << 16 for k in ("M_BUCKET", "N") if k in named})  # the most tiles the pruning keeps
    return kernel, args, list(prune(tuned.configs, named)), False


def compile_all(paths: list[str]) -> int:
    """Compile every variant the recorded steps build, for sm_90 into an empty cache; print counts and seconds."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lorafast-cold-")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    seen, grand_total, grand_cpu, grand_count = set(), 0.0, 0.0, 0
    for path in paths:
        per_kernel = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # count, wall s, slowest CPU s, CPU s
        with open(path) as lines:
            entries = [json.loads(line) for line in lines]
        for entry in entries:
            kernel, args, configs, first_fit = _variants(entry)
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            for config in configs:
                kwargs = config.all_kwargs()
                bound, specialization, options = binder(*args, **kwargs)
                packed = kernel._pack_args(backend, kwargs, bound, specialization, options)
                options, signature, constexprs, attrs = packed
                key = (kernel.__name__, *map(str, packed[1:]), config.num_warps, config.num_stages)
                if key in seen:  # compiled before (a first fit then found fitting or not): counted once
                    fits = True
                else:
                    seen.add(key)
                    start, cpu_start = time.perf_counter(), _cpu_seconds()
                    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                              options=options.__dict__)  # fmt: skip
                    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
                    stats = per_kernel[kernel.__name__]
                    stats[0], stats[1], stats[2], stats[3] = (
                        stats[0] + 1,
                        stats[1] + seconds,
                        max(stats[2], cpu),
                        stats[3] + cpu,
                    )
                    fits = compiled.metadata.shared <= HOPPER_SHARED_BYTES
                if first_fit and fits:
                    break
        count = sum(s[0] for s in per_kernel.values())
        total, cpu = sum(s[1] for s in per_kernel.values()), sum(s[3] for s in per_kernel.values())
        grand_count, grand_total, grand_cpu = grand_count + count, grand_total + total, grand_cpu + cpu
        print(f"{path}: {len(entries)} launches, {count} new variants, {cpu:.1f} CPU s ({total:.1f} s wall)")
        for name, (n, _, slowest, spent) in sorted(per_kernel.items(), key=lambda kv: -kv[1][3]):
            print(f"  {name}: {n} variants, {spent:.1f} CPU s ({spent / n:.2f} s each, slowest {slowest:.2f} s)")
    print(
        f"all steps: {grand_count} variants, {grand_cpu:.1f} CPU s of compilation for sm_90 ({grand_total:.1f} s wall)"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["record", "compile"])
    parser.add_argument("paths", nargs="+", help="record: the JSONL file, then pytest's arguments; compile: the files")
    opts, rest = parser.parse_known_args(argv)
    if opts.phase == "record":
        return record(opts.paths[0], opts.paths[1:] + rest)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("compile: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    return compile_all(opts.paths)


if __name__ == "__main__":
    sys.exit(main())
