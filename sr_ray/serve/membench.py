"""`sr-ray bench ingress-memory`: the ingress's peak memory under concurrent maximal-image requests vs idle.

The ingress app (`create_api`, the default limits) runs under uvicorn in a child process; its model side
answers at once with one chunk, so every byte measured is the ingress's own (body, JSON, base64, image
decode and normalisation). After a warm-up request, idle RSS is read; then `concurrency` requests are
sent at once and the child's RSS is sampled every 5 ms. Two payloads, each the worst of its kind under
the default limits:
- `pixels`: a 16-bit RGBA PNG of 4096 x 4096 (16 Mpx, the pixel cap; ~130 kB on the wire, 64 MiB decoded);
- `bytes`: a noise PNG just under `max_image_bytes` (5 MiB; a ~7 MB body).
Each runs with the budgets as configured and with them off (`max_inflight_*` = 1 TiB), side by side.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import multiprocessing
import os
import random
import struct
import threading
import time
import zlib
from collections import Counter

import httpx

from sr_ray.serve.bench import free_port
from sr_ray.serve.config import ServeConfig

UNBOUNDED = 2**40


def png_bomb(width: int, height: int, bit_depth: int = 16, color_type: int = 6) -> bytes:
    """A complete, valid PNG of one flat colour: tiny on the wire, width x height pixels when decoded
    (16-bit RGBA 4096 x 4096: ~130 kB, 64 MiB in Pillow's RGBA, ~340 MB while normalising)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\0" + b"\x7f" * (width * channels * bit_depth // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise_png(max_bytes: int) -> bytes:
    """Incompressible RGB noise, as large as fits in `max_bytes` as a PNG."""
    from PIL import Image

    side = int((max_bytes / 3) ** 0.5) - 8
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(0).randbytes(side * side * 3)).save(buf, "PNG")
    assert buf.tell() <= max_bytes
    return buf.getvalue()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _serve(cfg: ServeConfig, port: int) -> None:  # the child process
    import uvicorn

    from sr_ray.serve.api import create_api
    from sr_ray.serve.holdback import Chunk
    from sr_ray.serve.model import Admission

    async def answer_at_once(job):
        yield Admission(prompt_tokens=1)
        yield Chunk("ok", finish_reason="stop", completion_tokens=1,
                    safety=dict(enabled=False, stream_mode="holdback", flagged=False, checks_run=0, tokens_dropped=0))

    uvicorn.run(create_api(cfg, answer_at_once), host="127.0.0.1", port=port, log_level="warning")


def body(png: bytes) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {"model": "bench", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is this?"}]}],
        "max_tokens": 1}


def run_case(cfg: ServeConfig, payload: dict, concurrency: int, timeout_s: float) -> dict:
    port = free_port()
    child = multiprocessing.get_context("spawn").Process(target=_serve, args=(cfg, port), daemon=True)
    child.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a busy 2-core machine: the child imports torch and transformers
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        small = body(png_bomb(64, 64, 8, 2))
        warm = httpx.post(url + "/v1/chat/completions", json=small, timeout=300)
        assert warm.status_code == 200, warm.text
        time.sleep(1.0)
        idle = rss_bytes(child.pid)
        peak, done = idle, threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_bytes(child.pid))
                time.sleep(0.005)

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as http:
                return await asyncio.gather(*(http.post("/v1/chat/completions", json=payload)
                                              for _ in range(concurrency)))

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        try:
            responses = asyncio.run(burst())
        finally:
            done.set()
            sampler.join()
        wall = time.perf_counter() - t0
        after = httpx.get(url + "/health").status_code  # still serving
        busy = [r.json()["error"]["message"] for r in responses if r.status_code == 503][:1]
        return dict(idle_mb=round(idle / 2**20, 1), peak_mb=round(peak / 2**20, 1), ratio=round(peak / idle, 3),
                    statuses=dict(Counter(r.status_code for r in responses)), wall_s=round(wall, 2),
                    health_after=after, busy_message=busy[0] if busy else None)
    finally:
        child.terminate()
        child.join(10)


def run_memory_bench(concurrency: int = 16, payloads: tuple[str, ...] = ("pixels", "bytes"),
                     timeout_s: float = 600.0) -> dict:
    base = ServeConfig(model="bench", audit_log=None)
    limits = base.limits
    made = {"pixels": lambda: png_bomb(4096, 4096), "bytes": lambda: noise_png(limits.max_image_bytes)}
    unbounded = dataclasses.replace(limits, max_inflight_body_bytes=UNBOUNDED, max_inflight_decoded_bytes=UNBOUNDED)
    result = {"concurrency": concurrency, "load_avg_1m": round(os.getloadavg()[0], 2),
              "limits": dataclasses.asdict(limits), "cases": {}}
    for name in payloads:
        png = made[name]()
        payload = body(png)
        for mode, lim in (("budgets", limits), ("no_budgets", unbounded)):
            cfg = dataclasses.replace(base, guard=dataclasses.replace(base.guard, enabled=False), limits=lim)
            case = run_case(cfg, payload, concurrency, timeout_s)
            case.update(png_bytes=len(png), body_bytes=len(str(payload)))
            result["cases"][f"{name}/{mode}"] = case
            print(f"{name:6s} {mode:10s} idle {case['idle_mb']:7.1f} MB  peak {case['peak_mb']:7.1f} MB  "
                  f"ratio {case['ratio']:.2f}  statuses {case['statuses']}  {case['wall_s']} s", flush=True)
    result["worst_ratio_with_budgets"] = max(c["ratio"] for k, c in result["cases"].items() if k.endswith("/budgets"))
    return result
