"""The LoRA paper's comparison at laptop scale, on the small BART pretrained here and SumPubMed's test split.

    python train/reproduce.py --data ../shared/sumpubmed --output-dir runs/reproduce

Runs, on the same pretrained base (``pretrained:tiny``), data, seed and number of steps: the lead
baseline, full fine-tuning, lorafast LoRA with r ∈ {1, 2, 8, 64} on q,v and r = 8 on every linear
layer. Each fine-tuning runs in its own process (``finetune.py``), so its peak memory is its own.
Then it times the merged r = 8 model against the base model in one process. Writes ``report.md``
(the table) and ``report.png`` to ``--output-dir``; ``--steps``, ``--eval-docs`` and ``--runs``
make it smaller.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lead_baseline
import model_setup
import sumpubmed

import lorafast

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RUNS = {  # name: finetune.py options
    "full": ["--method", "full"],
    "lora-qv-r1": ["--r", "1", "--alpha", "2"],
    "lora-qv-r2": ["--r", "2", "--alpha", "4"],
    "lora-qv-r8": ["--r", "8", "--alpha", "16"],
    "lora-qv-r64": ["--r", "64", "--alpha", "128"],
    "lora-all-r8": ["--r", "8", "--alpha", "16", "--target-modules", *ALL_LINEAR],
}
LABELS = {
    "full": "full fine-tuning", "lora-qv-r1": "LoRA q,v r=1", "lora-qv-r2": "LoRA q,v r=2",
    "lora-qv-r8": "LoRA q,v r=8", "lora-qv-r64": "LoRA q,v r=64", "lora-all-r8": "LoRA all linear r=8",
}  # fmt: skip
LATENCY_RUN = "lora-qv-r8"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="SumPubMed release folder")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--model", default="pretrained:tiny", help="the base every run starts from")
    p.add_argument("--steps", type=int, default=224, help="optimizer steps of every fine-tuning (224: one epoch)")
    p.add_argument("--eval-docs", type=int, default=106, help="test documents scored (106: the whole test split)")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which fine-tunings")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the LoRA runs")
    p.add_argument("--full-lr", type=float, default=2e-4, help="learning rate of full fine-tuning")
    p.add_argument("--latency-rounds", type=int, default=20)
    p.add_argument("--finetune-args", nargs=argparse.REMAINDER, default=[],
                   help="passed to every finetune.py run (default: 128-token texts, no-repeat 2-grams)")  # fmt: skip
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_docs < 1:
        p.error("--steps and --eval-docs must be at least 1")
    return args


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_finetuning(name: str, args: argparse.Namespace) -> dict:
    """One ``finetune.py`` run in its own process; its ``metrics.json`` plus the saved sizes."""
    out = args.output_dir / name
    command = [
        sys.executable, str(Path(__file__).with_name("finetune.py")), "--data", str(args.data), "--model", args.model,
        "--split", "test", "--eval-docs", str(args.eval_docs), "--max-steps", str(args.steps),
        "--output-dir", str(out), "--max-source-length", "128", "--max-target-length", "128",
        "--no-repeat-ngram-size", "2", *RUNS[name],
        *args.finetune_args,
    ]  # fmt: skip
    command += ["--lr", str(args.full_lr if name == "full" else args.lr)]
    print(f"\n=== {LABELS[name]}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["saved_bytes"] = folder_bytes(out / ("model" if name == "full" else "adapter"))
    return metrics


@torch.no_grad()
def merged_latency(base_folder: Path, adapter: Path, tokenizer, texts: list[str], rounds: int) -> dict:
    """Median forward time of the base model and of the merged LoRA model, measured in turns on one batch."""
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(base_folder).eval()
    merged = lorafast.merge_lora(lorafast.load_adapter(AutoModelForSeq2SeqLM.from_pretrained(base_folder), adapter))
    merged.eval()
    batch = tokenizer(texts, max_length=256, truncation=True, padding=True, return_tensors="pt")
    decoder_input_ids = batch["input_ids"][:, :128]
    times = {"base": [], "merged": []}
    for round_ in range(rounds + 1):
        order = ("base", "merged") if round_ % 2 else ("merged", "base")
        for name in order:
            model = base if name == "base" else merged
            start = time.perf_counter()
            model(**batch, decoder_input_ids=decoder_input_ids)
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    ratios = [m / b for m, b in zip(times["merged"], times["base"])]
    return {
        "base_ms": 1000 * statistics.median(times["base"]),
        "merged_ms": 1000 * statistics.median(times["merged"]),
        "ratio": statistics.median(ratios),
        "merged_is_plain": not any(isinstance(m, lorafast.FusedLoRALinear) for m in merged.modules()),
    }


def report_table(results: dict, lead: dict, base_bytes: int, latency: dict | None, args) -> str:
    full = results.get("full")
    lines = [
        f"Base: `{args.model}` ({base_bytes / 1e6:.1f} MB checkpoint); every run {args.steps} steps, same seed and "
        f"data; ROUGE F1 (×100) on {args.eval_docs} test documents.",
        "",
        "| run | trainable params | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L vs full | tokens/s | vs full | "
        "peak memory | saved | saved / checkpoint |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| lead baseline | – | {lead['rouge1']:.2f} | {lead['rouge2']:.2f} | {lead['rougeL']:.2f} | – | – | – | – | – "
        "| – |",
    ]
    for name, m in results.items():
        rouge = m["rouge"]
        vs_full = f"{rouge['rougeL'] / full['rouge']['rougeL']:.3f}" if full and full["rouge"]["rougeL"] else "–"
        speed = f"{m['tokens_per_second'] / full['tokens_per_second']:.2f}" if full else "–"
        lines.append(
            f"| {LABELS[name]} | {m['trainable_parameters']:,} | {rouge['rouge1']:.2f} | {rouge['rouge2']:.2f} | "
            f"{rouge['rougeL']:.2f} | {vs_full} | {m['tokens_per_second']:,.0f} | {speed} | "
            f"{m['peak_memory_bytes'] / 2**20:,.0f} MiB | {m['saved_bytes'] / 1e6:.3f} MB | "
            f"1/{base_bytes / m['saved_bytes']:,.0f} |"
        )
    if latency:
        lines += [
            "",
            f"Inference (one forward pass, 8 × 256 source + 128 target tokens, median of {args.latency_rounds} "
            f"alternating rounds): base model {latency['base_ms']:.1f} ms, merged {LABELS[LATENCY_RUN]} "
            f"{latency['merged_ms']:.1f} ms, ratio {latency['ratio']:.3f}; the merged model holds no LoRA layer: "
            f"{latency['merged_is_plain']}.",
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict, lead: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in results.items():
        ax.scatter(m["trainable_parameters"], m["rouge"]["rougeL"], label=LABELS[name])
    ax.axhline(lead["rougeL"], color="grey", linestyle="--", label="lead baseline")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("ROUGE-L (test split)")
    ax.set_title("LoRA vs full fine-tuning, small BART pretrained on SumPubMed", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    documents, report = sumpubmed.load_documents(args.data)
    print(f"data {args.data}: {report}")
    test_docs = sumpubmed.select_split(documents, "test")[: args.eval_docs]
    lead = lead_baseline.lead_rouge([d.text for d in test_docs], [d.summary for d in test_docs])
    print("lead baseline: " + ", ".join(f"{k} {v:.2f}" for k, v in lead.items()))

    # build (or reuse) the base once, before the runs start
    tokenizer_dir = args.output_dir / "tokenizer"
    model_setup.ensure_tokenizer(args.model, sumpubmed.select_split(documents, "train"), tokenizer_dir)
    base, tokenizer, _ = model_setup.load_model(args.model, tokenizer_dir)
    base_folder = Path(base.name_or_path)
    base_bytes = (base_folder / "model.safetensors").stat().st_size
    del base

    results = {name: run_finetuning(name, args) for name in args.runs}
    latency = None
    if LATENCY_RUN in results:
        texts = [d.text for d in test_docs[:8]]
        latency = merged_latency(base_folder, args.output_dir / LATENCY_RUN / "adapter", tokenizer, texts,
                                 args.latency_rounds)  # fmt: skip
    table = report_table(results, lead, base_bytes, latency, args)
    (args.output_dir / "report.md").write_text(table)
    (args.output_dir / "results.json").write_text(
        json.dumps({"lead": lead, "runs": results, "latency": latency, "base_bytes": base_bytes}, indent=2) + "\n"
    )
    plot(results, lead, args.output_dir / "report.png")
    print("\n" + table + f"\nwrote {args.output_dir / 'report.md'} and report.png")


if __name__ == "__main__":
    main()
