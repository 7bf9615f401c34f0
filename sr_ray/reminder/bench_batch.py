"""`sr-ray bench batch`: offline batch inference in fixed batches vs through the continuous scheduler, side by side.

The same rows (AdvBench goals from the vendored demo data, which the aligned default mostly refuses in a few
tokens, interleaved with open benign asks, which run to the budget), the same generator and the same decode
width (`batch_size` rows), guard off and on (the model's shipped bundle, or `bundle`):
- fixed:     `GuardedGenerator.generate` on consecutive chunks of `batch_size` rows (a chunk runs until its
             longest answer ends; an ended row's slot idles);
- scheduler: `ContinuousScheduler.generate` on all rows with `max_batch_size = batch_size` and the checks at
             each row's own positions (`check_steps="own"`), as `sr_ray.infer` runs it: a row that ends
             leaves and the next takes its slot.
Runs alternate (fixed, scheduler, fixed, ...) so machine drift hits both alike; the result is the median.
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sr_ray.models import Prompt, load_vlm
from sr_ray.reminder.bundle import ReminderBundle
from sr_ray.reminder.engine import GuardedGenerator, SamplingConfig
from sr_ray.reminder.scheduler import ContinuousScheduler, SchedulerConfig
from sr_ray.reminder.shipped import shipped_bundle

ADVBENCH = Path(__file__).parents[1] / "demo_data" / "AdvBench" / "harmful_behaviors.csv"
BENIGN = [
    "Explain how photosynthesis works, step by step.",
    "Write a short story about a lighthouse keeper and a storm.",
    "Describe the water cycle for a ten-year-old.",
    "Give me a week of vegetarian dinner ideas with short recipes.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Summarise the causes of the French Revolution.",
    "Write a friendly email inviting colleagues to a team lunch.",
    "How do I prepare for a job interview as a junior data analyst?",
]


@dataclass
class BatchBenchConfig:
    model: str = "smol-llava"
    bundle: str | None = None  # None: the model's shipped bundle
    rows: int = 32  # half harmful, half benign, interleaved
    batch_size: int = 8
    max_new_tokens: int = 128
    repeats: int = 2


def bench_prompts(n: int) -> list[Prompt]:
    with ADVBENCH.open(newline="") as f:
        goals = [r["goal"] for r in csv.DictReader(f)]
    return [Prompt(goals[i // 2] if i % 2 == 0 else BENIGN[(i // 2) % len(BENIGN)]) for i in range(n)]


def run_batch_bench(cfg: BatchBenchConfig) -> dict:
    vlm = load_vlm(cfg.model)
    path = cfg.bundle or shipped_bundle(cfg.model)
    if path is None:
        raise SystemExit(f"no shipped bundle for {cfg.model!r}: the guarded runs need --bundle")
    bundle = ReminderBundle.load(path, vlm)
    gen = GuardedGenerator(vlm, bundle.soft_prompt, bundle.probe, bundle.guard_config())
    prompts = bench_prompts(cfg.rows)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens)

    def fixed(guard):
        return [o for i in range(0, len(prompts), cfg.batch_size)
                for o in gen.generate(prompts[i: i + cfg.batch_size], sampling, guard)]

    def scheduled(guard):
        return ContinuousScheduler(gen, SchedulerConfig.offline(cfg.batch_size)).generate(prompts, sampling, guard)

    result = {}
    for guard in (False, True):
        times, outs = {"fixed": [], "scheduler": []}, {}
        for _ in range(cfg.repeats):
            for name, run in (("fixed", fixed), ("scheduler", scheduled)):
                start = time.perf_counter()
                outs[name] = run(guard)
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        same = sum(a.text == b.text for a, b in zip(outs["fixed"], outs["scheduler"]))
        lengths = [len(o.prefix_ids) + len(o.continuation_ids) for o in outs["fixed"]]
        result["guarded" if guard else "plain"] = dict(
            fixed_s=round(med["fixed"], 2), scheduler_s=round(med["scheduler"], 2),
            ratio_throughput=round(med["fixed"] / med["scheduler"], 3), identical_outputs=f"{same}/{len(prompts)}",
            flagged=sum(o.flagged for o in outs["fixed"]), mean_tokens=round(statistics.mean(lengths), 1),
            all_times_s=times)
    result["settings"] = asdict(cfg) | {"bundle": str(path), "torch_threads": torch.get_num_threads()}
    return result


def format_table(r: dict) -> str:
    lines = [f"{'':8}  {'fixed s':>8}  {'scheduler s':>11}  {'throughput x':>12}  identical  flagged  mean tokens"]
    for name in ("plain", "guarded"):
        x = r[name]
        lines.append(f"{name:8}  {x['fixed_s']:8.2f}  {x['scheduler_s']:11.2f}  {x['ratio_throughput']:12.3f}  "
                     f"{x['identical_outputs']:>9}  {x['flagged']:7d}  {x['mean_tokens']:11.1f}")
    return "\n".join(lines)
