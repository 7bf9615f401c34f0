"""`load_vlm(name)`: built-in tiny models, the embedded `smol-llava`, or any HF VLM by hub id / local dir."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sr_ray.models.tiny import TINY_BUILDERS
from sr_ray.models.vlm import QWEN_FAMILY, VLM

EMBEDDED_DEFAULT = "smol-llava"  # safety-aligned; "smol-llava-unaligned": the same LM as shipped
EMBEDDED = (EMBEDDED_DEFAULT, "smol-llava-unaligned")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, dtype)


def _load_processor(path, model_type: str):
    """AutoProcessor, except Qwen2-VL's full processor needs torchvision (absent beside the CPU torch):
    then an image-only processor from the checkpoint's own image processor, tokenizer and template."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from sr_ray.models.tiny import ImageOnlyQwen2VLProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (ImportError, AttributeError, ValueError):
        processor = None
    if hasattr(processor, "image_processor") or model_type not in QWEN_FAMILY:
        return processor
    tokenizer = AutoTokenizer.from_pretrained(path)
    return ImageOnlyQwen2VLProcessor(AutoImageProcessor.from_pretrained(path), tokenizer, tokenizer.chat_template)


def load_vlm(name: str = EMBEDDED_DEFAULT, dtype: str | torch.dtype | None = None, device: str | None = None, **kwargs) -> VLM:
    """Load a VLM. `name`: "tiny-llava" | "tiny-qwen2-vl" | "smol-llava" | "smol-llava-unaligned" | hub id |
    local directory.

    Extra kwargs go to the embedded builder (`image_tokens=`). Hub ids load from the local HF cache only
    (offline by design); put weights there (or pass a directory) before running.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _resolve_dtype(dtype)
    if name in TINY_BUILDERS:
        model, processor = TINY_BUILDERS[name]()
        return VLM(model.to(device=device, dtype=dtype), processor, model_id=name)
    from transformers import AutoModelForImageTextToText

    if name in EMBEDDED:
        from sr_ray.models.smol_llava import smol_llava_dir

        path = smol_llava_dir(aligned=name == EMBEDDED_DEFAULT, **kwargs)
    else:
        path = Path(name) if Path(name).exists() else name
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    processor = _load_processor(path, model.config.model_type)
    meta = Path(path) / "sr_ray_model.json"
    model_id = json.loads(meta.read_text())["model_id"] if meta.exists() else str(name)
    return VLM(model, processor, model_id=model_id)
