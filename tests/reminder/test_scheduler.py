"""ContinuousScheduler: rows join and leave mid-decode with the outputs they get alone (fp32, own check steps),
shared check steps, a flag in a row that joined late, cancellation, the KV budget, the stuck-loop check, and the
bf16 guarantee."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from sr_ray.models import Prompt, load_vlm
from sr_ray.reminder import GuardConfig, GuardedGenerator, HarmProbe, SamplingConfig, SoftPrompt
from sr_ray.reminder.batch import DecodeBatch
from sr_ray.reminder.scheduler import ContinuousScheduler, SchedulerConfig

INTERVAL = 4
NEVER, ALWAYS = 0.0, 1.0  # thresholds around a probe's P(safe) in (0, 1)

LONG = Prompt("Tell me a long story about a cat, a dog and a red chair, please.")
IMAGE = Prompt("What is shown in this picture?", Image.new("RGB", (48, 40), (200, 30, 30)))
SHORT = Prompt("hi")


def generator(vlm, separate_check: bool = False, split_check_min_idle: int | None = None) -> GuardedGenerator:
    torch.manual_seed(0)  # a probe that reads the hidden state, so checks at wrong positions would show
    probe = HarmProbe(torch.randn(vlm.hidden_size) * 0.05, 0.0)
    return GuardedGenerator(vlm, SoftPrompt.from_text(vlm), probe, GuardConfig(interval=INTERVAL),
                            separate_check=separate_check, split_check_min_idle=split_check_min_idle)


# how a check runs: fused into the batch's step, or apart over the checking rows whenever a row is idle
CHECK_PATHS = pytest.mark.parametrize("split", [None, 1], ids=["fused", "apart"])


def guard(threshold: float, **kw) -> GuardConfig:
    return GuardConfig(interval=INTERVAL, threshold=threshold, reminder_max_new_tokens=8, **kw)


def sampling(n: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, ignore_eos=True)  # fixed lengths: who is running when is known


@dataclass
class Trace:
    """What one request received, and at which scheduler iteration."""

    events: list = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    @property
    def output(self):
        return next(ev.output for ev in self.events if ev.output is not None)


class Driver:
    def __init__(self, scheduler: ContinuousScheduler):
        self.s, self.iteration, self.traces = scheduler, 0, {}

    def submit(self, prompt, n, g) -> tuple:
        trace = Trace()

        def record(events):
            trace.events += events
            trace.steps += [self.iteration] * len(events)
        return self.s.submit(prompt, sampling(n), g, record), trace

    def steps(self, n: int | None = None) -> None:
        while (n is None or n > 0) and self.s.pending():
            self.iteration += 1
            self.s.step()
            n = None if n is None else n - 1


def same(out, alone) -> None:
    assert out.prefix_ids == alone.prefix_ids and out.continuation_ids == alone.continuation_ids
    assert out.flagged_at == alone.flagged_at and out.finish_reason == alone.finish_reason
    assert [c.position for c in out.checks] == [c.position for c in alone.checks]
    torch.testing.assert_close(torch.tensor([c.p_safe for c in out.checks]),
                               torch.tensor([c.p_safe for c in alone.checks]), atol=1e-4, rtol=0)


def alone(gen, prompt, n, g):
    return gen.generate([prompt], sampling(n), g)[0]


@CHECK_PATHS
def test_rows_join_and_leave_mid_decode_with_their_solo_outputs(tiny_vlm, split):
    gen = generator(tiny_vlm, split_check_min_idle=split)
    d = Driver(ContinuousScheduler(gen, SchedulerConfig(prefill_chunk_tokens=8, check_steps="own")))
    a, ta = d.submit(LONG, 20, guard(NEVER))
    d.steps(5)
    b, tb = d.submit(IMAGE, 6, guard(NEVER))  # a long (image) prompt: prefilled 8 tokens per iteration
    d.steps(1)
    c, tc = d.submit(SHORT, 12, False)
    d.steps()
    same(ta.output, alone(gen, LONG, 20, guard(NEVER)))
    same(tb.output, alone(gen, IMAGE, 6, guard(NEVER)))
    same(tc.output, alone(gen, SHORT, 12, False))
    # b joined while a decoded: a kept receiving tokens during b's chunked prefill, b left before a ended
    b_start = tb.steps[0]
    assert sum(5 < s < b_start for s in ta.steps) >= 2
    assert tb.steps[-1] < ta.steps[-1] and tc.steps[0] < ta.steps[-1]
    assert d.s.stats.max_rows == 3 and d.s.stats.finished == 3 and d.s.rows == 0


@CHECK_PATHS
def test_a_row_that_joined_late_is_flagged_and_continues_in_place(tiny_vlm, split):
    gen = generator(tiny_vlm, split_check_min_idle=split)
    d = Driver(ContinuousScheduler(gen, SchedulerConfig(check_steps="own")))
    a, ta = d.submit(LONG, 20, guard(NEVER))
    d.steps(3)
    b, tb = d.submit(IMAGE, 12, guard(ALWAYS))  # flags at its first check, 4 tokens in
    d.steps(2)
    c, tc = d.submit(SHORT, 12, guard(ALWAYS, mode="official"))  # leaves and comes back re-prefilled
    d.steps()
    out_b = tb.output
    assert out_b.flagged_at == INTERVAL and len(out_b.continuation_ids) == 8
    same(out_b, alone(gen, IMAGE, 12, guard(ALWAYS)))
    same(ta.output, alone(gen, LONG, 20, guard(NEVER)))
    out_c = tc.output
    assert out_c.flagged_at is not None and out_c.extra_prefill_tokens > 0
    same(out_c, alone(gen, SHORT, 12, guard(ALWAYS, mode="official")))
    assert ta.steps[-1] > tb.steps[0]  # b was flagged while a was still decoding


def forward_widths(monkeypatch) -> list[int]:
    widths, forward = [], DecodeBatch.forward

    def spy(self, embeds, *args):
        widths.append(embeds.shape[1])
        return forward(self, embeds, *args)
    monkeypatch.setattr(DecodeBatch, "forward", spy)
    return widths


def check_iterations(trace: Trace) -> list[int]:
    return [s for ev, s in zip(trace.events, trace.steps) if ev.check is not None and ev.output is None]


def test_shared_check_steps_put_rows_that_joined_apart_in_one_wide_forward(tiny_vlm, monkeypatch):
    gen = generator(tiny_vlm)
    widths = forward_widths(monkeypatch)
    wide = {}
    for steps in ("own", "shared"):
        widths.clear()
        d = Driver(ContinuousScheduler(gen, SchedulerConfig(check_steps=steps)))
        a, ta = d.submit(LONG, 40, guard(NEVER))
        d.steps(3)  # b and c join a running batch, out of phase with a's checks
        b, tb = d.submit(IMAGE, 14, guard(NEVER))
        c, tc = d.submit(SHORT, 14, guard(ALWAYS))
        d.steps()
        wide[steps] = sum(w > 1 for w in widths)
        # never-flagged rows: the same tokens as alone whatever the check steps
        for trace, prompt, n in ((ta, LONG, 40), (tb, IMAGE, 14)):
            assert trace.output.prefix_ids == alone(gen, prompt, n, guard(NEVER)).prefix_ids
        for trace in (ta, tb):  # no run of more than `interval` answer tokens goes unchecked
            positions = [0] + [ch.position for ch in trace.output.checks]
            assert max(q - p for p, q in zip(positions, positions[1:])) <= INTERVAL
    assert wide["shared"] < wide["own"]
    # shared: b checks on a's steps, its first check early (it joined out of phase), then every interval
    assert set(check_iterations(tb)) <= set(check_iterations(ta))
    positions = [ch.position for ch in tb.output.checks]
    first = positions[0]
    assert first < INTERVAL and positions == list(range(first, 14, INTERVAL)) + [14]  # + the end check
    # the late row's flag fires at its first shared check and the reminder's continuation follows in place
    out_c = tc.output
    assert out_c.flagged_at == out_c.checks[0].position < INTERVAL and len(out_c.continuation_ids) == 8


def test_a_check_apart_runs_the_soft_prompt_over_the_checking_rows_only(tiny_vlm, monkeypatch):
    """With own check steps, rows that joined apart check at different steps: apart, each such check feeds
    the k soft columns to its rows alone and the batch's step stays one column wide; a flag there keeps the
    row's reminder in the batch (same output as alone, hence as fused)."""
    gen = generator(tiny_vlm, split_check_min_idle=1)
    steps, sides, forward, side_forward = [], [], DecodeBatch.forward, DecodeBatch.side_forward

    def spy_step(self, embeds, *args):
        steps.append((embeds.shape[1], len(self)))
        return forward(self, embeds, *args)

    def spy_side(self, rows, *args):
        sides.append((len(rows), len(self)))
        return side_forward(self, rows, *args)
    monkeypatch.setattr(DecodeBatch, "forward", spy_step)
    monkeypatch.setattr(DecodeBatch, "side_forward", spy_side)
    d = Driver(ContinuousScheduler(gen, SchedulerConfig(check_steps="own")))
    _, ta = d.submit(LONG, 20, guard(NEVER))
    d.steps(2)
    _, tb = d.submit(SHORT, 12, guard(ALWAYS))
    d.steps()
    partial = [(c, b) for c, b in sides if c < b]
    assert partial and all(c == 1 for c, _ in partial)  # a lone check: one row through the soft prompt
    # a step was widened only where no row was idle: a row checking alone in the batch
    assert {rows for width, rows in steps if width > 1} == {1}
    same(tb.output, alone(gen, SHORT, 12, guard(ALWAYS)))
    same(ta.output, alone(gen, LONG, 20, guard(NEVER)))
    assert tb.output.flagged_at == INTERVAL


def test_a_cancelled_request_leaves_within_one_step(tiny_vlm):
    gen = generator(tiny_vlm)
    d = Driver(ContinuousScheduler(gen, SchedulerConfig(check_steps="own")))
    a, ta = d.submit(LONG, 20, guard(NEVER))
    b, tb = d.submit(IMAGE, 20, guard(NEVER))
    d.steps(4)
    assert d.s.rows == 2
    received = len(ta.events)
    a.cancel()
    d.steps(1)
    assert d.s.rows == 1 and len(ta.events) == received  # gone before the next decode step
    waiting = d.submit(SHORT, 20, guard(NEVER))
    waiting[0].cancel()  # cancelled before it was admitted: never prefilled nor decoded
    d.steps()
    assert waiting[1].events == [] and d.s.stats.cancelled == 2
    same(tb.output, alone(gen, IMAGE, 20, guard(NEVER)))


def test_the_kv_budget_makes_requests_wait_and_refuses_what_never_fits(tiny_vlm):
    gen = generator(tiny_vlm)
    probe_s = ContinuousScheduler(gen)
    n_long = int(tiny_vlm.encode([LONG]).attention_mask.sum())
    budget = probe_s.reservation(n_long, sampling(12), guard(NEVER)) + 10  # one request at a time
    d = Driver(ContinuousScheduler(gen, SchedulerConfig(kv_budget_tokens=budget)))
    a, ta = d.submit(LONG, 12, guard(NEVER))
    b, tb = d.submit(LONG, 12, guard(NEVER))
    d.steps()
    assert tb.steps[0] > ta.steps[-1] and d.s.stats.max_rows == 1
    assert d.s.stats.max_kv_tokens <= budget
    same(tb.output, alone(gen, LONG, 12, guard(NEVER)))
    with pytest.raises(ValueError, match="KV-cache tokens"):
        d.s.submit(LONG, sampling(200), guard(NEVER))


def test_check_fails_while_the_loop_is_stuck_and_when_it_is_gone(tiny_vlm):
    s = ContinuousScheduler(generator(tiny_vlm), SchedulerConfig(stuck_after_s=0.2)).start()
    s.check()
    release = threading.Event()
    blocked = s.call(release.wait)  # an iteration that does not return
    deadline = time.monotonic() + 30
    while not blocked.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.4)
    with pytest.raises(RuntimeError, match="stuck"):
        s.check()
    release.set()
    assert blocked.result(timeout=30) is True
    s.check()
    out = s.call(lambda: "ran on the loop").result(timeout=30)
    assert out == "ran on the loop"
    s.close()
    s._thread.join(timeout=30)
    with pytest.raises(RuntimeError, match="not running"):
        s.check()


def lm_head_outputs(vlm, run) -> list[torch.Tensor]:
    seen = []
    hook = vlm.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_guarantee_per_dtype_for_never_flagged_rows(tiny_vlm, dtype):
    """docs/core.md: with the check as its own forward, a never-flagged row's logits are bit-identical to plain
    decoding in every dtype, in a fixed batch and under the scheduler; the fused forward differs by rounding
    (fp32: ~1e-7, tokens identical unless a near-tie; bf16: no guarantee)."""
    vlm = load_vlm(tiny_vlm.model_id, dtype=dtype)
    prompts, n = [LONG, IMAGE, SHORT], 24
    fixed = lambda gen, g: lambda: gen.generate(prompts, sampling(n), g)  # noqa: E731

    def scheduled(gen, g):
        def run():
            d = Driver(ContinuousScheduler(gen))
            d.submit(LONG, n, g)
            d.steps(3)
            d.submit(IMAGE, 8, g)
            d.steps(2)
            d.submit(SHORT, n, g)
            d.steps()
        return run

    separate = generator(vlm, separate_check=True)
    for schedule in (fixed, scheduled):
        plain = lm_head_outputs(vlm, schedule(separate, False))
        guarded = lm_head_outputs(vlm, schedule(separate, guard(NEVER)))
        assert len(plain) == len(guarded) and all(torch.equal(a, b) for a, b in zip(plain, guarded))
    fused = generator(vlm)
    plain = lm_head_outputs(vlm, fixed(fused, False))
    guarded = lm_head_outputs(vlm, fixed(fused, guard(NEVER)))
    if dtype == torch.float32:
        assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(plain, guarded))
        assert [o.prefix_ids for o in fused.generate(prompts, sampling(n), guard(NEVER))] == \
               [o.prefix_ids for o in fused.generate(prompts, sampling(n), False)]
    assert any(not torch.equal(a, b) for a, b in zip(plain, guarded))  # why the separate option exists
