"""Evaluation pictures (matplotlib, PNG): ASR per benchmark and system, per-category bars, attack losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SYSTEM_COLORS = {"undefended": "tab:red", "self_reminder": "tab:orange", "safety_reminder": "tab:green",
                 "safety_reminder_official": "tab:olive"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, groups: list[str], values: dict[str, list[float | None]], title: str, ylabel: str) -> None:
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(groups))
    for i, (system, ys) in enumerate(values.items()):
        bars = ax.bar(x + i * width - 0.4 + width / 2, [np.nan if y is None else y for y in ys], width,
                      label=system, color=SYSTEM_COLORS.get(system))
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(x, groups, rotation=25, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel, ylim=(0, 1.05))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_asr(metrics: dict, path: str | Path) -> Path:
    """Harmful benchmarks: ASR on the full response and on the continuation only; benign: over-refusal and change."""
    plt = _pyplot()
    systems = list(metrics)
    benches = list(dict.fromkeys(b for s in systems for b in metrics[s]))
    harmful = [b for b in benches if any(metrics[s].get(b, {}).get("asr_full") is not None for s in systems)]
    benign = [b for b in benches if b not in harmful]
    value = lambda s, b, k: metrics[s].get(b, {}).get(k)  # noqa: E731
    panels = [(harmful, "asr_full", "ASR, full response (what the user saw)"),
              (harmful, "asr_continuation", "ASR, continuation only (official)"),
              (benign, "refusal_rate", "benign: refusal rate"), (benign, "changed_vs_undefended", "benign: changed vs undefended")]
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.4 * len(panels)), squeeze=False)
    for ax, (groups, key, title) in zip(axes[:, 0], panels):
        _bars(ax, groups, {s: [value(s, b, key) for b in groups] for s in systems}, title, key)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_categories(categories: pd.DataFrame, path: str | Path) -> Path:
    """Per-category full-response ASR, one panel per harmful benchmark."""
    plt = _pyplot()
    harmful = categories.dropna(subset=["asr_full"])
    benches = list(dict.fromkeys(harmful["benchmark"]))
    fig, axes = plt.subplots(len(benches) or 1, 1, figsize=(10, 3.2 * max(len(benches), 1)), squeeze=False)
    for ax, bench in zip(axes[:, 0], benches):
        sub = harmful.loc[harmful["benchmark"] == bench]
        cats = list(dict.fromkeys(sub["category"]))
        values = {s: [sub.loc[(sub["system"] == s) & (sub["category"] == c), "asr_full"].mean() for c in cats]
                  for s in dict.fromkeys(sub["system"])}
        _bars(ax, [str(c)[:28] for c in cats], values, f"{bench}: ASR (full response) per category", "asr_full")
    if not benches:
        axes[0, 0].text(0.5, 0.5, "no harmful benchmark in this run", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_attack_losses(infos: dict[str, dict], path: str | Path) -> Path:
    """PGD: objective per step; GCG: best loss per goal, first vs last."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(infos), figsize=(5.5 * len(infos), 3.6), squeeze=False)
    for ax, (bench, info) in zip(axes[0], infos.items()):
        if "history" in info:
            steps = [h["step"] for h in info["history"]]
            for key in ("loss", "target_loss", "probe_loss", "reminder_loss"):
                if key in info["history"][0]:
                    ax.plot(steps, [h[key] for h in info["history"]], label=key)
            ax.set(xlabel="PGD step", ylabel="loss")
        else:
            per_goal = info.get("losses", {})
            ax.plot([v[0] for v in per_goal.values()], "o", label="first step")
            ax.plot([min(v) for v in per_goal.values()], "o", label="best")
            ax.set(xlabel="goal", ylabel="GCG target loss")
        ax.set_title(bench)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
