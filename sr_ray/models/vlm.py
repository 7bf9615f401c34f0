"""`VLM`: one interface over HF image-text-to-text models for prompting, embedding and decoding.

The guarded engine drives the decoder stack directly (embeddings in, final-norm hidden states out), so it
can splice soft-prompt embeddings into the live KV cache. The architecture-specific parts live here:
how a chat turn is rendered, how image features are merged into the embeddings, and which position ids a
token gets (1-D for LLaVA; M-RoPE (t, h, w) for Qwen2-VL, where text after an image continues from the
image's largest position, not from the sequence index).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

QWEN_FAMILY = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class Prompt:
    """One user turn: text, an optional image, an optional system prompt, and an optional answer prefix
    (text the assistant has already said, placed after the generation prompt)."""

    text: str
    image: Image.Image | None = None
    system: str | None = None
    answer_prefix: str = ""


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (B, L), left padded
    attention_mask: torch.Tensor  # (B, L)
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values, image_grid_thw, ...


@dataclass
class Embedded:
    embeds: torch.Tensor  # (B, L, D) with image features merged
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L) or (3, B, L)
    next_pos: torch.Tensor  # (B,) position id of the next token per row


class VLM:
    """A frozen VLM with its processor, the handle the rest of sr_ray works with."""

    def __init__(self, model, processor, model_id: str):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.model_id = model_id
        self.family = model.config.model_type
        self.text_config = model.config.get_text_config()
        self.hidden_size = self.text_config.hidden_size
        self.decoder = model.model.language_model  # final norm included: last_hidden_state is post-norm
        self.lm_head = model.lm_head
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = self.tokenizer.pad_token_id
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ---- prompting -----------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """Chat template with generation prompt, then the answer prefix (if any)."""
        content = ([{"type": "image"}] if prompt.image is not None else []) + [
            {"type": "text", "text": prompt.text}
        ]
        messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
        messages.append({"role": "user", "content": content})
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prefix = prompt.answer_prefix.strip()
        if not prefix:
            return text
        # "ASSISTANT:" style templates need a space; ChatML ends in a newline already.
        return text + (prefix if text[-1:].isspace() else " " + prefix)

    def encode(self, prompts: list[Prompt]) -> PromptBatch:
        texts = [self.render(p) for p in prompts]
        images = [p.image.convert("RGB") for p in prompts if p.image is not None]
        enc = self.processor(
            text=texts, images=images or None, padding=True, return_tensors="pt", add_special_tokens=False
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        return PromptBatch(ids, mask, enc)

    # ---- embedding and positions ---------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(ids)

    def embed(self, batch: PromptBatch, suffix: torch.Tensor | None = None) -> Embedded:
        """Token + image embeddings for a prompt batch; `suffix` (k, D) is appended to every row."""
        embeds = self.embed_tokens(batch.input_ids)
        vision = dict(batch.vision)
        mm_types = vision.pop("mm_token_type_ids", None)
        if "pixel_values" in vision:
            feats = self.model.model.get_image_features(**vision, return_dict=True).pooler_output
            feats = torch.cat(list(feats), dim=0).to(embeds.dtype)
            slots = (batch.input_ids == self.model.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slots, feats)
        mask = batch.attention_mask
        if self.family in QWEN_FAMILY and "image_grid_thw" in vision:
            pos3, _ = self.model.model.get_rope_index(
                batch.input_ids, mm_types, image_grid_thw=vision["image_grid_thw"], attention_mask=mask
            )
            position_ids = pos3
            next_pos = (pos3[0] * mask).amax(dim=1) + 1
        else:
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            position_ids = self.positions(pos)
            next_pos = mask.sum(1)
        if suffix is not None:
            k = suffix.shape[0]
            embeds = torch.cat([embeds, suffix.to(embeds.dtype).expand(len(embeds), -1, -1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(mask), k)], dim=1)
            tail = next_pos[:, None] + torch.arange(k, device=mask.device)
            position_ids = torch.cat([position_ids, self.positions(tail)], dim=-1)
            next_pos = next_pos + k
        return Embedded(embeds, mask, position_ids, next_pos)

    def positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Position ids for text tokens at per-row positions `pos` (B, W)."""
        if self.family in QWEN_FAMILY:
            return pos.unsqueeze(0).expand(3, -1, -1)  # text tokens: t = h = w
        return pos

    # ---- forward ---------------------------------------------------------------------------------
    def hidden(self, embeds, attention_mask, position_ids, cache=None) -> torch.Tensor:
        """Final-norm hidden states (B, W, D) of the decoder for new positions, extending `cache`."""
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    @torch.no_grad()
    def last_prompt_hidden(self, prompts: list[Prompt], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Final-norm hidden state at the last prompt token, the official probe feature. (N, D) float32."""
        from tqdm.auto import tqdm

        feats = []
        for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="features"):
            e = self.embed(self.encode(prompts[i : i + batch_size]))
            feats.append(self.hidden(e.embeds, e.attention_mask, e.position_ids)[:, -1].float().cpu())
        return torch.cat(feats) if feats else torch.empty(0, self.hidden_size)
