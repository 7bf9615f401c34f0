"""Training pictures: the probe's ROC curves and the SAPT loss / validation curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str):
    """ROC of P(unsafe) per split; `curves[name] = (is_unsafe, p_unsafe)`. Saves the PNG at `path` and
    returns the (closed) figure, whose lines hold the curves drawn."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (y, score) in curves.items():
        if len(set(y.tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, score):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="false positive rate (harmless flagged)", ylabel="true positive rate (harmful flagged)", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_training(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> Path:
    """Train losses per step, val L_LM and val rates at the steps validation ran; `history[key] = [(step, value)]`."""
    val_axis = "optimizer step (0 = before training)"
    panels = [
        ("train losses", "optimizer step", ("train/lm_loss", "train/cls_loss", "train/total_loss")),
        ("val L_LM", val_axis, ("val/lm_loss",)),
        ("val rates", val_axis,
         ("val/refusal_rate_harmful", "val/unchanged_rate_benign", "val/flag_rate_harmful", "val/flag_rate_benign")),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (name, xlabel, keys) in zip(axes, panels):
        for key in keys:
            if history.get(key):
                steps, values = zip(*history[key])
                ax.plot(steps, values, label=key.split("/", 1)[1], marker=None if key.startswith("train") else "o", ms=4)
        ax.set(xlabel=xlabel, title=name)
        ax.legend(fontsize=8)
    for key, color in (("undefended/refusal_rate_harmful", "C0"), ("undefended/flag_rate_harmful", "C2")):
        if history.get(key):  # the base model without any reminder, for reference
            axes[2].axhline(history[key][-1][1], ls="--", c=color, lw=1, label=key.replace("/", " "))
    axes[2].legend(fontsize=8)
    axes[2].set_ylim(-0.05, 1.05)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
