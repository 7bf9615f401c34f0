"""The audit writer: appends, per-field truncation, the 4 kB record cap, size-based rotation, failures."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor

from sr_ray.serve.audit import MAX_RECORD_BYTES, AuditLog, encode_record, node_path


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_appends_json_lines_and_none_disables(tmp_path):
    path = tmp_path / "logs" / "audit.jsonl"
    AuditLog(path).write({"request_id": "a", "flagged": False})
    AuditLog(path).write({"request_id": "b", "flagged": True})  # a second writer appends, never truncates
    assert [r["request_id"] for r in records(path)] == ["a", "b"] and all("ts" in r for r in records(path))
    assert AuditLog(None).write({"request_id": "ignored"}) and AuditLog(None).path is None


def test_attacker_strings_are_cut_and_records_stay_under_4kb(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_field_chars=256)
    log.write({"request_id": "r1", "model": "m" * 2**20, "path": "/v1/" + "a" * 65_000})
    (record,) = records(path)
    assert record["model"] == "m" * 256 + f"...[{2**20} chars]" and record["path"].endswith("[65004 chars]")
    assert path.stat().st_size <= MAX_RECORD_BYTES
    # many long fields, escapes that grow on encoding (lone surrogates: 6 bytes each), nested values
    hostile = {f"f{i}": "\ud800" * 5000 for i in range(40)} | {"nested": {"x": ["y" * 10_000] * 50}}
    line = encode_record({"request_id": "r2", "status": 400, **hostile}, 256)
    assert len(line) <= MAX_RECORD_BYTES and json.loads(line)["request_id"] == "r2"
    wide = {f"field_{i:04d}_with_a_long_name": i for i in range(2000)}  # too many fields even when cut
    line = encode_record({"request_id": "r3", "status": 413, **wide}, 256)
    assert len(line) <= MAX_RECORD_BYTES and json.loads(line) == {"request_id": "r3", "status": 413, "ts": None,
                                                                  "path": None, "truncated": True}


def test_rotation_bounds_the_log(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=8192, backups=2)
    for i in range(400):
        assert log.write({"request_id": f"r{i}", "model": "x" * 300})
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 8192 for f in files)
    newest = records(path)[-1]["request_id"]
    assert newest == "r399" and records(tmp_path / "audit.jsonl.1")[-1]["request_id"] < newest
    zero = AuditLog(tmp_path / "z" / "a.jsonl", max_bytes=4096, backups=0)
    for i in range(50):
        zero.write({"request_id": f"r{i}", "model": "y" * 500})
    assert (tmp_path / "z" / "a.jsonl").stat().st_size <= 4096


def _write_many(path: str, worker: int) -> None:
    log = AuditLog(path, max_bytes=20_000, backups=3)
    for i in range(150):
        log.write({"request_id": f"w{worker}-{i}", "pad": "p" * 100})


def test_concurrent_writers_on_one_node_never_interleave(tmp_path):
    path = tmp_path / "audit.jsonl"
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_write_many, [str(path)] * 2, [0, 1]))
    for file in tmp_path.glob("audit.jsonl*"):
        if not file.name.endswith(".lock"):
            assert all(r["pad"] == "p" * 100 for r in records(file))  # every line parses whole
            assert file.stat().st_size <= 20_000


def test_node_placeholder_and_write_failures(tmp_path):
    node = node_path(tmp_path / "a.{node}.jsonl")
    assert "{node}" not in str(node) and node.name.startswith("a.") and node.parent == tmp_path
    log = AuditLog(tmp_path / "audit.jsonl")
    (tmp_path / "audit.jsonl").mkdir()  # the disk refuses the write (EISDIR, even for root)
    assert log.write({"request_id": "lost"}) is False and log.failures == 1
