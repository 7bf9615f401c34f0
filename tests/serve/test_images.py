"""Image parts: data URLs, hostile bytes, formats, decoded-size budgets, and the remote-URL policy
(resolver and transport injected)."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
from PIL import Image

from sr_ray.serve.budget import Busy, ByteBudget
from sr_ray.serve.images import ALLOWED_FORMATS, ImageError, ImagePolicy, decoded_size, is_public_address, load_image
from tests.serve.conftest import data_url, png_bomb, png_bytes, png_header_only

POLICY = ImagePolicy(max_bytes=100_000, max_pixels=1_000_000, max_side=256)
REMOTE = ImagePolicy(max_bytes=100_000, max_pixels=1_000_000, max_side=256, allow_remote=True,
                     allowed_hosts=("images.example.com", "127.0.0.1", "169.254.169.254", "[::1]", "::1"))


def load(url, policy=POLICY, **kw):
    return asyncio.run(load_image(url, policy, **kw))


def refused(url, policy=POLICY, **kw) -> ImageError:
    with pytest.raises(ImageError) as err:
        load(url, policy, **kw)
    return err.value


def test_data_url_png_and_jpeg_decode_to_rgb():
    assert load(data_url(png_bytes((30, 20)))).size == (30, 20)
    image = load(data_url(png_bytes((300, 150), fmt="JPEG"), "image/jpeg"))
    assert image.mode == "RGB" and image.size == (256, 128)  # longest side capped, as in the data pipeline


@pytest.mark.parametrize("url, status, words", [
    ("data:image/png;base64,@@@@", 400, "base64"),
    ("data:text/html;base64,PGI+", 400, "malformed data URL"),
    ("data:image/png,rawbytes", 400, "malformed data URL"),
    (data_url(b"definitely not an image"), 400, "not an image in an accepted format"),
    (data_url(png_bytes((64, 64), "blue")[:60]), 400, "corrupt or truncated"),
    (data_url(png_header_only(50_000, 50_000)), 400, "decompression-bomb"),
    (data_url(b"\0" * 200_000), 413, "limit"),
])
def test_hostile_data_urls_are_refused(url, status, words):
    err = refused(url)
    assert err.status == status and words in str(err)


@pytest.mark.parametrize("url, words", [
    ("file:///etc/passwd", "scheme 'file'"),
    ("ftp://images.example.com/a.png", "scheme 'ftp'"),
    ("gopher://127.0.0.1:70/", "scheme 'gopher'"),
    ("/etc/passwd", "scheme '(none)'"),
    ("https://images.example.com/a.png", "disabled"),
])
def test_non_http_schemes_and_disabled_remote_are_refused(url, words):
    assert words in str(refused(url))


def resolve_to(address):
    async def resolver(host, port):
        return [address]
    return resolver


@pytest.mark.parametrize("url, address", [
    ("http://127.0.0.1/a.png", "127.0.0.1"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    ("http://[::1]/a.png", "::1"),
    ("https://images.example.com/a.png", "10.0.0.7"),  # an allow-listed name that resolves inside
    ("https://images.example.com/a.png", "::ffff:127.0.0.1"),
    ("https://images.example.com/a.png", "224.0.0.1"),
])
def test_allow_listed_hosts_still_cannot_reach_internal_addresses(url, address):
    err = refused(url, REMOTE, resolve=resolve_to(address))
    assert "non-public address" in str(err)


def test_remote_url_policy_checks_host_and_credentials():
    public = resolve_to("93.184.216.34")
    assert "allow-list" in str(refused("https://evil.example.org/a.png", REMOTE, resolve=public))
    assert "credentials" in str(refused("https://user:pw@images.example.com/a.png", REMOTE, resolve=public))


def serve_bytes(status: int, body: bytes, headers=None) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(status, content=body, headers=headers))


def test_remote_fetch_of_an_allowed_public_host():
    public = resolve_to("93.184.216.34")
    image = load("https://images.example.com/a.png", REMOTE, resolve=public,
                 transport=serve_bytes(200, png_bytes((40, 10))))
    assert image.size == (40, 10)
    redirect = serve_bytes(302, b"", {"location": "http://169.254.169.254/"})
    assert "HTTP 302" in str(refused("https://images.example.com/a.png", REMOTE, resolve=public, transport=redirect))
    big = serve_bytes(200, b"x" * 200_000)
    assert refused("https://images.example.com/a.png", REMOTE, resolve=public, transport=big).status == 413


def test_public_address_classification():
    assert is_public_address("93.184.216.34") and is_public_address("2606:4700::1111")
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
                    "::1", "fe80::1", "fd00::2", "::ffff:10.0.0.1", "100.64.0.1", "239.1.1.1"):
        assert not is_public_address(address), address


def encoded(fmt: str, mode: str = "RGB", size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes(fmt):
    assert load(data_url(encoded(fmt))).size == (20, 12)


@pytest.mark.parametrize("fmt, mode", [("EPS", "RGB"), ("PPM", "RGB"), ("ICO", "RGBA"), ("PCX", "RGB"),
                                       ("TGA", "RGB"), ("SGI", "RGB"), ("IM", "RGB")])
def test_other_formats_never_reach_their_decoders(fmt, mode):
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n" if fmt == "EPS" else encoded(fmt, mode)
    err = refused(data_url(data))
    assert err.status == 400 and "accepted format" in str(err)


def test_decoded_size_counts_bytes_per_pixel():
    policy = ImagePolicy(max_bytes=1_000_000, max_pixels=20_000_000, max_side=256, max_decoded_bytes=64 * 2**20)
    assert decoded_size(png_bomb(64, 32, 8, 2), policy) == 64 * 32 * 3
    assert decoded_size(png_bomb(64, 32, 16, 0), policy) == 64 * 32 * 2  # 16-bit grey: Pillow's I;16
    assert decoded_size(png_bomb(64, 32, 16, 6), policy) == 64 * 32 * 4  # 16-bit RGBA decodes to 8-bit RGBA
    # 4097 x 4097 RGBA is under the pixel cap but over 64 MiB once decoded: refused from the header
    err = refused(data_url(png_bomb(4097, 4097)), policy)
    assert err.status == 413 and "decodes to 67141636 bytes" in str(err) and "mode RGBA" in str(err)
    assert load(data_url(png_bomb(2048, 1024, 16, 0)), policy).size == (256, 128)


def test_decode_budget_serialises_big_images_and_refuses_when_busy():
    policy = ImagePolicy(max_bytes=1_000_000, max_pixels=20_000_000, max_side=64, max_decoded_bytes=8 * 2**20)
    big = data_url(png_bomb(1400, 1400))  # 7.8 MB decoded: two cannot decode at once in an 8 MiB budget
    peak = 0

    async def run(wait_s: float):
        nonlocal peak
        budget = ByteBudget("decoded image pixels", 8 * 2**20, wait_s)

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, budget.used)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(load_image(big, policy, budget) for _ in range(3)), return_exceptions=True)
        finally:
            watcher.cancel()

    assert all(isinstance(r, Image.Image) for r in asyncio.run(run(wait_s=60)))
    assert 0 < peak <= 8 * 2**20
    results = asyncio.run(run(wait_s=0.0))
    busy = [r for r in results if isinstance(r, Busy)]
    assert busy and busy[0].status == 503 and "server busy" in busy[0].message
    assert any(isinstance(r, Image.Image) for r in results)


@pytest.mark.parametrize("address", [
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b:1::a00:1",  # local-use NAT64 of 10.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "::127.0.0.1",  # IPv4-compatible
    "::a9fe:a9fe",
    "::ffff:169.254.169.254",  # IPv4-mapped
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo (client 192.0.2.45)
    "fe80::1%eth0",
])
def test_embedded_ipv4_forms_are_unwrapped(address):
    assert not is_public_address(address)
    err = refused("https://images.example.com/a.png", REMOTE, resolve=resolve_to(address))
    assert "non-public address" in str(err)


def test_embedded_public_ipv4_stays_public():
    for address in ("64:ff9b::5db8:d822", "2002:5db8:d822::1", "::ffff:93.184.216.34"):
        assert is_public_address(address), address


def test_remote_fetch_is_bounded_in_total_time():
    policy = ImagePolicy(max_bytes=100_000, max_pixels=1_000_000, max_side=256, allow_remote=True,
                         allowed_hosts=("images.example.com",), timeout_s=0.5)

    async def slow_dns(host, port):
        await asyncio.sleep(30)
        return ["93.184.216.34"]

    async def drip(request):  # one byte every 0.2 s: no single read times out
        async def body():
            for _ in range(1000):
                await asyncio.sleep(0.2)
                yield b"x"
        return httpx.Response(200, content=body())

    for kw in (dict(resolve=slow_dns), dict(resolve=resolve_to("93.184.216.34"), transport=httpx.MockTransport(drip))):
        err = refused("https://images.example.com/a.png", policy, **kw)
        assert err.status == 400 and "longer than 0.5 s" in str(err)
