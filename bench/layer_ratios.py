"""Forward+backward time and saved activations of one LoRA layer against a frozen nn.Linear.

Candidates, in one process on the same input: a frozen ``nn.Linear`` (backward for dX only),
Hugging Face PEFT's LoRA ``Linear`` and lorafast's ``FusedLoRALinear``, each with the LoRA
dropout given. Every round times each candidate once, in a rotating order so that a noisy
machine affects them alike; the figure reported is the median over rounds of the per-round
ratio to the frozen layer.

    python bench/layer_ratios.py --tokens 8192 --features 768 --rank 8 --dropout 0 0.1

Also counts the kernels one forward+backward launches (CUDA: from the profiler; CPU: ATen ops
that would launch one, and lorafast's Triton launches when ``TRITON_INTERPRET=1
LORAFAST_BACKEND=triton`` runs them interpreted). Prints a Markdown table and writes it, with a
PNG chart, to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import torch
from harness import (
    FROZEN,
    Timer,
    assert_matches_reference,
    candidate_references,
    forward_backward,
    interleaved,
    kernel_launches,
    machine,
    make_candidates,
    saved_bytes,
    summarize,
)


def run(args) -> list[dict]:
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    d_out = args.out_features or args.features
    x = torch.randn(args.tokens, args.features, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(args.tokens, d_out, device=device, dtype=dtype)
    rows = []
    for p in args.dropout:
        candidates = make_candidates(args.features, d_out, args.rank, args.alpha, p, dtype, device)
        assert_matches_reference(candidates, candidate_references(candidates), x, grad_y)
        runs = {name: forward_backward(module, x, grad_y) for name, module in candidates.items()}
        results = summarize(interleaved(runs, args.rounds, Timer(device)), baselines=(FROZEN,))
        for name, result in results.items():
            rows.append(
                {
                    "dropout": p,
                    "layer": name,
                    "ms": result["seconds"] * 1e3,
                    "ratio": result[f"vs {FROZEN}"],
                    "saved_bytes": saved_bytes(candidates[name], x),
                    "launches": kernel_launches(runs[name], device),
                }
            )
    return rows


def report(rows: list[dict], args) -> str:
    x_bytes = args.tokens * args.features * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    lines = [
        f"fwd+bwd, x {args.tokens}x{args.features}, W0 {args.out_features or args.features}x{args.features}, "
        f"r={args.rank}, {args.dtype}, {machine(torch.device(args.device))}, {args.rounds} rounds; x = {x_bytes:,} B, "
        f"n·r·4 = {args.tokens * args.rank * 4:,} B",
        "",
        "| dropout | layer | median ms | median ratio to frozen | saved activations (B) | saved / x | launches |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dropout']} | {row['layer']} | {row['ms']:.1f} | {row['ratio']:.3f} | "
            f"{row['saved_bytes']:,} | {row['saved_bytes'] / x_bytes:.2f} | {row['launches']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows if r["dropout"] == rows[0]["dropout"]]
    dropouts = sorted({r["dropout"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(layers)
    for i, layer in enumerate(layers):
        ratios = [next(r["ratio"] for r in rows if r["layer"] == layer and r["dropout"] == p) for p in dropouts]
        bars = ax.bar([d + i * width for d in range(len(dropouts))], ratios, width, label=layer)
        ax.bar_label(bars, fmt="%.2f")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([d + width * (len(layers) - 1) / 2 for d in range(len(dropouts))])
    ax.set_xticklabels([f"dropout {p}" for p in dropouts])
    ax.set_ylabel("forward+backward time / frozen nn.Linear")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=768, help="in_features")
    parser.add_argument("--out-features", type=int, default=None, help="default: --features")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args)
    table = report(rows, args)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"layer_ratios_{args.device}_{args.dtype}_{args.tokens}x{args.features}_r{args.rank}"
    (args.out / f"{stem}.md").write_text(table + "\n")
    plot(rows, args.out / f"{stem}.png", table.splitlines()[0])
    print(f"written: {args.out / stem}.md and .png")


if __name__ == "__main__":
    main()
