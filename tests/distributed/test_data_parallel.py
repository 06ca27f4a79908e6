"""Data-parallel replicas on Ray: DP=2 returns what DP=1 returns (tokens, text, logprobs), in input
order, offline and through the engine interface the server drives; `pinfer serve -dp 2` answers the
openai client with DP=1's greedy output; a killed replica fails loudly and quickly instead of
hanging (offline: ReplicaDiedError naming it; serving: its requests end with that error, the other
replica's go on); bad sizes are refused.

Ray runs for real (a local Ray instance with actors in worker processes; Ray's old "local mode" is
deprecated), 2 CPUs and a small object store, one session for the whole module."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pinfer import LLM, SamplingParams
from pinfer.config import EngineConfig
from pinfer.errors import PinferError

ray = pytest.importorskip("ray")

from pinfer.distributed.data_parallel import ReplicaDiedError, balanced_shares  # noqa: E402  (needs ray)
from pinfer.entrypoints.llm import run_to_completion  # noqa: E402

ENGINE = dict(dtype="float32", kv_cache_memory="64MiB")
LONG = Path(__file__).resolve().parent.parent.joinpath("data", "pride_and_prejudice_ch1.txt").read_text()[:500]
PROMPTS = ["Hi", "The capital of France is", LONG, [1, 9690, 198, 2683, 314], "1, 2, 3,", "Once upon a time"]
CALL_TIMEOUT_S = 60  # a dead replica must be reported well within this


def mixed_params(seed: int | None) -> list[SamplingParams]:
    """Greedy, seeded sampling with n=2, and (seed=None) unseeded sampling, with logprobs."""
    sampled = dict(temperature=0.8, top_p=0.95, logprobs=2)
    return [
        SamplingParams(max_tokens=12, temperature=0, logprobs=2, seed=seed),
        SamplingParams(max_tokens=10, n=2, seed=7, **sampled),
        SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=1, seed=seed),
        SamplingParams(max_tokens=14, seed=seed, **sampled),
        SamplingParams(max_tokens=6, n=3, seed=3, **sampled),
        SamplingParams(max_tokens=9, seed=seed, **sampled),
    ]


def assert_same(got, expected) -> None:
    """Same tokens, text, ranks and finish; logprobs within float noise. Outside deterministic mode a
    batch of other sizes rounds the logits differently (observed <= 1.6e-5 here); with deterministic=True
    DP=2 and DP=1 agree bitwise (checked by hand: too slow for the suite)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g.prompt, g.prompt_token_ids, g.error, g.finished) == \
            (e.prompt, e.prompt_token_ids, e.error, e.finished)
        assert _tokens(g.prompt_logprobs) == _tokens(e.prompt_logprobs)
        assert _values(g.prompt_logprobs) == pytest.approx(_values(e.prompt_logprobs), abs=1e-4)
        for gc, ec in zip(g.outputs, e.outputs, strict=True):
            assert (gc.index, gc.text, gc.token_ids, gc.finish_reason, gc.stop_reason) == \
                (ec.index, ec.text, ec.token_ids, ec.finish_reason, ec.stop_reason)
            assert _tokens(gc.logprobs) == _tokens(ec.logprobs)
            assert _values(gc.logprobs) == pytest.approx(_values(ec.logprobs), abs=1e-4)
            assert (gc.token_logprobs is None) == (ec.token_logprobs is None)
            assert (gc.token_logprobs or []) == pytest.approx(ec.token_logprobs or [], abs=1e-4)


def _tokens(entries) -> list | None:
    return None if entries is None else [None if e is None else [(t, lp.rank, lp.decoded_token) for t, lp in e.items()]
                                         for e in entries]


def _values(entries) -> list[float]:
    return [lp.logprob for e in entries or [] if e is not None for lp in e.values()]


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dp1(smollm2_gguf):
    return LLM(str(smollm2_gguf), **ENGINE)


@pytest.fixture(scope="module")
def dp2(smollm2_gguf, ray_session):
    llm = LLM(str(smollm2_gguf), data_parallel_size=2, **ENGINE)
    yield llm
    llm.engine.shutdown()


def within(seconds: float, fn, *args, **kwargs):
    """fn(*args) on a thread; fail (instead of hanging the suite) if it takes longer than `seconds`."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args, **kwargs).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def test_bad_data_parallel_size_is_refused(smollm2_gguf):
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(PinferError, match="data_parallel_size must be an integer >= 1"):
            EngineConfig(model="x", data_parallel_size=bad)
    with pytest.raises(PinferError, match="data_parallel_size"):
        LLM(str(smollm2_gguf), data_parallel_size=0, **ENGINE)


def test_balanced_shares_are_contiguous_and_even():
    assert balanced_shares([1] * 10, 2) == [range(0, 5), range(5, 10)]
    assert balanced_shares([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 11)]
    assert balanced_shares([1, 1], 3) == [range(0, 1), range(1, 1), range(1, 2)]  # an empty share: no call


def test_dp2_generate_equals_dp1_in_input_order(dp1, dp2):
    # unseeded sampling too: the driver draws every request's seed as one engine would
    expected = dp1.generate(PROMPTS, mixed_params(seed=None), use_tqdm=False)
    got = dp2.generate(PROMPTS, mixed_params(seed=None), use_tqdm=False)
    assert [o.request_id for o in got] == [o.request_id for o in expected]
    assert_same(got, expected)
    assert [r.info.num_threads for r in dp2.engine.replicas] == [1, 1]
    assert len({r.info.pid for r in dp2.engine.replicas} | {os.getpid()}) == 3  # two worker processes


def test_bad_request_fails_before_any_work(dp2):
    before = dp2.engine.stats().num_prompt_tokens
    with pytest.raises(PinferError, match="exceeds the model's context length"):
        dp2.generate(["Hi", "Hello"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=10**6)])
    assert dp2.engine.stats().num_prompt_tokens == before


def test_engine_interface_routes_to_the_least_loaded_and_merges(dp1, dp2):
    """What AsyncEngine does: add_request, step() until done, abort_request, stats()."""
    engine = dp2.engine
    params = mixed_params(seed=11)
    ids = [engine.add_request(p, sp, request_id=f"req-{i}") for i, (p, sp) in enumerate(zip(PROMPTS, params))]
    assert [engine._owned[r].replica.index for r in ids] == [0, 1, 0, 1, 0, 1]
    assert engine.has_unfinished_requests()
    got = within(CALL_TIMEOUT_S, run_to_completion, engine, ids, use_tqdm=False)
    expected = dp1.generate(PROMPTS, params, use_tqdm=False)
    assert [o.request_id for o in got] == ids
    assert_same(got, expected)

    rid = engine.add_request("Tell me a long story.", SamplingParams(max_tokens=200, seed=1))
    engine.step()
    aborted = engine.abort_request(rid)
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_blocks == sum(r.state.stats.num_blocks for r in engine.replicas)
    assert stats.num_generated_tokens == sum(r.state.stats.num_generated_tokens for r in engine.replicas) > 0


def test_killed_replica_fails_loudly_instead_of_hanging(dp1, dp2):
    engine = dp2.engine
    # serving: one request on each replica, then replica 1 is SIGKILLed mid-generation
    long = SamplingParams(max_tokens=24, temperature=0, seed=0, ignore_eos=True)
    on_0 = engine.add_request(PROMPTS[1], long)
    on_1 = engine.add_request(PROMPTS[4], long)
    assert (engine._owned[on_0].replica.index, engine._owned[on_1].replica.index) == (0, 1)
    engine.step()
    os.kill(engine.replicas[1].info.pid, signal.SIGKILL)
    started = time.monotonic()
    outputs = within(CALL_TIMEOUT_S, run_to_completion, engine, [on_0, on_1], use_tqdm=False)
    assert time.monotonic() - started < CALL_TIMEOUT_S
    assert outputs[1].finished and outputs[1].outputs[0].finish_reason == "error"
    assert re.match(r"data-parallel replica 1 \(pid \d+ on [\d.]+\) died: ", outputs[1].error)
    expected = dp1.generate([PROMPTS[1]], long, use_tqdm=False)[0]
    assert_same(outputs[:1], [expected])  # the survivor went on
    assert [r.alive for r in engine.replicas] == [True, False]

    # offline: new work runs on the survivor; when it dies too, generate raises naming it
    greedy = SamplingParams(max_tokens=6, temperature=0, seed=0)
    assert_same(dp2.generate(PROMPTS[:2], greedy, use_tqdm=False), dp1.generate(PROMPTS[:2], greedy, use_tqdm=False))
    os.kill(engine.replicas[0].info.pid, signal.SIGKILL)
    with pytest.raises(ReplicaDiedError, match=r"data-parallel replica 0 \(pid \d+ on [\d.]+\) died: "):
        within(CALL_TIMEOUT_S, dp2.generate, PROMPTS, greedy, use_tqdm=False)
    with pytest.raises(ReplicaDiedError, match="every data-parallel replica died"):
        engine.add_request("Hi", greedy)


@pytest.fixture(scope="module", autouse=True)
def dp2_server(request, tmp_path_factory):
    """`pinfer serve -dp 2`, started with the module when its test is selected, so that its start-up
    (~20 s: Ray, two model loads) overlaps the other tests; yields (process, log path)."""
    if not any("dp2_server" in item.fixturenames and item.name.startswith("test_pinfer_serve")
               for item in request.session.items):
        yield None
        return
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w") as log:
        # RAY_ADDRESS unset: the server starts its own private Ray instance
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "pinfer.entrypoints.cli", "serve", "--model", "smollm2-135m", "--dtype", "float32",
             "--kv-cache-memory", "64MiB", "-dp", "2", "--host", "127.0.0.1", "--port", "0", "--no-access-log"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    yield proc, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_pinfer_serve_dp2_answers_the_openai_client(dp1, dp2_server):
    openai = pytest.importorskip("openai")
    proc, log_path = dp2_server
    try:
        base_url = _wait_for_server(proc, log_path)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        params = SamplingParams(max_tokens=16, temperature=0)
        prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,", "Hi"]
        expected = dp1.generate(prompts, params, use_tqdm=False)
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: both replicas busy
            responses = list(pool.map(lambda p: client.completions.create(
                model="smollm2-135m", prompt=p, max_tokens=16, temperature=0,
                extra_body={"return_token_ids": True}), prompts))
        for response, want in zip(responses, expected):
            assert response.choices[0].text == want.outputs[0].text
            assert response.choices[0].model_extra["token_ids"] == want.outputs[0].token_ids
        chat = client.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "Hi!"}])
        assert chat.choices[0].message.content == dp1.chat([{"role": "user", "content": "Hi!"}],
                                                           SamplingParams(max_tokens=8, temperature=0),
                                                           use_tqdm=False)[0].outputs[0].text
        assert "data parallel: 2 replicas" in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # 15: Ray's SIGTERM handler exits with the signal number once uvicorn has shut down cleanly
    assert proc.returncode in (0, 15, -signal.SIGTERM), log_path.read_text()[-3000:]


def _wait_for_server(proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> str:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log_path.read_text())
        if match:
            try:
                if httpx.get(f"{match.group(1)}/health", timeout=2).status_code == 200:
                    return match.group(1)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout} s:\n{log_path.read_text()[-3000:]}")
