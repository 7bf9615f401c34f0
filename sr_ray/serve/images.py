"""Image parts of a chat request: `data:` URLs always, http(s) URLs only when allowed, never anything local.

Before any pixel is decoded, the header must name an allowed format (PNG, JPEG, GIF, WebP, BMP, TIFF:
Pillow is asked to try only those plugins, so e.g. EPS never reaches Ghostscript) and the decoded size,
width x height x bytes per pixel of the decoded mode (16-bit modes count double), must fit
`max_decoded_bytes` and the replica's shared decode budget. Decoding then goes through the data
pipeline's validator (`sr_ray.data.images`), so a served image is checked and normalised exactly like a
training image: pixel cap (decompression-bomb guard), complete decode (truncated files fail), EXIF
orientation, RGB, longest side capped.

Remote fetching is off by default. When on, a URL must be http(s), name an allow-listed host, carry no
credentials, and resolve only to public addresses (no loopback, private, link-local such as the cloud
metadata address 169.254.169.254, multicast or reserved ranges); redirects are not followed. The check
unwraps IPv4 addresses embedded in IPv6 ones (mapped, compatible, NAT64, 6to4, Teredo), resolves the
name once before connecting (so the allow-list, not the address check, is the defence against DNS
rebinding), and the whole fetch, resolution included, must finish within `timeout_s`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageMode, UnidentifiedImageError

from sr_ray.data.images import ImageLimits, ImageRejected, normalise_image_bytes
from sr_ray.serve.budget import ByteBudget

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[a-z0-9=._-]+)*;base64,(?P<data>.*)$", re.I | re.S)

Resolver = Callable[[str, int], Awaitable[list[str]]]


class ImageError(ValueError):
    """The image part cannot be used; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int
    max_pixels: int
    max_side: int
    allow_remote: bool = False
    allowed_hosts: tuple[str, ...] = ()
    timeout_s: float = 5.0
    max_decoded_bytes: int = 64 * 2**20


def bytes_per_pixel(mode: str) -> int:
    """Bytes one pixel takes once decoded (RGBA: 4, I;16: 2, I and F: 4, 1-bit: 1)."""
    info = ImageMode.getmode(mode)
    return len(info.bands) * max(1, int(info.typestr[-1]))


def decoded_size(data: bytes, policy: ImagePolicy) -> int:
    """Header-only: the allowed format check and width x height x bytes per pixel, within the limits."""
    if len(data) > policy.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, above the limit of {policy.max_bytes}", 413)
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            (width, height), mode, fmt = image.size, image.mode, image.format
    except UnidentifiedImageError:
        raise ImageError(f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"invalid image: decompression-bomb guard (Pillow): {err}") from None
    except Exception as err:  # noqa: BLE001 (Pillow raises many types for corrupt headers)
        raise ImageError(f"invalid image: corrupt header: {type(err).__name__}") from None
    if width * height > policy.max_pixels:
        raise ImageError(f"invalid image: decompression-bomb guard: {width}x{height} = {width * height} pixels > "
                         f"the limit of {policy.max_pixels}")
    size = width * height * bytes_per_pixel(mode)
    if size > policy.max_decoded_bytes:
        raise ImageError(f"{fmt} image {width}x{height} in mode {mode} decodes to {size} bytes, above the limit of "
                         f"{policy.max_decoded_bytes}", 413)
    return size


def decode_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Normalise (after `decoded_size` passed) and convert to RGB."""
    try:
        limits = ImageLimits(policy.max_bytes, policy.max_pixels, policy.max_side)
        clean = normalise_image_bytes(data, limits, formats=ALLOWED_FORMATS)
    except ImageRejected as err:
        raise ImageError(f"invalid image: {err}") from None
    return Image.open(io.BytesIO(clean), formats=ALLOWED_FORMATS).convert("RGB")


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    match = DATA_URL.match(url)
    if match is None:
        raise ImageError("malformed data URL: expected data:image/<type>;base64,<data>")
    payload = match["data"]
    if len(payload) * 3 // 4 > max_bytes + 3:  # refuse before decoding a huge payload
        raise ImageError(f"image is larger than the limit of {max_bytes} bytes", 413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("data URL payload is not valid base64") from None


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address routes to: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d),
    NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48), 6to4 (2002::/16), Teredo (server and client)."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.teredo is not None:
        return list(ip.teredo)
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if any(ip in net for net in NAT64) or (ip in IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are IPv6's own
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        candidates += embedded_ipv4(ip)
    return all(c.is_global and not c.is_multicast for c in candidates)


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


async def check_remote_url(url: str, policy: ImagePolicy, resolve: Resolver = system_resolver) -> None:
    """Raise `ImageError` unless `url` may be fetched under `policy`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"image URL scheme {scheme or '(none)'!r} is not allowed; use data: or http(s)")
    if not policy.allow_remote:
        raise ImageError("remote image URLs are disabled on this server; send the image as a data: URL")
    if parts.username or parts.password:
        raise ImageError("image URLs with credentials are not allowed")
    host = (parts.hostname or "").lower()
    if host not in policy.allowed_hosts:
        raise ImageError(f"image host {host!r} is not on this server's allow-list")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
        addresses = await resolve(host, port)
    except (OSError, ValueError) as err:
        raise ImageError(f"cannot resolve image host {host!r}: {err}") from None
    blocked = [a for a in addresses if not is_public_address(a)]
    if blocked or not addresses:
        raise ImageError(f"image host {host!r} resolves to a non-public address {blocked or addresses}")


async def fetch_image_bytes(url: str, policy: ImagePolicy, resolve: Resolver = system_resolver,
                            transport: httpx.AsyncBaseTransport | None = None) -> bytes:
    """The checked download, resolution included, within `timeout_s` in total (httpx's own timeout is per
    read: a server dripping a byte at a time would never trip it)."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch(url, policy, resolve, transport)
    except TimeoutError:
        raise ImageError(f"fetching the image took longer than {policy.timeout_s} s") from None


async def _fetch(url: str, policy: ImagePolicy, resolve: Resolver, transport) -> bytes:
    await check_remote_url(url, policy, resolve)
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=policy.timeout_s, transport=transport) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ImageError(f"fetching the image failed: HTTP {response.status_code}")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > policy.max_bytes:
                        raise ImageError(f"image is larger than the limit of {policy.max_bytes} bytes", 413)
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.HTTPError as err:
        raise ImageError(f"fetching the image failed: {type(err).__name__}") from None


async def load_image(url: str, policy: ImagePolicy, budget: ByteBudget | None = None,
                     resolve: Resolver = system_resolver,
                     transport: httpx.AsyncBaseTransport | None = None) -> Image.Image:
    """An `image_url` part's URL to a validated RGB image. Decoding runs off the event loop, holding its
    decoded bytes of the replica's `budget` (so concurrent decodes cannot add up past it)."""
    if not isinstance(url, str) or not url:
        raise ImageError("image_url.url must be a non-empty string")
    if url[:5].lower() == "data:":
        data = data_url_bytes(url, policy.max_bytes)
    else:
        data = await fetch_image_bytes(url, policy, resolve, transport)
    size = decoded_size(data, policy)
    if budget is None:
        return await asyncio.to_thread(decode_image, data, policy)
    async with budget.hold(size):
        return await asyncio.to_thread(decode_image, data, policy)
