"""`sr-ray robustness`: ASR and flag rate against adaptive-PGD steps, SafetyReminder vs a robust variant.

For each defended bundle (the plain one and the one carrying a robust option), adaptive PGD is crafted against
that full guarded pipeline (`sr-ray attack pgd-adaptive`, every defense component in its objective) for
max(steps) steps, keeping the image after each step count (`PGDConfig.snapshots`); each image is evaluated on
the held-out AdvBench test goals, with undefended and Self-Reminder under the same images, so each defense's
ASR cut (`asr_cut`) is read against the undefended model under the images crafted against that defense.
Output: OUT/sweep.json (rows: steps, attack, system, n, asr_full, asr_cut, flag_rate, refusal_rate),
OUT/sweep.png, and every attack and evaluation directory under OUT.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sr_ray.eval.attacks.pgd import PGDConfig
from sr_ray.eval.attacks.runner import AttackConfig, run_attack
from sr_ray.eval.runner import EvaluateConfig, evaluate
from sr_ray.reminder.shipped import default_bundle

BENCHMARK = "advbench_pgd_adaptive"


@dataclass
class SweepConfig:
    out: str = "runs/robustness"
    robust_bundle: str = ""  # the bundle with the robust option (e.g. `sr-ray calibrate-blind` output)
    bundle: str | None = None  # the plain bundle (None: the model's shipped one)
    processed_dir: str | None = None
    data_dir: str | None = None
    model: str = "smol-llava"
    steps: list[int] = field(default_factory=lambda: [0, 12, 60])  # 12: the budget of docs/results.md
    n_train: int = 16
    n_test: int = 32
    pgd: PGDConfig = field(default_factory=lambda: PGDConfig(step_size=4 / 255, batch_size=2))
    max_new_tokens: int = 64

    def __post_init__(self):
        self.pgd = self.pgd if isinstance(self.pgd, PGDConfig) else PGDConfig(**self.pgd)
        self.bundle = self.bundle or default_bundle(self.model)
        if not (self.bundle and self.robust_bundle):
            raise ValueError("the sweep needs --robust-bundle (and --bundle unless the model ships one)")


def run_sweep(cfg: SweepConfig) -> list[dict]:
    out = Path(cfg.out)
    rows = []
    defended = {"safety_reminder": cfg.bundle, "robust": cfg.robust_bundle}
    for name, bundle in defended.items():
        attack = run_attack(AttackConfig(
            attack="pgd-adaptive", out=str(out / f"attack_{name}"), data_dir=cfg.data_dir, processed_dir=cfg.processed_dir,
            model=cfg.model, bundle=bundle, n_train=cfg.n_train, n_test=cfg.n_test,
            pgd=replace(cfg.pgd, steps=max(cfg.steps), snapshots=list(cfg.steps))))
        for steps in cfg.steps:
            metrics = evaluate(EvaluateConfig(
                out=str(out / f"eval_{name}_{steps}"), bundle=bundle, model=cfg.model,
                systems=["self_reminder", "safety_reminder"], benchmarks=[],
                attack_dirs=[str(attack / f"steps_{steps}")], limit=None, max_new_tokens=cfg.max_new_tokens,
                reminder_max_new_tokens=cfg.max_new_tokens, awareness=dict(limit=0)))
            undefended = metrics["undefended"][BENCHMARK]["asr_full"]
            for system, per_benchmark in metrics.items():
                m = per_benchmark[BENCHMARK]
                cut = 1 - m["asr_full"] / undefended if undefended else None  # against its own attack's images
                rows.append(dict(steps=steps, attack=name, system=system_label(system, name), n=m["n"],
                                 asr_full=m["asr_full"], asr_cut=None if system == "undefended" else cut,
                                 flag_rate=m.get("intervention_rate"), refusal_rate=m["refusal_rate"]))
    (out / "sweep.json").write_text(json.dumps(dict(rows=rows, config=asdict(cfg)), indent=2))
    plot_sweep(rows, out / "sweep.png")
    return rows


def system_label(system: str, attack: str) -> str:
    """Under the robust bundle's attack every system is labelled with it: its images differ from the plain
    bundle's, so undefended and Self-Reminder are measured under both."""
    if attack != "robust":
        return system
    return "safety_reminder+robust" if system == "safety_reminder" else f"{system} (robust's images)"


def plot_sweep(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, system in enumerate(dict.fromkeys(r["system"] for r in rows)):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["steps"])
        style = dict(marker="o", color=f"C{i}", label=system, linestyle="--" if "robust" in system else "-")
        axes[0].plot([r["steps"] for r in mine], [r["asr_full"] for r in mine], **style)
        if system.startswith("safety_reminder"):  # the systems with a guard that can flag
            axes[1].plot([r["steps"] for r in mine], [r["flag_rate"] or 0 for r in mine], **style)
    for ax, title in zip(axes, ("full-response ASR", "flag rate (guard interventions)")):
        ax.set(xlabel="adaptive PGD steps", title=title, ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
