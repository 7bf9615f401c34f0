"""`VLM`: one interface over HF image-text-to-text models for prompting, embedding and decoding.

The guarded engine drives the decoder stack directly (embeddings in, final-norm hidden states out), so it
can splice soft-prompt embeddings into the live KV cache. The architecture-specific parts live here:
how a chat turn is rendered, how image features are merged into the embeddings, and which position ids a
token gets (1-D for LLaVA; M-RoPE (t, h, w) for Qwen2-VL, where text after an image continues from the
image's largest position, not from the sequence index).
"""

from __future__ import annotations

import re
import uuid
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
    def segments(self, prompt: Prompt) -> list[tuple[str, bool]]:
        """The chat-templated prompt as (text, is_content) pieces, in order. Template pieces carry the real
        control tokens (`<|im_start|>`, the image placeholder); content pieces (system text, user text,
        answer prefix) are only ever tokenized as plain text, so `<|im_end|>` typed by a user cannot end
        its turn and a typed `<image>` is not an image slot."""
        marks = [f"\x00sr{uuid.uuid4().hex}{i}\x00" for i in range(2)]
        content = ([{"type": "image"}] if prompt.image is not None else []) + [{"type": "text", "text": marks[1]}]
        messages = [{"role": "system", "content": marks[0]}] if prompt.system else []
        messages.append({"role": "user", "content": content})
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        values = {marks[0]: prompt.system or "", marks[1]: prompt.text}
        pieces = []
        for i, piece in enumerate(re.split("(" + "|".join(map(re.escape, marks)) + ")", text)):
            if i % 2:  # content; the template's spaces before it join it, as they would in one string
                space = re.search(r"[ \t]*$", pieces[-1][0]).group()
                pieces[-1] = (pieces[-1][0][: len(pieces[-1][0]) - len(space)], False)
                pieces.append((space + values[piece], True))
            else:
                pieces.append((piece, False))
        if sum(is_content for _, is_content in pieces) != len(messages):
            raise ValueError(f"the chat template of {self.model_id} does not place each message's text once")
        prefix = prompt.answer_prefix.strip()
        if prefix:
            # "ASSISTANT:" style templates need a space; ChatML ends in a newline already.
            pieces.append((prefix if text[-1:].isspace() else " " + prefix, True))
        return pieces

    def render(self, prompt: Prompt) -> str:
        """Chat template with generation prompt, then the answer prefix (if any)."""
        return "".join(text for text, _ in self.segments(prompt))

    def encode(self, prompts: list[Prompt]) -> PromptBatch:
        """Left-padded ids: template pieces through the processor (which expands the image placeholder),
        content pieces through the tokenizer with special-token matching off, stitched per prompt."""
        rows = [self.segments(p) for p in prompts]
        template = [text for row in rows for text, content in row if not content]
        images = [p.image.convert("RGB") for p in prompts if p.image is not None]
        enc = self.processor(
            text=template, images=images or None, padding=True, return_tensors="pt", add_special_tokens=False
        )
        kept = enc.pop("attention_mask").bool()
        # per-token outputs (input_ids, Qwen's mm_token_type_ids) are stitched; content tokens get 0 types
        per_token = [k for k, v in enc.items() if torch.is_tensor(v) and v.shape == kept.shape]
        content = [text for row in rows for text, is_content in row if is_content]
        content_ids = iter(self.tokenizer(content, add_special_tokens=False, split_special_tokens=True).input_ids)
        template_rows = iter(range(len(template)))
        stitched = []
        for row in rows:
            parts = {k: [] for k in per_token}
            for _, is_content in row:
                if is_content:
                    ids = torch.tensor(next(content_ids), dtype=torch.long)
                    for k in per_token:
                        parts[k].append(ids if k == "input_ids" else torch.zeros_like(ids, dtype=enc[k].dtype))
                else:
                    j = next(template_rows)
                    for k in per_token:
                        parts[k].append(enc[k][j][kept[j]])
            stitched.append({k: torch.cat(v) for k, v in parts.items()})
        width = max(len(s["input_ids"]) for s in stitched)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        out = {k: torch.full((len(rows), width), pad if k == "input_ids" else 0, dtype=enc[k].dtype) for k in per_token}
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, s in enumerate(stitched):
            n = len(s["input_ids"])
            mask[i, width - n :] = 1
            for k in per_token:
                out[k][i, width - n :] = s[k]
        vision = {k: v for k, v in enc.items() if k not in per_token} | {k: out[k] for k in per_token if k != "input_ids"}
        vision = {k: v.to(self.device) for k, v in vision.items()}
        if "pixel_values" in vision:
            vision["pixel_values"] = vision["pixel_values"].to(self.dtype)
        return PromptBatch(out["input_ids"].to(self.device), mask.to(self.device), vision)

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
