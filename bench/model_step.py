"""One training step of a BART-base-shaped model on real SumPubMed text, for full, PEFT and lorafast.

Used by ``test_model_bench.py``, which times the configurations interleaved in one process, and,
as a script, to measure one configuration's peak memory in a process of its own (on CPU the peak
resident memory of a process is the only clean peak there is):

    python bench/model_step.py --method lorafast --targets all --dropout 0.1 --tokenizer DIR
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))

import bpe_tokenizer  # noqa: E402
import model_setup  # noqa: E402
import sumpubmed  # noqa: E402

# The shared sample beside the checkout; LORAFAST_SUMPUBMED points elsewhere (e.g. a copy carried to a GPU machine).
SUMPUBMED = Path(os.environ.get("LORAFAST_SUMPUBMED", REPO.parent / "shared" / "sumpubmed"))
TARGETS = {"q,v": ["q_proj", "v_proj"], "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
# LORAFAST_BENCH_DRY_RUN=1 (bench/gpu.sh --dry-run): the smallest preset and batch, the same steps.
DRY_RUN = os.environ.get("LORAFAST_BENCH_DRY_RUN") == "1"
MODEL = "random:tiny" if DRY_RUN else "random:base"
BATCH, SOURCE_TOKENS, TARGET_TOKENS = (2, 64, 16) if DRY_RUN else (4, 512, 128)
CONFIGS = [("full", "all", 0.0)] + [
    (method, targets, dropout)
    for targets in ("q,v", "all")
    for dropout in (0.0, 0.1)
    for method in ("peft", "lorafast")
]


def make_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer trained on SumPubMed text (the Hub's BART tokenizer is offline)."""
    if not (directory / "tokenizer.json").is_file():
        documents, _ = sumpubmed.load_release(SUMPUBMED)
        texts = [t for d in documents[:300] for t in (d.text, d.summary)]
        bpe_tokenizer.train_tokenizer(texts, vocab_size=8000).save_pretrained(directory)
    return directory


def make_batch(tokenizer_dir: Path, device) -> dict[str, torch.Tensor]:
    """4 articles truncated to 512 tokens and their abstracts to 128: the issue's step shape."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    documents, _ = sumpubmed.load_release(SUMPUBMED)
    documents = [d for d in documents if len(d.text) > 8 * SOURCE_TOKENS][:BATCH]  # long enough to fill 512
    batch = tokenizer(
        [d.text for d in documents], max_length=SOURCE_TOKENS, truncation=True, padding="max_length",
        return_tensors="pt",
    )  # fmt: skip
    labels = tokenizer(
        text_target=[d.summary for d in documents], max_length=TARGET_TOKENS, truncation=True,
        padding="max_length", return_tensors="pt",
    )["input_ids"]  # fmt: skip
    batch["labels"] = labels.masked_fill(labels == tokenizer.pad_token_id, -100)
    return {k: v.to(device) for k, v in batch.items()}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())


def build(config: tuple[str, str, float], tokenizer_dir: Path, device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The seeded random BART-base-shaped model prepared for ``config`` and its AdamW."""
    method, targets, dropout = config
    torch.manual_seed(0)
    model, _, _ = model_setup.load_model(MODEL, tokenizer_dir)
    model = model_setup.prepare(model, method, r=8, alpha=16, dropout=dropout, targets=TARGETS[targets])
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def train_step(model, optimizer, batch) -> None:
    """Forward, backward and optimizer step."""
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if batch["labels"].is_cuda
        else torch.autocast("cpu", enabled=False)
    )
    with autocast:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=model_setup.METHODS, required=True)
    parser.add_argument("--targets", choices=sorted(TARGETS), required=True)
    parser.add_argument("--dropout", type=float, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = make_batch(args.tokenizer, device)
    model, optimizer = build((args.method, args.targets, args.dropout), args.tokenizer, device)
    for _ in range(args.steps):
        train_step(model, optimizer, batch)
    print(json.dumps({"peak_rss_bytes": peak_resident_bytes()}))


def peak_resident_bytes() -> int:
    """This process's peak resident memory (VmHWM; ru_maxrss would count the forking parent's too)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
