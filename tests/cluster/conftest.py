"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`), with the dashboard
(the Jobs API lives there). Torn down by killing exactly the processes it started, never with `ray stop`,
which would stop every Ray cluster on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
from ray._raylet import Config

from sr_ray.runtime import RUNTIME_ENV_VARS

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NODE_START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    root: Path
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[subprocess.Popen] = field(default_factory=list)
    address: str = ""  # GCS <ip>:<port>, as the head prints it (Ray binds the host's address, not 127.0.0.1)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict:
        """The nodes' environment: the venv first on PATH (job entrypoints say `python`), offline HF, and
        token auth on both nodes (a joining node does not turn it on by itself; the token is ~/.ray/auth_token)."""
        env = {**os.environ, **RUNTIME_ENV_VARS, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token"}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
        env.pop("RAY_ADDRESS", None)
        return env

    def start_node(self, name: str, *args: str, attempts: int = 2) -> None:
        """`ray start --block` in its own process group; returns once the node is up (its log says so).
        Retried once: a joining raylet must register with the GCS within 30 s (hard-coded in Ray), which
        a heavily loaded 2-core machine can miss."""
        for attempt in range(1, attempts + 1):
            proc, log = self._launch(f"{name}{attempt}", args)
            deadline = time.monotonic() + NODE_START_TIMEOUT_S
            while "will now block forever" not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            else:
                self.nodes.append(proc)
                self.address = self.address or re.search(r"--address='([^']+)'", log.read_text()).group(1)
                return
            kill_tree([proc])
            if attempt == attempts:
                raise RuntimeError(f"ray start {name} failed:\n{log.read_text()[-4000:]}")

    def _launch(self, name: str, args: tuple[str, ...]) -> tuple[subprocess.Popen, Path]:
        ports = [f"--{flag}={free_port()}" for flag in ("node-manager-port", "object-manager-port",
                                                        "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                        "runtime-env-agent-port", "metrics-export-port")]
        log = self.root / f"{name}.log"
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", "--num-cpus=2",
               f"--temp-dir={self.root / name}", "--object-store-memory=300000000", *ports, *args]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env(), start_new_session=True)
        return proc, log

    def start(self) -> "LocalCluster":
        self.start_node("head", "--head", f"--port={self.port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}")
        self.start_node("worker", f"--address={self.address}")
        return self

    def stop(self) -> None:
        kill_tree(self.nodes)


def kill_tree(roots: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL, to every process these `ray start` commands started (their descendants and
    their process groups); nothing else on the machine is touched."""
    procs = []
    for root in roots:
        try:
            procs += [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for root in roots:
            try:
                os.killpg(root.pid, sig)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        if not alive:
            break
    for root in roots:
        root.wait(timeout=10)


def set_auth_mode(mode: str | None) -> None:
    """RAY_AUTH_MODE for this process; Ray caches it in its config, so that is re-read."""
    if mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = mode
    Config.initialize("")


@pytest.fixture(scope="module")
def local_cluster():
    # A short root: Ray's Unix sockets live under <temp-dir>/session_<date>_<pid>/sockets (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="srr-"))
    cluster = LocalCluster(root)
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    set_auth_mode("token")  # this process's Jobs API client sends the token too
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        set_auth_mode(saved_mode)
