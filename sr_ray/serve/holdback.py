"""From the engine's per-step events to the text a client may see: hold-back, stop strings, max_tokens.

Hold-back (default): answer tokens are held until a probe check covering them passes, so no unchecked
token ever leaves the replica. A flagged check drops the held tokens; everything after the flag is the
reminder's continuation and streams as it comes (by design it is not checked again). `stream_first`
releases every token at once, as NeMo Guardrails' default does: lower latency, no guarantee.
With the guard off there is nothing to wait for, so tokens are released at once too.

Text is decoded from all released tokens and sent as the growing difference. A tail that may still be the
start of a stop string, or an incomplete UTF-8 character, waits for the next release (or the end).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sr_ray.reminder.engine import StepEvent

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class Chunk:
    """Released text for one request; the last one carries `finish_reason` and the guard report."""

    text: str
    finish_reason: str | None = None  # "stop" | "length"
    completion_tokens: int = 0
    safety: dict | None = None


@dataclass
class Releaser:
    decode: Callable[[list[int]], str]
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    guarded: bool = True
    hold_back: bool = True
    released: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    sent: str = ""
    done: bool = False
    checks: list = field(default_factory=list)
    flag: object | None = None  # the flagged Check
    released_before_flag: int | None = None
    dropped: int = 0

    def feed(self, event: StepEvent) -> Chunk | None:
        """Consume one engine event; return what the client gets now (None: nothing yet or finished)."""
        if self.done:
            return None
        self.held.extend(event.tokens)
        if not self.hold_back or not self.guarded or self.flag is not None:
            self._release()  # nothing to wait for: stream as the tokens come
        if event.check is not None:
            self.checks.append(event.check)
            if event.check.flagged and self.flag is None:
                self.flag = event.check
                self.dropped, self.held = len(self.held), []  # the unchecked tail never leaves
                self.released_before_flag = len(self.released)
            self._release()
        if event.output is not None:
            # The engine checks the tail before EOS (check_at_end), so what is still held here was covered
            # by the check in this same event; release it and finish.
            self._release()
            return self._chunk(final_reason=event.output.finish_reason)
        return self._chunk()

    def _release(self) -> None:
        self.released.extend(self.held)
        self.held = []

    def _chunk(self, final_reason: str | None = None) -> Chunk | None:
        reason = final_reason
        if len(self.released) >= self.max_tokens:
            del self.released[self.max_tokens:]
            reason = "length"
        text = self.decode(self.released)
        stop_at = self._find_stop(text)
        if stop_at is not None:
            text, reason = text[:stop_at], "stop"
        if reason is None:
            text = text[: len(text) - self._unsafe_tail(text)]
        if not text.startswith(self.sent):  # decoding changed text already sent (rare merges): send only growth
            text = self.sent + text[len(self.sent):]
        delta, self.sent = text[len(self.sent):], text
        if reason is not None:
            self.done = True
            return Chunk(delta, reason, len(self.released), self.report())
        return Chunk(delta) if delta else None

    def _find_stop(self, text: str) -> int | None:
        start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _unsafe_tail(self, text: str) -> int:
        """Characters at the end that must wait: an incomplete UTF-8 char or a stop string's beginning."""
        if text.endswith(REPLACEMENT_CHAR):
            return len(text) - len(text.rstrip(REPLACEMENT_CHAR))
        for n in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0

    def report(self) -> dict:
        flag = self.flag
        return dict(
            enabled=self.guarded,
            stream_mode="holdback" if self.hold_back else "stream_first",
            flagged=flag is not None,
            checks_run=len(self.checks),
            flagged_at=flag.position if flag is not None else None,
            p_safe_at_flag=round(flag.p_safe, 6) if flag is not None else None,
            p_safe_min=round(min(c.p_safe for c in self.checks), 6) if self.checks else None,
            tokens_released_before_flag=self.released_before_flag,
            tokens_dropped=self.dropped,
        )
