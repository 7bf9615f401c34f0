"""Artifacts are one `tensors.safetensors` + one `meta.json` per directory: nothing else is ever loaded.

Pickle-based formats (`torch.save`, `.pt/.pth/.bin/.pkl`, numpy `.npz` with objects) can run code when
loaded, so they are refused with a clear error instead of being opened.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sr_ray.hashing import sha256_file

TENSORS = "tensors.safetensors"
META = "meta.json"


class ArtifactError(ValueError):
    """An artifact is missing, tampered with, of the wrong kind, or for another base model."""


def _refuse_non_safetensors(path: Path) -> None:
    head = path.read_bytes()[:9] if path.is_file() else b""
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise ArtifactError(f"{path} is a pickle/torch.save file; sr_ray only loads safetensors + JSON artifacts")
    if len(head) < 9 or head[8:9] != b"{":
        raise ArtifactError(f"{path} is not a safetensors file")


def save_artifact(directory: str | Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, directory / TENSORS)
    full = {"kind": kind, **meta, "sha256": sha256_file(directory / TENSORS)}
    (directory / META).write_text(json.dumps(full, indent=2, sort_keys=True))
    return directory


def load_artifact(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load an artifact directory (or refuse a single non-safetensors file) and verify its checksum."""
    path = Path(path)
    if path.is_file():
        _refuse_non_safetensors(path)
        raise ArtifactError(f"{path}: pass the artifact directory (with {TENSORS} and {META}), not a file")
    tensors_file, meta_file = path / TENSORS, path / META
    if not tensors_file.exists() or not meta_file.exists():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise ArtifactError(f"{path}: expected {TENSORS} + {META}, found {found}")
    _refuse_non_safetensors(tensors_file)
    meta = json.loads(meta_file.read_text())
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path}: is a {meta.get('kind')!r} artifact, expected {kind!r}")
    if sha256_file(tensors_file) != meta.get("sha256"):
        raise ArtifactError(f"{path}: checksum mismatch, the tensors were modified after saving")
    return load_file(tensors_file), meta


def check_base_model(meta: dict, model_id: str, hidden_size: int, path: Path | str) -> None:
    if meta.get("base_model_id") != model_id or meta.get("hidden_size") != hidden_size:
        raise ArtifactError(
            f"{path}: trained for base model {meta.get('base_model_id')!r} (hidden {meta.get('hidden_size')}), "
            f"cannot be used with {model_id!r} (hidden {hidden_size})"
        )
