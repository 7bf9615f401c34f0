"""The continuous scheduler behind real Ray Serve on 127.0.0.1: a full replica queue answers 503 with
Retry-After, a client that disconnects mid-stream frees its row within a step (the replica's stats, read
through a Serve handle) and leaves a 499 audit record, and the mixed-workload bench runs end to end."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sr_ray.serve.bench import free_port
from sr_ray.serve.bench_mixed import MixedBenchConfig, run_mixed_bench, workload
from sr_ray.serve.config import BatchingConfig, Limits, ScaleConfig, ServeConfig
from tests.bundles import constant_probe_bundle

pytestmark = pytest.mark.slow

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def live(ray_session, tiny_llava, tmp_path_factory):
    from ray import serve

    from sr_ray.serve.app import start

    tmp = tmp_path_factory.mktemp("continuous")
    bundle = constant_probe_bundle(tiny_llava, tmp / "bundle", bias=10.0, interval=4)  # never flags
    cfg = ServeConfig(
        model=MODEL, bundle=str(bundle), app_name="sr_ray_continuous", port=free_port(),
        audit_log=str(tmp / "audit.jsonl"),
        model_deployment=ScaleConfig(min_replicas=1, max_replicas=1, num_cpus=0.5, target_ongoing_requests=2,
                                     max_ongoing_requests=2, max_queued_requests=1),
        ingress_deployment=ScaleConfig(min_replicas=1, max_replicas=1, num_cpus=0.1, max_ongoing_requests=64,
                                       max_queued_requests=-1),
        batching=BatchingConfig(max_batch_size=2),
        limits=Limits(max_tokens=400, default_max_tokens=16, request_timeout_s=60))
    url = start(cfg)
    yield url, cfg
    serve.delete(cfg.app_name)


def chat(url: str, max_tokens: int, stream: bool = False, text: str = "Tell me a long story about a cat.") -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": stream}


def model_stats(cfg: ServeConfig) -> dict:
    from ray import serve

    return serve.get_deployment_handle("GuardedModel", app_name=cfg.app_name).stats.remote().result()


def test_a_full_replica_queue_answers_503_with_retry_after(live):
    url, cfg = live
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda i: httpx.post(url + "/v1/chat/completions", json=chat(url, 300),
                                                       timeout=120), range(12)))
    codes = sorted(r.status_code for r in responses)
    busy = [r for r in responses if r.status_code == 503]
    # The 2 running rows always finish; the 1 queued slot is Ray Serve's best-effort, per-caller limit, so under
    # load the queued request may be refused too (CI at 6156b2e: 2 x 200, 10 x 503).
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and busy, codes
    for r in busy:
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
        assert "capacity" in r.json()["error"]["message"]
    records = [json.loads(line) for line in Path(cfg.audit_log).read_text().splitlines()]
    assert sum(rec.get("status") == 503 for rec in records) == len(busy)


def test_a_disconnected_stream_leaves_the_batch(live):
    url, cfg = live
    before = model_stats(cfg)
    with httpx.stream("POST", url + "/v1/chat/completions", json=chat(url, 400, stream=True), timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # text arrived: the row is decoding; now hang up
    deadline, stats = time.monotonic() + 30, model_stats(cfg)
    while (stats["cancelled"] == before["cancelled"] or stats["rows"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = model_stats(cfg)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["rows"] == 0
    assert stats["steps"] - before["steps"] < 200  # far from the 400 tokens it asked for
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in Path(cfg.audit_log).read_text().splitlines()]
        if any(rec.get("status") == 499 for rec in records):
            break
        time.sleep(0.1)
    assert any(rec.get("status") == 499 for rec in records)


def test_the_mixed_workload_bench_runs_both_batchers(live):
    url, cfg = live
    bench = MixedBenchConfig(model=MODEL, requests=6, rate_rps=4.0, min_tokens=8, max_tokens=40, disconnects=1,
                             max_batch_size=2, num_cpus=0.25, ratio_requests=2, disconnect_tokens=40, port=cfg.port)
    reqs = workload(bench)
    assert reqs == workload(bench) and sum(r["hang_up"] for r in reqs) == 1  # seeded
    assert all(8 <= r["max_tokens"] <= 40 for r in reqs)
    result = run_mixed_bench(bench)
    assert result["errors"] == 0, result["detail"]
    assert result["rps_static"] > 0 and result["rps_continuous"] > 0 and result["ratio_guarded_plain"] > 0
    assert result["ratio_throughput"] == pytest.approx(result["rps_continuous"] / result["rps_static"], rel=0.01)
    assert result["detail"]["static"]["answered"] == result["detail"]["continuous"]["answered"] == 5
    assert result["cpu_s_full_answer"] > 0 and result["cpu_s_after_disconnect"] >= 0
