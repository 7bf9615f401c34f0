"""A real PostgreSQL (the Debian `postgresql` package's binaries) and a real `mlflow server` on it, both on
loopback ports, for the tracking-server tests. Each is started in its own temporary directory and stopped
by its own pid / data directory, so nothing else on the machine is touched.

CI runs as root, and PostgreSQL refuses to run as root: the server then runs as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    """The server binaries' directory (`initdb` and `pg_ctl` are not on PATH in Debian's package)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    on_path = shutil.which("initdb")
    if not found and not on_path:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (scripts/install.sh --test does)")
    return Path(found[-1] if found else on_path).resolve().parent


@dataclass
class Postgres:
    root: Path
    port: int

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/mlflow"

    def _run(self, *cmd: str) -> None:
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        out = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")

    @classmethod
    def start(cls) -> "Postgres":
        root = Path(tempfile.mkdtemp(prefix="srr-pg-"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        pg = cls(root, free_port())
        bindir = postgres_bin()
        pg._run(str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        # loopback only, sockets in the temporary directory (not /var/run/postgresql)
        pg._run(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"), "-w", "-t", "60",
                "-o", f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {root}", "start")
        pg._run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "mlflow")
        return pg

    def stop(self) -> None:
        try:
            self._run(str(postgres_bin() / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class MlflowServer:
    proc: subprocess.Popen
    url: str
    log: Path

    @classmethod
    def start(cls, backend_uri: str, artifacts: Path, log: Path, timeout_s: float = 360) -> "MlflowServer":
        port = free_port()
        cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts)]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        server = cls(proc, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(1)
        server.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s} s:\n{log.read_text()[-4000:]}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
