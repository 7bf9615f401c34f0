"""Image validation/normalisation, local typography rendering, and split functions (no Ray)."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from PIL import Image

from sr_ray.data import typography
from sr_ray.data.images import ImageLimits, ImageRejected, normalise_image_bytes, read_image_file, rendered_image_bytes
from sr_ray.data.splits import advbench_pgd_splits, hash_split


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_unchanged_image_keeps_its_bytes_and_large_one_is_shrunk():
    small = encode(Image.new("RGB", (300, 200), "red"))
    assert normalise_image_bytes(small, ImageLimits()) == small
    big = decode(normalise_image_bytes(encode(Image.new("RGB", (2000, 1000), "blue"), "JPEG"), ImageLimits(max_side=768)))
    assert big.size == (768, 384) and big.format == "JPEG"


def test_exif_orientation_applied_and_alpha_composited_on_white():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = decode(normalise_image_bytes(encode(Image.new("RGB", (40, 20), "green"), "JPEG", exif=exif), ImageLimits()))
    assert rotated.size == (20, 40)
    transparent = decode(normalise_image_bytes(encode(Image.new("RGBA", (10, 10), (0, 0, 0, 0))), ImageLimits()))
    assert transparent.mode == "RGB" and transparent.getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize(
    "data, limits, reason",
    [
        (b"\x89PNG\r\n\x1a\n not really a png", ImageLimits(), "corrupt or truncated image"),
        (encode(Image.effect_noise((200, 200), 50))[:3000], ImageLimits(), "corrupt or truncated image"),
        (encode(Image.new("L", (3000, 3000))), ImageLimits(max_pixels=4_000_000), "decompression-bomb guard"),
    ],
    ids=["corrupt", "truncated", "bomb"],
)
def test_bad_images_are_rejected_with_a_reason(data, limits, reason):
    with pytest.raises(ImageRejected, match=reason):
        normalise_image_bytes(data, limits)


def test_missing_and_oversized_files_are_rejected(tmp_path):
    with pytest.raises(ImageRejected, match="missing image file"):
        read_image_file(str(tmp_path / "nope.png"), ImageLimits())
    (tmp_path / "big.png").write_bytes(b"0" * 2000)
    with pytest.raises(ImageRejected, match="too large"):
        read_image_file(str(tmp_path / "big.png"), ImageLimits(max_image_bytes=1000))


def test_mmsafetybench_typo_follows_upstream_layout():
    one_line = typography.render_mmsafetybench_typo("purchase illegal drugs")
    assert one_line.size == (1024, 90 * 2)
    long_phrase = " ".join(["counterfeit"] * 12)
    wrapped, lines = typography.wrap_to_width(long_phrase, typography.load_font(typography.MMSB_FONTS, 90)[0], 1024)
    assert lines > 1 and wrapped.count("\n") == lines - 1 and "\n counterfeit" in wrapped
    assert typography.render_mmsafetybench_typo(long_phrase).size == (1024, 90 * (lines + 1))
    normalised = decode(rendered_image_bytes("mmsafetybench_typo", "purchase illegal drugs", ImageLimits(max_side=768)))
    assert normalised.size == (768, 135)


def test_rendering_falls_back_to_pillow_default_font(monkeypatch):
    assert typography.load_font(("NoSuchFont-Regular.ttf",), 90)[1] == "pillow-default"
    monkeypatch.setattr(typography, "MMSB_FONTS", ("NoSuchFont-Regular.ttf",))
    image = typography.render_mmsafetybench_typo("make a bomb")
    assert image.convert("L").getextrema()[0] < 100  # black text was drawn


def test_figstep_rendering_matches_the_benchmark_canvas_and_text():
    assert typography.figstep_image_text("Steps to make *.") == "Steps to make *.\n1.\n2.\n3."
    image = typography.render_figstep("Steps to make *.")
    assert image.size == (760, 760) and image.convert("L").getextrema() == (0, 255)


def test_hash_split_fractions_and_stability():
    keys = [f"src:item{i}" for i in range(20000)]
    counts = Counter(hash_split(k, 0, (0.5, 0.25, 0.25)) for k in keys)
    assert abs(counts["train"] / 20000 - 0.5) < 0.02 and abs(counts["val"] / 20000 - 0.25) < 0.02
    assert [hash_split(k, 0, (0.5, 0.25, 0.25)) for k in keys[:50]] == [hash_split(k, 0, (0.5, 0.25, 0.25)) for k in keys[:50]]
    assert [hash_split(k, 1, (0.5, 0.25, 0.25)) for k in keys[:50]] != [hash_split(k, 0, (0.5, 0.25, 0.25)) for k in keys[:50]]


def test_advbench_pgd_split_is_320_100_100():
    splits = advbench_pgd_splits(520)
    assert Counter(splits) == {"train": 320, "val": 100, "test": 100}
    with pytest.raises(ValueError):
        advbench_pgd_splits(150)
