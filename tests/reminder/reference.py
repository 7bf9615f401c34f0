"""Independent references for engine tests: full no-cache forwards through HF's own multimodal model.

Image features are merged by the HF model itself (placeholder detection on inputs_embeds); Qwen2-VL's
M-RoPE positions come from HF's `get_rope_index` over the whole sequence (the soft tokens and answer
tokens counted as text), never from sr_ray's position bookkeeping.
"""

from __future__ import annotations

import torch

from sr_ray.models import VLM, Prompt

FILLER = 0  # a text token standing in for soft-token slots when HF computes positions


def full_hidden(vlm: VLM, prompt: Prompt, answer_ids: list[int], soft: torch.Tensor | None, tail_ids: list[int] = ()) -> torch.Tensor:
    """Final-norm hidden states (L, D) over [prompt(+image) + answer_ids + soft + tail_ids], no cache."""
    enc = vlm.processor(text=[vlm.render(prompt)], images=[prompt.image] if prompt.image else None,
                        return_tensors="pt", add_special_tokens=False)
    ids = enc.pop("input_ids")[0].tolist()
    enc.pop("attention_mask")
    k = 0 if soft is None else soft.shape[0]
    embed = vlm.model.get_input_embeddings()
    parts = [embed(torch.tensor(ids + list(answer_ids)))]
    if soft is not None:
        parts.append(soft.to(parts[0].dtype))
    parts.append(embed(torch.tensor(list(tail_ids), dtype=torch.long)))
    embeds = torch.cat(parts)[None]
    kwargs = {}
    if vlm.family in ("qwen2_vl", "qwen2_5_vl"):  # explicit positions: HF's own fallback is stateful
        all_ids = torch.tensor([ids + list(answer_ids) + [FILLER] * k + list(tail_ids)])
        types = torch.cat([enc.pop("mm_token_type_ids"), torch.zeros(1, all_ids.shape[1] - len(ids), dtype=torch.long)], 1)
        grid = enc.get("image_grid_thw")
        kwargs["position_ids"] = (
            vlm.model.model.get_rope_index(all_ids, types, image_grid_thw=grid)[0] if grid is not None
            else torch.arange(all_ids.shape[1]).expand(3, 1, -1)
        )
    out = vlm.model(inputs_embeds=embeds, **enc, **kwargs, output_hidden_states=True)
    return out.hidden_states[-1][0]


def greedy_after(vlm: VLM, prompt: Prompt, answer_ids: list[int], soft: torch.Tensor | None, n: int) -> list[int]:
    """Greedy continuation of [prompt + answer_ids + soft], recomputing everything each step."""
    tail: list[int] = []
    for _ in range(n):
        h = full_hidden(vlm, prompt, answer_ids, soft, tail)
        nxt = int(vlm.lm_head(h[-1]).argmax())
        if nxt in vlm.eos_token_ids:
            break
        tail.append(nxt)
    return tail


def solo_answers(vlm: VLM, rows) -> list:
    """Plain greedy answers through the engine, each row alone (batch 1): rows with `prompt`, `image` (encoded
    bytes or None), `answer_prefix` and `max_new_tokens`."""
    from sr_ray.infer import decode_image
    from sr_ray.reminder import GuardedGenerator, SamplingConfig

    gen = GuardedGenerator(vlm)
    return [gen.generate([Prompt(r["prompt"], decode_image(r["image"]), answer_prefix=r["answer_prefix"])],
                         SamplingConfig(max_new_tokens=r["max_new_tokens"]), guard=False)[0] for r in rows]
