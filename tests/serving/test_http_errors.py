"""Bad requests get OpenAI-shaped errors with the right status and `param`, and
never reach the engine; 401 without the API key; 503 + Retry-After when the
queue is full; an engine failure fails only the requests it hit (500) and the
server keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from pinfer.serving.api_server import build_app

VOCAB_SIZE = 49152  # SmolLM2
CONTEXT = 8192

BAD_COMPLETIONS = [  # (fields over a valid body, the param the 400 must name)
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 50}, "logprobs"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [VOCAB_SIZE]}, "prompt"),
    ({"prompt": [[1, 2], [-1]]}, "prompt"),
    ({"suffix": "tail"}, "suffix"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    # wrong types: 400 naming the field, not FastAPI's 422
    ({"temperature": "hot"}, "temperature"),
    ({"n": "two"}, "n"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"stop": 5}, "stop"),
    ({"seed": "abc"}, "seed"),
    ({"stream": "yes please"}, "stream"),
]

BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs: true
    ({"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
]


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def engine_counters(read_metrics, base_url: str) -> tuple[float, float]:
    m = read_metrics(base_url)
    return m["pinfer:prompt_tokens_total"], m["pinfer:generation_tokens_total"]


def test_invalid_requests_are_400_naming_the_param_and_never_reach_the_engine(http, server, model_name,
                                                                              read_metrics, wait_until_idle):
    wait_until_idle(server.base_url)
    before = engine_counters(read_metrics, server.base_url)
    failures = []
    for path, base, cases in [
        ("/v1/completions", {"model": model_name, "prompt": "Hello", "max_tokens": 4}, BAD_COMPLETIONS),
        ("/v1/chat/completions", {"model": model_name, "messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 4}, BAD_CHAT),
    ]:
        for fields, param in cases:
            response = http.post(path, json={**base, **fields})
            try:
                error = assert_error(response, 400, param)
                assert error["type"] == "invalid_request_error"
            except (AssertionError, ValueError, KeyError) as exc:
                failures.append(f"{path} {fields}: {response.status_code} {response.text} ({exc})")
    assert not failures, "\n".join(failures)
    assert engine_counters(read_metrics, server.base_url) == before  # no token of them was processed
    wait_until_idle(server.base_url, timeout=1)


@pytest.mark.parametrize("content, content_type", [
    (b'{"prompt": "x",', "application/json"),
    (b"[1, 2]", "application/json"),
    (b"", "application/json"),
    (b"prompt=x", "application/x-www-form-urlencoded"),
], ids=["truncated", "array", "empty", "form"])
def test_malformed_bodies_are_400(http, content, content_type):
    assert_error(http.post("/v1/completions", content=content, headers={"Content-Type": content_type}), 400)


def test_prompt_beyond_the_context_is_400_saying_so(http, model_name):
    error = assert_error(http.post("/v1/completions", json={"model": model_name, "prompt": [1] * CONTEXT}), 400,
                         "prompt", "context_length_exceeded")
    assert "context length" in error["message"]
    error = assert_error(http.post("/v1/completions", json={"model": model_name, "prompt": [1] * 8000,
                                                            "max_tokens": 500}), 400, code="context_length_exceeded")
    assert "8000" in error["message"] and "500" in error["message"] and str(CONTEXT) in error["message"]
    long_chat = [{"role": "user", "content": "hello " * CONTEXT}]
    assert_error(http.post("/v1/chat/completions", json={"model": model_name, "messages": long_chat}), 400,
                 "messages", "context_length_exceeded")


def test_unknown_model_route_and_method(http):
    for path, body in [("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
        error = assert_error(http.post(path, json={"model": "gpt-4", **body}), 404, "model", "model_not_found")
        assert "gpt-4" in error["message"]
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_openai_client_raises_its_own_error_types(client, model_name):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="Hi", temperature=-1)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])


# ---- a second server: API key, and a queue of one ----------------------------------------------

def test_api_key_is_required_everywhere_but_health(small_server):
    url = small_server.base_url
    api_key = small_server.flag("--api-key")
    AUTH = {"Authorization": f"Bearer {api_key}"}
    body = {"prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": api_key}):
        error = assert_error(httpx.post(f"{url}/v1/completions", json=body, headers=headers), 401,
                             code="invalid_api_key")
        assert "API key" in error["message"]
    for path in ("/v1/models", "/metrics"):
        assert_error(httpx.get(f"{url}{path}"), 401)
        assert httpx.get(f"{url}{path}", headers=AUTH).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="smollm2-135m", prompt="Hi", max_tokens=2)
    ok = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0).completions.create(
        model="smollm2-135m", prompt="Hi", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_full_queue_answers_503_with_retry_after(small_server, wait_until_idle):
    url = small_server.base_url
    AUTH = {"Authorization": f"Bearer {small_server.flag('--api-key')}"}
    assert small_server.flag("--max-waiting") == "1" and small_server.flag("--max-num-seqs") == "1"
    wait_until_idle(url, headers=AUTH)
    body = {"prompt": "Count slowly:", "max_tokens": 16, "ignore_eos": True, "temperature": 0}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(4)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, code="server_overloaded")
            assert int(r.headers["Retry-After"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 16
    wait_until_idle(url, headers=AUTH)
    assert httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=120).status_code == 200


# ---- engine failures (faults injected into the real engine, served in this process) ------------------


class FlakyEngine:
    """The real engine with faults on demand: step() raising, or one request failing with
    RequestOutput.error (the engine's per-request failure report)."""

    POISON = 13  # a request whose prompt holds this token id fails

    def __init__(self, engine):
        self._engine = engine
        self.failing_steps = 0
        self.failing_stats = False

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stats(self):
        if self.failing_stats:
            raise RuntimeError("injected bug in the serving loop")
        return self._engine.stats()

    def step(self):
        if self.failing_steps:
            self.failing_steps -= 1
            raise RuntimeError("injected model failure")
        outputs = self._engine.step()
        for i, output in enumerate(outputs):
            if self.POISON in output.prompt_token_ids and not output.finished:
                failed = self._engine.abort_request(output.request_id)
                failed.error = "injected per-request failure"
                for completion in failed.outputs:
                    completion.finish_reason = "error"
                outputs[i] = failed
        return outputs


@pytest.fixture(scope="module")
def flaky(smollm2_llm, serve_app_in_thread):
    engine = FlakyEngine(smollm2_llm.engine)
    server = serve_app_in_thread(build_app(engine))
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        yield engine, server, http


def _complete(http, prompt, stream=False, max_tokens=8):
    return http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                              "stream": stream})


def test_failing_step_fails_the_requests_in_flight_then_serving_goes_on(flaky, wait_until_idle):
    engine, server, http = flaky
    expected = _complete(http, "The capital of France is").json()["choices"][0]["text"]
    engine.failing_steps = 1
    error = assert_error(_complete(http, "The capital of France is"), 500, code="engine_error")
    assert "injected model failure" in error["message"]
    wait_until_idle(server.base_url, timeout=5)  # the failed request's blocks were freed
    engine.failing_steps = 1
    events = _complete(http, "The capital of France is", stream=True).text.split("\n\n")
    assert '"code": "engine_error"' in events[-3] and events[-2] == "data: [DONE]"
    assert _complete(http, "The capital of France is").json()["choices"][0]["text"] == expected
    wait_until_idle(server.base_url, timeout=5)


def test_failed_request_does_not_disturb_the_others(flaky, wait_until_idle):
    engine, server, http = flaky
    healthy_prompt = "Water boils at"
    expected = _complete(http, healthy_prompt, max_tokens=16).json()["choices"][0]["text"]
    poisoned = [1, 504, FlakyEngine.POISON, 3575, 282]

    async def together():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as c:
            body = {"max_tokens": 16, "temperature": 0}
            return await asyncio.gather(c.post("/v1/completions", json={**body, "prompt": poisoned}),
                                        c.post("/v1/completions", json={**body, "prompt": healthy_prompt}))

    bad, good = asyncio.run(together())
    error = assert_error(bad, 500, code="engine_error")
    assert "injected per-request failure" in error["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == expected
    wait_until_idle(server.base_url, timeout=5)


def test_crashed_worker_fails_requests_instead_of_hanging_them(smollm2_llm, serve_app_in_thread):
    engine = FlakyEngine(smollm2_llm.engine)
    server = serve_app_in_thread(build_app(engine))  # its own worker, so the other tests' server lives on
    engine.failing_stats = True  # the worker's loop itself raises, after taking the request
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        error = assert_error(_complete(http, "Hello"), 500, code="engine_error")
        assert "crashed" in error["message"]
        assert http.get("/health").status_code == 503
        assert_error(_complete(http, "Hello"), 500, code="engine_error")
    engine.failing_stats = False
    assert smollm2_llm.engine.stats().kv_cache_usage == 0 and not smollm2_llm.engine.has_unfinished_requests()
