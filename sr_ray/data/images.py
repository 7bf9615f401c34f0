"""Decode, validate and normalise one image. Every failure is an `ImageRejected` with a reason.

Checks, in order: the file exists and is at most `max_image_bytes`; the header parses; width x height
is at most `max_pixels` (checked from the header, before any pixel is decoded: the decompression-bomb
guard); the pixels decode completely (truncated files fail here). Then: EXIF orientation applied,
converted to RGB (alpha composited on white), longest side shrunk to `max_side`. Images that needed
none of that keep their original bytes; others are re-encoded (JPEG stays JPEG, the rest PNG).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from sr_ray.data.typography import render

KEEP_AS_IS_FORMATS = ("PNG", "JPEG")
JPEG_QUALITY = 95


class ImageRejected(ValueError):
    """The image cannot be used; the message is the quarantine reason."""


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int = 20_000_000
    max_pixels: int = 40_000_000  # ~6300 x 6300; far above any benchmark image, far below a bomb
    max_side: int = 768


def read_image_file(path: str, limits: ImageLimits) -> bytes:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ImageRejected(f"missing image file: {path}") from None
    except OSError as err:
        raise ImageRejected(f"unreadable image file: {path}: {err}") from None
    if size > limits.max_image_bytes:
        raise ImageRejected(f"image file too large: {size} bytes > max_image_bytes={limits.max_image_bytes}")
    with open(path, "rb") as f:
        return f.read()


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, "PNG")
    return buf.getvalue()


def _normalise(image: Image.Image, limits: ImageLimits) -> tuple[Image.Image, bool]:
    """EXIF transpose, RGB, max side. Returns (image, changed)."""
    changed = False
    transposed = ImageOps.exif_transpose(image)
    if transposed is not None and transposed is not image:
        image, changed = transposed, True
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, "white")
            background.paste(rgba, mask=rgba.getchannel("A"))
            image = background
        else:
            image = image.convert("RGB")
        changed = True
    if max(image.size) > limits.max_side:
        image = image.copy()
        image.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
        changed = True
    return image, changed


def normalise_image_bytes(data: bytes, limits: ImageLimits, formats: tuple[str, ...] | None = None) -> bytes:
    """Validate + normalise encoded image bytes; returns the bytes to store. `formats`: the only Pillow
    plugins tried (None: all)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageRejected(
                    f"decompression-bomb guard: {width}x{height} = {width * height} pixels > max_pixels={limits.max_pixels}"
                )
            image.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected(f"decompression-bomb guard (Pillow): {err}") from None
    except Exception as err:  # Pillow raises many types for corrupt/truncated data
        raise ImageRejected(f"corrupt or truncated image: {type(err).__name__}: {err}") from None
    fmt = image.format
    normalised, changed = _normalise(image, limits)
    if not changed and fmt in KEEP_AS_IS_FORMATS:
        return data
    return _encode(normalised, "JPEG" if fmt == "JPEG" else "PNG")


def rendered_image_bytes(style: str, text: str, limits: ImageLimits) -> bytes:
    normalised, _ = _normalise(render(style, text), limits)
    return _encode(normalised, "PNG")


def noise_image_bytes(seed: str, size: int = 336, max_noise: int = 64) -> bytes:
    """A seeded random image: a flat gray level plus uniform noise of a random amplitude (<= max_noise / 255,
    the universal PGD's budget), the kind of image an attacker starts from."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "little"))
    level, amplitude = rng.integers(64, 193), rng.integers(0, max_noise + 1)
    pixels = level + rng.integers(-amplitude, amplitude + 1, size=(size, size, 3))
    return _encode(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), "PNG")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
