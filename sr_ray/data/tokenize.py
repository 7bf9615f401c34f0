"""Optional stage for training: apply a model's chat template to `prompt` and tokenise it.

Loads a processor (multimodal chat templates take `[{"type": "image"}, {"type": "text"}]` parts)
or, for a text-only tokenizer, a plain string message. The image placeholder stays a single
token here; expanding it to the model's image-token count needs the pixels and happens in training.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from sr_ray.data.schema import TOKENIZED_FIELDS


class ChatTokenize:
    """Callable class for `Dataset.map_batches` (one load per actor)."""

    def __init__(self, path: str):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.multimodal = hasattr(self.processor, "tokenizer")
        self.tokenizer = self.processor.tokenizer if self.multimodal else self.processor

    def chat_prompt(self, prompt: str, has_image: bool) -> str:
        if self.multimodal:
            content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
        else:
            content = prompt
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = [
            self.chat_prompt(prompt, has_image)
            for prompt, has_image in zip(batch.column("prompt").to_pylist(), pc.is_valid(batch.column("image")).to_pylist())
        ]
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        batch = batch.append_column(TOKENIZED_FIELDS[0], pa.array(prompts, pa.string()))
        return batch.append_column(TOKENIZED_FIELDS[1], pa.array(ids, TOKENIZED_FIELDS[1].type))
