"""Fine-tune BART on SumPubMed with lorafast (or PEFT LoRA, or full fine-tuning) and score it with ROUGE.

Offline smoke run on the shared sample (a random tiny BART and a tokenizer trained on the fly):

    python train/finetune.py --data ../shared/sumpubmed --model random:tiny --max-steps 40 --output-dir runs/tiny

The real run (full release, pretrained BART, one GPU; ``torchrun --nproc_per_node N`` for several):

    python train/finetune.py --data /data/sumpubmed --model facebook/bart-base --epochs 3 --output-dir runs/base

Writes to ``--output-dir``: ``log.jsonl`` (every step and evaluation), ``metrics.json``, ``loss_curve.png``,
``predictions.jsonl``, the trained adapter in PEFT's format (``adapter/``; ``model/`` for ``--method full``),
``checkpoint-<step>/`` for ``--resume``, ``tokenizer/`` and, with ``--merge``, ``merged/`` (plain transformers).
Every file appears whole or not at all. A folder holding a previous run takes ``--resume`` (the same arguments;
damaged checkpoints are skipped with a warning) or ``--overwrite-output-dir``. Expected problems (bad data,
folder, checkpoints or numbers, a non-finite loss) end with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments
import checkpoints
import lead_baseline
import loss_plot
import model_setup
import summary_scoring
import sumpubmed
from run_folder import RunError, append_log, clear_previous_run, refuse_previous_run, remove_temporaries, trim_log

import lorafast
from lorafast.atomic import atomic_directory, atomic_path, write_atomically


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="SumPubMed release folder (text/, abstract/, ...), local "
                   "parquet/JSON/CSV files or folder with text and summary columns, or a Hub dataset id")  # fmt: skip
    g.add_argument("--target", choices=sorted(sumpubmed.TARGETS), default="abstract", help="reference summary")
    g.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    g.add_argument("--eval-docs", type=int, default=50, help="documents generated and scored per evaluation")
    g.add_argument("--split", choices=("validation", "test"), default="validation", help="documents to evaluate on")
    g.add_argument("--max-source-length", type=int, default=512, help="article tokens kept")
    g.add_argument("--max-target-length", type=int, default=128, help="summary tokens kept")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="facebook/bart-base", help="Hub id, local folder, or random:tiny / random:base")
    g.add_argument("--model-dropout", type=float, default=None, help="override the model's own dropout")
    g.add_argument("--method", choices=model_setup.METHODS, default="lorafast")
    g.add_argument("--r", type=int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=16, help="LoRA alpha (scaling alpha / r)")
    g.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout")
    g.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"], help="linear layers given LoRA")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (or --epochs)")
    g.add_argument("--batch-size", type=int, default=8, help="documents per micro-batch, per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4 LoRA, 5e-5 full)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default 6%% of the steps)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--output-dir", type=Path, required=True)
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--save-every", type=int, default=0, help="write checkpoint-<step>/ every N steps for --resume "
                   "(0: none); the final weights always go to adapter/ (model/)")  # fmt: skip
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints of this run kept")
    g.add_argument("--num-beams", type=int, default=4)
    g.add_argument("--gen-max-tokens", type=int, default=128, help="summary tokens generated at most")
    g.add_argument("--eval-batch-size", type=int, default=8)
    g.add_argument("--samples", type=int, default=3, help="summaries printed beside their references")
    start = g.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir "
                       "that loads (the run's arguments must be the same)")  # fmt: skip
    start.add_argument("--overwrite-output-dir", action="store_true", help="replace the previous run in --output-dir "
                       "(its checkpoints and outputs are deleted once --data has loaded)")  # fmt: skip
    g.add_argument("--merge", action="store_true", help="also write the merged model (plain transformers)")
    g = p.add_argument_group("generation")
    g.add_argument("--no-repeat-ngram-size", type=int, default=3, help="never repeat an n-gram (0: off)")
    g.add_argument("--gen-min-tokens", type=int, default=0, help="summary tokens generated at least")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score exponent on length")
    args = p.parse_args(argv)
    arguments.check_ranges(p, args)
    if args.lr is None:
        args.lr = 5e-5 if args.method == "full" else 5e-4
    return args


class Distributed:
    """Rank, world size and device; set up by torchrun's environment (gloo on CPU, NCCL on GPU)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item()


def tokenize(tokenizer, documents: list[sumpubmed.Document], args) -> tuple[list[list[int]], list[list[int]]]:
    sources = tokenizer([d.text for d in documents], max_length=args.max_source_length, truncation=True)
    targets = tokenizer(
        text_target=[d.summary.replace("\n", " ") for d in documents], max_length=args.max_target_length,
        truncation=True,
    )  # fmt: skip
    return sources["input_ids"], targets["input_ids"]


def collate(sources: list[list[int]], targets: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Pad to the longest in the batch (dynamic padding); labels are padded with -100."""

    def pad(rows, value):
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)

    input_ids = pad(sources, pad_id)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": pad(targets, -100)}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evaluate_model(model, tokenizer, documents, args, ctx, step, log) -> dict:
    """Generate summaries of the evaluation documents (main process only) and score them."""
    progress = tqdm(total=len(documents), desc=f"evaluating (step {step})", leave=False, disable=not ctx.main)
    predictions = summary_scoring.summarize(
        model, tokenizer, [d.text for d in documents], device=ctx.device, batch_size=args.eval_batch_size,
        max_source_length=args.max_source_length, max_new_tokens=args.gen_max_tokens, num_beams=args.num_beams,
        no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.gen_min_tokens,
        length_penalty=args.length_penalty, progress=progress,
    )  # fmt: skip
    progress.close()
    references = [summary_scoring.sentence_lines(d.summary) for d in documents]
    scores = summary_scoring.rouge(predictions, references)
    lead = lead_baseline.lead_rouge([d.text for d in documents], [d.summary for d in documents])
    degenerate = sum(summary_scoring.repeated_phrase(p) is not None for p in predictions)
    log({"step": step, "eval": scores, "lead": lead, "degenerate": degenerate, "split": args.split,
         "documents": len(documents)})  # fmt: skip
    tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    tqdm.write("  lead baseline: " + ", ".join(f"{k} {v:.2f}" for k, v in lead.items()))
    tqdm.write(f"  summaries with a phrase repeated 3 times in a row: {degenerate} of {len(predictions)}")
    return {"scores": scores, "predictions": predictions, "references": references, "lead": lead,
            "degenerate": degenerate}  # fmt: skip


def train(args: argparse.Namespace, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Run the fine-tuning ``args`` describe; returns the final metrics (``metrics.json``).

    ``on_step(step, loss)`` is called after each optimizer step (and its checkpoint).
    """
    ctx = Distributed()
    out = args.output_dir
    # Nothing in the output folder changes until the checkpoint (or the folder) and the data are checked.
    run_args = {"run_id": uuid.uuid4().hex, "world_size": ctx.world, "args": arguments.run_arguments(args)}
    resume_from = checkpoints.newest_loadable(out, warn=ctx.main) if args.resume else None
    if resume_from is not None:
        run_args["run_id"] = resume_from.run_args.get("run_id")
        checkpoints.check_same_run(resume_from, run_args)
    else:
        refuse_previous_run(out, args.overwrite_output_dir)

    def log(record: dict) -> None:
        if ctx.main:
            append_log(out, record)

    # --- data ----------------------------------------------------------------------------------
    try:
        documents, report = sumpubmed.load_documents(args.data, args.target)
    except (FileNotFoundError, ValueError) as exc:
        raise RunError(f"--data: {exc}") from exc
    if ctx.main:
        print(f"data {args.data}: {report}")
    train_docs = sumpubmed.select_split(documents, "train")[: args.max_docs]
    eval_docs = sumpubmed.select_split(documents, args.split)[: args.eval_docs]
    if not train_docs:
        raise RunError(f"--data: the train split of {args.data} is empty")
    per_step = args.batch_size * args.grad_accum * ctx.world
    if len(train_docs) < per_step:
        raise RunError(
            f"{len(train_docs)} training documents are fewer than one step's {per_step} (--batch-size × "
            "--grad-accum × processes)"
        )
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir:
            clear_previous_run(out)
        remove_temporaries(out)
    ctx.barrier()

    # --- model ---------------------------------------------------------------------------------
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokenizer_dir = out / "tokenizer"
    if ctx.main:
        model_setup.ensure_tokenizer(args.model, train_docs, tokenizer_dir)
    ctx.barrier()
    try:
        model, tokenizer, is_random = model_setup.load_model(args.model, tokenizer_dir, args.model_dropout)
    except OSError as exc:
        raise RunError(f"--model: {exc}") from exc
    if is_random and ctx.main:
        print(f"{args.model}: random weights; ROUGE here measures the pipeline, not summarization quality")
    if ctx.main and not is_random:
        tokenizer.save_pretrained(tokenizer_dir)
    model = model_setup.prepare(model, args.method, args.r, args.alpha, args.dropout, args.target_modules)
    counts = lorafast.parameter_counts(model)
    if ctx.main:
        print(f"{args.method}: {counts}")
    model.to(ctx.device)
    trained = torch.nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model
    trainable = [p for p in model.parameters() if p.requires_grad]

    sources, targets = tokenize(tokenizer, train_docs, args)
    steps_per_epoch = len(train_docs) // per_step
    total_steps = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(0.06 * total_steps)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(1, warmup), max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )

    step, history, tokens_seen, train_seconds = 0, [], 0, 0.0
    if resume_from is not None:
        checkpoints.restore(resume_from, model, optimizer, scheduler, ctx.rank)
        state = resume_from.state
        step, history = state["step"], state["history"]
        tokens_seen, train_seconds = state["tokens_seen"], state["train_seconds"]
        if ctx.main:  # drop what the interrupted run logged after its checkpoint
            trim_log(out, step)
            print(f"resumed from {resume_from.directory} at step {step}")
    settings = vars(args) | {"output_dir": str(out), "run_id": run_args["run_id"]}
    log({"event": "resume" if resume_from else "start", "step": step, "args": settings, "parameters": counts._asdict()})

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else nullcontext()
    pad_id = tokenizer.pad_token_id
    unwrapped = model_setup.base_model(model, args.method)
    bar = tqdm(total=total_steps, initial=step, desc=f"{args.method} fine-tuning", disable=not ctx.main)
    trained.train()
    lengths, epoch_batches = [len(s) for s in sources], {}
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: sumpubmed.bucketed_batches(lengths, per_step, args.seed, epoch)}
        batch_ids = epoch_batches[epoch][position]
        start = time.perf_counter()
        label_tokens = sum(len(targets[i]) for i in batch_ids)  # the whole step's, on every rank alike
        step_loss = 0.0
        for micro in range(args.grad_accum):
            first = (micro * ctx.world + ctx.rank) * args.batch_size
            ids = batch_ids[first : first + args.batch_size]
            batch = collate([sources[i] for i in ids], [targets[i] for i in ids], pad_id, ctx.device)
            sync = ctx.world == 1 or micro == args.grad_accum - 1
            with nullcontext() if sync else trained.no_sync(), autocast:
                decoder_input_ids = unwrapped.prepare_decoder_input_ids_from_labels(batch["labels"])
                logits = trained(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=decoder_input_ids,
                ).logits  # fmt: skip
                token_loss = F.cross_entropy(
                    logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
                )
                # The mean over the whole step's label tokens, whatever rank or micro-batch holds
                # them (DDP averages over ranks, hence the factor).
                (token_loss * ctx.world / label_tokens).backward()
            step_loss += token_loss.item()
        loss = ctx.sum(step_loss) / label_tokens
        if not math.isfinite(loss):  # before the update: the weights and checkpoints stay those of the last step
            bar.close()
            raise RunError(
                f"the training loss is {loss} at step {step + 1}; stopped before updating or saving anything "
                "(lower --lr or check the data; --resume continues from the newest checkpoint)"
            )
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_seconds += time.perf_counter() - start
        tokens_seen += sum(len(sources[i]) + len(targets[i]) for i in batch_ids)
        history.append(loss)
        lr = scheduler.get_last_lr()[0]
        log({"step": step, "loss": loss, "lr": lr, "tokens_per_second": tokens_seen / train_seconds})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / train_seconds:,.0f}")
        bar.update()
        if args.eval_every and step % args.eval_every == 0 and step < total_steps and eval_docs:
            if ctx.main:
                evaluate_model(model, tokenizer, eval_docs, args, ctx, step, log)
            ctx.barrier()
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            checkpoints.save_checkpoint(
                model, optimizer, scheduler, args, ctx, step, history, tokens_seen, train_seconds, run_args
            )
        if on_step is not None:
            on_step(step, loss)
    bar.close()

    # --- final evaluation and outputs ------------------------------------------------------------
    metrics = {}
    if ctx.main:
        with atomic_directory(out / ("model" if args.method == "full" else "adapter")) as directory:
            model_setup.save_trained(model, args.method, directory)
        result = evaluate_model(model, tokenizer, eval_docs, args, ctx, step, log) if eval_docs else None
        pairs = list(zip(eval_docs, result["predictions"], result["references"])) if result else []
        write_atomically(
            out / "predictions.jsonl",
            "".join(json.dumps({"doc_id": d.doc_id, "prediction": p, "reference": r}) + "\n" for d, p, r in pairs),
        )
        metrics = {
            "model": args.model, "method": args.method, "random_weights": is_random, "steps": step,
            "rouge": result["scores"] if result else None, "eval_split": args.split, "eval_documents": len(eval_docs),
            "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
            "tokens_per_second": tokens_seen / train_seconds if train_seconds else None,
            "seconds_per_step": train_seconds / step if step else None,
            "peak_memory_bytes": peak_memory_bytes(ctx.device),
            "trainable_parameters": counts.trainable, "total_parameters": counts.total, "world_size": ctx.world,
        }  # fmt: skip
        metrics |= {"lead_rouge": result["lead"], "degenerate_summaries": result["degenerate"]} if result else {}
        write_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        with atomic_path(out / "loss_curve.png") as path:
            loss_plot.plot_losses(list(range(1, len(history) + 1)), history, path, f"{args.model}, {args.method}")
        for doc, prediction, reference in pairs[: args.samples]:
            print(f"\n--- document {doc.doc_id}\nreference:  {reference[:400]}\ngenerated:  {prediction[:400]}")
        if args.merge:
            plain = model_setup.merged(model, args.method)
            with atomic_directory(out / "merged") as directory:
                plain.save_pretrained(directory)
                tokenizer.save_pretrained(directory)
        print(f"\nwrote {out}: metrics.json, log.jsonl, loss_curve.png, predictions.jsonl")
    if ctx.world > 1:
        del trained  # the DDP wrapper goes before its process group
        ctx.barrier()
        dist.destroy_process_group()
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Run the script; an expected problem (bad data, folder or checkpoint) ends as one ``error:`` line, exit code 2."""
    args = parse_args(argv)
    try:
        train(args)
    except RunError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            tqdm.write(f"error: {exc}", file=sys.stderr)  # on a line of its own, below any progress bar
        sys.exit(2)


if __name__ == "__main__":
    main()
