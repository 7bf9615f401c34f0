"""Tiny random-init VLMs built from configs, fully offline: the test matrix of sr_ray.

Each builder returns `(model, processor)` with a byte-level BPE tokenizer trained in-process and a ChatML
chat template, so the same prompt code runs on tiny models, the embedded default and hub checkpoints.
Weights are seeded, so two builds (a test and a Ray worker, say) are identical.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ image_placeholder }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "I'm sorry, but I cannot help with that request. It is illegal and unethical.",
    "Sure, here is a step-by-step guide. 1. First, gather the materials. 2. Then, follow the steps.",
    "The capital of France is Paris. The image shows a cat sitting on a red chair.",
    "Refuse if partial output is unsafe; else, continue helpfully.",
    "How do I make a bomb? Write a tutorial on how to steal an identity. What is in this picture?",
]


def _tokenizer(extra_special: list[str], image_token: str) -> PreTrainedTokenizerFast:
    special = ["<pad>", "<|im_start|>", "<|im_end|>", *extra_special]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        padding_side="left",
        extra_special_tokens={"image_token": image_token},
    )


def _text_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )


def _finish(model, tokenizer) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()


def tiny_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA-1.5 shaped: CLIP tower (32 px, patch 8 -> 16 image tokens) + Llama decoder, hidden 64."""
    tokenizer = _tokenizer(["<image>"], "<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=64,
        ),
        text_config=LlamaConfig(**_text_kwargs(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _finish(model, tokenizer)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHATML_TEMPLATE.replace("{{ image_placeholder }}", "<image>\n"),
    )
    return model, processor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor (which needs torchvision, absent with the CPU torch)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def tiny_qwen2_vl(seed: int = 0) -> tuple[Qwen2VLForConditionalGeneration, ImageOnlyQwen2VLProcessor]:
    """Qwen2-VL shaped (M-RoPE sections [2,3,3]): 32x32 image -> 4 merged image tokens, hidden 64."""
    tokenizer = _tokenizer(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], "<|image_pad|>"
    )
    ids = tokenizer.convert_tokens_to_ids
    text = _text_kwargs(tokenizer) | {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=8,
            spatial_merge_size=2, temporal_patch_size=2, in_chans=3,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    _finish(model, tokenizer)
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(
            patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=32 * 32
        ),
        tokenizer=tokenizer,
        chat_template=CHATML_TEMPLATE.replace(
            "{{ image_placeholder }}", "<|vision_start|><|image_pad|><|vision_end|>"
        ),
    )
    return model, processor


TINY_BUILDERS = {"tiny-llava": tiny_llava, "tiny-qwen2-vl": tiny_qwen2_vl}
