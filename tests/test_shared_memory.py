"""The prunes as pure functions of the launch's arguments and a GPU's shared memory per block: every launch keeps a
config within the limit of every architecture lorafast supports, small-smem tiles only where nothing else fits, and
no config at all raises before anything runs. (That the estimate bounds the real compile is what
``bench/kernel_report.py --arch`` checks.)"""

import pytest
import torch
from triton.runtime.errors import OutOfResources

from lorafast.kernels import shared_memory
from lorafast.kernels.dropout_xa import dropout_xa_tuned
from lorafast.kernels.fused_lora_matmul import fused_lora_matmul_tuned
from lorafast.kernels.launch import (
    SMALL_GEMM_TILES,
    epilogue_config,
    gemm_shared_memory,
    projection_tiles,
    weight_grad_tiles,
)
from lorafast.kernels.lora_weight_grad import lora_weight_grad_tuned
from lorafast.kernels.multi_dropout_xa import multi_dropout_xa_tuned
from lorafast.kernels.multi_lora_matmul import SMALL_TILES as MULTI_SMALL_TILES
from lorafast.kernels.multi_lora_matmul import _shared_memory as multi_shared_memory
from lorafast.kernels.multi_lora_matmul import multi_lora_matmul_tuned
from lorafast.kernels.multi_lora_weight_grad import multi_lora_weight_grad_tuned
from lorafast.kernels.shared_memory import SHARED_MEMORY_PER_BLOCK, shared_memory_need

LIMITS = sorted(set(SHARED_MEMORY_PER_BLOCK.values()))
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
R_PADS = [16, 32, 64, 128, 256]


def _skinny_need(pointer, tiles):
    def need(config, args, limit):
        element_size = args[pointer].element_size()
        return shared_memory_need(config, element_size, tiles(config.kwargs, args["R_PAD"]), [], limit)

    return need


def _gemm_need(config, args, limit):
    return gemm_shared_memory(config, args["u_ptr"].element_size(), args["R_PAD"], limit)


def _multi_need(config, args, limit):
    return multi_shared_memory(config, args["u_ptr"].element_size(), args, limit)


# (autotuned kernel, the pointer whose dtype counts, the boolean flags of its launches, the estimate)
KERNELS = {
    "fused_lora_matmul": (fused_lora_matmul_tuned, "u_ptr", ["DROPOUT", "HAS_COL_SCALE", "HAS_BIAS"], _gemm_need),
    "dropout_xa": (dropout_xa_tuned, "x_ptr", ["DROPOUT"], _skinny_need("x_ptr", projection_tiles)),
    "lora_weight_grad": (lora_weight_grad_tuned, "u_ptr", ["DROPOUT"], _skinny_need("u_ptr", weight_grad_tiles)),
    "multi_dropout_xa": (multi_dropout_xa_tuned, "x_ptr", ["DROPPED_ONLY"], _skinny_need("x_ptr", projection_tiles)),
    "multi_lora_weight_grad": (
        multi_lora_weight_grad_tuned, "u_ptr", ["DROPOUT"], _skinny_need("u_ptr", weight_grad_tiles),
    ),
    "multi_lora_matmul": (
        multi_lora_matmul_tuned, "u_ptr", ["WRITE_C", "UP_GIVEN", "DROPOUT_UP", "DROPOUT_C", "EQUAL_RANKS"],
        _multi_need,
    ),
}  # fmt: skip


def _launch_args(pointer, dtype, r_pad, flags, on):
    args = {pointer: torch.empty(0, dtype=dtype), "R_PAD": r_pad, "M_BUCKET": 512, "N": 1024}
    args.update({flag: flag in on for flag in flags})
    return args


def _flag_sets(flags):
    """No flag, each flag alone, all of them."""
    return [set(), *({flag} for flag in flags), set(flags)]


@pytest.mark.parametrize("name", KERNELS)
def test_every_launch_keeps_a_config_within_every_architectures_shared_memory(name):
    tuned, pointer, flags, need = KERNELS[name]
    prune = tuned.early_config_prune.prune
    for limit in LIMITS:
        for dtype in DTYPES:
            for r_pad in R_PADS:
                for on in _flag_sets(flags):
                    args = _launch_args(pointer, dtype, r_pad, flags, on)
                    kept = prune(tuned.configs, args, limit)
                    assert kept, (limit, dtype, r_pad, on)
                    assert all(need(c, args, limit) <= limit for c in kept), (limit, dtype, r_pad, on)
                    assert all(c in tuned.configs for c in kept)


def test_small_tiles_only_where_no_regular_tile_fits():
    prune = fused_lora_matmul_tuned.early_config_prune.prune
    configs = fused_lora_matmul_tuned.configs
    bf16, fp32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0)
    hopper, rtx = SHARED_MEMORY_PER_BLOCK["sm_90"], SHARED_MEMORY_PER_BLOCK["sm_86"]
    assert not any(c in SMALL_GEMM_TILES for c in prune(configs, {"u_ptr": bf16, "R_PAD": 16}, hopper))
    assert not any(c in SMALL_GEMM_TILES for c in prune(configs, {"u_ptr": bf16, "R_PAD": 256}, rtx))
    # fp32 at rank 256: the regular 64×128 tile's (64 + 128)·256·4 B epilogue operands exceed even an H100
    assert all(c in SMALL_GEMM_TILES for c in prune(configs, {"u_ptr": fp32, "R_PAD": 256}, hopper))
    kept = prune(configs, {"u_ptr": fp32, "R_PAD": 256}, rtx)
    assert [c.kwargs["BLOCK_M"] for c in kept] == [32]  # the 64×64 small tile needs 128 KiB there
    multi = multi_lora_matmul_tuned.early_config_prune.prune
    kept = multi(multi_lora_matmul_tuned.configs, {"u_ptr": fp32, "R_PAD": 256}, rtx)
    assert kept and all(c in MULTI_SMALL_TILES for c in kept)


def test_the_hopper_tiles_stay_for_hopper():
    prune = fused_lora_matmul_tuned.early_config_prune.prune
    args = {"u_ptr": torch.empty(0, dtype=torch.bfloat16), "R_PAD": 16}
    hopper = prune(fused_lora_matmul_tuned.configs, args, SHARED_MEMORY_PER_BLOCK["sm_90"])
    assert any(c.kwargs["BLOCK_N"] == 256 for c in hopper)  # the 128×256×64, 3-stage tile: 144 KiB of pipeline
    rtx = prune(fused_lora_matmul_tuned.configs, args, SHARED_MEMORY_PER_BLOCK["sm_86"])
    assert rtx and not any(c.kwargs["BLOCK_N"] == 256 for c in rtx)


@pytest.mark.parametrize("name", KERNELS)
def test_nothing_fits_raises_before_any_launch(name):
    tuned, pointer, flags, _ = KERNELS[name]
    args = _launch_args(pointer, torch.float32, 256, flags, set(flags))
    with pytest.raises(OutOfResources, match="shared memory"):
        tuned.early_config_prune.prune(tuned.configs, args, 16 * 1024)


def test_the_autotuner_prunes_with_the_launchs_gpu_limit(monkeypatch):
    seen = []
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda args: seen.append(args) or 40 * 1024)
    args = {"x_ptr": torch.empty(0, dtype=torch.bfloat16), "R_PAD": 256, "DROPOUT": True}
    kept = dropout_xa_tuned.early_config_prune(dropout_xa_tuned.configs, args)
    assert seen and kept == dropout_xa_tuned.early_config_prune.prune(dropout_xa_tuned.configs, args, 40 * 1024)
    assert kept == [c for c in dropout_xa_tuned.configs if c.num_stages == 2]  # only the 2-stage small tile fits


def test_cpu_tensors_are_pruned_for_an_h100():
    assert shared_memory.shared_memory_limit({"x_ptr": torch.empty(0)}) == SHARED_MEMORY_PER_BLOCK["sm_90"]


def test_need_counts_the_epilogue_beside_the_loop_only_above_an_a100():
    config = fused_lora_matmul_tuned.configs[0]  # 128×256×64, 3 stages
    loop, epilogue = 3 * (128 * 64 + 64 * 256) * 2, (128 * 256 + 256 * 256) * 2
    assert gemm_shared_memory(config, 2, 256, SHARED_MEMORY_PER_BLOCK["sm_90"]) == loop + epilogue
    assert gemm_shared_memory(config, 2, 256, SHARED_MEMORY_PER_BLOCK["sm_80"]) == max(loop, epilogue)


@pytest.mark.parametrize("r_pad", R_PADS)
@pytest.mark.parametrize("element_size", [2, 4])
def test_the_k0_epilogue_tile_fits_every_architecture(r_pad, element_size):
    config = epilogue_config(64, r_pad, element_size)
    assert config.kwargs["BLOCK_M"] == 64 and config.num_stages == 2
    shared = (64 + config.kwargs["BLOCK_N"]) * r_pad * element_size  # its only operands: no main loop
    assert shared <= min(LIMITS)
    assert config.kwargs["BLOCK_N"] == 128 or (64 + 2 * config.kwargs["BLOCK_N"]) * r_pad * element_size > min(LIMITS)
