"""Pretrain a small BART here with BART's denoising objective, on the training split's texts only.

    python train/pretrain.py --data ../shared/sumpubmed --preset tiny --output-dir runs/pretrained-tiny

Text infilling (Poisson(λ=3) spans, 30 % of the tokens, each span one ``<mask>``) and sentence
permutation (``train/denoising.py``) on passages of the training documents' articles and abstracts; the
validation and test documents are never read. The byte-level BPE tokenizer is trained on the same
texts. ``--output-dir`` receives the model and tokenizer (``save_pretrained``: ``--model <folder>`` of
``finetune.py`` loads it), ``log.jsonl``, ``loss_curve.png`` and ``checkpoint/`` for ``--resume``.
``finetune.py --model pretrained:tiny`` builds this once into a cache folder and reuses it afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bpe_tokenizer
import denoising
import loss_plot
import summary_scoring
import sumpubmed


@dataclass(frozen=True)
class Preset:
    """A model size and the pretraining budget that goes with it."""

    d_model: int
    layers: int  # encoder and decoder each
    heads: int
    ffn_dim: int
    vocab_size: int
    steps: int
    batch_size: int = 16
    max_length: int = 256  # passage tokens, <s> and </s> included
    lr: float = 4e-4
    sentences_per_document: int = 64  # the corpus: each training text's first sentences


PRESETS = {
    "tiny": Preset(d_model=192, layers=2, heads=4, ffn_dim=768, vocab_size=4000, steps=1500, max_length=128),
    "micro": Preset(d_model=64, layers=1, heads=2, ffn_dim=128, vocab_size=1000, steps=20, batch_size=4, lr=3e-3,
                    max_length=64, sentences_per_document=8),  # for tests
}  # fmt: skip
_MAX_POSITIONS = 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="SumPubMed release folder or anything finetune.py's --data takes")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size and pretraining budget")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--max-docs", type=int, default=None, help="use at most this many training documents")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def training_texts(documents: list[sumpubmed.Document]) -> list[str]:
    """The articles and abstracts of the training split (never a validation or test document)."""
    return [t for d in sumpubmed.select_split(documents, "train") for t in (d.text, d.summary.replace("\n", " "))]


def corpus_fingerprint(documents: list[sumpubmed.Document], preset: str, steps: int, seed: int) -> str:
    """A short hash of what a pretrained base depends on: the training documents and the settings."""
    digest = hashlib.sha256(f"{preset}|{PRESETS[preset]}|{steps}|{seed}".encode())
    for d in sumpubmed.select_split(documents, "train"):
        digest.update(f"{d.doc_id}\0{len(d.text)}\0".encode())
    return digest.hexdigest()[:12]


def first_sentences(texts: list[str], per_text: int) -> list[list[str]]:
    """Each text's first ``per_text`` sentences: the pretraining corpus."""
    return [summary_scoring.sentence_lines(t).splitlines()[:per_text] for t in texts]


def sentence_ids(tokenizer, sentences: list[list[str]]) -> list[list[list[int]]]:
    """Each text's sentences as token ids (each with its leading space, as inside a text)."""
    sentences = [[" " + s for s in group] for group in sentences]
    flat = tokenizer([s for group in sentences for s in group], add_special_tokens=False)["input_ids"]
    out, start = [], 0
    for group in sentences:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return [doc for doc in out if doc]


def make_batch(
    corpus: list[list[list[int]]], tokenizer, preset: Preset, seed: int, step: int
) -> dict[str, torch.Tensor]:
    """The denoising batch of ``step``: a pure function of (seed, step), so a resumed run sees the same data."""
    rng = np.random.default_rng([seed, step])
    sources, targets = [], []
    for doc_index in rng.integers(len(corpus), size=preset.batch_size):
        sentences = corpus[doc_index]
        start = 0 if rng.random() < 0.25 else int(rng.integers(len(sentences)))  # often the text's opening
        chosen = denoising.passage(sentences, start, preset.max_length - 2)
        source, target = denoising.denoising_pair(
            chosen, rng, mask_id=tokenizer.mask_token_id, bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
        )  # fmt: skip
        sources.append(source)
        targets.append(target)

    def pad(rows, value):
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    input_ids = pad(sources, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": (input_ids != tokenizer.pad_token_id).long(),
            "labels": pad(targets, -100)}  # fmt: skip


def new_model(preset: Preset, tokenizer) -> BartForConditionalGeneration:
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=preset.d_model, encoder_layers=preset.layers,
        decoder_layers=preset.layers, encoder_attention_heads=preset.heads, decoder_attention_heads=preset.heads,
        encoder_ffn_dim=preset.ffn_dim, decoder_ffn_dim=preset.ffn_dim, max_position_embeddings=_MAX_POSITIONS,
        dropout=0.1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return BartForConditionalGeneration(config)


def pretrain(
    documents: list[sumpubmed.Document],
    output_dir: Path,
    preset_name: str = "tiny",
    *,
    steps: int | None = None,
    seed: int = 0,
    save_every: int = 100,
    resume: bool = False,
    on_step=None,
) -> dict:
    """Pretrain on the training split of ``documents`` and ``save_pretrained`` into ``output_dir``.

    With ``resume``, continues from ``output_dir/checkpoint`` (weights, optimizer, scheduler, RNG,
    losses; the data is a function of the step). ``on_step(step, loss)`` runs after every step and
    checkpoint. Returns the summary also written to ``pretrain.json``.
    """
    preset = PRESETS[preset_name]
    steps = steps or preset.steps
    output_dir = Path(output_dir)
    checkpoint = output_dir / "checkpoint"
    if resume and not (checkpoint / "state.pt").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint/state.pt in {output_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    texts = training_texts(documents)
    if not texts:
        raise ValueError("the training split is empty: nothing to pretrain on")

    sentences = first_sentences(texts, preset.sentences_per_document)
    torch.manual_seed(seed)
    tokenizer_dir = output_dir / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        tokenizer = bpe_tokenizer.train_tokenizer([" ".join(group) for group in sentences], preset.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
    corpus = sentence_ids(tokenizer, sentences)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = new_model(preset, tokenizer).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.05, (steps - s) / max(1, steps - warmup)))
    )
    step, losses, train_seconds, tokens = 0, [], 0.0, 0
    if resume:
        state = torch.load(checkpoint / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        step, losses, train_seconds, tokens = state["step"], state["losses"], state["seconds"], state["tokens"]
        print(f"resumed from {checkpoint} at step {step}")
    log_path = output_dir / "log.jsonl"
    kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step] if resume else []
    log_path.write_text("".join(line + "\n" for line in kept))

    model.train()
    bar = tqdm(total=steps, initial=step, desc=f"pretraining BART ({preset_name}, denoising)")
    while step < steps:
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in make_batch(corpus, tokenizer, preset, seed, step).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_seconds += time.perf_counter() - start
        tokens += int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
        losses.append(loss.item())
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "loss": losses[-1], "lr": scheduler.get_last_lr()[0]}) + "\n")
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / train_seconds:,.0f}")
        bar.update()
        if step % save_every == 0 and step < steps:
            save_checkpoint(checkpoint, model, optimizer, scheduler, step, losses, train_seconds, tokens)
        if on_step is not None:
            on_step(step, losses[-1])
    bar.close()

    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    loss_plot.plot_losses(
        list(range(1, len(losses) + 1)), losses, output_dir / "loss_curve.png", f"denoising pretraining, {preset_name}"
    )
    summary = {
        "preset": preset_name, "settings": asdict(preset), "steps": step, "seed": seed,
        "training_texts": len(texts), "passages": len(corpus), "first_loss": losses[0], "last_loss": losses[-1],
        "parameters": sum(p.numel() for p in model.parameters()), "seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds,
    }  # fmt: skip
    (output_dir / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(checkpoint, ignore_errors=True)
    print(f"pretrained {preset_name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved to {output_dir}")
    return summary


def save_checkpoint(directory: Path, model, optimizer, scheduler, step, losses, seconds, tokens) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(), "step": step, "losses": losses, "seconds": seconds, "tokens": tokens,
    }  # fmt: skip
    torch.save(state, directory / "state.pt.tmp")
    (directory / "state.pt.tmp").replace(directory / "state.pt")  # never a half-written checkpoint


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    documents, report = sumpubmed.load_documents(args.data)
    print(f"data {args.data}: {report}")
    if args.max_docs is not None:
        documents = sumpubmed.select_split(documents, "train")[: args.max_docs]
    pretrain(documents, args.output_dir, args.preset, steps=args.steps, seed=args.seed,
             save_every=args.save_every, resume=args.resume)  # fmt: skip


if __name__ == "__main__":
    main()
