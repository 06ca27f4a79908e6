"""The `serve` workload: concurrent streaming clients against an OpenAI-compatible server.

run_serve_clients(base_url, model, workload, concurrency) drives any such server
(pinfer, llama.cpp's llama-server, vLLM) the way its users do: the official `openai`
client (AsyncOpenAI), streaming chat completions with the usage in the last chunk.
`concurrency` clients run a closed loop: each sends the next prompt as soon as its
request has finished. Per request:

- TTFT = first chunk with content - request sent;
- TPOT = (last chunk - first content chunk) / (completion tokens - 1), the tokens from usage;
- ITL  = the gaps between consecutive content chunks (a chunk usually carries one token).

PinferServeRunner starts `pinfer serve` with one bench configuration's engine settings
in a subprocess (port 0, read from uvicorn's start-up line), waits for /health, and stops
it with SIGTERM (the server's graceful drain), then SIGKILL after a timeout. It measures
the server process (CPU time, VmHWM peak RSS): the client process's numbers are not the
engine's. A peer that has a server registers a runner like it in SERVE_RUNNERS: llama.cpp's
llama-server does (bench_llama_server.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pinfer.tools.bench_runners import RequestTiming, RunResult, _short_model_name
from pinfer.tools.workloads import Workload

START_TIMEOUT_S = 600.0  # model load on a busy machine
REQUEST_TIMEOUT_S = 1800.0  # one streamed request, queueing included
UVICORN_URL = re.compile(r"Uvicorn running on (http://\S+)")


class NotApplicableError(Exception):
    """This workload cannot run on this engine (e.g. serve on a peer without a server)."""


@dataclass
class StreamedRequest(RequestTiming):
    sent_s: float  # since the run started
    finished_s: float  # the stream's end, since the run started
    itl_s: list[float]  # gaps between consecutive content chunks


@dataclass
class ServedRunResult(RunResult):
    # The server process's, over the clients' run: the client process's CPU and memory are not the engine's.
    server_cpu_seconds: float | None = None
    server_peak_rss_bytes: int | None = None  # high-water mark since the server started


# ---- the clients ------------------------------------------------------------------------


def run_serve_clients(base_url: str, model_name: str, workload: Workload, concurrency: int | None = None,
                      api_key: str | None = None) -> RunResult:
    """Every prompt of `workload` through `concurrency` (default: workload.concurrency) streaming
    clients against base_url (no /v1); seconds = first request sent to last stream closed."""
    concurrency = concurrency or workload.concurrency or 1
    return asyncio.run(_serve_clients(base_url, model_name, workload, concurrency, api_key))


async def _serve_clients(base_url: str, model_name: str, workload: Workload, concurrency: int,
                         api_key: str | None) -> RunResult:
    try:
        from openai import AsyncOpenAI
    except ImportError as exc:
        raise RuntimeError("the serve workload drives the server with the official openai client: "
                           "pip install openai") from exc

    timings: list[StreamedRequest | None] = [None] * workload.num_prompts
    pending = iter(range(workload.num_prompts))  # shared: a client takes the next index when it is free
    async with AsyncOpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key or "unused", max_retries=0,
                           timeout=REQUEST_TIMEOUT_S) as client:
        start = time.perf_counter()

        async def client_loop() -> None:
            for i in pending:
                timings[i] = await _streamed_request(client, model_name, workload, i, start)

        await asyncio.gather(*(client_loop() for _ in range(min(concurrency, workload.num_prompts))))
        seconds = time.perf_counter() - start
    return RunResult(seconds, [t for t in timings if t is not None])


async def _streamed_request(client, model_name: str, workload: Workload, i: int, start: float) -> StreamedRequest:
    extra: dict[str, Any] = {"logprobs": True} if workload.logprobs else {}
    ignore_eos = {"ignore_eos": True} if workload.ignore_eos else None  # vLLM's extension; pinfer, llama.cpp take it
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model_name, messages=list(workload.conversations[i]), max_tokens=workload.max_tokens,
        temperature=workload.temperature, seed=workload.seed + i, stream=True,
        stream_options={"include_usage": True},
        extra_body=ignore_eos, **extra)
    content_times: list[float] = []
    last, usage = None, None
    async for chunk in stream:
        now = time.perf_counter()
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                content_times.append(now)
            if (choice.delta and choice.delta.content) or choice.finish_reason:
                last = now
    finished = time.perf_counter()
    if usage is None:
        raise RuntimeError("the server sent no usage in its stream (stream_options.include_usage), so the "
                           "generated tokens cannot be counted")
    n = usage.completion_tokens
    first = content_times[0] if content_times else None
    ttft = None if first is None else first - sent
    tpot = (last - first) / (n - 1) if first is not None and last is not None and n > 1 else None
    gaps = [b - a for a, b in zip(content_times, content_times[1:])]
    return StreamedRequest(usage.prompt_tokens, n, ttft, tpot, sent - start, finished - start, gaps)


# ---- the server process ---------------------------------------------------------------


class ServerProcess:
    """A server in a subprocess, its output in log_path. base_url None: read it from uvicorn's start-up line."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None,
                 base_url: str | None = None, url_pattern: re.Pattern = UVICORN_URL):
        self.log_path = Path(log_path)
        self.base_url = base_url
        self.url_pattern = url_pattern
        self._log = open(self.log_path, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.start_seconds: float | None = None  # launch -> /health answered

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.failure(f"the server exited with code {self.proc.returncode} before it was ready")
            if self.base_url is None:
                match = self.url_pattern.search(self.log_text())
                self.base_url = match.group(1) if match else None
            if self.base_url is not None and _get_status(f"{self.base_url}/health") == 200:
                self.start_seconds = time.perf_counter() - self.started
                return self
            time.sleep(0.2)
        self.stop()
        raise self.failure(f"the server was not ready after {timeout:.0f} s")

    def failure(self, message: str) -> RuntimeError:
        """The error for a server that failed: its log's last lines go to stderr, the last one into the message."""
        lines = self.log_text().splitlines()
        print("  server log (last lines):\n    " + "\n    ".join(lines[-30:]), file=sys.stderr, flush=True)
        return RuntimeError(f"{message}: {lines[-1] if lines else '(no output)'}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful drain), SIGKILL if it has not exited after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process, all its threads (Linux /proc; else psutil)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime in ticks
        except (OSError, IndexError, ValueError):
            pass
        try:
            import psutil

            times = psutil.Process(self.proc.pid).cpu_times()
            return times.user + times.system
        except Exception:  # no psutil, or the process is gone
            return None

    def peak_rss_bytes(self) -> int | None:
        """The server's resident-set high-water mark (VmHWM; Linux only, None elsewhere)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return None


def _get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening yet
        return None


def json_post(url: str, body: dict[str, Any]) -> urllib.request.Request:
    """A POST of body as JSON to url, for urllib.request.urlopen."""
    return urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                  headers={"Content-Type": "application/json"})


def _post(url: str, body: dict[str, Any]) -> int:
    try:
        with urllib.request.urlopen(json_post(url, body), timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def measured_clients(server: ServerProcess, model_name: str, workload: Workload,
                     concurrency: int | None = None) -> ServedRunResult:
    """run_serve_clients against a running server, with the server's CPU time over the run and its peak RSS."""
    cpu_before = server.cpu_seconds()
    result = run_serve_clients(server.base_url, model_name, workload, concurrency)
    cpu_after = server.cpu_seconds()
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return ServedRunResult(result.seconds, result.requests, cpu, server.peak_rss_bytes())


# ---- pinfer serve -----------------------------------------------------------------------


# EngineConfig fields pinfer_serve_command passes on; seed has no serve flag (requests bring their own).
_SERVE_FIELDS = {"model", "dtype", "device", "block_size", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens",
                 "max_model_len", "enable_prefix_caching", "attention_backend", "seed", "deterministic",
                 "quantization", "trace_file", "trace_layers", "tensor_parallel_size", "data_parallel_size", "compile",
                 "kv_cache_dtype"}


def pinfer_serve_command(engine: dict[str, Any]) -> list[str]:
    """`pinfer serve` with the engine settings of a bench spec (EngineConfig fields) on a free port."""
    from pinfer.config import EngineConfig

    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    unknown = [k for k, v in engine.items() if k not in _SERVE_FIELDS and v != defaults.get(k)]
    if unknown:  # never benchmark a server that silently runs another configuration
        raise RuntimeError(f"bench_serve does not pass {', '.join(unknown)} on to `pinfer serve` yet")
    args = ["--model", str(engine["model"]), "--dtype", str(engine["dtype"]).removeprefix("torch."),
            "--kv-cache-memory", str(engine["kv_cache_memory"]), "--block-size", str(engine["block_size"]),
            "--max-num-seqs", str(engine["max_num_seqs"]),
            "--max-num-batched-tokens", str(engine["max_num_batched_tokens"]),
            "--attention-backend", str(engine["attention_backend"]),
            "--tensor-parallel-size", str(engine["tensor_parallel_size"]),
            "--data-parallel-size", str(engine["data_parallel_size"]),
            "--kv-cache-dtype", str(engine.get("kv_cache_dtype", "auto"))]
    optional = {"--device": engine["device"], "--max-model-len": engine["max_model_len"],
                "--quantization": engine["quantization"], "--trace": engine["trace_file"]}
    args += [a for flag, value in optional.items() if value is not None for a in (flag, str(value))]
    flags = {"--no-prefix-caching": not engine["enable_prefix_caching"], "--deterministic": engine["deterministic"],
             "--trace-layers": engine["trace_layers"], "--compile": engine.get("compile", False)}
    args += [flag for flag, on in flags.items() if on]
    return [sys.executable, "-m", "pinfer.serving.cli", *args, "--host", "127.0.0.1", "--port", "0",
            "--no-access-log", "--shutdown-timeout", "5"]


class PinferServeRunner:
    """`pinfer serve` for one bench spec: run(workload) streams it through the clients."""

    name = "pinfer"

    def __init__(self, spec: dict[str, Any], log_path: Path):
        self.spec = spec
        env = dict(os.environ)
        if spec.get("threads"):  # `pinfer serve` has no thread flag: torch reads this when it starts
            env["OMP_NUM_THREADS"] = str(spec["threads"])
        self.server = ServerProcess(pinfer_serve_command(spec["engine"]), log_path, env).wait_ready()
        self.model_name = str(spec["engine"]["model"])  # the served name is the --model string

    def describe(self) -> dict[str, Any]:
        import torch

        from pinfer.config import ModelConfig
        from pinfer.loading.loader import default_dtype, open_checkpoint

        engine = self.spec["engine"]
        checkpoint = open_checkpoint(engine["model"])  # metadata only: the same rule the server applied
        dtype = default_dtype(checkpoint) if engine["dtype"] == "auto" else engine["dtype"]
        capacity = re.search(r"KV pool (\d+) tokens", self.server.log_text())
        return {
            "engine": self.name, "served_by": "pinfer serve", "model": _short_model_name(self.model_name),
            "model_path": self.model_name, "architecture": ModelConfig.from_hf_config(checkpoint.config).architecture,
            "dtype": str(dtype).removeprefix("torch."), "quantization": engine["quantization"] or "none",
            "kv_cache_dtype": engine.get("kv_cache_dtype", "auto"),
            "attention_backend": engine["attention_backend"],
            "threads": self.spec.get("threads") or torch.get_num_threads(),  # the server's default is ours
            "device": engine["device"] or ("cuda" if torch.cuda.is_available() else "cpu"),
            "max_num_seqs": engine["max_num_seqs"], "deterministic": engine["deterministic"],
            "kv_capacity_tokens": int(capacity.group(1)) if capacity else None,
        }

    def run(self, workload: Workload) -> ServedRunResult:
        self._reset_prefix_cache()
        return measured_clients(self.server, self.model_name, workload)

    def _reset_prefix_cache(self, timeout: float = 30.0) -> None:
        """Every run prefills from scratch, as the offline runner's do: sleep level 1 frees the KV pool
        and its prefix cache, wake_up allocates it again. 409 = the last streams are still closing."""
        deadline = time.monotonic() + timeout
        while (status := _post(f"{self.server.base_url}/sleep", {"level": 1})) == 409 and time.monotonic() < deadline:
            time.sleep(0.1)
        if status != 200 or _post(f"{self.server.base_url}/wake_up", {}) != 200:
            raise RuntimeError(f"could not reset the server's prefix cache (POST /sleep answered {status})")

    def close(self) -> int:
        return self.server.stop()


def _llama_server_runner(spec: dict[str, Any], log_path: Path, workload: Workload):
    from pinfer.tools.bench_llama_server import LlamaServerRunner  # imports this module

    return LlamaServerRunner(spec, log_path, workload)


# engine -> (spec, server log path, the workload it will serve) -> a started runner
SERVE_RUNNERS: dict[str, Callable[[dict[str, Any], Path, Workload], Any]] = {
    "pinfer": lambda spec, log_path, workload: PinferServeRunner(spec, log_path),
    "llama.cpp": _llama_server_runner,
}


def start_serve_runner(spec: dict[str, Any], log_path: Path, workload: Workload):
    """The server runner of spec["runner"], started and ready for `workload`; NotApplicableError for an
    engine without one."""
    engine = spec.get("runner", "pinfer")
    if engine not in SERVE_RUNNERS:
        raise NotApplicableError(f"the {engine} peer has no server (serve runs against {', '.join(SERVE_RUNNERS)})")
    return SERVE_RUNNERS[engine](spec, log_path, workload)
