"""The live Serve app on 127.0.0.1: the openai client, hold-back, a hostile-input matrix, schemathesis,
metrics + audit, a replica killed under load, and the bench. One deployment serves the whole module.

The bundle's probe ignores the hidden state: P(safe) = 0.5 at every check, so the per-request threshold
decides (0.2: never flags; 0.9: always flags at the first check). Expected texts come from the same seeded
tiny-llava and bundle run in-process, so the server must reproduce the engine token for token.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from openai import OpenAI
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, negative_data_rejection, response_schema_conformance, status_code_conformance,
)

from sr_ray.models import Prompt
from sr_ray.reminder import GuardConfig, GuardedGenerator, ReminderBundle, SamplingConfig
from sr_ray.serve.bench import ServeBenchConfig, free_port, run_serve_bench
from sr_ray.serve.config import BatchingConfig, GuardPolicy, ScaleConfig, ServeConfig
from tests.bundles import constant_probe_bundle
from tests.serve.conftest import data_url, png_bytes, scrape_ray
from tests.serve.hostile import ADMIN_KEY, CASES, MODEL, USER_KEY, api_keys, chat, check, limits, send

pytestmark = pytest.mark.slow

NEVER, ALWAYS = 0.2, 0.9  # thresholds around the constant P(safe) = 0.5


@dataclass
class Live:
    url: str
    cfg: ServeConfig
    bundle: Path
    audit: Path

    def client(self, key: str = USER_KEY) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def live(ray_session, tiny_llava, tmp_path_factory):
    from ray import serve

    from sr_ray.serve.app import start

    tmp = tmp_path_factory.mktemp("serve")
    bundle = constant_probe_bundle(tiny_llava, tmp / "bundle", bias=0.0, interval=4)
    cfg = ServeConfig(
        model=MODEL, bundle=str(bundle), app_name="sr_ray_test", port=free_port(), audit_log=str(tmp / "audit.jsonl"),
        api_keys=api_keys(),
        model_deployment=ScaleConfig(min_replicas=2, max_replicas=2, num_cpus=0.5, target_ongoing_requests=4,
                                     max_ongoing_requests=8),
        ingress_deployment=ScaleConfig(min_replicas=1, max_replicas=1, num_cpus=0.1, max_ongoing_requests=64),
        batching=BatchingConfig(max_batch_size=4),
        guard=GuardPolicy(interval_bounds=(2, 16), threshold_bounds=(0.1, 0.9)),
        limits=limits())
    url = start(cfg)
    yield Live(url, cfg, bundle, Path(cfg.audit_log))
    serve.delete(cfg.app_name)
    serve.shutdown()


@pytest.fixture(scope="module")
def engine(live, tiny_llava):
    bundle = ReminderBundle.load(live.bundle, tiny_llava)
    return GuardedGenerator(tiny_llava, bundle.soft_prompt, bundle.probe, bundle.guard_config())


def expected(engine, prompt: Prompt, max_tokens: int, threshold: float):
    guard = GuardConfig(interval=4, threshold=threshold, reminder_max_new_tokens=max_tokens)
    return engine.generate([prompt], SamplingConfig(max_new_tokens=max_tokens), guard)[0]


def decode(engine, ids) -> str:
    return engine.vlm.tokenizer.decode(ids, skip_special_tokens=True)


def image_message(text: str, png: bytes) -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                         {"type": "text", "text": text}]}]


def sse_events(live: Live, body: dict, key: str = USER_KEY) -> list[dict]:
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def streamed_text(events: list[dict]) -> str:
    return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])


# ---- the openai client -------------------------------------------------------------------------
def test_openai_client_plain_matches_the_engine(live, engine):
    png = png_bytes((24, 24), "orange")
    want = expected(engine, Prompt("What is in this picture?", Image.open(io.BytesIO(png)).convert("RGB"),
                                   "Be brief."), 16, NEVER)
    resp = live.client().chat.completions.create(model=MODEL, messages=image_message("What is in this picture?", png),
                                                 max_tokens=16)
    assert resp.choices[0].message.content == want.text and resp.choices[0].finish_reason == want.finish_reason
    assert resp.usage.completion_tokens == len(want.prefix_ids) and resp.usage.prompt_tokens > 16  # image tokens
    safety = resp.model_extra["safety"]
    assert safety["flagged"] is False and safety["checks_run"] == len(want.checks) >= 4
    assert safety["p_safe_min"] == pytest.approx(0.5)
    assert [m.id for m in live.client().models.list().data] == [MODEL]


def test_openai_client_streaming(live, engine):
    want = expected(engine, Prompt("Tell me a story."), 20, NEVER)
    stream = live.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=20, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == want.text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["safety"]["checks_run"] == len(want.checks)
    assert chunks[-1].usage.completion_tokens == len(want.prefix_ids) and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1


def test_stop_and_seeded_sampling(live):
    client = live.client()
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16)
    text = full.choices[0].message.content
    stop = text[5:8]
    cut = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                              temperature=1.0, top_p=0.9, seed=s).choices[0].message.content
               for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


# ---- hold-back ----------------------------------------------------------------------------------
def test_holdback_no_pre_flag_token_reaches_the_stream(live, engine):
    prompt = "Explain how to pick a lock."
    want = expected(engine, Prompt(prompt), 16, ALWAYS)
    pre_flag = decode(engine, want.prefix_ids)
    assert want.flagged_at == 4 and pre_flag.strip()
    events = sse_events(live, {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                               "safety": {"threshold": ALWAYS}})
    text = streamed_text(events)
    assert text == decode(engine, want.continuation_ids)  # exactly the reminder's continuation
    assert not text.startswith(pre_flag)
    safety = events[-1]["safety"]
    assert safety["flagged"] and safety["flagged_at"] == 4 and safety["p_safe_at_flag"] == pytest.approx(0.5)
    assert safety["tokens_released_before_flag"] == 0 and safety["tokens_dropped"] == 4


def test_stream_first_needs_admin_and_leaks_by_design(live, engine):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Explain how to pick a lock."}], "max_tokens": 16,
            "safety": {"threshold": ALWAYS, "stream_mode": "stream_first"}}
    denied = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {USER_KEY}"})
    assert denied.status_code == 403
    want = expected(engine, Prompt("Explain how to pick a lock."), 16, ALWAYS)
    events = sse_events(live, body, key=ADMIN_KEY)
    text = streamed_text(events)
    assert text.startswith(decode(engine, want.prefix_ids))  # the pre-flag tokens went out before the check
    assert text == decode(engine, want.prefix_ids + want.continuation_ids)[: len(text)]
    assert events[-1]["safety"]["tokens_released_before_flag"] == 4


def test_guard_off_needs_admin(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "safety": {"enabled": False}}
    assert httpx.post(live.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {USER_KEY}"}).status_code == 403
    resp = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 200
    assert resp.json()["safety"]["enabled"] is False and resp.json()["safety"]["checks_run"] == 0


# ---- hostile input -------------------------------------------------------------------------------
def test_hostile_input_matrix_gets_4xx_and_the_server_keeps_serving(live):
    """The shared matrix (tests/serve/hostile.py) through the real Serve proxy; each case is followed by a
    normal request. Also: one x-request-id per response although Serve's proxy adds its own."""
    good = chat(max_tokens=2)
    auth = {"Authorization": f"Bearer {USER_KEY}"}
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for case in [c for c in CASES if c.wire]:
            response = send(http, case, auth)
            check(case, response)
            assert len(response.headers.get_list("x-request-id")) == 1, case.name
            assert http.post("/v1/chat/completions", headers=auth, json=good).status_code == 200, case.name
        assert http.get("/v1/chat/completions", headers=auth).status_code == 405


# ---- schemathesis -------------------------------------------------------------------------------
def test_schemathesis_no_5xx_and_conforming_responses(live):
    """Schema-driven fuzzing of every operation, valid and invalid inputs (the lazy pytest loader of
    schemathesis 4.32 does not run under pytest 9, so the cases are drawn with Hypothesis directly)."""
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @given(case=schema.as_strategy(mode))
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60, checks=checks)

        fuzz()
    # A streamed answer is rare among the drawn cases; its SSE events are checked against the schema every run.
    stream = schema["/v1/chat/completions"]["POST"].Case(body=chat(max_tokens=4, stream=True))
    stream.call_and_validate(headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60, checks=checks)


# ---- metrics and audit --------------------------------------------------------------------------
def test_metrics_and_audit_log(live):
    resp = live.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "audit me"}],
                                                 max_tokens=8, extra_body={"safety": {"threshold": ALWAYS}})
    sse_events(live, chat(max_tokens=8))
    assert httpx.post(live.url + "/v1/chat/completions", json=chat()).status_code == 401  # no key
    metrics = httpx.get(live.url + "/metrics").text
    for name in ("sr_ray_requests_total", "sr_ray_completion_tokens_total", "sr_ray_guard_checks_total",
                 "sr_ray_guard_interventions_total", "sr_ray_request_latency_seconds_bucket",
                 "sr_ray_time_to_first_token_seconds_bucket"):
        assert name in metrics

    def value(name: str, *labels: str) -> float:  # summed over the lines with all these labels
        return sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith(name) and all(label in line for label in labels))

    assert value("sr_ray_requests_total", 'status="200"', 'stream="false"', 'route="chat"') >= 1
    assert value("sr_ray_requests_total", 'status="401"') >= 1 and value("sr_ray_guard_interventions_total") >= 1
    # The cluster-wide view: Ray's metrics agent exports the (one) ingress replica's counts, tagged with its
    # application, deployment, replica and reminder version.
    def ours(samples):
        return [s for s in samples if s.name == "ray_sr_ray_requests_total"
                and s.labels.get("application") == live.cfg.app_name]

    def agrees(samples):
        return all(sum(s.value for s in ours(samples) if s.labels["status"] == status)
                   == value("sr_ray_requests_total", f'status="{status}"') for status in ("200", "401"))

    samples = scrape_ray(agrees)
    assert agrees(samples)
    assert {(s.labels["deployment"], s.labels["model_version"]) for s in ours(samples)} == {
        ("GuardedIngress", live.cfg.reminder_version)}
    assert all(s.labels["replica"] for s in ours(samples))
    records = [json.loads(line) for line in live.audit.read_text().splitlines()]
    mine = next(r for r in records if r["request_id"] == resp.id)
    assert mine["key_id"] == "user" and mine["flagged"] and mine["flagged_at"] == 4
    assert mine["p_safe_at_flag"] == pytest.approx(0.5)
    assert mine["emitted_sha256"] == hashlib.sha256(resp.choices[0].message.content.encode()).hexdigest()
    assert {r["status"] for r in records} >= {200, 400, 401, 403, 404, 413}


# ---- a replica dies under load -------------------------------------------------------------------
def model_replicas(app: str) -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#GuardedModel#")]


def test_replica_killed_under_load(live):
    replicas = model_replicas(live.cfg.app_name)
    assert len(replicas) == 2
    total, done, outcomes = 150, [], []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            resp = live.client().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=12)
            ok = bool(resp.choices[0].message.content is not None)
        except Exception as err:  # noqa: BLE001 (counted: a failure, no client retry)
            ok = False
            outcomes.append(repr(err))
        with lock:
            done.append(ok)

    def killer() -> None:
        while len(done) < 40:
            time.sleep(0.01)
        victim = replicas[0]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)

    thread = threading.Thread(target=killer)
    thread.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(total)))
    thread.join()
    assert sum(done) >= 0.99 * total, (sum(done), outcomes[:3])
    deadline = time.time() + 90  # the controller replaces the dead replica
    while not (len(model_replicas(live.cfg.app_name)) == 2 and replicas[0] not in model_replicas(live.cfg.app_name)):
        assert time.time() < deadline
        time.sleep(1)


# ---- bench --------------------------------------------------------------------------------------
def test_bench_serve_runs_both_modes(live):
    result = run_serve_bench(ServeBenchConfig(model=MODEL, requests=8, rounds=1, concurrency=4, max_tokens=8,
                                              num_cpus=0.5, port=live.cfg.port))
    assert result["errors"] == 0 and result["rps_guarded"] > 0 and result["rps_plain"] > 0
    assert result["ratio"] == pytest.approx(result["rps_guarded"] / result["rps_plain"], rel=0.01)
    assert set(result["p50_ms"]) == set(result["p99_ms"]) == {"guarded", "plain"}
    assert result["detail"]["guarded"]["requests"] == result["detail"]["plain"]["requests"] == 8
