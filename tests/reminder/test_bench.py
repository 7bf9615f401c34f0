"""The engine benchmarks run end to end on tiny-llava and compare what they claim to compare (their timings
are not asserted: timing goals live in benchmarks/)."""

from __future__ import annotations

from sr_ray.reminder.bench import GuardBenchConfig, format_table, run_guard_bench
from sr_ray.reminder.bench_batch import BatchBenchConfig, run_batch_bench
from sr_ray.reminder.bench_batch import format_table as batch_table


def test_guard_bench_times_every_variant_on_the_same_tokens():
    r = run_guard_bench(GuardBenchConfig(model="tiny-llava", new_tokens=12, interval=4, repeats=1))
    assert r["outputs_identical"] and r["separate_identical_to_plain"] and r["blind_identical_to_plain"]
    assert all(len(v) == 1 and v[0] > 0 for v in r["all_times_s"].values())
    assert r["flag_position_ours"] == 4 and r["extra_prefill_tokens_on_flag"] == 0
    assert "image-blind" in format_table(r)


def test_batch_bench_gets_the_fixed_batch_outputs_through_the_scheduler(tiny_bundle):
    r = run_batch_bench(BatchBenchConfig(model="tiny-llava", bundle=str(tiny_bundle), rows=8, batch_size=3,
                                         max_new_tokens=10, repeats=1))
    for mode in ("plain", "guarded"):
        assert r[mode]["identical_outputs"] == "8/8" and r[mode]["ratio_throughput"] > 0
    assert "guarded" in batch_table(r)
