"""`pinfer bench -w serve`: percentiles as numpy computes them, a `pinfer serve` command
that carries the whole engine configuration, and one tiny real server driven by
closed-loop streaming clients whose JSON numbers add up (and a peer without a server
is a "not applicable" row, not a failure)."""

from __future__ import annotations

import json
import random
import signal
from dataclasses import asdict, fields

import numpy as np
import pytest

from pinfer.config import EngineConfig
from pinfer.entrypoints.cli import build_parser, engine_config_from_args, main
from pinfer.tools import energy
from pinfer.tools.bench import expand_configs
from pinfer.tools.bench_report import format_table, summarize
from pinfer.tools.bench_serve import ServedRunResult, StreamedRequest, pinfer_serve_command
from pinfer.tools.bench_worker import percentile, run_record


def test_percentile_is_numpys_linear_interpolation():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(v) for v in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None
    values = [random.Random(0).random() for _ in range(37)]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_a_served_run_reports_percentiles_and_the_servers_cpu():
    requests = [StreamedRequest(60, 4, ttft_s=t, tpot_s=p, sent_s=0.0, finished_s=1.0, itl_s=[p, p, p])
                for t, p in ((0.1, 0.01), (0.2, 0.02), (0.3, 0.03), (0.4, 0.04))]
    result = ServedRunResult(2.0, requests, server_cpu_seconds=3.2, server_peak_rss_bytes=512 * 2**20)
    meter = energy.EnergyMeter()
    with meter:
        pass
    record = run_record(result, meter)
    assert record["tok_s"] == 8.0 and record["ttft_s_p50"] == pytest.approx(0.25)
    assert record["ttft_s_p99"] == pytest.approx(0.397) and record["tpot_s_p99"] == pytest.approx(0.0397)
    assert record["itl_s_p50"] == pytest.approx(0.025)
    assert record["cpu_seconds"] == 3.2 and record["cpu_seconds_per_token"] == pytest.approx(0.2)  # not the client's
    workload = {"workload": "serve", "metric": "total", "concurrency": 2, "runs": [record],
                "peak_rss_bytes": result.server_peak_rss_bytes}
    config = {"model": "m", "dtype": "float32", "quantization": "none", "threads": 2,
              "attention_backend": "paged", "max_num_seqs": 256}
    row = summarize(config, workload)
    assert (row.ttft_p50_ms, row.tpot_p99_ms, row.peak_rss_mib) == pytest.approx((250.0, 39.7, 512.0))
    table = format_table([row], energy=True, rapl=False)
    assert "TTFT p50/p99 ms" in table.splitlines()[0]
    assert "serve (2 clients)" in table and "250 / 397" in table and "8.00 ± 0.00" in table


def test_the_serve_command_carries_the_whole_engine_configuration():
    compile_flag = ["--compile"] if "compile" in {f.name for f in fields(EngineConfig)} else []
    args = build_parser().parse_args(
        ["bench", "-q", "int8", "--dtype", "float32", "--attention-backend", "blocked", "--max-num-seqs", "8",
         "--kv-cache-memory", "64MiB", "--block-size", "32", "--max-model-len", "512", "--no-prefix-caching",
         "--max-num-batched-tokens", "256", "--device", "cpu", *compile_flag])
    (spec,) = expand_configs(args)
    command = pinfer_serve_command(spec["engine"])
    assert command[1:3] == ["-m", "pinfer.serving.cli"] and command[command.index("--port") + 1] == "0"
    served = build_parser().parse_args(["serve", *command[3:]])
    assert asdict(engine_config_from_args(served)) == spec["engine"]
    with pytest.raises(RuntimeError, match="does not pass new_knob"):  # a new engine field is not dropped silently
        pinfer_serve_command({**spec["engine"], "new_knob": True})


@pytest.fixture
def no_rapl(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "POWERCAP_ROOT", tmp_path / "no-powercap")


def test_tiny_serve_bench_streams_every_token_through_a_real_server(tmp_path, no_rapl, capsys):
    json_path = tmp_path / "bench.json"
    code = main(["bench", "-e", "pinfer,transformers", "-w", "serve", "--max-tokens", "4", "--num-prompts", "4",
                 "--concurrency", "2", "--repeats", "1", "--warmup-tokens", "0", "--dtype", "float32",
                 "--kv-cache-memory", "64MiB", "--energy", "--json", str(json_path)])
    out, err = capsys.readouterr()
    assert code == 0, err  # "not applicable" is not a failure
    assert "serve (2 clients)" in out and "n/a: the transformers peer has no server" in out

    pinfer, transformers = json.loads(json_path.read_text())["configurations"]
    result = pinfer["result"]
    assert result["error"] is None and result["load_seconds"] is None  # the worker itself loaded no model
    assert result["describe"]["dtype"] == "float32" and result["describe"]["served_by"] == "pinfer serve"
    (workload,) = result["workloads"]
    # stopped cleanly by SIGTERM, not killed (uvicorn re-raises the signal after its graceful shutdown)
    assert workload["server_exit_code"] in (0, -signal.SIGTERM) and workload["server_start_seconds"] > 0
    (run,) = workload["runs"]
    requests = run["requests"]
    assert [r["generated_tokens"] for r in requests] == [4] * 4 and run["generated_tokens"] == 16  # ignore_eos
    assert all(50 <= r["prompt_tokens"] <= 70 for r in requests)  # the rollout prompts, chat template applied
    assert run["tok_s"] == pytest.approx(16 / run["seconds"])
    for r in requests:
        assert 0 < r["ttft_s"] <= r["finished_s"] - r["sent_s"] <= run["seconds"]
        assert r["tpot_s"] > 0 and len(r["itl_s"]) <= 3
    # closed loop, 2 clients: never more than 2 in flight, and the 3rd and 4th wait for a free client
    events = sorted([(r["sent_s"], 1) for r in requests] + [(r["finished_s"], -1) for r in requests])
    assert max(np.cumsum([e for _, e in events])) == 2
    first_done = min(r["finished_s"] for r in requests[:2])
    assert all(r["sent_s"] >= first_done for r in requests[2:])
    assert run["ttft_s_p50"] <= run["ttft_s_p99"] and run["itl_s_p50"] is not None
    assert run["cpu_seconds"] > 0  # the server's, read from /proc
    assert workload["peak_rss_bytes"] == run["server_peak_rss_bytes"] > 100 * 2**20

    (na,) = transformers["result"]["workloads"]
    assert na["not_applicable"] and "no server" in na["error"]
    rows = json.loads(json_path.read_text())["rows"]
    assert rows[1]["not_applicable"] and rows[0]["ttft_p99_ms"] == pytest.approx(run["ttft_s_p99"] * 1e3)


def test_a_failed_served_run_reports_the_end_of_the_servers_log(monkeypatch, capsys):
    """The server's log lives in a folder that goes with the run: its last line comes with the
    error (one line, for the table), its last lines on stderr."""
    import sys

    from pinfer.tools import bench_worker
    from pinfer.tools.bench_serve import ServerProcess
    from pinfer.tools.workloads import make_workload

    class Runner:  # a server that logged its reason and exited
        def __init__(self, spec, log_path, workload):
            script = "print('loading model'); print('GGML_ASSERT(n_tokens <= n_batch) failed')"
            self.server = ServerProcess([sys.executable, "-c", script], log_path)
            self.server.proc.wait()
            self.server.base_url, self.server.start_seconds = "http://127.0.0.1:1", 0.1  # as if it had started

        def run(self, workload):
            raise ConnectionError("Server disconnected without sending a response.")

        def close(self):
            return self.server.stop()

    monkeypatch.setattr(bench_worker, "start_serve_runner", Runner)
    with pytest.raises(RuntimeError) as error:
        bench_worker.bench_served_workload({"repeats": 1, "warmup_max_tokens": 0}, make_workload("serve"))
    assert str(error.value) == ("ConnectionError: Server disconnected without sending a response.: "
                                "GGML_ASSERT(n_tokens <= n_batch) failed")
    assert "loading model\n    GGML_ASSERT(n_tokens <= n_batch) failed" in capsys.readouterr().err
