"""No device→host synchronisation in DoRA's backward: whether m has a zero comes from the forward's flag
(``dora.ZeroFlag``, copied to the host asynchronously on CUDA), the one host read allowed."""

import pytest
import test_multi_sync
import torch

from conftest import make_inputs
from lorafast.dora import dora_linear


@pytest.mark.parametrize("zero", [False, True])
def test_dora_backward_reads_nothing_on_the_host_but_the_forwards_flag(backend, monkeypatch, zero):
    x, w, b, a, bb = make_inputs((12,), 16, 20, 4)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    m = (torch.rand(20) + 0.5).index_fill_(0, torch.tensor([3]), 0.0 if zero else 1.0).requires_grad_()
    y = dora_linear(x, w, b, a, bb, m, 2.0)
    monkeypatch.setattr(test_multi_sync, "ALLOWED", test_multi_sync.ALLOWED | {("dora.py", "__call__")})
    with test_multi_sync.no_host_reads() as offences:
        grads = torch.autograd.grad(y, (x, a, bb, m), torch.ones_like(y))
    assert not offences and all(g is not None for g in grads)
