"""The benchmark report: tables printed at the end of the run and written as Markdown and PNG."""

from __future__ import annotations

import datetime
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Target:
    """A measured ratio (or size) against the limit the project set for it."""

    name: str
    measured: float
    limit: float
    at_most: bool = True  # False: the measured value must be at least the limit

    @property
    def met(self) -> bool:
        return self.measured <= self.limit if self.at_most else self.measured >= self.limit

    def row(self) -> str:
        sign = "≤" if self.at_most else "≥"
        return f"| {self.name} | {self.measured:.3f} | {sign} {self.limit} | {'yes' if self.met else 'NO'} |"


@dataclass
class Report:
    """Rows collected by the benchmark tests; ``write`` renders them once the session ends."""

    machine: str = ""
    layer_rows: list[dict] = field(default_factory=list)
    model_rows: list[dict] = field(default_factory=list)
    multi_rows: list[dict] = field(default_factory=list)
    gemm_rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    started: datetime.datetime = field(default_factory=datetime.datetime.now)

    def has_rows(self) -> bool:
        return bool(self.layer_rows or self.model_rows or self.multi_rows or self.gemm_rows or self.targets)

    def markdown(self) -> str:
        out = [f"# lorafast benchmarks\n\n{self.machine}; {datetime.datetime.now():%Y-%m-%d %H:%M}\n"]
        if self.targets:
            out += ["## Targets\n", "| target | measured | limit | met |", "|---|---|---|---|"]
            out += [t.row() for t in self.targets] + [""]
        if self.layer_rows:
            out += [
                "## Layers (median of interleaved rounds; ratios are medians of per-round ratios)\n",
                "| in→out | tokens | r | dropout | layer | fwd ms | fwd+bwd ms | fwd / frozen | fwd+bwd / frozen "
                "| fwd+bwd / PEFT | saved for backward | peak CUDA |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in self.layer_rows:
                peak = f"{r['peak_bytes'] / 2**20:,.1f} MiB" if r["peak_bytes"] is not None else "–"
                out.append(
                    f"| {r['d_in']}→{r['d_out']} | {r['tokens']} | {r['r']} | {r['dropout']} | {r['layer']} | "
                    f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_vs_frozen']:.3f} | "
                    f"{r['fwd_bwd_vs_frozen']:.3f} | {r['fwd_bwd_vs_peft']:.3f} | {r['saved_bytes'] / 2**20:,.2f} MiB "
                    f"| {peak} |"
                )
            out.append("")
        if self.gemm_rows:
            out += [
                "## GEMM paths of lorafast's forward and dX (Triton: the fused kernel; cuBLAS: addmm beside the "
                "epilogue kernel)\n",
                "| in→out | tokens | r | dropout | auto chose fwd / dX | first-call timing fwd: Triton / cuBLAS ms "
                "| dX: Triton / cuBLAS ms | fwd+bwd ms auto / Triton / cuBLAS | fwd+bwd / frozen auto / Triton / "
                "cuBLAS | PEFT / lorafast auto / Triton / cuBLAS |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            out += [gemm_row(r) for r in self.gemm_rows] + [""]
        if self.model_rows:
            out += [
                "## BART-base-shaped training step (random weights, real SumPubMed batches)\n",
                "| method | targets | dropout | trainable params | step s | tokens/s | vs full | vs PEFT (same "
                "targets, dropout) | peak memory |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in self.model_rows:
                vs_peft = f"{r['vs_peft']:.2f}" if r.get("vs_peft") else "–"
                out.append(
                    f"| {r['method']} | {r['targets']} | {r['dropout']} | {r['trainable']:,} | {r['step_s']:.2f} | "
                    f"{r['tokens_per_s']:,.0f} | {r['vs_full']:.2f} | {vs_peft} | {r['peak_bytes'] / 2**30:.2f} GiB |"
                )
            out.append("")
        if self.multi_rows:
            out += [
                "## Mixed-adapter batch (each sequence its own adapter, rows unsorted)\n",
                "| case | mode | layer | ms | vs frozen | vs one adapter | vs loop |",
                "|---|---|---|---|---|---|---|",
            ]
            out += [
                f"| {r['case']} | {r['mode']} | {r['layer']} | {r['ms']:.2f} | {r['vs_frozen']:.3f} | "
                f"{r['vs_one']:.3f} | {r['vs_loop']:.3f} |"
                for r in self.multi_rows
            ]
            out.append("")
        out += [f"- {note}" for note in self.notes]
        return "\n".join(out) + "\n"

    def write(self, device_type: str) -> Path:
        """Write ``report.md`` and ``report.png`` to this run's results folder; returns the folder."""
        folder = RESULTS / f"{device_type}-{self.started:%Y%m%d-%H%M%S}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(self.markdown())
        self._plot(folder / "report.png")
        return folder

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [p for p in (self.layer_rows, self.model_rows, self.multi_rows) if p]
        if not panels:
            return
        fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.2 * len(panels)), squeeze=False)
        axes = iter(axes[:, 0])
        if self.layer_rows:
            ax = next(axes)
            cases = []
            for r in self.layer_rows:
                key = (r["d_in"], r["d_out"], r["tokens"], r["r"], r["dropout"])
                if key not in cases:
                    cases.append(key)
            for offset, layer in ((-0.2, "PEFT LoRA"), (0.2, "lorafast")):
                values = [
                    next((r["fwd_bwd_vs_frozen"] for r in self.layer_rows if r["layer"] == layer and
                          (r["d_in"], r["d_out"], r["tokens"], r["r"], r["dropout"]) == case), float("nan"))
                    for case in cases
                ]  # fmt: skip
                ax.bar([i + offset for i in range(len(cases))], values, 0.4, label=layer)
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([f"{a}→{b}\nn={n} r={r}\np={p}" for a, b, n, r, p in cases], fontsize=6)
            ax.set_ylabel("fwd+bwd time / frozen nn.Linear")
            ax.legend()
        if self.model_rows:
            ax = next(axes)
            labels = [f"{r['method']}\n{r['targets']}\np={r['dropout']}" for r in self.model_rows]
            bars = ax.bar(range(len(labels)), [r["tokens_per_s"] for r in self.model_rows])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel("training tokens / s")
        if self.multi_rows:
            ax = next(axes)
            labels = [f"{r['layer']}\n{r['mode']}" for r in self.multi_rows]
            bars = ax.bar(range(len(labels)), [r["vs_one"] for r in self.multi_rows])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel(f"time / one adapter ({self.multi_rows[0]['case']})", fontsize=8)
        fig.suptitle(textwrap.fill(self.machine, 120), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def gemm_row(r: dict) -> str:
    """One Markdown row of the GEMM paths table; a path auto did not measure shows "–" for its timings."""

    def timing(op):
        seconds = (r[f"{op}_choice"] or {}).get("seconds", {})
        return " / ".join(f"{seconds[p] * 1e3:.3f}" if p in seconds else "–" for p in ("triton", "cublas"))

    def chose(op):
        choice = r[f"{op}_choice"]
        return choice["path"] if choice else "triton (not measured)"

    three = lambda key, fmt: " / ".join(format(r[f"{key}_{p}"], fmt) for p in ("auto", "triton", "cublas"))  # noqa: E731
    return (
        f"| {r['d_in']}→{r['d_out']} | {r['tokens']} | {r['r']} | {r['dropout']} | {chose('fwd')} / {chose('dx')} | "
        f"{timing('fwd')} | {timing('dx')} | {three('ms', '.2f')} | {three('vs_frozen', '.3f')} | "
        f"{three('peft_speedup', '.3f')} |"
    )
