"""One rank of the DDP test (``torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT``).

Each rank trains on its half of one batch under DistributedDataParallel (gloo); rank 0 saves the
averaged LoRA gradients to OUT for tests/test_ddp.py to compare with one process on the whole batch.
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from conftest import tiny_bart
from lorafast import apply_lora, lora_layers

VOCAB = 300


def build_model():
    """The same LoRA model on every rank: seeded base weights and seeded, non-zero adapters."""
    model = apply_lora(tiny_bart(vocab_size=VOCAB, seed=0), r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model.train()


def make_batch(size: int = 8) -> dict[str, torch.Tensor]:
    """Token ids without padding, so every half of the batch has as many label tokens."""
    g = torch.Generator().manual_seed(2)
    return {
        "input_ids": torch.randint(5, VOCAB, (size, 24), generator=g),
        "labels": torch.randint(5, VOCAB, (size, 12), generator=g),
    }


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(build_model())
    shard = {k: v.chunk(world)[rank] for k, v in make_batch().items()}
    model(**shard).loss.backward()
    if rank == 0:
        grads = {n: p.grad for n, p in model.module.named_parameters() if p.requires_grad}
        trainable = sum(p.numel() for p in model.module.parameters() if p.requires_grad)
        torch.save({"grads": grads, "trainable": trainable}, out)
    dist.barrier()  # every rank is done before any leaves
    # Leave without tearing DDP down: freeing its Reducer while holding the GIL can deadlock with
    # gloo's worker thread, which needs the GIL to free its last work item (seen with torch 2.13,
    # about one run in four after torch.compile ran in the parent process).
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
