"""`sr-ray bench serve --workload mixed`: the static batcher vs the continuous scheduler, both guarded, on one
seeded open-loop workload through real Serve on loopback, in one run.

Workload: `requests` arrivals at a fixed rate (open loop: a request is sent at its time whether or not the
earlier ones are done), `max_tokens` drawn from [min_tokens, max_tokens], a share with images, and
`disconnects` clients that hang up after their first text. The same app (one model replica) is deployed with
`batching.scheduler=static`, then `continuous`, and answers the same list. Per mode: throughput (answers
completed / time from the first arrival to the last answer), p50 latency of the short requests
(max_tokens <= 32), errors (anything but 200 and a complete stream, the planned hang-ups excepted).
Then, per mode on the idle replica: the replica's CPU seconds spent after a client hung up on a long answer,
next to a full answer's (`time.process_time()` of the replica process, read through a Serve handle).
Finally the guarded/plain throughput ratio under the continuous scheduler (`bench.guarded_vs_plain`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sr_ray.serve.bench import (
    ServeBenchConfig, _messages, _never_flag_bundle, _summary, bench_app, free_port, guarded_vs_plain,
)

SHORT_MAX_TOKENS = 32


@dataclass
class MixedBenchConfig:
    model: str = "smol-llava"
    bundle: str | None = None
    requests: int = 40
    rate_rps: float = 1.0  # arrivals per second, fixed interval
    min_tokens: int = 16
    max_tokens: int = 256
    image_share: float = 0.25
    disconnects: int = 3
    max_batch_size: int = 8
    num_cpus: float = 1.0
    seed: int = 0
    ratio_requests: int = 16  # per mode per round of the guarded/plain phase (64 tokens, concurrency = batch)
    disconnect_tokens: int = 256  # the long answer of the CPU-after-disconnect probe
    port: int | None = None  # None: a free port (or the running Serve proxy's, when given)


def workload(cfg: MixedBenchConfig) -> list[dict]:
    rng = np.random.default_rng(cfg.seed)
    tokens = rng.integers(cfg.min_tokens, cfg.max_tokens + 1, cfg.requests)
    image = rng.random(cfg.requests) < cfg.image_share
    hang_up = set(rng.choice(cfg.requests, cfg.disconnects, replace=False).tolist()) if cfg.disconnects else set()
    # message i carries an image when i is even (bench._messages): pick indices of the right parity
    return [dict(at=i / cfg.rate_rps, max_tokens=int(tokens[i]), message=2 * i if image[i] else 2 * i + 1,
                 hang_up=i in hang_up) for i in range(cfg.requests)]


async def _request(client, model: str, req: dict, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + req["at"] - time.perf_counter()))
    sent, text, ok = time.perf_counter(), "", False
    try:
        stream = await client.chat.completions.create(
            model=model, messages=_messages(req["message"]), max_tokens=req["max_tokens"], stream=True,
            temperature=0)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                if req["hang_up"]:
                    await stream.close()
                    break
            if chunk.choices and chunk.choices[0].finish_reason:
                ok = True
        error = None if ok or req["hang_up"] else "stream ended without a finish_reason"
    except Exception as err:  # noqa: BLE001 (counted and reported)
        error = f"{type(err).__name__}: {err}"
    return dict(req, latency_s=time.perf_counter() - sent, done_at=time.perf_counter() - t0, error=error,
                chars=len(text))


async def _open_loop(base_url: str, key: str, model: str, reqs: list[dict]) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=900)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_request(client, model, r, t0) for r in reqs))
    await client.close()
    return list(results)


def _mode_summary(results: list[dict]) -> dict:
    answered = [r for r in results if not r["hang_up"] and r["error"] is None]
    short = [r["latency_s"] * 1000 for r in answered if r["max_tokens"] <= SHORT_MAX_TOKENS]
    every = [r["latency_s"] * 1000 for r in answered]
    span = max((r["done_at"] for r in answered), default=0.0)
    errors = [r["error"] for r in results if r["error"] is not None]
    return dict(rps=round(len(answered) / span, 4) if span else 0.0, answered=len(answered),
                p50_short_ms=round(float(np.percentile(short, 50)), 1) if short else None, short_requests=len(short),
                p50_ms=round(float(np.percentile(every, 50)), 1) if every else None,
                span_s=round(span, 2), errors=len(errors), error_samples=errors[:3])


def _replica_stats(app_name: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("GuardedModel", app_name=app_name).stats.remote().result()


def _cpu_after_disconnect(base_url: str, key: str, cfg: MixedBenchConfig, app_name: str) -> dict:
    """Replica CPU seconds: one long answer read to the end, then the same request hung up after its first text
    (from the hang-up until the replica is idle again, plus a second)."""
    req = dict(at=0.0, max_tokens=cfg.disconnect_tokens, message=3, hang_up=False)  # "Explain how a rainbow forms."
    c0 = _replica_stats(app_name)["cpu_s"]
    full = asyncio.run(_open_loop(base_url, key, cfg.model, [req]))[0]
    c1 = _replica_stats(app_name)["cpu_s"]
    asyncio.run(_open_loop(base_url, key, cfg.model, [dict(req, hang_up=True)]))
    c2 = _replica_stats(app_name)["cpu_s"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not _idle(_replica_stats(app_name)):
        time.sleep(0.2)
    time.sleep(1.0)
    c3 = _replica_stats(app_name)["cpu_s"]
    return dict(cpu_s_full_answer=round(c1 - c0, 3), cpu_s_after_disconnect=round(c3 - c2, 3),
                full_answer_chars=full["chars"], full_answer_error=full["error"])


def _idle(stats: dict) -> bool:
    if "rows" in stats:
        return stats["rows"] == 0 and stats["finished"] + stats["cancelled"] == stats["submitted"]
    return stats["batches"] == 0


def run_mixed_bench(cfg: MixedBenchConfig) -> dict:
    import ray
    from ray import serve

    from sr_ray.serve.app import start

    started_ray = not ray.is_initialized()
    key, reqs, port = secrets.token_urlsafe(24), workload(cfg), cfg.port or free_port()  # one proxy, both apps
    modes, probes = {}, {}
    with tempfile.TemporaryDirectory(prefix="sr_ray_bench_mixed_") as tmp:
        bundle = cfg.bundle or str(_never_flag_bundle(cfg.model, Path(tmp) / "bundle"))
        load_before = os.getloadavg()[0]
        try:
            for scheduler in ("static", "continuous"):
                serve_cfg = bench_app(cfg.model, bundle, Path(tmp), key, cfg.max_batch_size, cfg.num_cpus,
                                      cfg.max_tokens, scheduler=scheduler, port=port,
                                      app_name=f"sr_ray_bench_{scheduler}")
                base_url = start(serve_cfg)
                warm = [dict(r, at=0.0, hang_up=False, max_tokens=16) for r in reqs[:2]]
                asyncio.run(_open_loop(base_url, key, cfg.model, warm))
                modes[scheduler] = _mode_summary(asyncio.run(_open_loop(base_url, key, cfg.model, reqs)))
                probes[scheduler] = _cpu_after_disconnect(base_url, key, cfg, serve_cfg.app_name)
                if scheduler == "continuous":
                    ratio_cfg = ServeBenchConfig(model=cfg.model, requests=cfg.ratio_requests, rounds=2,
                                                 concurrency=cfg.max_batch_size, max_tokens=64)
                    runs = guarded_vs_plain(base_url, key, ratio_cfg)
                    runs.pop("load")
                serve.delete(serve_cfg.app_name)
        finally:
            if started_ray:
                serve.shutdown()
                ray.shutdown()
    guarded, plain = _summary(runs["guarded"]), _summary(runs["plain"])
    static, cont = modes["static"], modes["continuous"]
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    probe = probes["continuous"]
    return dict(
        model=cfg.model,
        workload=dict(requests=cfg.requests, rate_rps=cfg.rate_rps, tokens=[cfg.min_tokens, cfg.max_tokens],
                      image_share=cfg.image_share, disconnects=cfg.disconnects, seed=cfg.seed,
                      max_batch_size=cfg.max_batch_size),
        rps_static=static["rps"], rps_continuous=cont["rps"], ratio_throughput=ratio(cont["rps"], static["rps"]),
        p50_short_ms_static=static["p50_short_ms"], p50_short_ms_continuous=cont["p50_short_ms"],
        ratio_short_latency=ratio(cont["p50_short_ms"], static["p50_short_ms"]),
        cpu_s_after_disconnect=probe["cpu_s_after_disconnect"], cpu_s_full_answer=probe["cpu_s_full_answer"],
        cpu_after_disconnect_share=ratio(probe["cpu_s_after_disconnect"], probe["cpu_s_full_answer"]),
        cpu_s_after_disconnect_static=probes["static"]["cpu_s_after_disconnect"],
        errors=static["errors"] + cont["errors"] + guarded["errors"] + plain["errors"]
        + sum(p["full_answer_error"] is not None for p in probes.values()),
        rps_guarded_continuous=guarded["rps"], rps_plain_continuous=plain["rps"],
        ratio_guarded_plain=ratio(guarded["rps"], plain["rps"]),
        detail=dict(static=static, continuous=cont, probes=probes, guarded=guarded, plain=plain),
        machine=dict(cpus=os.cpu_count(), load_avg_1m_before=round(load_before, 1),
                     load_avg_1m_after=round(os.getloadavg()[0], 1)))
