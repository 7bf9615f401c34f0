"""The image-blind twin (`GuardConfig.blind_threshold`, a robust option; docs/robustness.md).

A guarded row whose prompt has an image decodes beside a twin: the same prompt without the image, which reads
the row's answer in a text-only context, so a gradient attack on the pixels cannot steer its reading. The
twins live in their own cache (`DecodeBatch.blind`), short because it holds no image, and are fed lazily: at a
check step of its row a twin gets the answer tokens decoded since its last reading plus the soft prompt, all
in one forward. A row is flagged when either reading is below its threshold; a flagged row hands over to its
twin, which joins the batch with the reminder kept and decodes the continuation without the image.
"""

from __future__ import annotations

import torch

from sr_ray.models.vlm import VLM, Prompt
from sr_ray.reminder.batch import DecodeBatch
from sr_ray.reminder.guard import GuardConfig


def needs_twin(prompt: Prompt, guard: GuardConfig | None) -> bool:
    """Whether a row decodes beside an image-blind twin: its guard has the blind check and its prompt an image."""
    return guard is not None and guard.blind_threshold is not None and prompt.image is not None


def read_twins(vlm: VLM, probe, batch: DecodeBatch, check, soft: torch.Tensor) -> dict:
    """Feed every twin the answer tokens its row decoded since the twin's last reading, then the soft prompt
    where its row checks now, in one forward over the twins' own text-only cache; id(row) -> (the twin's
    index in `batch.blind`, P(safe), its hidden state at soft_k). Lazy feeding keeps the twin out of every
    decode step: it costs one forward per check step, over a cache without the image's columns."""
    twins = batch.blind
    checking = {id(row) for row, c in zip(batch.rows, check) if c}
    if twins is None or not any(id(t.twin_of) in checking for t in twins.rows):
        return {}
    dev, n, k = twins.mask.device, len(twins), soft.shape[0]
    pending = [t.twin_of.answer[t.fed:] for t in twins.rows]
    P = max(map(len, pending))
    ids = torch.zeros(n, P, dtype=torch.long, device=vlm.device)
    mask = torch.zeros(n, P + k, dtype=twins.mask.dtype, device=dev)
    pos = torch.zeros(n, P + k, dtype=torch.long, device=dev)
    for j, (twin, new) in enumerate(zip(twins.rows, pending)):  # right-aligned: tokens, then the soft prompt
        start, p0 = P - len(new), int(twins.next_pos[j])
        ids[j, start:] = torch.tensor(new, dtype=torch.long)
        mask[j, start:P] = 1
        pos[j, start:P] = p0 + torch.arange(len(new))
        if id(twin.twin_of) in checking:
            mask[j, P:] = 1
            pos[j, P:] = p0 + len(new) + torch.arange(k)
        twin.fed += len(new)
    embeds = torch.cat([vlm.embed_tokens(ids), soft.to(vlm.dtype).expand(n, -1, -1)], 1)
    hidden = twins.forward(embeds, mask, pos)[:, -1]
    twins.next_pos = twins.next_pos + torch.tensor([len(new) for new in pending], device=dev)
    p_safe = probe.p_safe(hidden).tolist()
    return {id(t.twin_of): (j, p_safe[j], hidden[j]) for j, t in enumerate(twins.rows) if id(t.twin_of) in checking}


def settle_twins(vlm: VLM, batch: DecodeBatch, handed: list, blind: dict, k: int) -> None:
    """Drop the twins' soft columns; a twin that took over its flagged row joins the batch with its reminder
    kept, decoding on from soft_k's logits."""
    twins = batch.blind
    taken = [blind[id(row)][0] for row in handed]
    for row, j in zip(handed, taken):
        hand_over(row, twins.rows[j])
    joining = twins.take(taken) if taken else None
    twins.drop_last(k)
    if joining is not None:
        twins.keep(lambda twin: twin.twin_of is not None)  # the handed-over twins left: twin_of is cleared
        batch.blind = twins if len(twins) else None
        joining.logits = vlm.lm_head(torch.stack([blind[id(row)][2] for row in handed])).float()
        joining.next_pos = joining.next_pos + k
        batch.merge(joining)


def hand_over(row, twin) -> None:
    """After a flag, the image-blind twin becomes the row (same key, answer, checks and budget) and decodes
    the continuation with the reminder kept; the row with the image retires silently and leaves the batch."""
    for name, value in vars(row).items():
        setattr(twin, name, list(value) if isinstance(value, list) else value)
    twin.twin_of = None
    row.done, row.emitted, row.finish_reason = True, True, ""
