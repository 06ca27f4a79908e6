"""Real servers for the serving tests.

`pinfer serve` runs in a subprocess on 127.0.0.1 with `--port 0` (the OS picks a
free port; we read it from uvicorn's start-up line), on the real default model
in float32. One session-wide server carries most tests; tests that need other
flags (api key, tiny queue) or that kill the server have their own (SERVER_FLAGS). `serve_app_in_thread` runs an app on an engine in this process,
for tests that inject faults into the engine.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pinfer.tools import bench_serve

SERVE_COMMAND = [sys.executable, "-m", "pinfer.entrypoints.cli", "serve"]  # `pinfer serve`
MODEL_ARGS = ["--model", "smollm2-135m", "--dtype", "float32"]
SERVED_MODEL_NAME = "smollm2"
START_TIMEOUT_S = 240  # model load; generous because tests may share 2 cores with other work

# The servers the tests use, by fixture name.
SERVER_FLAGS = {
    # the shared one: default engine settings
    "server": ["--served-model-name", SERVED_MODEL_NAME, "--kv-cache-memory", "512MiB"],
    # API key, and a queue of one request
    "small_server": ["--api-key", "test-secret", "--max-waiting", "1", "--max-num-seqs", "1",
                     "--kv-cache-memory", "64MiB"],
    # gets SIGTERM
    "sigterm_server": ["--shutdown-timeout", "6", "--kv-cache-memory", "64MiB"],
    # RL controls (pause, sleep, weight updates) change its state; API key to check they need it
    "rl_server": ["--api-key", "rl-secret", "--kv-cache-memory", "128MiB"],
    # the browser pages (test_web_ui.py), behind an API key as a shared deployment would be
    "web_server": ["--api-key", "web-secret", "--kv-cache-memory", "128MiB"],
}


class ServerProcess(bench_serve.ServerProcess):
    """`pinfer serve` on the default model with these flags; launching it, waiting for /health
    and the SIGTERM-then-SIGKILL stop are the serve benchmark's (tools/bench_serve.py)."""

    def __init__(self, args: list[str], log_path: Path):
        self.args = args
        super().__init__([*SERVE_COMMAND, *MODEL_ARGS, "--host", "127.0.0.1", "--port", "0", "--no-access-log",
                          *args], log_path)

    def flag(self, name: str) -> str | None:
        return self.args[self.args.index(name) + 1] if name in self.args else None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "ServerProcess":
        super().wait_ready(timeout)
        return self


@pytest.fixture(scope="session", autouse=True)
def _server_pool(request, tmp_path_factory):
    """Launch, all at once at the start, every server the selected tests use (their model loads
    overlap); the fixtures below wait for theirs. All are stopped at the end of the session."""
    wanted = [name for name in SERVER_FLAGS if any(name in item.fixturenames for item in request.session.items)]
    pool = {name: ServerProcess(SERVER_FLAGS[name], tmp_path_factory.mktemp(name) / "server.log") for name in wanted}
    yield pool
    for server in pool.values():
        server.stop()


@pytest.fixture(scope="session")
def server(_server_pool) -> ServerProcess:
    return _server_pool["server"].wait_ready()


@pytest.fixture(scope="session")
def small_server(_server_pool) -> ServerProcess:
    return _server_pool["small_server"].wait_ready()


@pytest.fixture(scope="session")
def sigterm_server(_server_pool) -> ServerProcess:
    return _server_pool["sigterm_server"].wait_ready()


@pytest.fixture(scope="session")
def rl_server(_server_pool) -> ServerProcess:
    return _server_pool["rl_server"].wait_ready()


@pytest.fixture(scope="session")
def web_server(_server_pool) -> ServerProcess:
    return _server_pool["web_server"].wait_ready()


@pytest.fixture(scope="session")
def model_name() -> str:
    return SERVED_MODEL_NAME


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


# ---- /metrics ----------------------------------------------------------------------------


def _read_metrics(base_url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Samples of /metrics as {'name' or 'name{label="v"}': value}."""
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def _is_idle(m: dict[str, float]) -> bool:
    return (m["pinfer:num_requests_running"] == 0 and m["pinfer:num_requests_waiting"] == 0
            and m["pinfer:num_requests_in_flight"] == 0 and m["pinfer:kv_cache_usage_perc"] == 0
            and m["pinfer:kv_cache_free_blocks"] == m["pinfer:kv_cache_total_blocks"])


def _wait_until_idle(base_url: str, timeout: float = 15.0, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and every KV block is free; return the metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = _read_metrics(base_url, headers)
        if _is_idle(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout} s: "
                                 f"{ {k: v for k, v in m.items() if 'requests' in k or 'kv_cache' in k} }")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def read_metrics():
    """read_metrics(base_url, headers=None) -> {'name' or 'name{label="v"}': value}"""
    return _read_metrics


@pytest.fixture(scope="session")
def wait_until_idle():
    """wait_until_idle(base_url, timeout=15, headers=None) -> metrics once nothing runs and all KV blocks are free"""
    return _wait_until_idle


# ---- an app on a given engine, in this process ---------------------------------------------


class ThreadServer:
    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("in-process server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "in-process server did not stop"


@pytest.fixture(scope="module")
def serve_app_in_thread():
    """serve_app_in_thread(app) -> a started ThreadServer (base_url); stopped at the end of the module."""
    servers: list[ThreadServer] = []

    def serve(app) -> ThreadServer:
        servers.append(ThreadServer(app))
        return servers[-1]

    yield serve
    for s in servers:
        s.stop()
