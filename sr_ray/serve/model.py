"""The model replica: one VLM + reminder, decoding concurrent requests as one guarded batch.

`generate(job)` streams one request: first an `Admission` (prompt token count, or why it is refused),
then `Chunk`s of released text. Two batchers (`batching.scheduler`):
- "continuous" (default): a `ContinuousScheduler` thread; a request joins the running batch between decode
  steps and leaves when it finishes, when its client goes away (Serve cancels this generator, which cancels
  its row) or when its text is complete (stop string, max_tokens);
- "static": requests that arrive together are decoded in one `GuardedGenerator.stream()` call
  (`@serve.batch`, streaming form), a batch fixed when it starts; kept as the benchmark's baseline.
All tokenizer and torch work runs on one thread (the scheduler's, or the static worker): the replica's
event loop stays free for new requests and health checks, and the fast tokenizer, which is not safe to use
from two threads at once, is only ever used from that thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from ray import serve

from sr_ray.models import Prompt, load_vlm
from sr_ray.reminder import GuardConfig, GuardedGenerator, HarmProbe, ReminderBundle, SamplingConfig, SoftPrompt
from sr_ray.reminder.scheduler import ContinuousScheduler, SchedulerConfig
from sr_ray.runtime import quiet_third_party
from sr_ray.serve.config import ServeConfig
from sr_ray.serve.holdback import Releaser
from sr_ray.serve.policy import GuardChoice
from sr_ray.tracking import resolve_bundle


@dataclass
class GenerationJob:
    prompt: Prompt
    sampling: SamplingConfig
    guard: GuardChoice
    stop: list[str]
    max_prompt_tokens: int


@dataclass
class Admission:
    prompt_tokens: int
    error: str | None = None  # set when the request is refused (answered with 400)


def load_reminder(cfg: ServeConfig, vlm) -> tuple[SoftPrompt, HarmProbe, GuardConfig] | None:
    """The bundle (checksums verified by `ReminderBundle.load`), or a fresh soft prompt + a given probe; the
    guard is the bundle's (a bare probe: the paper's interval, the probe's threshold) under the server's
    `guard:` settings."""
    server = dict(mode=cfg.guard.mode, interval=cfg.guard.interval, threshold=cfg.guard.threshold)
    if cfg.bundle:
        bundle = ReminderBundle.load(resolve_bundle(cfg.bundle, cfg.tracking_uri), vlm)
        return bundle.soft_prompt, bundle.probe, bundle.guard_config(**server)
    if cfg.probe:
        return SoftPrompt.from_text(vlm), HarmProbe.load(cfg.probe, vlm), GuardConfig().override(**server)
    return None


class GuardedModel:
    def __init__(self, cfg: ServeConfig):
        quiet_third_party()
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.vlm = load_vlm(cfg.model)
        reminder = load_reminder(cfg, self.vlm)
        soft_prompt, probe, self.base_guard = reminder or (None, None, GuardConfig())
        b = cfg.batching
        self.generator = GuardedGenerator(self.vlm, soft_prompt, probe, self.base_guard,
                                          separate_check=b.separate_check,
                                          split_check_min_idle=b.split_check_min_idle)
        self.scheduler = None
        if b.scheduler == "continuous":
            self.scheduler = ContinuousScheduler(self.generator, SchedulerConfig(
                max_batch_size=b.max_batch_size, kv_budget_tokens=b.kv_budget_tokens,
                prefill_chunk_tokens=b.prefill_chunk_tokens, stuck_after_s=b.stuck_after_s,
                check_steps=b.check_steps)).start()
        else:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sr_ray_model")
            self._static_batches = 0
            self._batched = serve.batch(max_batch_size=b.max_batch_size, batch_wait_timeout_s=b.batch_wait_timeout_s,
                                        max_concurrent_batches=b.max_concurrent_batches)(self._decode_batch)

    def check_health(self) -> None:
        """Serve's periodic probe: fails (and the replica is replaced) when the decode loop is stuck or gone."""
        if self.scheduler is not None:
            self.scheduler.check()

    def stats(self) -> dict:
        """This process's CPU seconds, and the batcher's counters: the scheduler's (requests finished/cancelled,
        decode steps, largest batch, rows decoding now) or the static batcher's batches decoding now."""
        if self.scheduler is None:
            return {"cpu_s": time.process_time(), "batches": self._static_batches}
        return {"cpu_s": time.process_time(), "rows": self.scheduler.rows, **dataclasses.asdict(self.scheduler.stats)}

    def __del__(self):
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()

    async def _on_worker(self, fn, *args):
        if self.scheduler is not None:
            return await asyncio.wrap_future(self.scheduler.call(fn, *args))
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def prompt_tokens(self, prompt: Prompt) -> int:
        return int(self.vlm.encode([prompt]).attention_mask.sum())

    async def generate(self, job: GenerationJob):
        if self.scheduler is not None:
            async for item in self._generate_continuous(job):
                yield item
            return
        n = await self._on_worker(self.prompt_tokens, job.prompt)
        if n > job.max_prompt_tokens:
            yield Admission(n, f"the prompt is {n} tokens, above this server's limit of {job.max_prompt_tokens}")
            return
        yield Admission(n)
        results = self._batched(job)
        try:
            async for chunk in results:
                if chunk is not None:
                    yield chunk
                    if chunk.finish_reason is not None:
                        break
        finally:
            # The batch decodes on for other rows; consume this row's remaining results so no future is
            # left unretrieved (the batch ends this row's results one step after its last chunk).
            asyncio.get_running_loop().create_task(_drain(results))

    async def _generate_continuous(self, job: GenerationJob):
        encoded = await self._on_worker(self.vlm.encode, [job.prompt])
        n = int(encoded.attention_mask.sum())
        if n > job.max_prompt_tokens:
            yield Admission(n, f"the prompt is {n} tokens, above this server's limit of {job.max_prompt_tokens}")
            return
        loop, chunks = asyncio.get_running_loop(), asyncio.Queue()
        releaser, ticket = self._releaser(job), None

        def on_events(events) -> None:  # on the scheduler's thread, like every tokenizer call
            for event in events:
                chunk = releaser.feed(event)
                if chunk is not None:
                    loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            if releaser.done:  # stop string or max_tokens: the row need not decode on
                ticket.cancel()

        try:
            ticket = self.scheduler.submit(job.prompt, job.sampling, self._guard_config(job), on_events,
                                           lambda err: loop.call_soon_threadsafe(chunks.put_nowait, err), encoded)
        except ValueError as err:  # can never fit this replica's KV budget
            yield Admission(n, str(err))
            return
        try:
            yield Admission(n)
            while True:
                chunk = await chunks.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:  # finished, cancelled by Serve (client gone, timeout) or failed: the row leaves the batch
            ticket.cancel()

    def _guard_config(self, job: GenerationJob) -> GuardConfig | None:
        choice = job.guard
        if not choice.enabled:
            return None
        # max_tokens bounds the whole answer, so the continuation after a flag never needs more.
        return self.base_guard.override(interval=choice.interval, threshold=choice.threshold, check_at_end=True,
                                        reminder_max_new_tokens=job.sampling.max_new_tokens)

    def _releaser(self, job: GenerationJob) -> Releaser:
        tokenizer = self.vlm.tokenizer
        return Releaser(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), job.sampling.max_new_tokens,
                        job.stop, guarded=job.guard.enabled, hold_back=job.guard.hold_back)

    async def _decode_batch(self, jobs: list[GenerationJob]):
        """One guarded decode for a batch of requests; yields one result per request per step: a `Chunk`,
        None (nothing released) or, once the request has its last chunk, the end-of-stream sentinel."""
        releasers = [self._releaser(job) for job in jobs]
        steps = self.generator.stream([j.prompt for j in jobs], [j.sampling for j in jobs],
                                      [self._guard_config(j) for j in jobs])

        def step() -> list | None:
            events = next(steps, None)
            if events is None:
                return None
            out: list = [StopAsyncIteration if r.done else None for r in releasers]
            for event in events:
                if not releasers[event.row].done:
                    out[event.row] = releasers[event.row].feed(event)
            return out

        self._static_batches += 1
        try:
            while (out := await self._on_worker(step)) is not None:
                yield out
        finally:
            self._static_batches -= 1


async def _drain(results) -> None:
    async for _ in results:
        pass
