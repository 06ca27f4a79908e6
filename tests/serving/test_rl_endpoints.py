"""RL controls over HTTP on a server of their own (they change its state):
/update_weights from safetensors (greedy output then equals a fresh engine on the
new weights; bad input is a 400 and the old weights stay), /pause (streams wait,
without the worker spinning; abort_in_flight ends them with finish_reason
"abort"; new requests queue), /resume, /sleep (503 until /wake_up, output
identical afterwards), /engine_state, the weight_version metric, the API key."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from pinfer import LLM, SamplingParams

PROMPT = "The capital of France is"
MAX_TOKENS = 16  # the greedy reference; long enough to pause a stream in the middle of it
LONG = 400  # requests that must still be running when we pause or sleep


# ---- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def headers(rl_server) -> dict[str, str]:
    return {"Authorization": f"Bearer {rl_server.flag('--api-key')}"}


@pytest.fixture(scope="module")
def rl(rl_server, headers) -> httpx.Client:
    with httpx.Client(base_url=rl_server.base_url, headers=headers, timeout=120) as c:
        yield c


def completion_body(max_tokens: int = MAX_TOKENS, **fields: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **fields}


def greedy(rl: httpx.Client, max_tokens: int = MAX_TOKENS) -> list[int]:
    response = rl.post("/v1/completions", json=completion_body(max_tokens))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def post_ok(rl: httpx.Client, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = rl.post(path, json=body) if body is not None else rl.post(path)
    assert response.status_code == 200, f"{path}: {response.text}"
    return response.json()


def state(rl: httpx.Client) -> dict[str, Any]:
    response = rl.get("/engine_state")
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error"), error
    for word in words:
        assert word in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class Stream(threading.Thread):
    """A streaming completion read on a thread: its chunks (and when they came) as they arrive."""

    def __init__(self, base_url: str, headers: dict[str, str], body: dict[str, Any]):
        super().__init__(daemon=True)
        self.url, self.headers, self.body = f"{base_url}/v1/completions", headers, {**body, "stream": True}
        self.choices: list[dict[str, Any]] = []
        self.done = False  # [DONE] received
        self.status: int | None = None
        self._close = threading.Event()
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, headers=self.headers, timeout=120) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if self._close.is_set():
                    return  # drop the connection: the server aborts the request
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done = True
                    return
                self.choices.extend(json.loads(line[len("data: "):])["choices"])

    @property
    def token_ids(self) -> list[int]:
        return [t for c in list(self.choices) for t in c.get("token_ids") or []]

    @property
    def finish_reason(self) -> str | None:
        return self.choices[-1]["finish_reason"] if self.choices else None

    def close(self) -> None:
        self._close.set()
        self.join(30)


class Completion(threading.Thread):
    """A non-streaming completion sent on a thread."""

    def __init__(self, rl: httpx.Client, body: dict[str, Any]):
        super().__init__(daemon=True)
        self.rl, self.body = rl, body
        self.response: httpx.Response | None = None
        self.start()

    def run(self) -> None:
        self.response = self.rl.post("/v1/completions", json=self.body)

    def choice(self) -> dict[str, Any]:
        self.join(60)
        assert self.response is not None and self.response.status_code == 200, self.response
        return self.response.json()["choices"][0]


def sleep_level_2_and_wake_up(rl: httpx.Client, rl_server, baseline: list[int]) -> None:
    """Sleep level 2 drops the weights; wake_up re-reads them from the checkpoint the server started with,
    so greedy output is the baseline again (whatever /update_weights wrote before)."""
    rss = rss_mib(rl_server.proc.pid)
    assert post_ok(rl, "/sleep", {"level": 2}) == {"sleeping": True, "level": 2}
    print(f"/sleep level 2: RSS {rss:.0f} -> {rss_mib(rl_server.proc.pid):.0f} MiB")
    assert_error(rl.post("/v1/completions", json=completion_body()), 503, "asleep")
    start = time.perf_counter()
    assert post_ok(rl, "/wake_up") == {"sleeping": False}
    print(f"/wake_up reloading the weights: {time.perf_counter() - start:.2f} s")
    assert greedy(rl) == baseline


@pytest.fixture(scope="module")
def baseline(rl) -> list[int]:
    """Greedy tokens of PROMPT on the server's own (checkpoint) weights, nothing else running."""
    return greedy(rl)


@pytest.fixture(scope="module")
def perturbed_folder(smollm2_hf_dir: Path, tmp_path_factory) -> Path:
    """A Hugging Face folder like smollm2_hf_dir, with every matrix perturbed (as a trainer's step would)."""
    folder = tmp_path_factory.mktemp("perturbed")
    for f in smollm2_hf_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    gen = torch.Generator().manual_seed(0)
    weights = load_file(str(smollm2_hf_dir / "model.safetensors"))
    weights = {name: (t + 0.02 * t.std() * torch.randn(t.shape, generator=gen)) if t.dim() == 2 else t
               for name, t in weights.items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def perturbed_expected(perturbed_folder: Path) -> list[int]:
    """What a fresh engine built on the perturbed folder generates."""
    llm = LLM(str(perturbed_folder), dtype="float32")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    token_ids = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    del llm
    gc.collect()
    return token_ids


# ---- /update_weights ------------------------------------------------------------------------


def test_update_weights_equals_a_fresh_engine_on_the_new_weights(rl, rl_server, headers, baseline,
                                                                perturbed_folder, perturbed_expected,
                                                                read_metrics):
    version = state(rl)["weight_version"]
    try:
        result = post_ok(rl, "/update_weights", {"path": str(perturbed_folder)})
        print(f"/update_weights (folder, SmolLM2 float32): {result}")
        assert result["weight_version"] == version + 1
        assert result["num_tensors"] > 0 and result["seconds"] > 0
        assert perturbed_expected != baseline
        assert greedy(rl) == perturbed_expected
        assert state(rl)["weight_version"] == version + 1
        assert read_metrics(rl_server.base_url, headers)["pinfer:weight_version"] == version + 1

        # one file works as well as its folder; without the prefix-cache reset too
        result = post_ok(rl, "/update_weights", {"path": str(perturbed_folder / "model.safetensors"),
                                                 "reset_prefix_cache": False})
        assert result["weight_version"] == version + 2
    finally:
        sleep_level_2_and_wake_up(rl, rl_server, baseline)


def _save(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / name))
    return folder / name


def test_update_weights_rejects_bad_input_and_keeps_serving_the_old_weights(rl, baseline, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    good = _save(tmp_path / "trunc", "good.safetensors", {"model.norm.weight": torch.ones(576)})
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-100])
    # a valid tensor next to a bad one: nothing may be written (the zeroed norm would change the output)
    wrong_shape = _save(tmp_path / "shape", "model.safetensors", {
        "model.norm.weight": torch.zeros(576), "model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    unknown = _save(tmp_path / "names", "model.safetensors", {"model.norm.weight": torch.zeros(576),
                                                              "model.vision_tower.weight": torch.zeros(4)})
    cases = [  # (path, words the message must contain)
        (tmp_path / "missing", ["does not exist"]),
        (tmp_path / "empty", ["no *.safetensors"]),
        (tmp_path / "config.json", ["neither a .safetensors file"]),
        (tmp_path / "corrupt.safetensors", ["corrupt.safetensors", "corrupt"]),
        (tmp_path / "truncated.safetensors", ["truncated.safetensors", "corrupt or truncated"]),
        (wrong_shape.parent, ["q_proj", "shape (3, 3)"]),
        (unknown, ["model.vision_tower.weight"]),
    ]
    version = state(rl)["weight_version"]
    for path, words in cases:
        assert_error(rl.post("/update_weights", json={"path": str(path)}), 400, *words, param="path")
    assert_error(rl.post("/update_weights", json={}), 400, param="path")
    assert_error(rl.post("/update_weights", json={"path": str(good), "reset_cache": True}), 400, "reset_cache")
    assert state(rl)["weight_version"] == version
    assert greedy(rl) == baseline


# ---- /pause, /resume --------------------------------------------------------------------------


def test_pause_holds_a_stream_without_spinning_and_resume_finishes_it(rl, rl_server, headers, baseline,
                                                                     read_metrics):
    stream = Stream(rl_server.base_url, headers, completion_body())
    try:
        wait_for(lambda: len(stream.token_ids) >= 2, what="the first tokens")
        assert post_ok(rl, "/pause") == {"paused": True}
        time.sleep(0.2)  # outputs of the last step before the pause may still be on their way
        held = len(stream.token_ids)
        assert 2 <= held < MAX_TOKENS and not stream.done
        s = state(rl)
        assert s["paused"] and not s["sleeping"] and s["num_running"] == 1
        assert read_metrics(rl_server.base_url, headers)["pinfer:engine_paused"] == 1

        cpu_before = cpu_seconds(rl_server.proc.pid)
        time.sleep(1.0)
        cpu = cpu_seconds(rl_server.proc.pid) - cpu_before
        print(f"server CPU time over 1 s while paused with a request in flight: {cpu:.3f} s")
        assert cpu < 0.3, "the engine worker spins while paused"
        assert len(stream.token_ids) == held and not stream.done

        assert post_ok(rl, "/resume") == {"paused": False}
        stream.join(60)
        assert stream.done and stream.finish_reason == "length"
        assert stream.token_ids == baseline
        assert not state(rl)["paused"]
    finally:
        rl.post("/resume")
        stream.close()


def test_pause_with_abort_in_flight_returns_partial_outputs(rl, rl_server, headers, baseline, wait_until_idle):
    stream = Stream(rl_server.base_url, headers, completion_body(LONG))
    plain = Completion(rl, completion_body(LONG))
    try:
        wait_for(lambda: len(stream.token_ids) >= 2 and state(rl)["num_running"] == 2, what="both to run")
        assert post_ok(rl, "/pause", {"abort_in_flight": True}) == {"paused": True}
        stream.join(30)
        assert stream.done and stream.finish_reason == "abort"
        assert 2 <= len(stream.token_ids) < LONG
        assert stream.token_ids[:MAX_TOKENS] == baseline[:len(stream.token_ids)]
        choice = plain.choice()
        assert choice["finish_reason"] == "abort"
        assert 1 <= len(choice["token_ids"]) < LONG
        assert state(rl)["paused"]
    finally:
        rl.post("/resume")
        stream.close()
    wait_until_idle(rl_server.base_url, headers=headers)  # every KV block freed


def test_requests_sent_while_paused_run_after_resume(rl, baseline):
    post_ok(rl, "/pause")
    try:
        waiting = [Completion(rl, completion_body()) for _ in range(2)]
        wait_for(lambda: state(rl)["num_waiting"] == 2, what="the requests to be queued")
        time.sleep(0.5)
        assert all(c.is_alive() for c in waiting)  # accepted, not answered
        assert state(rl)["num_running"] == 0
    finally:
        post_ok(rl, "/resume")
    assert [c.choice()["token_ids"] for c in waiting] == [baseline, baseline]


# ---- /sleep, /wake_up ----------------------------------------------------------------------------


def test_sleep_refuses_while_busy_answers_503_and_wake_up_restores_service(rl, rl_server, headers, baseline,
                                                                           wait_until_idle):
    assert_error(rl.post("/sleep", json={"level": 3}), 400, "level", param="level")
    stream = Stream(rl_server.base_url, headers, completion_body(LONG))
    try:
        wait_for(lambda: len(stream.token_ids) >= 1, what="the first token")
        assert_error(rl.post("/sleep"), 409, "in flight")
        assert not state(rl)["sleeping"]
    finally:
        stream.close()
    wait_until_idle(rl_server.base_url, headers=headers)

    rss = rss_mib(rl_server.proc.pid)
    assert post_ok(rl, "/sleep") == {"sleeping": True, "level": 1}
    print(f"/sleep level 1: RSS {rss:.0f} -> {rss_mib(rl_server.proc.pid):.0f} MiB")
    try:
        assert state(rl)["sleeping"] and state(rl)["sleep_level"] == 1
        assert_error(rl.post("/v1/completions", json=completion_body()), 503, "asleep", "/wake_up")
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert_error(rl.post("/v1/chat/completions", json=chat), 503, "asleep")
        assert_error(rl.post("/v1/completions", json=completion_body(stream=True)), 503, "asleep")
    finally:
        assert post_ok(rl, "/wake_up") == {"sleeping": False}
    assert not state(rl)["sleeping"]
    assert greedy(rl) == baseline


def test_sleep_level_2_then_wake_up_without_weights_waits_for_update_weights(rl, rl_server, baseline,
                                                                            perturbed_folder,
                                                                            perturbed_expected):
    assert post_ok(rl, "/sleep", {"level": 2}) == {"sleeping": True, "level": 2}
    try:
        assert_error(rl.post("/v1/completions", json=completion_body()), 503, "asleep")
        assert_error(rl.post("/update_weights", json={"path": str(perturbed_folder)}), 409, "/wake_up")
        assert post_ok(rl, "/wake_up", {"reload_weights": False}) == {"sleeping": False}
        assert_error(rl.post("/v1/completions", json=completion_body()), 503, "/update_weights")
        post_ok(rl, "/update_weights", {"path": str(perturbed_folder)})
        assert greedy(rl) == perturbed_expected
    finally:
        sleep_level_2_and_wake_up(rl, rl_server, baseline)  # and identical output once woken up


# ---- the rest ---------------------------------------------------------------------------------


def test_rl_endpoints_need_the_api_key(rl_server):
    for method, path in [("POST", "/update_weights"), ("POST", "/pause"), ("POST", "/resume"),
                         ("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/engine_state")]:
        response = httpx.request(method, f"{rl_server.base_url}{path}", json={}, timeout=10)
        assert response.status_code == 401, (path, response.text)


def test_engine_state_and_metrics_when_idle(rl, rl_server, headers, read_metrics, wait_until_idle):
    wait_until_idle(rl_server.base_url, headers=headers)
    s = state(rl)
    assert s == {"paused": False, "sleeping": False, "sleep_level": None, "weight_version": s["weight_version"],
                 "num_running": 0, "num_waiting": 0, "num_in_flight": 0}
    m = read_metrics(rl_server.base_url, headers)
    assert m["pinfer:weight_version"] == s["weight_version"]
    assert m["pinfer:engine_paused"] == 0 and m["pinfer:engine_sleeping"] == 0
