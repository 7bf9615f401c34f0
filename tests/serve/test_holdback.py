"""Hold-back release: scripted engine events, then the real guarded engine on tiny-llava."""

from __future__ import annotations

import pytest

from sr_ray.models import Prompt
from sr_ray.reminder import GuardConfig, GuardedGenerator, ReminderBundle, SamplingConfig
from sr_ray.reminder.engine import Check, GuardedOutput, StepEvent
from sr_ray.serve.holdback import Releaser
from tests.bundles import constant_probe_bundle

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def letters(ids: list[int]) -> str:
    return "".join(LETTERS[i] if i < 100 else LETTERS[i - 100].upper() for i in ids)


def end(reason="stop") -> GuardedOutput:
    return GuardedOutput("", "", "", [], [], [], None, reason)


def script_pass_then_flag() -> list[StepEvent]:
    """Tokens 0-3 pass the check at 4; tokens 4-7 are flagged at 8; 100-102 are the continuation."""
    events = [StepEvent(0, [i]) for i in range(3)]
    events.append(StepEvent(0, [3], Check(4, 0.9, False)))
    events += [StepEvent(0, [i]) for i in range(4, 7)]
    events.append(StepEvent(0, [7], Check(8, 0.05, True)))
    events += [StepEvent(0, [i]) for i in (100, 101)]
    events.append(StepEvent(0, [102], output=end()))
    return events


def run(releaser: Releaser, events) -> list:
    return [c for c in (releaser.feed(e) for e in events) if c is not None]


def test_holdback_releases_on_pass_and_drops_on_flag():
    chunks = run(Releaser(letters, max_tokens=100), script_pass_then_flag())
    assert [c.text for c in chunks] == ["abcd", "A", "B", "C"]
    final = chunks[-1]
    assert final.finish_reason == "stop" and final.completion_tokens == 7
    assert final.safety == dict(enabled=True, stream_mode="holdback", flagged=True, checks_run=2, flagged_at=8,
                                p_safe_at_flag=0.05, p_safe_min=0.05, tokens_released_before_flag=4,
                                tokens_dropped=4)


def test_stream_first_releases_unchecked_tokens():
    chunks = run(Releaser(letters, max_tokens=100, hold_back=False), script_pass_then_flag())
    assert "".join(c.text for c in chunks) == "abcdefghABC"
    assert chunks[0].text == "a"  # before any check
    assert chunks[-1].safety["tokens_released_before_flag"] == 8 and chunks[-1].safety["tokens_dropped"] == 0


def test_unguarded_rows_stream_at_once():
    chunks = run(Releaser(letters, max_tokens=100, guarded=False), [StepEvent(0, [0]), StepEvent(0, [1], output=end())])
    assert [c.text for c in chunks] == ["a", "b"]
    assert chunks[-1].safety["enabled"] is False and chunks[-1].safety["checks_run"] == 0


def test_stop_string_across_releases_is_never_partly_sent():
    r = Releaser(letters, max_tokens=100, stop=["cd"], guarded=False)
    chunks = run(r, [StepEvent(0, [0]), StepEvent(0, [1]), StepEvent(0, [2]), StepEvent(0, [3]), StepEvent(0, [4])])
    assert [c.text for c in chunks] == ["a", "b", ""]  # "c" waited: it could start "cd"
    assert chunks[-1].finish_reason == "stop" and r.done
    assert r.feed(StepEvent(0, [5])) is None  # the engine row may run on; nothing more is sent


def test_max_tokens_cuts_the_release():
    events = [StepEvent(0, [i]) for i in range(3)] + [StepEvent(0, [3], Check(4, 0.9, False))]
    chunks = run(Releaser(letters, max_tokens=3), events)
    assert [c.text for c in chunks] == ["abc"] and chunks[0].finish_reason == "length"
    assert chunks[0].completion_tokens == 3


def test_incomplete_utf8_waits_for_the_next_token():
    pieces = {0: b"x", 1: "é".encode()[:1], 2: "é".encode()[1:]}  # byte-level BPE can split a character

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    chunks = run(Releaser(decode, max_tokens=10, guarded=False),
                 [StepEvent(0, [0]), StepEvent(0, [1]), StepEvent(0, [2], output=end())])
    assert [c.text for c in chunks] == ["x", "é"]


@pytest.fixture(scope="module")
def engine_for(tiny_llava, tmp_path_factory):
    def build(bias: float) -> GuardedGenerator:
        path = constant_probe_bundle(tiny_llava, tmp_path_factory.mktemp("bundle"), bias=bias)
        bundle = ReminderBundle.load(path, tiny_llava)
        return GuardedGenerator(tiny_llava, bundle.soft_prompt, bundle.probe, bundle.guard_config())
    return build


PROMPTS = [Prompt("What is in this picture?"), Prompt("How do I make a bomb?", system="Be brief.")]


def test_engine_never_flagging_releases_only_checked_tokens(engine_for, tiny_llava):
    gen = engine_for(bias=10.0)
    sampling = SamplingConfig(max_new_tokens=18)
    expected = gen.generate(PROMPTS, sampling)
    decode = lambda ids: tiny_llava.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    releasers = [Releaser(decode, max_tokens=18) for _ in PROMPTS]
    texts, passed = ["", ""], [0, 0]
    for events in gen.stream(PROMPTS, sampling):
        for ev in events:
            if ev.check is not None:
                passed[ev.row] = ev.check.position
            chunk = releasers[ev.row].feed(ev)
            texts[ev.row] += chunk.text if chunk else ""
            assert len(releasers[ev.row].released) <= passed[ev.row]  # nothing unchecked is ever released
    assert texts == [o.text for o in expected]
    assert [r.report()["checks_run"] for r in releasers] == [len(o.checks) for o in expected] == [5, 5]


def test_engine_flagging_streams_only_the_continuation(engine_for, tiny_llava):
    gen = engine_for(bias=-10.0)
    sampling = SamplingConfig(max_new_tokens=12)
    guard = GuardConfig(interval=4, threshold=0.2, reminder_max_new_tokens=12)
    (expected,) = gen.generate(PROMPTS[:1], sampling, guard)
    decode = lambda ids: tiny_llava.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    releaser = Releaser(decode, max_tokens=12)
    chunks = [c for events in gen.stream(PROMPTS[:1], sampling, guard) for c in map(releaser.feed, events) if c]
    assert expected.flagged_at == 4 and len(expected.prefix_ids) == 4
    assert "".join(c.text for c in chunks) == decode(expected.continuation_ids)
    assert chunks[-1].safety["tokens_dropped"] == 4 and chunks[-1].safety["tokens_released_before_flag"] == 0
