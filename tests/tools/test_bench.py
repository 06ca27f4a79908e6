"""`pinfer bench`: deterministic workloads in the right token-length range, one
configuration per comma-list combination, a table that says which energy unit it
shows (and seconds for a TTFT workload), and a tiny real run (fresh worker process)
whose JSON numbers add up. The serve workload: test_bench_serve.py."""

from __future__ import annotations

import json

import pytest

from pinfer.entrypoints.cli import build_parser, main
from pinfer.errors import PinferError
from pinfer.loading.loader import open_checkpoint
from pinfer.loading.resolve import DEFAULT_MODEL
from pinfer.tools import energy
from pinfer.tools.bench import expand_configs
from pinfer.tools.bench_report import Row, format_table
from pinfer.tools.workloads import arithmetic_prompts, long_prompt, make_workload


def test_rollout_prompts_are_the_same_list_every_run_and_varied():
    assert arithmetic_prompts(64, seed=0) == arithmetic_prompts(64, seed=0)
    assert arithmetic_prompts(64, seed=0) != arithmetic_prompts(64, seed=1)
    assert len(set(arithmetic_prompts(64))) == 64
    assert arithmetic_prompts(256)[:64] == arithmetic_prompts(64)  # --num-prompts 256 extends the list
    rollout = make_workload("rollout", num_prompts=64)
    assert (rollout.num_prompts, rollout.max_tokens, rollout.temperature) == (64, 128, 1.0)
    assert rollout.logprobs and rollout.ignore_eos
    latency = make_workload("latency")
    assert (latency.num_prompts, latency.max_tokens, latency.temperature) == (1, 128, 0.0)
    serve = make_workload("serve", num_prompts=64, concurrency=8)
    assert serve.conversations == rollout.conversations and (serve.concurrency, serve.temperature) == (8, 1.0)
    assert rollout.concurrency is None and serve.ignore_eos and not serve.logprobs
    long = make_workload("long_prompt")
    assert (long.num_prompts, long.max_tokens, long.temperature, long.metric) == (1, 16, 0.0, "ttft")
    assert long_prompt() == long_prompt()  # the same text on every run
    lines = long_prompt().splitlines()[2:-2]
    assert len(lines) == 29 and len(set(lines)) == 29  # a real document, no repeated lines


def test_prompts_are_50_to_70_tokens_with_the_chat_template():
    tokenizer = open_checkpoint(DEFAULT_MODEL).load_tokenizer()

    def num_tokens(conversation) -> int:
        ids = tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    rollout = [num_tokens(c) for c in make_workload("rollout", num_prompts=256).conversations]
    assert 50 <= min(rollout) and max(rollout) <= 70, (min(rollout), max(rollout))
    assert 55 <= num_tokens(make_workload("latency").conversations[0]) <= 65
    assert 980 <= num_tokens(make_workload("long_prompt").conversations[0]) <= 1020


def test_comma_separated_flags_make_one_configuration_per_combination():
    args = build_parser().parse_args(["bench", "--dtype", "float32,bfloat16", "-q", "none,int8", "-t", "1"])
    configs = expand_configs(args)
    assert [(c["engine"]["dtype"], c["engine"]["quantization"]) for c in configs] == [
        ("float32", None), ("float32", "int8"), ("bfloat16", None), ("bfloat16", "int8")]
    assert all(c["threads"] == 1 and c["engine"]["attention_backend"] == "paged" for c in configs)
    deterministic = expand_configs(build_parser().parse_args(["bench", "--deterministic"]))
    assert deterministic[0]["engine"]["attention_backend"] == "batch_invariant"
    kv = expand_configs(build_parser().parse_args(["bench", "--kv-cache-dtype", "auto,int8"]))
    assert [c["engine"]["kv_cache_dtype"] for c in kv] == ["auto", "int8"]
    with pytest.raises(PinferError, match="kv_cache_dtype must be one of"):
        expand_configs(build_parser().parse_args(["bench", "--kv-cache-dtype", "auto,q4"]))


def test_table_has_a_kv_cache_column_once_a_row_uses_int8():
    assert "kv cache" not in format_table([_row()], energy=False, rapl=False)
    table = format_table([_row(), _row(kv_cache_dtype="int8")], energy=False, rapl=False).splitlines()
    assert "| kv cache |" in table[0] and "| auto     |" in table[2] and "| int8     |" in table[3]


def _row(**kw) -> Row:
    base = dict(model="m", dtype="float32", quantization="none", threads=2, attention_backend="paged",
                max_num_seqs=256, workload="rollout", metric="total", repeats=3, tok_s_mean=100.0, tok_s_std=2.5,
                ttft_ms=50.0, tpot_ms=10.0, peak_rss_mib=900.0, cpu_seconds_per_token=0.02)
    return Row(**{**base, **kw})


def test_table_shows_cpu_seconds_without_rapl_and_joules_with_it():
    no_rapl = format_table([_row()], energy=True, rapl=False)
    header = no_rapl.splitlines()[0]
    assert "CPU-s/tok" in header and "J/tok" not in header.replace("CPU-s/tok", "")
    assert "100.00 ± 2.50" in no_rapl and "0.0200" in no_rapl
    with_rapl = format_table([_row(joules_per_token=0.75)], energy=True, rapl=True)
    assert "| J/tok |" in with_rapl.splitlines()[0] and "0.750" in with_rapl
    assert "tok" not in format_table([_row()], energy=False, rapl=False).splitlines()[0].replace("tok/s", "")


def test_a_ttft_workload_shows_seconds_and_an_inapplicable_one_says_so():
    rows = [_row(workload="long_prompt", metric="ttft", ttft_ms=1234.5, ttft_ms_std=20.0),
            _row(workload="serve", metric="total", error="the transformers peer has no server", not_applicable=True)]
    table = format_table(rows, energy=False, rapl=False)
    assert "1.234 ± 0.020 s (TTFT)" in table and "100.00" not in table  # TTFT is the headline, not tok/s
    assert "n/a: the transformers peer has no server" in table and "failed" not in table


@pytest.fixture
def no_rapl(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "POWERCAP_ROOT", tmp_path / "no-powercap")  # the worker gets it through its spec


def test_tiny_real_bench_writes_consistent_json_and_a_png(tmp_path, no_rapl, capsys):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--workload", "latency,rollout,long_prompt", "--max-tokens", "8", "--num-prompts", "2",
                 "--repeats", "1", "--warmup-tokens", "0", "--dtype", "float32", "--kv-cache-memory", "64MiB",
                 "--energy", "--json", str(json_path), "--plot", str(png_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.count("RAPL energy counters are not exposed") == 1  # said once, plainly
    assert "CPU-s/tok" in out.splitlines()[0] and "smollm2-135m | float32" in out

    doc = json.loads(json_path.read_text())
    assert {"cpu_model", "cpu_matrix_isa", "logical_cpus", "torch"} <= doc["machine"].keys()
    assert doc["energy"]["source"] == "cpu_time"
    (config,) = doc["configurations"]
    result = config["result"]
    assert result["error"] is None and result["describe"]["dtype"] == "float32"
    latency, rollout, long = result["workloads"]
    for workload, num_prompts in ((latency, 1), (rollout, 2), (long, 1)):
        (run,) = workload["runs"]
        assert run["generated_tokens"] == num_prompts * 8  # ignore_eos: exactly prompts x max_tokens
        assert [r["generated_tokens"] for r in run["requests"]] == [8] * num_prompts
        low, high = (980, 1020) if workload is long else (50, 70)
        assert all(low <= r["prompt_tokens"] <= high for r in run["requests"])
        assert run["tok_s"] == pytest.approx(run["generated_tokens"] / run["seconds"])
        assert run["cpu_seconds_per_token"] == pytest.approx(run["cpu_seconds"] / run["generated_tokens"])
        assert run["joules"] is None and run["cpu_seconds"] > 0
        assert all(0 < r["ttft_s"] <= run["seconds"] for r in run["requests"])
        assert workload["warmup"] is None  # --warmup-tokens 0 (the default run warms up with 32 tokens)
        assert workload["peak_rss_bytes"] > 100 * 2**20
    (lat_request,) = latency["runs"][0]["requests"]
    assert latency["runs"][0]["decode_tok_s"] == pytest.approx(1 / lat_request["tpot_s"])
    rows = doc["rows"]
    assert [r["workload"] for r in rows] == ["latency", "rollout", "long_prompt"]
    assert rows[1]["tok_s_mean"] == pytest.approx(rollout["runs"][0]["tok_s"]) and rows[1]["tok_s_std"] == 0.0
    assert rows[2]["metric"] == "ttft" and rows[2]["ttft_ms"] == pytest.approx(long["runs"][0]["ttft_s_mean"] * 1e3)
    assert f"{long['runs'][0]['ttft_s_mean']:.3f} ± 0.000 s (TTFT)" in out
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_configuration_is_a_failed_row_not_a_crash(tmp_path, no_rapl, capsys):
    code = main(["bench", "--model", str(tmp_path / "missing.gguf"), "--workload", "rollout", "--repeats", "1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "failed:" in out and "missing.gguf" in err



@pytest.mark.parametrize("setting", [["-q", "int8"], ["--kv-cache-dtype", "int8"]])
def test_a_peer_without_the_setting_is_not_applicable_not_failed(tmp_path, no_rapl, capsys, setting):
    """`-e pinfer,transformers -q none,int8` is a natural command: transformers' int8 rows say
    n/a (it has no int8 path), and the bench's exit code stays 0."""
    json_path = tmp_path / "bench.json"
    code = main(["bench", "-e", "transformers", "-w", "latency,rollout", "--repeats", "1", *setting,
                 "--json", str(json_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("n/a: the transformers peer runs") == 2 and "failed" not in out
    (config,) = json.loads(json_path.read_text())["configurations"]
    assert all(w["not_applicable"] for w in config["result"]["workloads"])
    assert config["result"]["load_seconds"] is None  # refused before loading anything

def test_transformers_peer_runs_the_workload_as_pinfer_does(smollm2_hf_dir, hf_smollm2):
    """The transformers peer generates exactly max_tokens per prompt (EOS banned), returns a
    logprob per sampled token that is transformers' own log_softmax, and times the batch;
    greedy, its tokens are transformers' generate() tokens (and pinfer's: tests/entrypoints)."""
    import torch

    from pinfer.tools.bench_peers import TransformersRunner, _ChosenLogprobs

    runner = TransformersRunner({"engine": {"model": str(smollm2_hf_dir), "dtype": "float32", "quantization": None},
                                 "threads": None})
    assert runner.describe()["engine"] == "transformers"
    result = runner.run(make_workload("rollout", max_tokens=6, num_prompts=3))
    assert [r.generated_tokens for r in result.requests] == [6, 6, 6]
    # greedy past the point where the answer ends (SmolLM2 says a short sentence): still max_tokens
    assert runner.run(make_workload("latency", max_tokens=160)).requests[0].generated_tokens == 160
    assert all(r.ttft_s > 0 and r.tpot_s > 0 for r in result.requests) and result.seconds > 0

    # The logprob bookkeeping against a forward pass of the finished sequence (greedy, one prompt).
    ids = runner.tokenizer("The capital of France is", return_tensors="pt")
    collect = _ChosenLogprobs()
    with torch.inference_mode():
        out = runner.model.generate(**ids, max_new_tokens=4, do_sample=False, logits_processor=[collect])
        expected = torch.log_softmax(hf_smollm2(out).logits[0, ids["input_ids"].shape[1] - 1 : -1].float(), -1)
    chosen = torch.cat(collect.finish(out), dim=1)[0]
    new = out[0, ids["input_ids"].shape[1]:]
    torch.testing.assert_close(chosen, expected.gather(1, new[:, None])[:, 0], atol=1e-4, rtol=0)


def test_unknown_engine_is_refused_before_any_work():
    args = build_parser().parse_args(["bench", "--engine", "pinfer,vllm"])
    with pytest.raises(Exception, match="unknown engine 'vllm'"):
        expand_configs(args)
