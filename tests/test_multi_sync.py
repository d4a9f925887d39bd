"""No device→host synchronisation in a mixed-adapter forward and backward, on both backends.

On CPU the Triton path runs under the interpreter; every Tensor method that reads a value on
the host (and so would wait for a GPU) is made to fail when lorafast's own code calls it.
"""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

import lorafast
import lorafast.kernels
from lorafast import adapter_ids, add_adapter, multi_lora_layers
from lorafast import kernels as kernel_modules
from lorafast.multi_function import row_adapter_ids

HOST_READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "numpy", "cpu")
LORAFAST_CODE = (Path(lorafast.__file__).resolve().parent, Path(lorafast.kernels.__file__).resolve().parent)
# The dropout seed is drawn from torch's CPU generator: a host value, no device involved.
ALLOWED = {("dropout.py", "draw_seed")}


@contextlib.contextmanager
def no_host_reads():
    """Within the block, ``Tensor.item`` & co. and ``torch.tensor`` raise when lorafast's code calls them."""
    offences = []

    def guarded(name, original):
        def wrapper(*args, **kwargs):
            code = sys._getframe(1).f_code
            path = Path(code.co_filename).resolve()
            if any(path.is_relative_to(root) for root in LORAFAST_CODE) and (path.name, code.co_name) not in ALLOWED:
                offences.append(f"{name} in {path.name}:{sys._getframe(1).f_lineno} ({code.co_name})")
                raise AssertionError(f"host read: {offences[-1]}")
            return original(*args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, guarded(name, getattr(torch.Tensor, name)))
        patch.setattr(torch, "tensor", guarded("torch.tensor", torch.tensor))  # a host list copied to the device
        yield offences


def test_the_guard_catches_a_host_read_in_lorafast_code():
    with no_host_reads() as offences, pytest.raises(AssertionError, match="host read"):
        row_adapter_ids(torch.tensor([0, 1]), (2, 4), 2)  # range check on (CPU) ids: int(ids.min())
    assert offences and "multi_function.py" in offences[0]
    with no_host_reads() as offences:
        assert torch.ones(1).item() == 1.0  # from elsewhere: allowed
    assert not offences


def _model(dropout):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    for name, r, p in zip(("a", "b", "c"), (2, 4, 3), dropout):
        add_adapter(model, name, r=r, dropout=p, target_modules=["0", "2"])
    with torch.no_grad():
        for _, layer in multi_lora_layers(model):
            for b in layer.lora_B.values():
                b.normal_()
    return model


@pytest.mark.parametrize("dropout", [(0.0, 0.0, 0.0), (0.1, 0.0, 0.2)])
def test_mixed_forward_and_backward_read_nothing_on_the_host(backend, monkeypatch, dropout):
    calls = []
    # the entries lorafast.backend.implementation hands the autograd Function
    implementation = lorafast.kernels.multi_lora_linear if backend == "triton" else lorafast.multi_torch_backend
    prefix = "" if backend == "triton" else "multi_lora_"
    for name in ("forward", "backward"):
        original = getattr(implementation, prefix + name)
        monkeypatch.setattr(
            implementation, prefix + name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    model = _model(dropout).train()
    x = torch.randn(4, 5, 24)
    with adapter_ids(model, ["b", None, "a", "c"]):  # warm-up: the adapters' device values are made once
        model(x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with adapter_ids(model, ["b", None, "a", "c"]):
        torch.manual_seed(1)
        with no_host_reads() as offences:
            loss = model(x.requires_grad_()).square().sum()
            loss.backward()
    assert not offences
    assert calls.count("forward") == 4 and calls.count("backward") == 4  # the backend ran
    assert x.grad is not None and all(p.grad is not None for n, p in model.named_parameters() if n in want)
    if not any(dropout):  # the same batch without the guard gives the same gradients
        for name, grad in want.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad)


def test_row_tables_are_built_once_per_batch_and_row_count_shared_by_layers_and_backward(monkeypatch):
    monkeypatch.setenv("LORAFAST_BACKEND", "triton")
    builds = []
    for module in (
        kernel_modules.adapter_segments,
        kernel_modules.multi_lora_linear,
        kernel_modules.multi_lora_weight_grad,
    ):
        if hasattr(module, "adapter_segments"):
            original = module.adapter_segments
            monkeypatch.setattr(
                module, "adapter_segments", lambda *a, _f=original, **k: builds.append(a[0].shape[0]) or _f(*a, **k)
            )
    model = _model((0.0, 0.0, 0.0)).train()
    with adapter_ids(model, ["b", None, "a"]):
        model(torch.randn(3, 5, 24)).sum().backward()  # two layers, forward and backward: one table
        assert builds == [15]
        model(torch.randn(3, 2, 24)).sum().backward()  # another row count: another table
        model(torch.randn(3, 5, 24)).sum().backward()  # the first still cached
        assert builds == [15, 6]
    with adapter_ids(model, ["b", None, "a"]):  # a new block: new tables
        model(torch.randn(3, 5, 24)).sum().backward()
    assert builds == [15, 6, 15]
