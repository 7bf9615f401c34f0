"""The reminder itself: k learned embeddings appended to the partial answer (SafetyReminder §1)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sr_ray.reminder.artifacts import check_base_model, load_artifact, save_artifact

DEFAULT_INIT_TEXT = "Refuse if partial output is unsafe; else, continue helpfully."


class SoftPrompt(nn.Module):
    """k x hidden embeddings, kept in fp32 and cast to the model dtype at use (as the official code)."""

    def __init__(self, embeddings: torch.Tensor, base_model_id: str, init_text: str = DEFAULT_INIT_TEXT):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.detach().float().clone())
        self.base_model_id = base_model_id
        self.init_text = init_text

    @property
    def k(self) -> int:
        return self.embeddings.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[1]

    @classmethod
    def from_text(cls, vlm, text: str = DEFAULT_INIT_TEXT, k: int = 4) -> "SoftPrompt":
        """Word embeddings of `text`'s first k tokens (repeated if shorter), the official initialisation."""
        ids = vlm.tokenizer(text, add_special_tokens=False).input_ids
        ids = (ids * (k // max(len(ids), 1) + 1))[:k]
        with torch.no_grad():
            emb = vlm.embed_tokens(torch.tensor(ids, device=vlm.device))
        return cls(emb, vlm.model_id, text)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.embeddings if dtype is None else self.embeddings.to(dtype)

    def save(self, directory: str | Path) -> Path:
        meta = dict(
            base_model_id=self.base_model_id, hidden_size=self.hidden_size, k=self.k,
            dtype="float32", init_text=self.init_text,
        )
        return save_artifact(directory, "soft_prompt", {"embeddings": self.embeddings}, meta)

    @classmethod
    def load(cls, directory: str | Path, vlm=None) -> "SoftPrompt":
        """Load; with `vlm`, refuse a prompt trained for another base model and move it to its device."""
        tensors, meta = load_artifact(directory, "soft_prompt")
        if vlm is not None:
            check_base_model(meta, vlm.model_id, vlm.hidden_size, directory)
        prompt = cls(tensors["embeddings"], meta["base_model_id"], meta["init_text"])
        return prompt.to(vlm.device) if vlm is not None else prompt
