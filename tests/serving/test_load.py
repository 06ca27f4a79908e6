"""The server under concurrent load, client disconnects and SIGTERM: every
finished request gets exactly the tokens it gets alone (greedy), disconnected
ones are aborted and their KV blocks freed, nothing leaks, shutdown is bounded."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai

from pinfer import SamplingParams
from smollm2_prompts import USER_MESSAGES

NUM_CLIENTS = 64
MAX_TOKENS = [8, 12, 16, 20, 24, 28, 32, 32]
# eight chat prompts from 3 to ~300 words, one max_tokens each
MESSAGES = USER_MESSAGES[:7] + [" ".join(USER_MESSAGES) * 2]


def test_concurrent_streams_match_requests_sent_alone(server, model_name, smollm2_llm, wait_until_idle,
                                                      read_metrics):
    # each request alone, in-process (test_openai_client shows HTTP alone gives the same tokens)
    alone = []
    for messages, max_tokens in zip(MESSAGES, MAX_TOKENS):
        output = smollm2_llm.chat([{"role": "user", "content": messages}],
                                  SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)[0]
        alone.append((output.outputs[0].text, output.outputs[0].token_ids))

    def request(i: int) -> dict:
        return dict(model=model_name, messages=[{"role": "user", "content": MESSAGES[i % 8]}],
                    max_tokens=MAX_TOKENS[i % 8], temperature=0, extra_body={"return_token_ids": True})

    before = wait_until_idle(server.base_url)

    async def one_client(aclient: openai.AsyncOpenAI, i: int, disconnect: bool) -> dict:
        start = time.perf_counter()
        result = {"i": i, "text": "", "token_ids": [], "ttft": None, "finish_reason": None}
        stream = await aclient.chat.completions.create(**request(i), stream=True)
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.model_extra.get("token_ids") and result["ttft"] is None:
                result["ttft"] = time.perf_counter() - start
            result["text"] += choice.delta.content or ""
            result["token_ids"] += choice.model_extra.get("token_ids") or []
            result["finish_reason"] = choice.finish_reason or result["finish_reason"]
            if disconnect and len(result["token_ids"]) >= 2:
                await stream.close()  # walk away mid-stream
                break
        return result

    async def run_all() -> tuple[list[dict], float]:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            start = time.perf_counter()
            # every 9th client (so each time another prompt) disconnects after two tokens
            results = await asyncio.wait_for(asyncio.gather(
                *(one_client(aclient, i, disconnect=i % 9 == 4) for i in range(NUM_CLIENTS))), timeout=150)
            return results, time.perf_counter() - start

    results, elapsed = asyncio.run(run_all())
    completed = [r for r in results if r["i"] % 9 != 4]
    assert len(completed) == NUM_CLIENTS - 7
    for r in completed:
        text, token_ids = alone[r["i"] % 8]
        assert r["token_ids"] == token_ids, f"client {r['i']} diverged from the same request sent alone"
        assert r["text"] == text
        assert r["finish_reason"] in ("stop", "length")

    after = wait_until_idle(server.base_url, timeout=10)  # running 0, waiting 0, KV usage 0, all blocks free
    assert after['pinfer:request_success_total{finished_reason="abort"}'] \
        - before.get('pinfer:request_success_total{finished_reason="abort"}', 0) == 7
    generated = after["pinfer:generation_tokens_total"] - before["pinfer:generation_tokens_total"]
    ttfts = sorted(r["ttft"] for r in results)
    print(f"\n{NUM_CLIENTS} streaming clients: {elapsed:.1f} s, {generated:.0f} tokens generated, "
          f"{generated / elapsed:.1f} tok/s; TTFT median {ttfts[len(ttfts) // 2]:.2f} s, max {ttfts[-1]:.2f} s")


def test_disconnect_aborts_the_request_and_frees_its_blocks(http, server, read_metrics, wait_until_idle):
    wait_until_idle(server.base_url)
    body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()  # (leaving a `for` over it early would close the connection already)
        chunks = 0
        while chunks < 3:
            chunks += next(lines).startswith("data: {")
        busy = read_metrics(server.base_url)
        assert busy["pinfer:num_requests_running"] == 1 and busy["pinfer:kv_cache_usage_perc"] > 0
        assert busy["pinfer:num_requests_in_flight"] == 1
    idle = wait_until_idle(server.base_url, timeout=5)
    assert idle["pinfer:generation_tokens_total"] - busy["pinfer:generation_tokens_total"] < 200  # stopped early

    # a non-streaming client that gives up is aborted too
    try:
        http.post("/v1/completions", json={**body, "stream": False}, timeout=1.5)
        raise AssertionError("a 4000-token request finished within 1.5 s")
    except httpx.ReadTimeout:
        pass
    wait_until_idle(server.base_url, timeout=5)


def _read_events(url: str, body: dict, events: list, started: threading.Event) -> None:
    """Collect a stream's SSE payloads (the data of each event) into `events`."""
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    started.set()
    except httpx.HTTPError as exc:
        events.append(f"transport error: {exc!r}")
    finally:
        started.set()


def test_sigterm_lets_short_requests_finish_ends_long_ones_and_exits(sigterm_server):
    server = sigterm_server
    grace = float(server.flag("--shutdown-timeout"))
    streams = {}
    for name, max_tokens in [("short", 12), ("long", 1000)]:  # short ends well within the grace period
        events, started = [], threading.Event()
        body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "temperature": 0}
        thread = threading.Thread(target=_read_events, args=(server.base_url, body, events, started), daemon=True)
        thread.start()
        streams[name] = (events, started, thread)
    for events, started, _ in streams.values():
        assert started.wait(60), "no first chunk"

    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    while True:  # soon no new work is taken: the port is closed (or, in between, 503)
        try:
            probe = {"prompt": "Hi", "max_tokens": 1}
            if httpx.post(f"{server.base_url}/v1/completions", json=probe, timeout=5).status_code == 503:
                break
        except httpx.TransportError:
            break
        assert time.monotonic() - signalled < 3, "still taking new requests 3 s after SIGTERM"
        time.sleep(0.05)
    server.proc.wait(timeout=grace + 20)
    exit_seconds = time.monotonic() - signalled
    for events, _, thread in streams.values():
        thread.join(5)
        assert not thread.is_alive()

    short, long = streams["short"][0], streams["long"][0]
    assert short[-1] == "[DONE]" and json.loads(short[-2])["choices"][0]["finish_reason"] == "length"
    assert long[-1] == "[DONE]"
    error = json.loads(long[-2])["error"]
    assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
    assert exit_seconds < grace + 15
    assert server.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert "Application shutdown complete" in server.log_tail()
