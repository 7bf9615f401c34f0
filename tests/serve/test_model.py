"""The model replica class in-process (no Serve): the continuous scheduler behind `generate`, requests that
overlap in time get their solo texts, a closed stream cancels its row, a stop string ends the row early,
and `check_health` fails while the decode loop is stuck."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sr_ray.models import Prompt
from sr_ray.reminder import GuardConfig, GuardedGenerator, ReminderBundle, SamplingConfig
from sr_ray.serve.config import BatchingConfig, ServeConfig
from sr_ray.serve.holdback import Chunk
from sr_ray.serve.model import Admission, GenerationJob, GuardedModel
from sr_ray.serve.policy import GuardChoice
from tests.bundles import constant_probe_bundle

NEVER = 0.2  # the constant P(safe) = 0.5 never falls below it


@pytest.fixture(scope="module")
def replica(tiny_llava, tmp_path_factory):
    bundle = constant_probe_bundle(tiny_llava, tmp_path_factory.mktemp("model") / "bundle", bias=0.0, interval=4)
    cfg = ServeConfig(model="tiny-llava", bundle=str(bundle), audit_log=None,
                      batching=BatchingConfig(max_batch_size=4, stuck_after_s=0.3))
    model = GuardedModel(cfg)
    yield model
    model.scheduler.close()


def job(text: str, max_tokens: int, stop=()) -> GenerationJob:
    return GenerationJob(Prompt(text), SamplingConfig(max_new_tokens=max_tokens),
                         GuardChoice(enabled=True, hold_back=True, interval=4, threshold=NEVER), list(stop), 256)


def solo_text(replica, j: GenerationJob) -> str:
    guard = GuardConfig(interval=4, threshold=NEVER, reminder_max_new_tokens=j.sampling.max_new_tokens)
    gen = GuardedGenerator(replica.vlm, replica.generator.soft_prompt, replica.generator.probe)
    return gen.generate([j.prompt], j.sampling, guard)[0].text


async def collect(replica, j: GenerationJob, delay: float = 0.0) -> tuple[Admission, list[Chunk]]:
    await asyncio.sleep(delay)
    items = [item async for item in replica.generate(j)]
    return items[0], items[1:]


def settled(replica, before: dict) -> dict:
    """The scheduler's stats once every request submitted since `before` has left the batch."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = replica.stats()
        if now["rows"] == 0 and now["finished"] + now["cancelled"] == now["submitted"]:
            return now
        time.sleep(0.02)
    raise AssertionError(f"rows still decoding: {replica.stats()} (before: {before})")


def test_overlapping_requests_get_their_solo_texts(replica):
    jobs = [job("Tell me a long story about a cat.", 24), job("hi", 8), job("What is the capital of France?", 16)]

    async def main():
        return await asyncio.gather(*(collect(replica, j, 0.05 * i) for i, j in enumerate(jobs)))

    before = replica.stats()
    results = asyncio.run(main())
    for j, (admission, chunks) in zip(jobs, results):
        assert admission.error is None and admission.prompt_tokens > 0
        assert "".join(c.text for c in chunks) == solo_text(replica, j)
        assert chunks[-1].finish_reason is not None and chunks[-1].safety["flagged"] is False
    after = settled(replica, before)
    # a row leaves when its output is out, or a step earlier once its text is complete (the releaser's max_tokens)
    assert after["finished"] + after["cancelled"] == before["finished"] + before["cancelled"] + 3


def test_a_closed_stream_cancels_its_row(replica):
    long = job("Tell me a long story about a cat.", 200)

    async def main():
        stream = replica.generate(long)
        await anext(stream)  # admission
        await anext(stream)  # some text: the row is decoding
        await stream.aclose()  # what Serve does when the client goes away

    before = replica.stats()
    asyncio.run(main())
    after = settled(replica, before)
    assert after["cancelled"] == before["cancelled"] + 1 and after["finished"] == before["finished"]
    assert after["steps"] - before["steps"] < 100  # it did not decode its 200 tokens


def test_a_stop_string_ends_the_row(replica):
    full = solo_text(replica, job("Tell me a long story about a cat.", 40))
    stop = full[len(full) // 3:len(full) // 3 + 3]
    cut = job("Tell me a long story about a cat.", 40, stop=[stop])
    before = replica.stats()
    _, chunks = asyncio.run(collect(replica, cut))
    assert "".join(c.text for c in chunks) == full[:full.index(stop)] and chunks[-1].finish_reason == "stop"
    after = settled(replica, before)
    assert after["cancelled"] == before["cancelled"] + 1  # left the batch once its text was complete
    assert after["steps"] - before["steps"] < 40


def test_prompts_above_the_limit_are_refused_at_admission(replica):
    plain = GuardChoice(enabled=False, hold_back=True, interval=None, threshold=None)
    long = GenerationJob(Prompt("word " * 300), SamplingConfig(max_new_tokens=8), plain, [], 64)
    admission, chunks = asyncio.run(collect(replica, long))
    assert admission.error and "above this server's limit" in admission.error and chunks == []


def test_check_health_fails_while_the_decode_loop_is_stuck(replica):
    replica.check_health()
    release = threading.Event()
    blocked = replica.scheduler.call(release.wait)
    while not blocked.running():
        time.sleep(0.02)
    time.sleep(0.5)
    with pytest.raises(RuntimeError, match="stuck"):
        replica.check_health()
    release.set()
    blocked.result(timeout=30)
    replica.check_health()
