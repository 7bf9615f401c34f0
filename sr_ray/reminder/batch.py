"""The KV state of a running decode: rows share one left-padded DynamicCache, its attention mask, per-row
next positions and next-token logits. Rows can leave (`select`) and join (`merge`) between decode steps.

Rows are aligned on the right: every step appends one column for all rows, and a row that joins later
is left-padded with masked-out zero keys/values up to the batch's length (or the batch is padded up to the
newcomer's). Masked columns get zero attention weight, so a row's attention sums the same terms as when it
decodes alone (fp32: same tokens; the tests check it). Leading columns no row uses any more are trimmed.
Positions come from each row's own counter, never from the column index.

`Prefill` runs a prompt through the decoder in chunks of at most `budget` tokens per call, so a scheduler
can interleave a long prompt with decode steps of the running batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sr_ray.models.vlm import VLM, Embedded


class DecodeBatch:
    def __init__(self, vlm: VLM, rows: list, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor,
                 logits: torch.Tensor):
        self.vlm, self.rows, self.cache, self.mask = vlm, rows, cache, mask
        self.next_pos, self.logits = next_pos, logits
        self.finished = False  # set by the engine when no row has anything left to feed or check
        self.clock = 0  # decode steps that fed a token; rows that join keep the running batch's clock
        # the rows' image-blind twins (twins.needs_twin) in a cache of their own: text-only, so short, and fed
        # the answer tokens only when their row checks; they follow their rows through select and merge
        self.blind: DecodeBatch | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        return self.mask.shape[1]

    def forward(self, embeds: torch.Tensor, step_mask: torch.Tensor, step_pos: torch.Tensor) -> torch.Tensor:
        """Feed (B, W) new columns; returns their final-norm hidden states (B, W, D)."""
        mask = torch.cat([self.mask, step_mask], 1)
        hidden = self.vlm.hidden(embeds, mask, self.vlm.positions(step_pos), self.cache)
        self.mask = mask
        return hidden

    def _copy_cache(self, idx: torch.Tensor) -> DynamicCache:
        copy = DynamicCache(config=self.vlm.text_config)
        for mine, theirs in zip(copy.layers, self.cache.layers):
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys, mine.values = theirs.keys[idx], theirs.values[idx]
        return copy

    def side_forward(self, rows: list[int], embeds: torch.Tensor, step_pos: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
        """Feed (len(rows), W) columns to a copy of these rows' cache only; the batch itself is unchanged. A check
        of a few rows then costs their W columns, not W columns for every row of the batch (`adopt` keeps them)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        side = self._copy_cache(idx)
        mask = torch.cat([self.mask[idx], self.mask.new_ones(len(rows), embeds.shape[1])], 1)
        return self.vlm.hidden(embeds, mask, self.vlm.positions(step_pos), side), side

    def take(self, rows: list[int]) -> "DecodeBatch":
        """A new batch holding a copy of these rows (their cache, mask, positions and logits); this one unchanged."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        out = DecodeBatch(self.vlm, [self.rows[i] for i in rows], self._copy_cache(idx), self.mask[idx],
                          self.next_pos[idx], self.logits[idx])
        out._trim()
        return out

    def adopt(self, side: DynamicCache, rows: list[int], keep: list[bool], n: int) -> None:
        """Append `side`'s last n columns (from `side_forward` over `rows`) to the batch: the rows whose `keep` is
        set take theirs, every other row gets n masked-out zero columns."""
        idx = torch.tensor([b for b, k in zip(rows, keep) if k], dtype=torch.long, device=self.mask.device)
        mine = torch.tensor([j for j, k in enumerate(keep) if k], dtype=torch.long, device=self.mask.device)
        for layer, their in zip(self.cache.layers, side.layers):
            for name in ("keys", "values"):
                old, new = getattr(layer, name), getattr(their, name)[mine, :, -n:]
                grown = old.new_zeros(*old.shape[:2], n, old.shape[-1])
                grown[idx] = new
                setattr(layer, name, torch.cat([old, grown], -2))
        step = self.mask.new_zeros(len(self), n)
        step[idx] = 1
        self.mask = torch.cat([self.mask, step], 1)

    def drop_last(self, n: int) -> None:
        self.cache.crop(-n)
        self.mask = self.mask[:, :-n]

    def select(self, keep: list[int]) -> None:
        """Keep these rows (in this order); trim leading columns that only the dropped rows used."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(idx)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_pos, self.logits = self.mask[idx], self.next_pos[idx], self.logits[idx]
        self._trim()
        if self.blind is not None:
            kept = {id(row) for row in self.rows}
            self.blind.keep(lambda twin: id(twin.twin_of) in kept)
            self.blind = self.blind if len(self.blind) else None

    def keep(self, predicate) -> None:
        """Keep the rows for which `predicate(row)` holds (all of them: no copy)."""
        idx = [b for b, row in enumerate(self.rows) if predicate(row)]
        if len(idx) < len(self):
            self.select(idx)

    def _trim(self) -> None:
        used = self.mask.any(0).nonzero()
        lead = int(used[0]) if len(used) else self.columns
        if lead:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
            self.mask = self.mask[:, lead:]

    def merge(self, other: "DecodeBatch") -> None:
        """Append `other`'s rows, left-padding the shorter side's cache and mask."""
        width = max(self.columns, other.columns)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            if type(mine) is not DynamicLayer or type(theirs) is not DynamicLayer:
                raise NotImplementedError("rows can only join full-attention DynamicCache layers "
                                          f"(got {type(mine).__name__})")
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], 0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], 0)
        pad = lambda m: F.pad(m, (width - m.shape[1], 0))  # noqa: E731
        self.mask = torch.cat([pad(self.mask), pad(other.mask)], 0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos], 0)
        self.logits = torch.cat([self.logits, other.logits], 0)
        self.rows = self.rows + other.rows
        if other.blind is not None:
            if self.blind is None:
                self.blind = other.blind
            else:
                self.blind.merge(other.blind)


def _left_pad(kv: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(kv, (0, 0, width - kv.shape[-2], 0))


class Prefill:
    """A prompt batch on its way into the cache, `budget` tokens (columns) per `advance` call."""

    def __init__(self, vlm: VLM, e: Embedded, rows: list):
        self.vlm, self.e, self.rows = vlm, e, rows
        self.cache = DynamicCache(config=vlm.text_config)
        self.done = 0
        self.last_hidden: torch.Tensor | None = None

    @property
    def total(self) -> int:
        return self.e.embeds.shape[1]

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def advance(self, budget: int | None = None) -> int:
        """Prefill the next chunk (all that is left when `budget` is None); returns its column count."""
        end = self.total if budget is None else min(self.total, self.done + max(1, budget))
        e = self.e
        hidden = self.vlm.hidden(e.embeds[:, self.done:end], e.attention_mask[:, :end],
                                 e.position_ids[..., self.done:end], self.cache)
        self.last_hidden, n, self.done = hidden[:, -1], end - self.done, end
        return n

    def run(self) -> "Prefill":
        while not self.finished:
            self.advance()
        return self

    def batch(self) -> DecodeBatch:
        """The prefilled rows as a batch; image-blind twins (rows with `twin_of`) go to its `blind` batch."""
        logits = self.vlm.lm_head(self.last_hidden).float()
        batch = DecodeBatch(self.vlm, self.rows, self.cache, self.e.attention_mask, self.e.next_pos.clone(), logits)
        twins = [b for b, row in enumerate(self.rows) if getattr(row, "twin_of", None) is not None]
        if twins:
            blind = batch.take(twins)
            batch.keep(lambda row: getattr(row, "twin_of", None) is None)
            batch.blind = blind
        return batch
