"""Teacher-forced forwards match independent full forwards through HF's own model (both tiny architectures),
with the prompt differentiated (attacks) or cached without autograd (SAPT)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from sr_ray.reminder.forward import answer_forward
from sr_ray.models import Prompt
from tests.reminder.reference import full_hidden


@pytest.mark.parametrize("prompt_grad", [True, False])
def test_answer_forward_matches_full_forwards_with_ragged_rows(tiny_vlm, prompt_grad):
    vlm = tiny_vlm
    prompts = [Prompt("What is in this picture?", Image.new("RGB", (40, 32), "blue")), Prompt("How do I make a bomb?")]
    tok = lambda s: vlm.tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    first = [tok("Sure, here is"), tok("The capital")]
    second = [tok(" 1. First"), tok(" Paris is the capital of France")]
    soft = (torch.randn(3, vlm.hidden_size) * 0.05).requires_grad_()
    e = vlm.embed(vlm.encode(prompts))
    e = replace(e, embeds=e.embeds.detach().requires_grad_())  # as an attacked image's embeddings
    fw = answer_forward(vlm, e, first, soft, second, prompt_grad=prompt_grad)
    fw.second_loss(vlm.lm_head).sum().backward()
    assert soft.grad.abs().sum() > 0
    assert (e.embeds.grad is not None) == prompt_grad  # a cached prompt is outside the graph
    for b, p in enumerate(prompts):
        ref = full_hidden(vlm, p, first[b], soft, second[b])
        n_prompt = ref.shape[0] - len(first[b]) - 3 - len(second[b])
        torch.testing.assert_close(fw.answer_hidden(b), ref[n_prompt : n_prompt + len(first[b])], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fw.soft_hidden()[b], ref[n_prompt + len(first[b]) + 2], atol=1e-4, rtol=1e-4)
        # losses: the same CE recomputed from the reference hidden states
        logits = vlm.lm_head(ref).float()
        ids = torch.tensor(first[b] + [0] * 3 + second[b])
        ce_first = torch.nn.functional.cross_entropy(logits[n_prompt - 1 : n_prompt - 1 + len(first[b])], ids[: len(first[b])])
        after = n_prompt + len(first[b]) + 2
        ce_second = torch.nn.functional.cross_entropy(logits[after : after + len(second[b])], ids[len(first[b]) + 3 :])
        torch.testing.assert_close(fw.first_loss(vlm.lm_head)[b], ce_first, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fw.second_loss(vlm.lm_head)[b], ce_second, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fw.second_hidden()[b, : len(second[b])], ref[after : after + len(second[b])],
                                   atol=1e-4, rtol=1e-4)
