"""The `pinfer` command, run as users run it: a subprocess on the default model."""

from __future__ import annotations

import json
import subprocess
import sys

PINFER = [sys.executable, "-m", "pinfer.entrypoints.cli"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*PINFER, *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_generate_json_on_the_default_model():
    result = run("generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--json",
                 "--logprobs", "0")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)["outputs"][0]
    completion = record["completions"][0]
    assert record["prompt"] == "The capital of France is"
    assert len(completion["token_ids"]) == 8 and completion["finish_reason"] == "length"
    assert len(completion["token_logprobs"]) == 8 and all(lp <= 0 for lp in completion["token_logprobs"])
    assert "Paris" in completion["text"]


def test_chat_streams_an_answer_from_stdin():
    result = run("chat", "--max-tokens", "24", stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_bad_flag_values_give_a_clear_error():
    result = run("generate", "--prompt", "hi", "--top-p", "1.5")
    assert result.returncode == 2 and "top_p must be in (0, 1]" in result.stderr
    result = run("generate", "--prompt", "hi", "--model", "/no/such/model")
    assert result.returncode == 2 and "unknown model '/no/such/model'" in result.stderr
