"""The serve workload's llama.cpp peer (tools/bench_llama_server.py): llama-server started
with one slot per client, room for every prompt, and pinfer's KV cache precision; a clear
error when there is no llama-server; and, where one is built (`make llama-server`; CI does
not build it, so that test skips there), a real server that streams every requested token
from the same prompt tokens pinfer's chat template makes."""

from __future__ import annotations

import signal

import pytest

from pinfer.loading.loader import open_checkpoint
from pinfer.loading.resolve import DEFAULT_MODEL, resolve_model
from pinfer.tools import bench_llama_server
from pinfer.tools.bench_llama_server import LlamaServerRunner, find_llama_server, llama_server_command, slot_context
from pinfer.tools.bench_llamacpp import chat_ids
from pinfer.tools.workloads import make_workload


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_command_gives_each_client_a_slot_with_room_for_its_request(tmp_path):
    workload = make_workload("serve", max_tokens=128, num_prompts=8, concurrency=4)
    slot_ctx = slot_context(workload, [50, 70, 61])
    assert slot_ctx == 256  # 70 + 128 tokens, rounded up to llama.cpp's 256-cell padding
    assert slot_context(workload, [129]) == 512
    command = llama_server_command(tmp_path / "llama-server", tmp_path / "m.gguf", 8123, 4, slot_ctx, 2, "smollm2",
                                   tmp_path / "slots")
    assert (_option(command, "--parallel"), _option(command, "--ctx-size")) == ("4", str(4 * 256))
    assert (_option(command, "--threads"), _option(command, "--threads-batch"), _option(command, "--port")) == \
        ("2", "2", "8123")
    assert _option(command, "--cache-ram") == "0" and "--jinja" in command and "--cache-type-k" not in command
    assert _option(command, "--slot-save-path") == str(tmp_path / "slots")  # llama-server's slot erase needs it
    int8 = llama_server_command(tmp_path / "s", tmp_path / "m.gguf", 1, 4, 256, 2, "m", tmp_path,
                                kv_cache_dtype="int8")
    assert (_option(int8, "--cache-type-k"), _option(int8, "--cache-type-v"), _option(int8, "--flash-attn")) == \
        ("q8_0", "q8_0", "on")
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8'"):
        llama_server_command(tmp_path / "s", tmp_path / "m.gguf", 1, 4, 256, 2, "m", tmp_path, kv_cache_dtype="fp8")


def test_a_missing_llama_server_names_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="LLAMA_SERVER=.*nowhere is not an executable"):
        find_llama_server()
    monkeypatch.delenv("LLAMA_SERVER")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(bench_llama_server.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(FileNotFoundError, match="make llama-server"):
        find_llama_server()
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_llama_server() == fake  # beside the Python, as `make llama-server` puts it


def _built_llama_server():
    try:
        return find_llama_server()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_llama_server_streams_every_token_from_pinfers_prompt_tokens(tmp_path):
    _built_llama_server()
    workload = make_workload("serve", max_tokens=4, num_prompts=4, concurrency=2)
    # the model's own Q4_1 file (no conversion); one thread: ggml's spinning barriers and a busy machine
    spec = {"engine": {"model": DEFAULT_MODEL, "dtype": "auto", "quantization": "int4"}, "threads": 1}
    runner = LlamaServerRunner(spec, tmp_path / "server.log", workload)
    try:
        described = runner.describe()
        result = runner.run(workload)
        # the run left a prompt in each slot, and run() erases them first: no reuse across runs
        held, after = runner.erase_slots(), runner.erase_slots()
    finally:
        exit_code = runner.close()
    assert exit_code in (0, -signal.SIGTERM)
    assert (described["served_by"], described["gguf_type"], described["max_num_seqs"]) == ("llama-server", "Q4_1", 2)
    assert len(held) == 2 and all(n > 0 for n in held) and after == [0, 0]
    assert "version" in described["llama_server_version"]
    tokenizer = open_checkpoint(resolve_model(DEFAULT_MODEL)).load_tokenizer()
    # its Jinja chat template on the GGUF's template makes the ids pinfer's tokenizer makes
    assert [r.prompt_tokens for r in result.requests] == [len(chat_ids(tokenizer, list(c)))
                                                          for c in workload.conversations]
    assert [r.generated_tokens for r in result.requests] == [4] * 4  # ignore_eos honoured
    assert all(0 < r.ttft_s <= result.seconds and r.tpot_s > 0 for r in result.requests)
    assert result.server_cpu_seconds > 0 and result.server_peak_rss_bytes > 50 * 2**20
