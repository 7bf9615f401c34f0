"""The teacher-forced forward over [prompt | answer | soft prompt | more answer], for training and evaluation.

One forward gives the LM loss of a target answer, the probe's reading at the soft prompt after a partial
answer (the guard's check), and the loss of what follows the reminder: SAPT's loss (`sr_ray.train.sapt`), the
PGD attacks' objectives and the delayed-awareness readings (`sr_ray.eval`). Rows have different answer
lengths: each block is right-padded to the batch maximum and padding is masked out, with explicit position
ids that continue from each row's prompt (so padding never shifts a position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from sr_ray.models.vlm import VLM, Embedded


@dataclass
class AnswerForward:
    hidden: torch.Tensor  # (B, L + A + k + S, D) final-norm hidden states
    prompt_len: int  # L
    first: list[list[int]]  # per-row answer tokens before the soft prompt
    second: list[list[int]]  # per-row answer tokens after it
    width_first: int  # A (max len of `first`)
    k: int  # soft tokens (0: none)

    def soft_hidden(self) -> torch.Tensor:
        """(B, D) at the last soft token: the probe's feature for the check."""
        if not self.k:
            raise ValueError("no soft prompt in this forward")
        return self.hidden[:, self.prompt_len + self.width_first + self.k - 1]

    def answer_hidden(self, row: int) -> torch.Tensor:
        """(len(first[row]), D): hidden state after each answer token (the state at answer length j+1)."""
        return self.hidden[row, self.prompt_len : self.prompt_len + len(self.first[row])]

    def second_hidden(self) -> torch.Tensor:
        """(B, S, D): the state that predicts each `second` token (the last soft token, then each token)."""
        start = self.prompt_len + self.width_first + self.k - 1
        return self.hidden[:, start : start + max(len(s) for s in self.second)]

    def _ce(self, lm_head, starts: list[int], tokens: list[list[int]]) -> torch.Tensor:
        losses = []
        for b, (start, ids) in enumerate(zip(starts, tokens)):
            if not ids:
                losses.append(self.hidden.new_zeros(()))
                continue
            # token j is predicted by the state before it: `start` for j = 0, then the previous token
            idx = [start] + list(range(start + 1, start + len(ids)))
            logits = lm_head(self.hidden[b, idx]).float()
            losses.append(F.cross_entropy(logits, torch.tensor(ids, device=logits.device)))
        return torch.stack(losses)

    def first_loss(self, lm_head) -> torch.Tensor:
        """(B,) mean CE of the `first` tokens given the prompt."""
        return self._ce(lm_head, [self.prompt_len - 1] * len(self.first), self.first)

    def second_loss(self, lm_head) -> torch.Tensor:
        """(B,) mean CE of the `second` tokens given prompt + first + soft prompt (the reminder continuation)."""
        return self._ce(lm_head, [self.prompt_len + self.width_first + self.k - 1] * len(self.second), self.second)


def answer_forward(vlm: VLM, e: Embedded, first: list[list[int]], soft: torch.Tensor | None = None,
                   second: list[list[int]] | None = None, *, prompt_grad: bool = True) -> AnswerForward:
    """Forward [prompt | first | soft | second] for a batch whose prompts are embedded in `e`.

    Gradients flow through the prompt (an attacked image) unless `prompt_grad` is False: the prompt then runs
    once without autograd into a KV cache and only the blocks after it are differentiated, so backward costs
    their positions, not the image's (576 tokens on LLaVA-1.5). The hidden states are the same either way.
    """
    B, k = len(first), (0 if soft is None else soft.shape[0])
    second = second or [[] for _ in range(B)]
    if any(second) and not k:
        raise ValueError("tokens after the answer need a soft prompt between them")
    A, S = max(len(f) for f in first), max(len(s) for s in second)
    W = A + k + S
    dev = e.embeds.device
    ids = torch.zeros(B, W, dtype=torch.long, device=dev)
    mask = torch.zeros(B, W, dtype=e.attention_mask.dtype, device=dev)
    pos = torch.zeros(B, W, dtype=torch.long, device=dev)
    for b in range(B):
        a, s, start = len(first[b]), len(second[b]), int(e.next_pos[b])
        ids[b, :a] = torch.tensor(first[b], dtype=torch.long)
        ids[b, A + k : A + k + s] = torch.tensor(second[b], dtype=torch.long)
        for lo, n, p0 in ((0, a, start), (A, k, start + a), (A + k, s, start + a + k)):
            mask[b, lo : lo + n] = 1
            pos[b, lo : lo + n] = p0 + torch.arange(n)
    block = vlm.embed_tokens(ids)
    if k:
        block = torch.cat([block[:, :A], soft.to(block.dtype).expand(B, -1, -1), block[:, A + k :]], dim=1)
    full_mask = torch.cat([e.attention_mask, mask], 1)
    if prompt_grad:
        hidden = vlm.hidden(torch.cat([e.embeds, block], 1), full_mask, torch.cat([e.position_ids, vlm.positions(pos)], -1))
    else:
        cache = DynamicCache(config=vlm.text_config)
        with torch.no_grad():
            context = vlm.hidden(e.embeds, e.attention_mask, e.position_ids, cache)
        hidden = torch.cat([context, vlm.hidden(block, full_mask, vlm.positions(pos), cache)], 1)
    return AnswerForward(hidden, e.embeds.shape[1], [list(f) for f in first], [list(s) for s in second], A, k)
