"""The image-blind check (GuardConfig.blind_threshold): each guarded row decodes beside a text-only twin that reads
the same answer without the image; its reading is the teacher-forced one, it flags on its own, it leaves
decoding untouched, and rows with twins join, flag and leave under the scheduler as they do alone."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sr_ray.models import Prompt
from sr_ray.reminder import GuardConfig, GuardedGenerator, HarmProbe, SamplingConfig, SoftPrompt
from sr_ray.reminder.forward import answer_forward
from sr_ray.reminder.scheduler import ContinuousScheduler, SchedulerConfig

INTERVAL = 4
NEVER, ALWAYS = 0.0, 1.0
IMAGE = Prompt("What is shown in this picture?", Image.new("RGB", (48, 40), (200, 30, 30)))
TEXT = Prompt("Tell me a long story about a cat, a dog and a red chair, please.")
SAMPLING = SamplingConfig(max_new_tokens=14, ignore_eos=True)


def generator(vlm) -> GuardedGenerator:
    torch.manual_seed(0)  # a probe that reads the hidden state, so a wrong reading would show
    return GuardedGenerator(vlm, SoftPrompt.from_text(vlm), HarmProbe(torch.randn(vlm.hidden_size) * 0.05, 0.0))


def guard(threshold: float, blind: float | None, **kw) -> GuardConfig:
    return GuardConfig(interval=INTERVAL, threshold=threshold, blind_threshold=blind, reminder_max_new_tokens=6, **kw)


def test_the_twin_reads_the_answer_without_the_image_and_leaves_decoding_alone(tiny_vlm):
    gen = generator(tiny_vlm)
    outs = gen.generate([IMAGE, TEXT], SAMPLING, guard(NEVER, NEVER))
    plain = gen.generate([IMAGE, TEXT], SAMPLING, guard(NEVER, None))
    assert [o.prefix_ids for o in outs] == [o.prefix_ids for o in plain]  # the twins change no token
    soft = gen.soft_prompt(tiny_vlm.dtype)
    for prompt, out in zip([Prompt(IMAGE.text), TEXT], outs):  # the twin's reading = the text-only teacher-forced one
        positions = [c.position for c in out.checks]
        e = tiny_vlm.embed(tiny_vlm.encode([prompt] * len(positions)))
        ref = gen.probe.p_safe(answer_forward(tiny_vlm, e, [out.prefix_ids[:n] for n in positions], soft).soft_hidden())
        torch.testing.assert_close(torch.tensor([c.p_safe_blind for c in out.checks]), ref, atol=1e-4, rtol=0)
    image, text = outs
    # without an image the twin reads what the row reads; with one it does not
    torch.testing.assert_close(torch.tensor([c.p_safe_blind for c in text.checks]),
                               torch.tensor([c.p_safe for c in text.checks]), atol=1e-4, rtol=0)
    assert any(abs(c.p_safe_blind - c.p_safe) > 1e-3 for c in image.checks)
    assert "p_safe_blind" in image.trace() and "p_safe_blind" not in plain[0].trace()


@pytest.mark.parametrize("mode", ["inplace", "official"])
def test_the_blind_reading_alone_flags(tiny_vlm, mode):
    gen = generator(tiny_vlm)
    out = gen.generate([IMAGE], SAMPLING, guard(NEVER, ALWAYS, mode=mode))[0]
    assert out.flagged_at is not None and out.checks[0].flagged and out.checks[0].p_safe >= NEVER
    assert len(out.continuation_ids) == 6
    assert not gen.generate([IMAGE], SAMPLING, guard(NEVER, NEVER, mode=mode))[0].flagged


def greedy_after_reminder(vlm, gen, prompt: Prompt, out) -> list[int]:
    """The greedy continuation of `out` after the reminder, teacher-forced in `prompt`'s context."""
    e = vlm.embed(vlm.encode([prompt]))
    fw = answer_forward(vlm, e, [out.prefix_ids], gen.soft_prompt(vlm.dtype), [out.continuation_ids])
    return vlm.lm_head(fw.second_hidden()).argmax(-1)[0].tolist()


def test_a_flagged_answer_continues_from_the_twin_without_the_image(tiny_vlm):
    gen = generator(tiny_vlm)
    for own, blind in ((ALWAYS, None), (ALWAYS, NEVER), (NEVER, ALWAYS)):
        out = gen.generate([IMAGE], SAMPLING, guard(own, blind))[0]
        assert out.flagged_at == INTERVAL and len(out.continuation_ids) == 6
        context = IMAGE if blind is None else Prompt(IMAGE.text)  # with the blind check on, whichever reading flagged
        assert greedy_after_reminder(tiny_vlm, gen, context, out) == out.continuation_ids
    alone = gen.generate([IMAGE], SAMPLING, guard(ALWAYS, None))[0]
    handed = gen.generate([IMAGE], SAMPLING, guard(ALWAYS, NEVER))[0]
    assert alone.prefix_ids == handed.prefix_ids and alone.continuation_ids != handed.continuation_ids


def test_rows_with_twins_join_flag_and_leave_under_the_scheduler_as_alone(tiny_vlm):
    gen = generator(tiny_vlm)
    s = ContinuousScheduler(gen, SchedulerConfig(check_steps="own"))
    got = {}
    collect = lambda name: lambda events: got.update({name: ev.output for ev in events if ev.output})  # noqa: E731
    s.submit(TEXT, SAMPLING, guard(NEVER, NEVER), collect("text"))
    for _ in range(3):
        s.step()
    assert s.rows == 1  # a text-only row needs no twin
    s.submit(IMAGE, SAMPLING, guard(NEVER, ALWAYS), collect("flagged"))
    plain = s.submit(IMAGE, SAMPLING, False, collect("plain"))  # unguarded: no twin
    twins = 0
    while s.pending():
        s.step()
        running = s._running
        twins = max(twins, len(running.blind) if running is not None and running.blind is not None else 0)
    # text 1, image row 1 (then its twin, after the hand-over), plain 1; the twin waited in the blind cache
    assert s.stats.max_rows == 3 and twins == 1 and s.rows == 0
    for name, prompt, g in (("text", TEXT, guard(NEVER, NEVER)), ("flagged", IMAGE, guard(NEVER, ALWAYS)),
                            ("plain", IMAGE, False)):
        alone = gen.generate([prompt], SAMPLING, g)[0]
        assert got[name].prefix_ids == alone.prefix_ids and got[name].continuation_ids == alone.continuation_ids
        assert got[name].flagged_at == alone.flagged_at
    assert got["flagged"].flagged_at == INTERVAL and plain.done


def test_the_twin_is_fed_only_at_its_rows_checks_in_a_cache_without_the_image(tiny_vlm, monkeypatch):
    from sr_ray.reminder.batch import DecodeBatch

    gen, calls, forward = generator(tiny_vlm), [], DecodeBatch.forward

    def spy(self, embeds, *args):
        calls.append((any(row.twin_of is not None for row in self.rows), embeds.shape[1], self.columns))
        return forward(self, embeds, *args)
    monkeypatch.setattr(DecodeBatch, "forward", spy)
    out = gen.generate([IMAGE], SAMPLING, guard(NEVER, NEVER))[0]
    twin = [c for c in calls if c[0]]
    main = [c for c in calls if not c[0]]
    assert len(twin) == len(out.checks) == 4  # at 4, 8, 12 and the end check at 14, never in between
    # each reading feeds the tokens since the last one plus the soft prompt (k = 4): 4, 4, 4, 2 tokens
    assert [w for _, w, _ in twin] == [8, 8, 8, 6]
    assert twin[0][2] < main[0][2]  # at the first check: the text prompt's columns, not the image prompt's
