"""Image parts: data URLs, hostile bytes, and the remote-URL policy (resolver and transport injected)."""

from __future__ import annotations

import asyncio
import httpx
import pytest

from sr_ray.serve.images import ImageError, ImagePolicy, is_public_address, load_image
from tests.serve.conftest import data_url, png_bytes, png_header_only

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
    (data_url(b"definitely not an image"), 400, "corrupt or truncated"),
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
