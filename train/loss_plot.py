"""The loss curve that fine-tuning and pretraining write beside their logs."""

from __future__ import annotations

from pathlib import Path


def plot_losses(steps: list[int], losses: list[float], path: Path, title: str) -> None:
    """A PNG at ``path`` of the training loss against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (token mean)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
