"""What the GPU target allows, decided from the target alone (made-up targets on CPU): tl.dot precision (IEEE for
2-byte inputs, TF32 for fp32 only where torch allows it and the target has it) and whether ``auto`` takes the
Triton kernels on a ROCm architecture."""

import logging

import pytest
import torch
from triton.backends.compiler import GPUTarget

from lorafast.kernels import targets
from lorafast.kernels.launch import dot_precision

CUDA = [GPUTarget("cuda", capability, 32) for capability in (80, 86, 89, 90)]
MI200, MI300, MI350, RADEON = (GPUTarget("hip", arch, 64) for arch in ("gfx90a", "gfx942", "gfx950", "gfx1100"))


@pytest.fixture
def tf32(monkeypatch):
    """Set whether torch allows TF32 for fp32 matmuls (restored afterwards)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    yield lambda allowed: setattr(matmul, "allow_tf32", allowed)
    matmul.allow_tf32 = saved


def test_tf32_exists_on_every_cuda_target_and_on_rocm_only_on_gfx942():
    assert all(targets.has_tf32(target) for target in CUDA)
    assert targets.has_tf32(MI300)
    assert not any(targets.has_tf32(target) for target in (MI200, MI350, RADEON))


@pytest.mark.parametrize("target", [*CUDA, MI200, MI300, MI350, RADEON, None], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_byte_inputs_take_ieee_everywhere(tf32, target, dtype):
    for allowed in (True, False):
        tf32(allowed)
        assert dot_precision(dtype, target) == "ieee"


def test_fp32_takes_tf32_only_where_allowed_and_the_target_has_it(tf32):
    tf32(True)
    assert [dot_precision(torch.float32, t) for t in (*CUDA, MI300)] == ["tf32"] * 5
    assert [dot_precision(torch.float32, t) for t in (MI200, MI350, RADEON)] == ["ieee"] * 3
    tf32(False)
    assert {dot_precision(torch.float32, t) for t in (*CUDA, MI200, MI300)} == {"ieee"}


def test_without_a_gpu_fp32_follows_torch_alone(tf32):
    tf32(True)
    assert targets.current_target() is None and dot_precision(torch.float32) == "tf32"


@pytest.mark.parametrize("name", ["gfx90a", "gfx90a:sramecc+:xnack-", "gfx942:sramecc+:xnack-", "GFX942"])
def test_auto_takes_triton_on_the_rocm_architectures_the_kernels_build_for(name, caplog):
    with caplog.at_level(logging.WARNING):
        assert targets.hip_backend("auto", name) == "triton"
        assert targets.hip_backend("triton", name) == "triton"
    assert not caplog.records


@pytest.mark.parametrize("name", ["gfx1100", "gfx1030:xnack-", "gfx908:sramecc+:xnack-", "gfx950"])
def test_auto_takes_pytorch_elsewhere_with_one_log_line(name, caplog):
    targets._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=targets.__name__):
        assert targets.hip_backend("auto", name) == "torch"
        assert targets.hip_backend("auto", name) == "torch"
    assert len(caplog.records) == 1
    assert targets.hip_arch(name) in caplog.text and "PyTorch path" in caplog.text


def test_forced_triton_on_an_unsupported_rocm_architecture_says_how_to_run():
    with pytest.raises(ValueError, match=r"gfx1100.*LORAFAST_BACKEND=torch"):
        targets.hip_backend("triton", "gfx1100")


@pytest.mark.parametrize("name,expected", [("gfx942:sramecc+:xnack-", "triton"), ("gfx1100", "torch")])
def test_resolve_backend_asks_the_rocm_devices_architecture(monkeypatch, name, expected):
    from types import SimpleNamespace

    import lorafast.kernels
    from lorafast.backend import resolve_backend

    monkeypatch.setattr(lorafast.kernels, "INTERPRETED", False)  # as on a ROCm machine
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(gcnArchName=name))
    monkeypatch.delenv("LORAFAST_BACKEND", raising=False)
    assert resolve_backend(torch.device("cuda", 0), torch.bfloat16, 16) == expected
