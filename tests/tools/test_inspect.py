"""`pinfer inspect` on the real SmolLM2 GGUF and on the HF folder transformers made from it:
the numbers agree with the tensors themselves and with transformers, --json parses, and
nothing is dequantized (it is fast)."""

from __future__ import annotations

import json
import time

import pytest

from pinfer.entrypoints.cli import main
from pinfer.loading.gguf_loader import GGUFCheckpoint
from pinfer.tools.inspect import inspect_model

# SmolLM2-135M: 30 layers, 3 KV heads of 64 dims; K and V per token and layer.
KV_FLOAT32_PER_TOKEN = 2 * 30 * 3 * 64 * 4


def run_json(capsys, model) -> dict:
    assert main(["inspect", str(model), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_gguf_report_matches_the_file(smollm2_gguf, hf_smollm2, capsys) -> None:
    start = time.perf_counter()
    report = run_json(capsys, smollm2_gguf)
    seconds = time.perf_counter() - start
    headers = GGUFCheckpoint(smollm2_gguf).tensor_headers()
    assert report["format"] == "gguf" and report["architecture"] == "LlamaForCausalLM"
    assert report["num_parameters"] == sum(int(t.n_elements) for t in headers) == hf_smollm2.num_parameters()
    assert (report["num_layers"], report["hidden_size"], report["num_kv_heads"], report["head_dim"]) == (30, 576, 3, 64)
    assert report["context_length"] == 8192 and report["vocab_size"] == 49152
    assert report["has_tokenizer"] and report["tokenizer_vocab_size"] == 49152 and report["has_chat_template"]
    assert report["tokenizer"] == "gpt2 (pre: smollm)"
    # Counts per GGUF type: every tensor once, and the file's own bytes.
    types = report["tensor_types"]
    assert {k: v["tensors"] for k, v in types.items()} == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert report["weight_bytes"]["file"] == sum(int(t.n_bytes) for t in headers)
    assert report["weight_bytes"]["float32"] == 4 * report["num_parameters"]
    assert report["weight_bytes"]["bfloat16"] == 2 * report["num_parameters"]
    assert report["weight_bytes"]["bfloat16"] > report["weight_bytes"]["int8"] > report["weight_bytes"]["int4"]
    assert report["kv_bytes_per_token"] == {"float32": KV_FLOAT32_PER_TOKEN, "bfloat16": KV_FLOAT32_PER_TOKEN // 2}
    # One row per tensor kind: 9 per-layer kinds x 30 layers, plus embedding and final norm.
    groups = {g["name"]: g for g in report["tensor_groups"]}
    assert len(groups) == 11 and sum(g["count"] for g in groups.values()) == len(headers)
    q_proj = groups["model.layers.*.self_attn.q_proj.weight"]
    assert (q_proj["count"], q_proj["shape"], q_proj["dtype"]) == (30, [576, 576], "Q4_1")
    assert groups["model.layers.*.self_attn.k_proj.weight"]["shape"] == [192, 576]
    assert seconds < 5, f"inspect took {seconds:.1f}s: it should read headers only"


def test_hf_folder_report_matches_transformers(smollm2_hf_dir, hf_smollm2, capsys) -> None:
    report = run_json(capsys, smollm2_hf_dir)
    assert report["format"] == "safetensors"
    assert report["num_parameters"] == hf_smollm2.num_parameters()
    assert report["tensor_types"] == {
        "F32": {"tensors": 272, "parameters": report["num_parameters"], "bytes": 4 * report["num_parameters"]}
    }
    assert report["tokenizer_vocab_size"] == 49152 and report["has_chat_template"]
    groups = {g["name"]: g for g in report["tensor_groups"]}
    assert groups["model.layers.*.mlp.gate_proj.weight"] == {
        "name": "model.layers.*.mlp.gate_proj.weight", "shape": [1536, 576], "dtype": "F32", "count": 30}


def test_table_output(smollm2_gguf, capsys) -> None:
    assert main(["inspect", str(smollm2_gguf)]) == 0
    out = capsys.readouterr().out
    for expected in ("LlamaForCausalLM", "134,515,008", "model.layers.*.self_attn.q_proj.weight", "Q4_1",
                     "KV cache", "per token: float32 45.0 KiB, bfloat16 22.5 KiB"):
        assert expected in out


def test_unknown_model_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "nope.gguf")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_report_is_the_same_through_the_api(smollm2_gguf) -> None:
    report = inspect_model(smollm2_gguf)
    assert report.num_parameters == 134_515_008
    with pytest.raises(Exception):
        inspect_model("not-a-model")
