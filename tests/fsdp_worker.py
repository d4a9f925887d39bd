"""One rank of the FSDP2 test (``torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT``).

A small Llama-style model with lorafast LoRA on all linear layers is sharded with FSDP2
(``fully_shard``: each decoder layer, then the whole model; the frozen base is sharded too, only
A and B train). Each rank trains on its half of every batch; rank 0 saves the loss curve and the
final LoRA factors to OUT for tests/test_fsdp.py to compare with one process on the whole batches.
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from tiny_models import VOCAB, tiny_llama
from torch.distributed.fsdp import fully_shard

import lorafast

STEPS = 3


def build_model():
    """The same LoRA model on every rank: seeded base weights and seeded, non-zero adapters."""
    model = lorafast.apply_lora(tiny_llama(seed=0), target_modules="all-linear", r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lorafast.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model.train()


def make_batch(step: int, size: int = 4) -> dict[str, torch.Tensor]:
    """Token ids without padding, so every half of the batch has as many label tokens."""
    g = torch.Generator().manual_seed(10 + step)
    ids = torch.randint(3, VOCAB, (size, 10), generator=g)
    return {"input_ids": ids, "labels": ids}


def train(model, batches) -> list[float]:
    """AdamW steps over ``batches``; the loss of each step (averaged over ranks when distributed)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        if dist.is_initialized():
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    return losses


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    shards = [{k: v.chunk(world)[rank] for k, v in make_batch(step).items()} for step in range(STEPS)]
    losses = train(model, shards)
    factors = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    frozen = sum(p.to_local().numel() for p in model.parameters() if not p.requires_grad)
    if rank == 0:
        torch.save({"losses": losses, "factors": factors, "local_frozen": frozen}, out)
    dist.barrier()  # no rank tears down gloo while another still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # In CI runs of the whole suite a rank has now and then aborted in C++ teardown ("terminate called without an
    # active exception") after its work was done; the results are written, so skip the interpreter's teardown.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
