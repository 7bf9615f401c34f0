"""load_vlm: built-in tiny models, local checkpoints, prompt rendering."""

from __future__ import annotations

import torch
from PIL import Image

from sr_ray.models import Prompt, load_vlm


def test_a_saved_checkpoint_loads_from_its_directory_with_identical_outputs(tmp_path):
    vlm = load_vlm("tiny-qwen2-vl")
    vlm.model.save_pretrained(tmp_path / "ckpt")
    vlm.processor.save_pretrained(tmp_path / "ckpt")
    again = load_vlm(str(tmp_path / "ckpt"))
    assert again.family == "qwen2_vl" and again.hidden_size == vlm.hidden_size
    prompts = [Prompt("What is this?", Image.new("RGB", (32, 32), "blue")), Prompt("hello")]
    a, b = vlm.embed(vlm.encode(prompts)), again.embed(again.encode(prompts))
    torch.testing.assert_close(
        vlm.hidden(a.embeds, a.attention_mask, a.position_ids), again.hidden(b.embeds, b.attention_mask, b.position_ids)
    )


def test_answer_prefix_joins_the_generation_prompt_per_template_style():
    vlm = load_vlm("tiny-llava")
    chatml = vlm.render(Prompt("q", answer_prefix="  Sure, here is "))
    assert chatml.endswith("<|im_start|>assistant\nSure, here is")
    vlm.processor.chat_template = "{% for m in messages %}USER: {{ m['content'][0]['text'] }} ASSISTANT:{% endfor %}"
    assert vlm.render(Prompt("q", answer_prefix="Sure")) == "USER: q ASSISTANT: Sure"


def test_prompt_features_are_the_last_real_token_under_left_padding():
    vlm = load_vlm("tiny-llava")
    short, long = Prompt("hi"), Prompt("a much longer question about the red chair and the cat")
    batched = vlm.last_prompt_hidden([short, long], batch_size=2)
    single = torch.cat([vlm.last_prompt_hidden([short]), vlm.last_prompt_hidden([long])])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert batched.shape == (2, vlm.hidden_size) and batched.dtype == torch.float32
