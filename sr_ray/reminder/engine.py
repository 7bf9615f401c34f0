"""Guarded decoding: generate, and every `interval` tokens ask the probe whether the answer turned harmful.

The check is fused into the next decode step: the row feeds [next token, soft_1..soft_k] in one forward.
The causal mask keeps the token's logits independent of the soft tokens behind it, and the hidden state at
soft_k is the probe's feature for the answer so far. If every checked row is safe, the k cache entries are
cropped (the reminder vanishes); a flagged row keeps them and continues decoding in place from soft_k's
logits, so a flag costs no extra prefill. Rows of a batch that keep no reminder see it masked out.

`mode="official"` reproduces the official code instead: the flagged row stops (after that step's token),
and is re-prefilled from prompt + decoded prefix + soft prompt; only that continuation is returned.

`batch.DecodeBatch` is the running state of one decode (rows, one left-padded KV cache, its mask, positions and
next-token logits). `stream()` decodes a fixed batch with it; `scheduler.ContinuousScheduler` lets rows join
and leave it between steps. Image-blind twins (`GuardConfig.blind_threshold`) live beside it, in `twins.py`.

A check can also run apart: the token forward first, then the soft prompt over only the checking rows, on a
copy of their cache rows (`DecodeBatch.side_forward`; a flagged row's soft columns are copied back).
`separate_check=True` always does so: the token forward is then exactly the unguarded one, which keeps bf16
decoding of never-flagged rows token-identical to plain decoding (the fused forward's width changes bf16
rounding). `split_check_min_idle=n` does so when at least n rows of the batch are not checking: a fused check
pads every row with k soft columns, which on CPU costs more than one more forward over a few rows (a row
ending out of phase with the batch's check steps, docs/core.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from transformers import NoRepeatNGramLogitsProcessor

from sr_ray.models.vlm import VLM, Embedded, Prompt
from sr_ray.reminder.batch import DecodeBatch, Prefill
from sr_ray.reminder.guard import GuardConfig
from sr_ray.reminder.twins import needs_twin, read_twins, settle_twins


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # decode the full budget (benchmarks)


@dataclass
class Check:
    position: int  # answer tokens the check covered
    p_safe: float
    flagged: bool
    p_safe_blind: float | None = None  # the image-blind twin's reading (GuardConfig.blind_threshold)


@dataclass
class GuardedOutput:
    text: str  # what the user gets: prefix + continuation (in place), continuation only (official)
    prefix_text: str  # answer before the flag (the whole answer when not flagged)
    continuation_text: str  # after the reminder ("" when not flagged)
    prefix_ids: list[int]
    continuation_ids: list[int]
    checks: list[Check]
    flagged_at: int | None  # answer tokens emitted when the flag fired
    finish_reason: str  # "stop" | "length"
    extra_prefill_tokens: int = 0  # tokens re-prefilled because of a flag (official mode only)

    @property
    def flagged(self) -> bool:
        return self.flagged_at is not None

    @property
    def tokens_before_flag(self) -> int:
        return len(self.prefix_ids)

    def trace(self) -> dict:
        return dict(
            checks=[c.position for c in self.checks], p_safe=[round(c.p_safe, 4) for c in self.checks],
            **({"p_safe_blind": [round(c.p_safe_blind, 4) for c in self.checks]}
               if self.checks and self.checks[0].p_safe_blind is not None else {}),
            flagged_at=self.flagged_at, tokens_before_flag=self.tokens_before_flag,
            finish_reason=self.finish_reason, extra_prefill_tokens=self.extra_prefill_tokens,
        )


@dataclass
class StepEvent:
    """What happened to one row in one decode step (for streaming with hold-back)."""

    row: int
    tokens: list[int]  # appended to the visible answer in this step
    check: Check | None = None  # covers the answer up to and including `tokens`
    output: GuardedOutput | None = None  # set when the row is finished


@dataclass
class _Row:
    key: int  # what its StepEvents carry as `row`
    sampling: SamplingConfig
    guard: GuardConfig | None
    generator: torch.Generator | None
    budget: int
    answer: list[int] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    flagged_at: int | None = None
    last_checked: int = 0
    end_pending: str = ""  # finish reason waiting on the end check
    done: bool = False
    finish_reason: str = ""
    emitted: bool = False  # its final output event was sent
    twin_of: "_Row | None" = None  # set on an image-blind twin (in `DecodeBatch.blind`): it reads this row's answer
    fed: int = 0  # a twin: answer tokens of its row already in its own cache

    def due(self, clock: int | None) -> bool:
        """Whether a check is due now: at the row's own answer length (`clock` None), or on the batch's shared
        check steps (`clock`: the batch's feed steps), and in any case after `interval` unchecked tokens."""
        n, g = len(self.answer), self.guard
        if n == self.last_checked:
            return False
        at = g.interval - 1 if g.schedule == "official" else 0
        if clock is None:
            return n % g.interval == at
        return clock % g.interval == at or n - self.last_checked >= g.interval


def per_row(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class GuardedGenerator:
    def __init__(self, vlm: VLM, soft_prompt=None, probe=None, config: GuardConfig | None = None,
                 separate_check: bool = False, split_check_min_idle: int | None = 4):
        self.vlm, self.soft_prompt, self.probe = vlm, soft_prompt, probe
        self.config = config or GuardConfig()
        self.separate_check = separate_check
        self.split_check_min_idle = split_check_min_idle

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], sampling=None, guard: bool | GuardConfig | list = True) -> list[GuardedOutput]:
        outputs: list[GuardedOutput | None] = [None] * len(prompts)
        for events in self.stream(prompts, sampling, guard):
            for ev in events:
                if ev.output is not None:
                    outputs[ev.row] = ev.output
        return outputs

    @torch.no_grad()
    def stream(self, prompts: list[Prompt], sampling=None, guard: bool | GuardConfig | list = True) -> Iterator[list[StepEvent]]:
        """Yield the per-step events of a batch. `sampling`/`guard` may be per-row lists; guard=False is plain decoding."""
        n = len(prompts)
        guards = [self.guard_config(g) for g in per_row(guard, n)]
        samplings = per_row(sampling or SamplingConfig(), n)
        rows = [self.new_row(i, s, g) for i, (s, g) in enumerate(zip(samplings, guards))]
        blind, twins = self.twins(prompts, rows)
        embedded = self.vlm.embed(self.vlm.encode(prompts + blind))
        yield from self._decode(embedded, rows + twins)
        second = [i for i, r in enumerate(rows) if r.flagged_at is not None and r.guard.mode == "official"]
        if second:
            yield from self._official_second_pass(prompts, rows, second)

    @staticmethod
    def twins(prompts: list[Prompt], rows: list[_Row]) -> tuple[list[Prompt], list[_Row]]:
        """The image-blind twins of the rows whose guard asks for them and whose prompt has an image: the prompt
        without it (the answer prefix kept), prefilled with its row and then kept in the batch's `blind` cache,
        where it reads the row's answer at the row's checks (`twins.py`). A text-only row needs none: its own
        reading is the blind one."""
        pairs = [(replace(p, image=None), _Row(r.key, r.sampling, None, None, 0, twin_of=r, emitted=True))
                 for p, r in zip(prompts, rows) if needs_twin(p, r.guard)]
        return [p for p, _ in pairs], [t for _, t in pairs]

    def guard_config(self, guard: bool | GuardConfig | None) -> GuardConfig | None:
        """A request's guard setting resolved (True: the generator's default; False/None: unguarded)."""
        resolved = self.config if guard is True else (guard or None)
        if resolved is not None and (self.soft_prompt is None or self.probe is None):
            raise ValueError("guarded decoding needs a soft prompt and a probe")
        return resolved

    @property
    def soft_tokens(self) -> int:
        return 0 if self.soft_prompt is None else int(self.soft_prompt(self.vlm.dtype).shape[0])

    def new_row(self, key: int, sampling: SamplingConfig, guard: GuardConfig | None, budget: int | None = None) -> _Row:
        """A request's decoding state; `key` is what its StepEvents carry as `row`."""
        gen = None
        if sampling.do_sample:
            gen = torch.Generator(device=self.vlm.device)
            if sampling.seed is None:
                gen.seed()  # fresh entropy for this row only; torch.seed() would reseed the global RNG
            else:
                gen.manual_seed(sampling.seed)
        return _Row(key, sampling, guard, gen, budget if budget is not None else sampling.max_new_tokens)

    # ---- internals -------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        for b, row in enumerate(rows):
            n = row.guard.reminder_no_repeat_ngram if row.guard is not None else None
            if n and row.flagged_at is not None and not row.done:
                continuation = torch.tensor([row.answer[row.flagged_at:]], device=logits.device)
                logits[b] = NoRepeatNGramLogitsProcessor(n)(continuation, logits[b : b + 1])[0]
        tokens = logits.argmax(-1).tolist()
        for b, row in enumerate(rows):
            s = row.sampling
            if row.done or not s.do_sample or s.temperature <= 0:
                continue
            probs = torch.softmax(logits[b].float() / s.temperature, -1)
            if s.top_p < 1.0:
                sorted_p, idx = probs.sort(descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > s.top_p  # keep the smallest set reaching top_p
                probs = probs.scatter(0, idx[drop], 0.0)
            tokens[b] = int(torch.multinomial(probs, 1, generator=row.generator))
        return tokens

    def _output(self, row: _Row, prefix_ids: list[int] | None = None, extra_prefill: int = 0) -> GuardedOutput:
        dec = lambda ids: self.vlm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        cut = row.flagged_at if row.flagged_at is not None else len(row.answer)
        if prefix_ids is None:  # in place: the answer holds prefix + continuation
            prefix_ids, cont = row.answer[:cut], row.answer[cut:]
            text = dec(row.answer)
        else:  # official second pass: the row's answer is the continuation only
            cont = row.answer
            text = dec(cont)
        return GuardedOutput(text, dec(prefix_ids), dec(cont), prefix_ids, cont, row.checks,
                             row.flagged_at, row.finish_reason, extra_prefill)

    def _decode(self, e: Embedded, rows: list[_Row]) -> Iterator[list[StepEvent]]:
        batch = Prefill(self.vlm, e, rows).run().batch()
        while not batch.finished:
            events = self.step(batch)
            if events:
                yield events

    def step(self, batch: DecodeBatch, shared_checks: bool = False) -> list[StepEvent]:
        """One decode step of `batch`: sample, account, feed the tokens (and the soft prompt for due checks).

        `shared_checks`: rows check on the batch's shared steps (every `interval` feed steps of the batch)
        instead of at their own multiples of `interval`, so rows that joined at different steps still check in
        the same (wider) forward. In a batch whose rows all started together both rules give the same
        positions; a row that joined late gets its first check earlier (after 1..interval tokens)."""
        vlm, rows = self.vlm, batch.rows
        tokens = self._sample(batch.logits, rows)
        events: dict[int, StepEvent] = {}
        feed = [False] * len(rows)
        for b, row in enumerate(rows):
            if row.done:
                continue
            if row.budget <= 0 or (tokens[b] in vlm.eos_token_ids and not row.sampling.ignore_eos):
                self._end(row, "length" if row.budget <= 0 else "stop")
            else:
                row.answer.append(tokens[b])
                row.budget -= 1
                feed[b] = True
                events[b] = StepEvent(row.key, [tokens[b]])
        batch.clock += any(feed)
        clock = batch.clock if shared_checks else None
        check = [
            not row.done and row.guard is not None and row.flagged_at is None
            and ((feed[b] and row.due(clock)) or bool(row.end_pending))
            for b, row in enumerate(rows)
        ]
        for b, row in enumerate(rows):  # rows that just finished without an end check
            if row.done and not row.emitted:
                row.emitted = True
                events[b] = StepEvent(row.key, [], output=self._output(row))
        if not any(feed) and not any(check):
            batch.finished = True
        else:
            self._feed(batch, tokens, feed, check, events)
        return list(events.values())

    def _feed(self, batch: DecodeBatch, tokens, feed, check, events) -> None:
        vlm, dev, B = self.vlm, batch.mask.device, len(batch)
        checking = [b for b, c in enumerate(check) if c]
        apart = bool(checking) and (self.separate_check or (
            self.split_check_min_idle is not None and B - len(checking) >= self.split_check_min_idle))
        fed = torch.tensor(feed, device=dev)
        parts = []
        if any(feed) or (checking and not apart):  # fused: the token column is there even if no row feeds
            parts.append((vlm.embed_tokens(torch.tensor(tokens, device=vlm.device))[:, None],
                          fed[:, None].to(batch.mask.dtype), batch.next_pos[:, None]))
            batch.next_pos = batch.next_pos + fed
        soft = self.soft_prompt(vlm.dtype) if checking else None
        k = 0 if soft is None else soft.shape[0]
        if checking and not apart:
            on = torch.tensor(check, device=dev)
            embeds = torch.zeros(B, k, vlm.hidden_size, dtype=vlm.dtype, device=vlm.device)
            embeds[on] = soft
            parts.append((embeds, on[:, None].expand(B, k).to(batch.mask.dtype),
                          batch.next_pos[:, None] + torch.arange(k, device=dev)))
        if parts:
            hidden = batch.forward(*(torch.cat(t, 1) for t in zip(*parts)))
            batch.logits = vlm.lm_head(hidden[:, 0]).float()
        if not checking:
            return
        if apart:  # only the checking rows run the soft prompt, over a copy of their cache rows
            side_hidden, side = batch.side_forward(
                checking, soft.expand(len(checking), -1, -1), batch.next_pos[checking, None] + torch.arange(k, device=dev))
            h_last = side_hidden.new_zeros(B, vlm.hidden_size)
            h_last[checking] = side_hidden[:, -1]
        else:
            h_last = hidden[:, -1]
        blind = read_twins(self.vlm, self.probe, batch, check, soft)
        keep, handed = self._apply_checks(h_last, batch.rows, check, events, batch.logits, tokens, blind)
        if not any(keep):
            if not apart:
                batch.drop_last(k)
        else:
            keep_t = torch.tensor(keep, device=dev)
            if apart:
                batch.adopt(side, checking, [keep[b] for b in checking], k)
            else:
                batch.mask[:, -k:] *= keep_t[:, None]  # the others never saw the reminder
            batch.logits[keep_t] = vlm.lm_head(h_last[keep_t]).float()
            batch.next_pos = batch.next_pos + keep_t * k
        if blind:
            settle_twins(self.vlm, batch, handed, blind, k)

    def _apply_checks(self, h_last, rows, check, events, logits, tokens, blind) -> tuple[list[bool], list[_Row]]:
        """Run the probe on checked rows; return per-row 'keep the reminder in the cache', and the flagged rows
        whose image-blind twin takes over (`blind`: the twins' readings, `_read_twins`)."""
        p_safe = self.probe.p_safe(h_last).tolist()
        keep, handed = [False] * len(rows), []
        for b in [b for b, row in enumerate(rows) if check[b]]:
            row, g = rows[b], rows[b].guard
            threshold = g.threshold if g.threshold is not None else self.probe.threshold
            # a text-only row has no twin: its own reading is the blind one
            blind_p = None if g.blind_threshold is None else blind[id(row)][1] if id(row) in blind else p_safe[b]
            flagged = p_safe[b] < threshold or (blind_p is not None and blind_p < g.blind_threshold)
            result = Check(len(row.answer), p_safe[b], flagged, blind_p)
            row.checks.append(result)
            row.last_checked = len(row.answer)
            ev = events.setdefault(b, StepEvent(row.key, []))
            ev.check = result
            if not result.flagged:
                if row.end_pending:
                    row.done, row.finish_reason, row.emitted = True, row.end_pending, True
                    ev.output = self._output(row)
                continue
            row.flagged_at = len(row.answer)
            if g.mode == "official":
                # Parity: the flagged row still receives this step's token, then stops for the re-prefill.
                nxt = int(logits[b].argmax()) if not row.end_pending else None
                if nxt is not None and nxt not in self.vlm.eos_token_ids:
                    row.answer.append(nxt)
                    row.flagged_at += 1
                    ev.tokens.append(nxt)
                row.done, row.finish_reason, row.emitted = True, "flagged", True
            else:
                row.end_pending = ""
                row.budget = g.reminder_max_new_tokens
                if id(row) in blind:  # the reminder continues without the (attacker-controlled) image
                    handed.append(row)
                else:
                    keep[b] = True
        return keep, handed

    def _end(self, row: _Row, reason: str) -> None:
        g = row.guard
        needs_check = (g is not None and g.check_at_end and row.flagged_at is None
                       and row.answer and row.last_checked != len(row.answer))
        if needs_check:
            row.end_pending = reason
        else:
            row.done, row.finish_reason = True, reason

    def official_followup(self, prompts: list[Prompt], firsts: list[_Row]) -> tuple[Embedded, list[_Row], list[int]]:
        """Official flag handling: re-prefill template + decoded prefix + soft prompt, decode unguarded.

        Not token-exact with the official LLaVA second pass: it appends the soft tokens as text,
        `" " + " ".join(["<soft_prompt>"] * 4)` (`prompt_tuning.py:541-550`), so depending on the tokenizer
        whitespace tokens can sit before and between them. Here the k embeddings follow the prefix's last
        token directly, as in every check and in SAPT training."""
        tok = self.vlm.tokenizer
        again = [replace(p, answer_prefix=tok.decode(r.answer, skip_special_tokens=True))
                 for p, r in zip(prompts, firsts)]
        embedded = self.vlm.embed(self.vlm.encode(again), suffix=self.soft_prompt(self.vlm.dtype))
        subs = [self.new_row(r.key, r.sampling, None, r.guard.reminder_max_new_tokens) for r in firsts]
        return embedded, subs, [int(n) for n in embedded.attention_mask.sum(1).tolist()]

    def official_output(self, first: _Row, sub: _Row, prefill: int) -> GuardedOutput:
        sub.checks, sub.flagged_at = first.checks, first.flagged_at
        return self._output(sub, prefix_ids=first.answer, extra_prefill=prefill)

    def _official_second_pass(self, prompts, rows, idx) -> Iterator[list[StepEvent]]:
        embedded, subs, prefill = self.official_followup([prompts[i] for i in idx], [rows[i] for i in idx])
        for events in self._decode(embedded, subs):
            for ev in events:  # sub-rows carry their first row's key
                if ev.output is not None:
                    j = idx.index(ev.row)
                    ev.output = self.official_output(rows[ev.row], subs[j], prefill[j])
            yield events
