"""Issue 16 in-process: the real app (`create_api`) over the real model replica class (`GuardedModel`, its
continuous scheduler) on tiny-llava, driven through Starlette's TestClient or httpx's ASGI transport (no
Serve startup): the shared hostile matrix, one audit record and one count per
request, bounded records, the body budget, config refusals and the CLI's checks before Ray starts."""

from __future__ import annotations

import asyncio
import io
import json
import random
import shutil
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sr_ray.models import Prompt
from sr_ray.serve.api import create_api
from sr_ray.serve.audit import MAX_RECORD_BYTES
from sr_ray.serve.config import GuardPolicy, ImageFetchConfig, ServeConfig
from sr_ray.serve.model import GuardedModel
from tests.bundles import constant_probe_bundle
from tests.serve.conftest import data_url
from tests.serve.hostile import CASES, FORGED_TURN, MODEL, USER_KEY, api_keys, chat, check, limits, send

AUTH = {"Authorization": f"Bearer {USER_KEY}"}
EMBEDDED_IPV4_HOSTS = ["64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::", "::127.0.0.1", "::ffff:127.0.0.1"]


@pytest.fixture(scope="module")
def bundle(tiny_llava, tmp_path_factory):
    return constant_probe_bundle(tiny_llava, tmp_path_factory.mktemp("bundle") / "b", bias=0.0, interval=4)


def config(bundle, tmp_path, **overrides) -> ServeConfig:
    return ServeConfig(**dict(
        model=MODEL, bundle=str(bundle), audit_log=str(tmp_path / "audit.jsonl"), api_keys=api_keys(),
        guard=GuardPolicy(interval_bounds=(2, 16), threshold_bounds=(0.1, 0.9)), limits=limits(),
        # remote fetching on, for IP literals only: getaddrinfo returns them as they are (no network)
        images=ImageFetchConfig(allow_remote=True, allowed_hosts=EMBEDDED_IPV4_HOSTS)) | overrides)


@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    cfg = config(bundle, tmp_path_factory.mktemp("served"))
    model = GuardedModel(cfg)
    with TestClient(create_api(cfg, model.generate), raise_server_exceptions=False) as client:
        yield cfg, client
    model.scheduler.close()


def audit_records(cfg) -> list[dict]:
    path = Path(cfg.audit_log)
    lines = path.read_bytes().splitlines() if path.exists() else []
    assert all(len(line) + 1 <= MAX_RECORD_BYTES for line in lines)
    return [json.loads(line) for line in lines]


def requests_counted(client) -> float:
    metrics = client.get("/metrics").text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("sr_ray_requests_total{"))


def test_hostile_matrix_no_5xx_one_record_and_one_count_each(served):
    cfg, client = served
    assert len(CASES) >= 80
    before_records, before_count = len(audit_records(cfg)), requests_counted(client)
    sent, ids = 0, []
    for case in CASES:
        response = send(client, case, AUTH)
        check(case, response)
        assert response.headers.get_list("x-request-id") and len(response.headers.get_list("x-request-id")) == 1
        ids.append(response.headers["x-request-id"])
        good = client.post("/v1/chat/completions", headers=AUTH, json=chat(max_tokens=2))
        assert good.status_code == 200, case.name  # the server keeps serving
        sent += 2
    records = audit_records(cfg)[before_records:]
    assert len(records) == sent and requests_counted(client) - before_count == sent
    by_id = {r["request_id"]: r for r in records}
    assert len(by_id) == sent and all(i in by_id for i in ids)  # the header names the request's record
    for case, request_id in zip(CASES, ids):
        record = by_id[request_id]
        assert record["status"] == case.status, case.name
        assert case.status == 200 or record["reason"], case.name
    longest = max(records, key=lambda r: len(r["path"]))
    assert longest["path"].endswith("[65004 chars]") and longest["status"] in (401, 404)


def test_openapi_is_served_and_swagger_is_not(served):
    _, client = served
    schema = client.get("/openapi.json").json()
    assert schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["enum"] == [MODEL]
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


@pytest.mark.parametrize("host", EMBEDDED_IPV4_HOSTS)
def test_embedded_ipv4_image_hosts_are_refused_by_the_app(served, host):
    _, client = served
    url = f"http://[{host}]/latest/meta-data"
    body = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    response = client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert response.status_code == 400 and "non-public address" in response.json()["error"]["message"]


def test_forged_turn_is_answered_as_one_user_turn(served, tiny_llava):
    _, client = served
    response = client.post("/v1/chat/completions", headers=AUTH,
                           json=chat(messages=[{"role": "user", "content": FORGED_TURN}], max_tokens=2))
    assert response.status_code == 200
    plain = len(tiny_llava.tokenizer(FORGED_TURN, add_special_tokens=False, split_special_tokens=True).input_ids)
    template = tiny_llava.encode([Prompt("")])  # the template's own tokens around an empty user text
    assert response.json()["usage"]["prompt_tokens"] == plain + int(template.attention_mask.sum())


def test_body_budget_waits_then_refuses_with_503(bundle, tmp_path):
    cfg = config(bundle, tmp_path, limits=limits(max_inflight_body_bytes=300_000, busy_wait_s=0.0))
    model = GuardedModel(cfg)
    app = create_api(cfg, model.generate)
    noise = io.BytesIO()
    Image.frombytes("RGB", (160, 160), random.Random(1).randbytes(160 * 160 * 3)).save(noise, "PNG")
    body = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(noise.getvalue())}},
                                                       {"type": "text", "text": "what is this?"}]}], max_tokens=8)
    assert 100_000 < len(json.dumps(body)) < 150_000  # two fit the 300 kB budget, three do not

    async def burst(n: int):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return await asyncio.gather(*(http.post("/v1/chat/completions", headers=AUTH, json=body)
                                          for _ in range(n)))

    try:
        responses = asyncio.run(burst(3))
    finally:
        model.scheduler.close()
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "server busy" in busy.json()["error"]["message"]
    assert len(audit_records(cfg)) == 3


@pytest.mark.parametrize("host, keys, override, allowed", [
    ("127.0.0.1", False, False, True), ("localhost", False, False, True), ("::1", False, False, True),
    ("0.0.0.0", False, False, False), ("::", False, False, False), ("10.0.0.5", False, False, False),
    ("serve.internal", False, False, False), ("0.0.0.0", True, False, True), ("0.0.0.0", False, True, True),
])
def test_public_bind_needs_api_keys_or_an_explicit_override(host, keys, override, allowed):
    cfg = ServeConfig(model=MODEL, host=host, api_keys=api_keys() if keys else [],
                      allow_public_without_keys=override, guard=GuardPolicy(enabled=False))
    if allowed:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match="reachable from other machines but no api_keys"):
            cfg.validate()


class RayWouldStart(Exception):
    pass


@pytest.fixture
def cli(monkeypatch, capsys):
    """`sr-ray serve ...` up to the point where Ray would start (`ensure_ray` raises instead)."""
    from sr_ray import cli as sr_ray_cli
    from sr_ray.serve import app

    def no_ray():
        raise RayWouldStart

    monkeypatch.setattr(app, "ensure_ray", no_ray)

    def run(*argv) -> tuple[int | str, str]:
        try:
            sr_ray_cli.main(["serve", "--model", MODEL, *argv])
        except SystemExit as exit_:
            return exit_.code, capsys.readouterr().err
        except RayWouldStart:
            return "ray", ""
        raise AssertionError("returned without starting Ray")

    return run


def test_serve_cli_refuses_bad_bundles_and_configs_before_ray(cli, bundle, tmp_path):
    assert cli("--bundle", str(tmp_path / "missing")) == (2, f"sr-ray serve: error: reminder bundle "
                                                             f"'{tmp_path / 'missing'}' is not a directory or an "
                                                             f"MLflow models:/ URI\n")
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    tensors = next(tampered.glob("probe/*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\x01\x02\x03\x04")
    code, err = cli("--bundle", str(tampered))
    assert code == 2 and "checksum mismatch" in err and "Traceback" not in err
    (tmp_path / "bad.yaml").write_text("limits: {max_tokenz: 3}\n")
    code, err = cli("--bundle", str(bundle), "--config", str(tmp_path / "bad.yaml"))
    assert code == 2 and "unknown keys ['limits.max_tokenz']; valid keys of limits:" in err
    (tmp_path / "broken.yaml").write_text("limits: [\n")
    assert cli("--config", str(tmp_path / "broken.yaml"))[0] == 2
    code, err = cli("--bundle", str(bundle), "--host", "0.0.0.0")
    assert code == 2 and "no api_keys" in err
    assert cli("--no-guard")[0] == "ray" and cli("--bundle", str(bundle))[0] == "ray"  # valid: on to Ray


def test_ingress_memory_bench_measures_both_modes():
    from sr_ray.serve.membench import run_memory_bench

    result = run_memory_bench(concurrency=2, payloads=("pixels",))
    budgets, unbounded = result["cases"]["pixels/budgets"], result["cases"]["pixels/no_budgets"]
    for case in (budgets, unbounded):
        assert case["idle_mb"] > 0 and case["peak_mb"] >= case["idle_mb"] and case["health_after"] == 200
        assert sum(case["statuses"].values()) == 2 and set(case["statuses"]) <= {200, 503}
    assert result["worst_ratio_with_budgets"] == budgets["ratio"]


def test_behind_serve_the_app_adds_no_request_id_of_its_own(bundle, tmp_path):
    """Serve's proxy adds x-request-id to every response; the app adding one too made two."""
    for proxied, expected in ((True, 0), (False, 1)):
        cfg = config(bundle, tmp_path / str(proxied))
        with TestClient(create_api(cfg, generate=None, proxy_sets_request_id=proxied)) as client:
            response = client.get("/v1/models", headers={**AUTH, "x-request-id": "client-chosen"})
        assert response.status_code == 200 and len(response.headers.get_list("x-request-id")) == expected
        (record,) = audit_records(cfg)
        assert record["x_request_id"] == "client-chosen" and record["request_id"].startswith("req-")
