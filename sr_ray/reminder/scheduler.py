"""Iteration-level scheduling for the guarded engine: requests join the running batch between decode steps
and leave it as soon as they finish or are cancelled.

One `step()` is one scheduler iteration:
  1. run queued `call()`s (work that must share the engine's thread, e.g. the tokenizer);
  2. drop cancelled requests wherever they are (waiting, prefilling, running): a cancelled row leaves
     before the next decode step;
  3. admit waiting requests in arrival order while the batch has room (`max_batch_size` rows) and the KV
     budget allows (see below);
  4. prefill admitted requests, at most `prefill_chunk_tokens` prompt tokens per iteration (so a long prompt
     stalls the decoding rows by one chunk's forward at a time), then merge them into the running batch;
  5. one guarded decode step of the running batch (per-row sampling, guard state, fused checks, hold-back
     events as in `GuardedGenerator.stream`); finished rows leave. Checks fall on the batch's shared steps
     by default (`check_steps`): a fused check widens the whole batch's forward, so rows that joined at
     different steps would otherwise widen different steps (on CPU a 5-wide step of 8 rows costs ~3.4x a
     1-wide one, docs/core.md).
A row flagged in `mode="official"` leaves and comes back as its re-prefilled continuation.

KV budget: the running batch's cache is a rectangle of rows x columns (left-padded, see `batch.py`); its
columns never exceed the longest row's reservation, so admission keeps rows x (largest reservation) within
`kv_budget_tokens`. A request's reservation covers its prompt, its answer budget and, when guarded, the
reminder's continuation and the soft-prompt columns other rows' flags can add. A request that could never
fit is refused at `submit`.

The driver is `start()` (one daemon thread looping `step()`), or a caller calling `step()` itself (tests).
This module has no Ray dependency; `sr_ray.serve.model` wires it to Serve.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch

from sr_ray.models.vlm import Prompt, PromptBatch
from sr_ray.reminder.batch import DecodeBatch, Prefill
from sr_ray.reminder.engine import GuardedGenerator, GuardedOutput, SamplingConfig, StepEvent, per_row
from sr_ray.reminder.guard import GuardConfig
from sr_ray.reminder.twins import needs_twin


@dataclass
class SchedulerConfig:
    max_batch_size: int = 8  # rows decoding at once
    kv_budget_tokens: int = 32768  # cache columns x rows the running batch may hold
    prefill_chunk_tokens: int = 128  # prompt tokens prefilled per iteration while other rows decode
    stuck_after_s: float = 30.0  # `check()` fails when an iteration with work pending takes longer
    # "shared": every row checks on the batch's check steps (one wide forward per `interval` steps however the
    # rows joined; a late row's checks shift by its join phase); "own": at its own multiples of `interval`
    # (token-identical to decoding alone, but rows that joined apart widen different steps)
    check_steps: Literal["shared", "own"] = "shared"

    @classmethod
    def offline(cls, max_batch_size: int) -> "SchedulerConfig":
        """Batch inference: each prompt prefilled whole (no row waits on it), no KV budget (as a fixed batch),
        checks at each row's own positions (the paper's)."""
        return cls(max_batch_size=max_batch_size, kv_budget_tokens=1 << 30, prefill_chunk_tokens=1 << 30,
                   check_steps="own")


@dataclass(eq=False)
class Ticket:
    """One submitted request. `cancel()` is safe from any thread; the row leaves within one decode step."""

    id: int
    prompt: Prompt
    sampling: SamplingConfig
    guard: GuardConfig | None
    on_events: Callable[[list[StepEvent]], None]  # called on the scheduler's thread
    on_error: Callable[[BaseException], None] | None
    encoded: PromptBatch
    reserved: int  # KV columns per cache row
    rows: int = 1  # cache rows: 2 with an image-blind twin
    cancelled: bool = False
    done: bool = False
    first_row: object | None = None  # official mode: the flagged first pass, while its follow-up runs
    followup_prefill: int = 0

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class SchedulerStats:
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    steps: int = 0
    max_rows: int = 0
    max_kv_tokens: int = 0  # largest rows x columns the cache held


class ContinuousScheduler:
    def __init__(self, generator: GuardedGenerator, config: SchedulerConfig | None = None):
        self.gen, self.vlm = generator, generator.vlm
        self.config = config or SchedulerConfig()
        self.stats = SchedulerStats()
        self._ids = itertools.count()
        self._inbox: deque[Ticket] = deque()
        self._tasks: deque[tuple[Callable, tuple, Future]] = deque()
        self._waiting: deque[Ticket] = deque()
        self._prefilling: list[tuple[Ticket, Prefill]] = []
        self._running: DecodeBatch | None = None
        self._tickets: dict[int, Ticket] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy_since: float | None = None  # start of the iteration in progress

    # ---- submitting --------------------------------------------------------------------------------
    def reservation(self, prompt_tokens: int, sampling: SamplingConfig, guard: GuardConfig | None) -> int:
        k = self.gen.soft_tokens
        own = prompt_tokens + sampling.max_new_tokens + 1
        if guard is not None:
            own += guard.reminder_max_new_tokens + 1 + k  # its continuation after a flag, the end check
        return own + k * self.config.max_batch_size  # a kept reminder of any row adds k columns to all

    def submit(self, prompt: Prompt, sampling: SamplingConfig | None = None, guard: bool | GuardConfig | None = True,
               on_events: Callable[[list[StepEvent]], None] = lambda events: None,
               on_error: Callable[[BaseException], None] | None = None, encoded: PromptBatch | None = None) -> Ticket:
        """Queue one request. `encoded` (from `vlm.encode([prompt])`) saves re-encoding; without it the prompt is
        encoded here, on the caller's thread. Raises ValueError when the request can never fit the KV budget."""
        sampling = sampling or SamplingConfig()
        guard = self.gen.guard_config(guard)
        encoded = encoded if encoded is not None else self.vlm.encode([prompt])
        need = self.reservation(int(encoded.attention_mask.sum()), sampling, guard)
        rows = 2 if needs_twin(prompt, guard) else 1
        if need * rows > self.config.kv_budget_tokens:
            raise ValueError(f"the request needs {need * rows} KV-cache tokens (prompt + max_tokens + reminder"
                             f"{', twice: image-blind check' if rows == 2 else ''}), above this server's budget of "
                             f"{self.config.kv_budget_tokens}")
        ticket = Ticket(next(self._ids), prompt, sampling, guard, on_events, on_error, encoded, need, rows)
        self._inbox.append(ticket)
        self._wake.set()
        return ticket

    def call(self, fn: Callable, *args) -> Future:
        """Run `fn(*args)` on the scheduler's thread between iterations."""
        future: Future = Future()
        self._tasks.append((fn, args, future))
        self._wake.set()
        return future

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig | None = None,
                 guard: bool | GuardConfig | None | list = True) -> list[GuardedOutput]:
        """Decode all prompts through the scheduler on the caller's thread (no driver thread may be running);
        `guard` may be a per-prompt list, as in `GuardedGenerator.generate`."""
        outputs: dict[int, GuardedOutput] = {}

        def collect(i):
            return lambda events: outputs.update({i: ev.output for ev in events if ev.output is not None})

        for i, (prompt, g) in enumerate(zip(prompts, per_row(guard, len(prompts)))):
            self.submit(prompt, sampling, g, collect(i))
        while self.step():
            pass
        return [outputs[i] for i in range(len(prompts))]

    # ---- the loop ------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self._running) if self._running is not None else 0

    def pending(self) -> bool:
        return bool(self._inbox or self._tasks or self._waiting or self._prefilling or self.rows)

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration; returns whether work is left."""
        self._busy_since = time.monotonic()
        try:
            while self._tasks:
                fn, args, future = self._tasks.popleft()
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except Exception as err:  # noqa: BLE001 (handed to the caller)
                        future.set_exception(err)
            while self._inbox:
                self._waiting.append(self._inbox.popleft())
                self.stats.submitted += 1
            self._drop_cancelled()
            self._admit()
            self._prefill()
            if self._running is not None:
                self._decode()
        finally:
            self._busy_since = None
        return self.pending()

    def _drop_cancelled(self) -> None:
        for t in [t for t in self._waiting if t.cancelled]:
            self._waiting.remove(t)
            self._finish(t, cancelled=True)
        for t, p in [x for x in self._prefilling if x[0].cancelled]:
            self._prefilling.remove((t, p))
            self._finish(t, cancelled=True)
        if self._running is not None:
            gone = [r.key for r in self._running.rows if self._tickets[r.key].cancelled]
            for key in gone:
                self._finish(self._tickets[key], cancelled=True)
            if gone:
                self._keep_rows(lambda row: row.key not in gone)

    def _admit(self) -> None:
        cfg = self.config
        while self._waiting:
            t = self._waiting[0]
            live = [self._tickets[r.key] for r in (self._running.rows if self._running else [])]
            live += [x[0] for x in self._prefilling]
            live = list({id(x): x for x in live}.values())  # for one step a handed-over ticket holds two rows
            rows = sum(x.rows for x in live) + t.rows
            width = max([x.reserved for x in live] + [t.reserved])
            if len(live) + 1 > cfg.max_batch_size or rows * width > cfg.kv_budget_tokens:
                return  # in order: a large request is not overtaken forever by small ones
            self._waiting.popleft()
            self._tickets[t.id] = t
            row = self.gen.new_row(t.id, t.sampling, t.guard)
            blind, twins = self.gen.twins([t.prompt], [row])
            encoded = self.vlm.encode([t.prompt] + blind) if twins else t.encoded
            self._prefilling.append((t, Prefill(self.vlm, self.vlm.embed(encoded), [row] + twins)))

    def _prefill(self) -> None:
        # Chunked even when nothing decodes: an iteration stays short, so `check()` can tell slow from stuck.
        budget = self.config.prefill_chunk_tokens
        for t, p in list(self._prefilling):
            budget -= p.advance(budget)
            if p.finished:
                self._prefilling.remove((t, p))
                self._join(p.batch())
            if budget <= 0:
                return

    def _join(self, batch: DecodeBatch) -> None:
        if self._running is None:
            self._running = batch
        else:
            self._running.merge(batch)

    def _decode(self) -> None:
        batch = self._running
        self.stats.steps += 1
        self.stats.max_rows = max(self.stats.max_rows, len(batch))
        twins = batch.blind
        kv = len(batch) * batch.columns + (len(twins) * twins.columns if twins is not None else 0)
        self.stats.max_kv_tokens = max(self.stats.max_kv_tokens, kv)
        events = self.gen.step(batch, shared_checks=self.config.check_steps == "shared")
        for ev in events:
            t = self._tickets[ev.row]
            if ev.output is not None and t.first_row is not None:  # the end of an official follow-up
                ev.output = self.gen.official_output(t.first_row, _row_of(batch, t.id), t.followup_prefill)
            self._deliver(t, [ev])
            if ev.output is not None:
                self._finish(t)
        followups = [r for r in batch.rows if r.done and r.finish_reason == "flagged"
                     and self._tickets[r.key].first_row is None and not self._tickets[r.key].cancelled]
        for row in followups:  # official mode: the flagged row stops and is re-prefilled
            t = self._tickets[row.key]
            embedded, subs, prefill = self.gen.official_followup([t.prompt], [row])
            t.first_row, t.followup_prefill = row, prefill[0]
            self._prefilling.append((t, Prefill(self.vlm, embedded, subs)))
        self._keep_rows(lambda row: not (row.done and row.emitted) and not batch.finished)

    def _keep_rows(self, keep: Callable) -> None:
        batch = self._running
        idx = [b for b, row in enumerate(batch.rows) if keep(row)]
        if not idx:
            self._running = None
        elif len(idx) < len(batch):
            batch.select(idx)

    def _deliver(self, t: Ticket, events: list[StepEvent]) -> None:
        try:
            t.on_events(events)
        except Exception:  # noqa: BLE001 (a broken consumer ends its own request, not the loop)
            t.cancel()

    def _finish(self, t: Ticket, cancelled: bool = False) -> None:
        if t.done:
            return
        t.done = True
        self._tickets.pop(t.id, None)
        if cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1

    def _fail_all(self, err: BaseException) -> None:
        """An iteration raised: every request in flight gets the error; the scheduler starts clean."""
        tickets = list(self._waiting) + [t for t, _ in self._prefilling] + list(self._tickets.values())
        self._waiting.clear()
        self._prefilling.clear()
        self._running = None
        for t in {id(t): t for t in tickets}.values():
            self._finish(t, cancelled=True)
            if t.on_error is not None:
                t.on_error(err)

    # ---- the driver thread -----------------------------------------------------------------------------
    def start(self) -> "ContinuousScheduler":
        self._thread = threading.Thread(target=self._loop, name="sr_ray_scheduler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._closed:
            try:
                busy = self.step()
            except Exception as err:  # noqa: BLE001 (reported to the requests; the loop goes on)
                self._fail_all(err)
                busy = False
            if not busy:
                self._wake.wait(timeout=1.0)
                self._wake.clear()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def check(self) -> None:
        """Raise if the decode loop is dead or one iteration has been running for over `stuck_after_s`."""
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("the decode loop thread is not running")
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.config.stuck_after_s:
            raise RuntimeError(f"the decode loop is stuck: one iteration has run for "
                               f"{time.monotonic() - since:.0f} s (limit {self.config.stuck_after_s:.0f} s)")


def _row_of(batch: DecodeBatch, key: int):
    return next(r for r in batch.rows if r.key == key and r.twin_of is None)
