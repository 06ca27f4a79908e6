"""llama.cpp's own server (`llama-server`) as the serve workload's peer (bench_serve.SERVE_RUNNERS).

llama-cpp-python's server handles one request at a time, so the batched peer is the C++
`llama-server` with parallel slots, the way its users serve many clients: `make
llama-server` builds it into .venv/bin from the llama.cpp that llama-cpp-python vendors
(the same version as the offline peer), with the CMake flags that avoid the AMX SIGILL;
LLAMA_SERVER=/path picks another build. The runner starts it with:

- the offline peer's weight file for this precision (bench_llamacpp.gguf_for_precision);
- one slot per streaming client (`-np`), each with room for the longest prompt plus
  max_tokens (`-c` is the total; slots get separate KV streams when -np is given);
- continuous batching (its default), the GGUF's chat template through its Jinja engine
  (`--jinja`, the template pinfer's tokenizer applies), the q8_0 KV cache with flash
  attention for pinfer's int8 KV cache;
- `--cache-ram 0`: no host-memory cache of earlier prompts, which would let a repeat skip
  the prefill that pinfer's runs redo (its runner resets the prefix cache between runs);
  and before every run the runner erases each slot's prompt (`POST /slots/{id}?action=erase`,
  which llama-server serves only with `--slot-save-path`), so a run's first request in a
  slot cannot reuse the last run's chat-template prefix. Within a run each slot still
  reuses its last prompt's shared prefix, as pinfer's prefix cache does.

The clients are bench_serve's (the official openai package, streaming chat completions),
and the server process is measured the same way (CPU time, VmHWM).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pinfer.tools.bench_llamacpp import _KV_PAD, _usable_cpus, chat_ids, peer_model
from pinfer.tools.bench_serve import ServedRunResult, ServerProcess, json_post, measured_clients
from pinfer.tools.workloads import Workload

BUILD_HINT = "build it with `make llama-server` (into .venv/bin), or point LLAMA_SERVER at a llama-server binary"


def find_llama_server() -> Path:
    """LLAMA_SERVER, else llama-server next to this Python (`make llama-server`), else on PATH."""
    configured = os.environ.get("LLAMA_SERVER")
    if configured:
        path = Path(configured).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"LLAMA_SERVER={configured} is not an executable file")
        return path
    beside = Path(sys.executable).parent / "llama-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("llama-server")
    if found is None:
        raise FileNotFoundError(f"the llama.cpp serve peer needs llama.cpp's llama-server: {BUILD_HINT}")
    return Path(found)


def slot_context(workload: Workload, prompt_lengths: list[int]) -> int:
    """KV cells per slot: the longest prompt plus max_tokens, rounded up to llama.cpp's padding."""
    return -(-(max(prompt_lengths) + workload.max_tokens) // _KV_PAD) * _KV_PAD


def llama_server_command(binary: Path, weights: Path, port: int, slots: int, slot_ctx: int, threads: int,
                         alias: str, slot_dir: Path, kv_cache_dtype: str = "auto") -> list[str]:
    """slot_dir: --slot-save-path, without which llama-server refuses the slot erase the runner uses."""
    command = [str(binary), "--model", str(weights), "--alias", alias, "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(slots), "--ctx-size", str(slots * slot_ctx), "--threads", str(threads),
               "--threads-batch", str(threads), "--n-gpu-layers", "0", "--jinja", "--cache-ram", "0",
               "--slot-save-path", str(slot_dir), "--no-webui"]
    if kv_cache_dtype == "int8":
        command += ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--flash-attn", "on"]
    elif kv_cache_dtype != "auto":
        raise ValueError(f"the llama.cpp serve peer has no KV cache type for kv_cache_dtype {kv_cache_dtype!r}")
    return command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServerRunner:
    """llama-server for one bench spec, sized for `workload`: run(workload) streams it through the clients."""

    name = "llama.cpp"

    def __init__(self, spec: dict[str, Any], log_path: Path, workload: Workload):
        from pinfer.loading.loader import open_checkpoint

        self.binary = find_llama_server()
        self.peer = peer = peer_model(spec["engine"])
        self.model_name, self.weights = peer.name, peer.weights
        self.kv_cache_dtype = peer.kv_cache_dtype
        self.threads = spec.get("threads") or _usable_cpus()
        self.slots = workload.concurrency or 1
        tokenizer = open_checkpoint(peer.source).load_tokenizer()
        lengths = [len(chat_ids(tokenizer, list(c))) for c in workload.conversations]
        self.slot_ctx = slot_context(workload, lengths)
        port = _free_port()
        slot_dir = Path(log_path).parent / "llama-server-slots"
        slot_dir.mkdir(exist_ok=True)
        command = llama_server_command(self.binary, self.weights.path, port, self.slots, self.slot_ctx,
                                       self.threads, self.model_name, slot_dir, self.kv_cache_dtype)
        print(f"  llama.cpp: serving {self.weights.path} ({self.weights.type}) with {self.binary}",
              file=sys.stderr, flush=True)
        self.server = ServerProcess(command, log_path, base_url=f"http://127.0.0.1:{port}").wait_ready()

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name, "served_by": "llama-server", **self.peer.describe(),
            "kv_cache": f"{self.slots} slots x {self.slot_ctx} cells, one stream per slot",
            "threads": self.threads, "device": "cpu", "max_num_seqs": self.slots, "deterministic": False,
            "llama_server": str(self.binary), "llama_server_version": llama_server_version(self.binary),
            "kv_capacity_tokens": self.slots * self.slot_ctx,
        }

    def run(self, workload: Workload) -> ServedRunResult:
        self.erase_slots()  # every run prefills from scratch, as pinfer's runs do
        return measured_clients(self.server, self.model_name, workload, self.slots)

    def erase_slots(self) -> list[int]:
        """Drop every slot's cached prompt; how many tokens each slot held."""
        erased = []
        for slot in range(self.slots):
            url = f"{self.server.base_url}/slots/{slot}?action=erase"
            try:
                with urllib.request.urlopen(json_post(url, {}), timeout=30) as response:
                    erased.append(int(json.load(response)["n_erased"]))
            except urllib.error.HTTPError as exc:  # its message names neither the URL nor llama-server's reason
                raise RuntimeError(f"llama-server refused to erase slot {slot} ({url}): HTTP {exc.code}: "
                                   f"{exc.read().decode(errors='replace')}") from exc
        return erased

    def close(self) -> int:
        return self.server.stop()


def llama_server_version(binary: Path) -> str:
    """`llama-server --version`: its version, commit, compiler and target, on one line."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines()
             if re.match(r"\s*(version|built with)", line)]
    return "; ".join(lines) or "unknown"
