"""The audit trail: one bounded JSON line per request, in a size-capped, rotated file.

Request content is attacker-controlled, so a record never stores it verbatim: every string field is cut
to `max_field_chars` (the cut is marked, with the original length) and the whole line to
`MAX_RECORD_BYTES`. The file rotates by size (`path` -> `path.1` -> ... -> `path.<backups>`), so the log
never holds more than `(backups + 1) * max_bytes` bytes.

Writers on one node (several ingress replicas) serialise on an `flock` of `<path>.lock`, so rotation and
appends do not interleave. Across nodes that is not enough: O_APPEND and flock are not atomic on NFS and
most NAS mounts, so give each node its own file, `{node}` in the path (expanded to the host name).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

logger = logging.getLogger("sr_ray.serve")
MAX_RECORD_BYTES = 4096


def node_path(path: str | Path) -> Path:
    """`{node}` in an audit path -> this host's name (one file per node on shared storage)."""
    node = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "node"
    return Path(str(path).replace("{node}", node))


def clip(value, max_chars: int):
    """Strings (also inside lists and dicts, which keep their first 16 / 32 items) cut to `max_chars`, marked
    with the original length."""
    if isinstance(value, str):
        return value if len(value) <= max_chars else f"{value[:max_chars]}...[{len(value)} chars]"
    if isinstance(value, (list, tuple)):
        return [clip(v, max_chars) for v in value[:16]]
    if isinstance(value, dict):
        return {str(k)[:64]: clip(v, max_chars) for k, v in list(value.items())[:32]}
    return value


def encode_record(record: dict, max_field_chars: int) -> bytes:
    """One JSON line of at most MAX_RECORD_BYTES (fields shortened further if the first cut is not enough)."""
    chars = max_field_chars
    while True:
        fields = {k: clip(v, chars) for k, v in record.items()}  # every field kept; nested values capped too
        line = (json.dumps(fields, sort_keys=True, default=str) + "\n").encode()
        if len(line) <= MAX_RECORD_BYTES or chars <= 8:
            break
        chars //= 2
    if len(line) > MAX_RECORD_BYTES:  # too many fields even at 8 chars: keep what identifies the request
        keep = {k: record.get(k) for k in ("ts", "request_id", "status", "path")}
        line = (json.dumps(clip(keep, 64) | {"truncated": True}, default=str) + "\n").encode()
    return line


class AuditLog:
    """Append-only JSONL with per-field truncation and size-based rotation; `path=None` disables it."""

    def __init__(self, path: str | Path | None, max_bytes: int = 64 * 2**20, backups: int = 4,
                 max_field_chars: int = 256):
        self.path = node_path(path) if path else None
        self.max_bytes, self.backups, self.max_field_chars = max_bytes, backups, max_field_chars
        self.failures = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()

    def write(self, record: dict) -> bool:
        """Append one record; False (logged, counted in `failures`) if the disk refused it. A full or
        read-only disk must not turn every request into a 500."""
        if self.path is None:
            return True
        line = encode_record({"ts": round(time.time(), 3), **record}, self.max_field_chars)
        try:
            lock = os.open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o640)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    if os.path.getsize(self.path) + len(line) > self.max_bytes:
                        self._rotate()
                except FileNotFoundError:
                    pass
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            finally:
                os.close(lock)  # closing releases the flock
        except OSError as err:
            self.failures += 1
            logger.error("audit log %s: write failed (%s); record %s lost", self.path, err, record.get("request_id"))
            return False
        return True
