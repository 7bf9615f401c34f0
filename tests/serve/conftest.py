"""Serve fixtures: tiny-llava reminder bundles with a constant probe, images as data URLs."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import pytest
from PIL import Image

from sr_ray.serve.membench import png_bomb  # noqa: F401 (re-exported for the tests)


def png_bytes(size=(24, 24), color="red", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no data (a decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def tiny_llava():
    from sr_ray.models import load_vlm

    return load_vlm("tiny-llava")



def scrape_ray(until, timeout_s: float = 90.0) -> list:
    """The samples every live node's Ray metrics agent exports (what Prometheus scrapes through Ray's service
    discovery), scraped until `until(samples)` holds: workers push their metrics every few seconds."""
    import httpx
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while True:
        samples = [sample for node in ray.nodes() if node["Alive"]
                   for family in text_string_to_metric_families(httpx.get(
                       f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10).text)
                   for sample in family.samples]
        if until(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1)
