"""`sr-ray bench serve`: the same Serve app with the guard on vs off, side by side, on loopback.

Both modes go through one deployed application (one model replica, so autoscaling does not blur the
comparison) and the real `openai` client, streaming, at the same concurrency, on the same prompts (text
and image requests alternating, greedy decoding). Plain requests turn the guard off with the admin key.
Rounds alternate the order of the two modes so a neighbour's load on a shared machine hits both; the
result records the machine's load average so a disturbed run can be recognised.
Without `--bundle` the guard uses a fresh soft prompt and a never-flagging probe: every check still runs
(the cost being measured); no answer is re-steered, so both modes decode the same tokens.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import secrets
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sr_ray.serve.config import ApiKey, ScaleConfig, ServeConfig

QUESTIONS = [
    "Describe what you see in this picture.",
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain how a rainbow forms.",
    "Write a short poem about the sea.",
    "What are the main parts of a bicycle?",
]


@dataclass
class ServeBenchConfig:
    model: str = "smol-llava"
    bundle: str | None = None  # None: fresh soft prompt + never-flagging probe
    requests: int = 32  # per mode per round
    rounds: int = 2
    concurrency: int = 8
    max_tokens: int = 64
    max_batch_size: int = 8
    num_cpus: float = 1.0
    port: int | None = None  # None: a free port (or the running Serve proxy's, when given)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(i: int) -> list[dict]:
    text = QUESTIONS[i % len(QUESTIONS)]
    content = [{"type": "image_url", "image_url": {"url": _image_url(i)}}, {"type": "text", "text": text}] \
        if i % 2 == 0 else text
    return [{"role": "user", "content": content}]


def _never_flag_bundle(model: str, directory: Path) -> Path:
    import torch

    from sr_ray.models import load_vlm
    from sr_ray.reminder import HarmProbe, ReminderBundle, SoftPrompt

    vlm = load_vlm(model)
    probe = HarmProbe(torch.zeros(vlm.hidden_size), bias=10.0, base_model_id=vlm.model_id)
    return ReminderBundle(SoftPrompt.from_text(vlm), probe, vlm.model_id).save(directory)


async def _one(client, model: str, i: int, max_tokens: int, safety: dict | None) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    stream = await client.chat.completions.create(
        model=model, messages=_messages(i), max_tokens=max_tokens, stream=True, temperature=0,
        extra_body={"safety": safety} if safety else None)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
    end = time.perf_counter()
    return end - t0, (first or end) - t0


async def _phase(base_url: str, key: str, cfg: ServeBenchConfig, safety: dict | None) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=600)
    queue = list(range(cfg.requests))
    latencies, ttfts, errors = [], [], []

    async def worker():
        while queue:
            i = queue.pop()
            try:
                latency, ttft = await _one(client, cfg.model, i, cfg.max_tokens, safety)
                latencies.append(latency)
                ttfts.append(ttft)
            except Exception as err:  # noqa: BLE001 (counted and reported, the run goes on)
                errors.append(f"{type(err).__name__}: {err}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return dict(wall_s=wall, latencies=latencies, ttfts=ttfts, errors=errors)


def _summary(phases: list[dict]) -> dict:
    lat = np.array([x for p in phases for x in p["latencies"]]) * 1000
    ttft = np.array([x for p in phases for x in p["ttfts"]]) * 1000
    wall = sum(p["wall_s"] for p in phases)
    pct = lambda a, q: round(float(np.percentile(a, q)), 1) if len(a) else None  # noqa: E731
    return dict(rps=round(len(lat) / wall, 3), p50_ms=pct(lat, 50), p99_ms=pct(lat, 99), ttft_p50_ms=pct(ttft, 50),
                ttft_p99_ms=pct(ttft, 99), requests=len(lat), errors=sum(len(p["errors"]) for p in phases),
                wall_s=round(wall, 2), error_samples=[e for p in phases for e in p["errors"]][:3])


def bench_app(model: str, bundle: str, tmp: Path, key: str, max_batch_size: int, num_cpus: float, max_tokens: int,
              scheduler: str = "continuous", port: int | None = None, app_name: str = "sr_ray_bench") -> ServeConfig:
    """The benchmarked app: one model replica (autoscaling would blur a comparison), no queue bound."""
    serve_cfg = ServeConfig(
        model=model, bundle=bundle, app_name=app_name, port=port or free_port(),
        route_prefix="/bench", audit_log=str(tmp / f"audit_{app_name}.jsonl"),
        api_keys=[ApiKey("bench-admin", hashlib.sha256(key.encode()).hexdigest(), admin=True)],
        model_deployment=ScaleConfig(min_replicas=1, max_replicas=1, num_cpus=num_cpus,
                                     target_ongoing_requests=max_batch_size, max_ongoing_requests=4 * max_batch_size,
                                     max_queued_requests=-1),
        ingress_deployment=ScaleConfig(min_replicas=1, max_replicas=1, num_cpus=0.1, max_ongoing_requests=256,
                                       max_queued_requests=-1))
    serve_cfg.batching.max_batch_size = max_batch_size
    serve_cfg.batching.scheduler = scheduler
    serve_cfg.limits.max_tokens = max(serve_cfg.limits.max_tokens, max_tokens)
    serve_cfg.limits.request_timeout_s = 600
    return serve_cfg


def run_serve_bench(cfg: ServeBenchConfig) -> dict:
    import ray
    from ray import serve

    from sr_ray.serve.app import start

    started_ray = not ray.is_initialized()
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="sr_ray_bench_serve_") as tmp:
        bundle = cfg.bundle or str(_never_flag_bundle(cfg.model, Path(tmp) / "bundle"))
        serve_cfg = bench_app(cfg.model, bundle, Path(tmp), key, cfg.max_batch_size, cfg.num_cpus, cfg.max_tokens,
                              port=cfg.port)
        base_url = start(serve_cfg)
        try:
            runs = guarded_vs_plain(base_url, key, cfg)
            load_before, load_after = runs.pop("load")
        finally:
            serve.delete(serve_cfg.app_name)
            if started_ray:
                serve.shutdown()
                ray.shutdown()
    guarded, plain = _summary(runs["guarded"]), _summary(runs["plain"])
    result = dict(
        model=cfg.model, concurrency=cfg.concurrency, max_tokens=cfg.max_tokens, rounds=cfg.rounds,
        requests_per_mode=cfg.requests * cfg.rounds, bundle=cfg.bundle or "fresh soft prompt + never-flag probe",
        rps_guarded=guarded["rps"], rps_plain=plain["rps"],
        ratio=round(guarded["rps"] / plain["rps"], 3) if plain["rps"] else None,
        p50_ms=dict(guarded=guarded["p50_ms"], plain=plain["p50_ms"]),
        p99_ms=dict(guarded=guarded["p99_ms"], plain=plain["p99_ms"]),
        ttft_p50_ms=dict(guarded=guarded["ttft_p50_ms"], plain=plain["ttft_p50_ms"]),
        errors=guarded["errors"] + plain["errors"], detail=dict(guarded=guarded, plain=plain),
        machine=dict(cpus=os.cpu_count(), load_avg_1m_before=round(load_before, 1),
                     load_avg_1m_after=round(load_after, 1)))
    return result


def guarded_vs_plain(base_url: str, key: str, cfg: ServeBenchConfig) -> dict:
    """Closed-loop rounds of guarded and plain requests, alternating which goes first; the phases per mode."""
    modes = {"guarded": None, "plain": {"enabled": False}}
    warm = ServeBenchConfig(**{**asdict(cfg), "requests": 2, "concurrency": 2})  # one text, one image
    for safety in modes.values():
        asyncio.run(_phase(base_url, key, warm, safety))
    runs = {name: [] for name in modes}
    load_before = os.getloadavg()[0]
    for r in range(cfg.rounds):
        for name in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
            runs[name].append(asyncio.run(_phase(base_url, key, cfg, modes[name])))
    return {**runs, "load": (load_before, os.getloadavg()[0])}


def write_result(result: dict, out: str | Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
