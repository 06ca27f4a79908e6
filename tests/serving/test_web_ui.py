"""The chat page (/) and the dashboard (/dashboard), driven in a real headless Chromium.

The browser is Debian's chromium (`.ci/install-browser`), driven by Playwright's
Python package (which brings no browser of its own). Without /usr/bin/chromium
or playwright the browser tests skip and say why. The server is a real
`pinfer serve` with --api-key on the default model. Screenshots go to
artifacts/web_ui/ (their paths are printed; run with -s to see them).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import httpx
import pytest

from pinfer.serving.async_engine import ServerStats
from pinfer.serving.web import DashboardHistory, _quantile, is_public_page

CHROMIUM = Path(os.environ.get("PINFER_CHROMIUM", "/usr/bin/chromium"))  # Debian's; override for another build
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "web_ui"
API_KEY = "web-secret"  # conftest SERVER_FLAGS["web_server"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GENERATION_TIMEOUT_MS = 90_000  # 2 cores shared with other work


# ---- without a browser ---------------------------------------------------------------------


def test_public_paths_are_only_the_pages_and_their_files():
    assert is_public_page("/") and is_public_page("/dashboard") and is_public_page("/static/chat.js")
    assert not is_public_page("/dashboard/stats") and not is_public_page("/v1/models")
    assert not is_public_page("/static/../v1/models")


def test_dashboard_history_rates_and_percentiles():
    stats = ServerStats(num_generated_tokens=0, num_prompt_tokens=0)
    history = DashboardHistory(lambda: stats, lambda: 0)
    history.sample()
    time.sleep(0.05)
    stats.num_generated_tokens, stats.num_prompt_tokens = 10, 40
    history.sample()
    snap = history.snapshot()
    gen = snap["series"]["generation_tokens_per_s"]
    assert gen[0] == 0 and 10 / 0.2 < gen[1] < 10 / 0.04
    assert _quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and _quantile([], 0.9) is None
    assert snap["percentiles"]["ttft"] == {"count": 0, "p50": None, "p90": None, "p99": None}


def test_pages_load_without_the_key_and_their_api_calls_need_it(web_server):
    base = web_server.base_url
    for path in ("/", "/dashboard", "/static/chat.js", "/static/vendor/purify.min.js", "/static/vendor/marked.umd.js"):
        response = httpx.get(base + path, timeout=10)
        assert response.status_code == 200, path
    page = httpx.get(base + "/", timeout=10)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path in ("/dashboard/stats", "/v1/models", "/metrics"):
        assert httpx.get(base + path, timeout=10).status_code == 401, path
    stats = httpx.get(base + "/dashboard/stats", headers=AUTH, timeout=10).json()
    assert stats["current"]["running"] == 0 and stats["window_seconds"] == 300


# ---- in the browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not installed: {CHROMIUM} is missing; .ci/install-browser installs Debian's "
                    f"chromium with apt-get (as root), which was not possible here")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright not installed: pip install -e '.[test]'")
    with sync_api.sync_playwright() as p:
        # a failure to launch an installed browser is an error, not a skip
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, web_server):
    # The pages' Content-Security-Policy stays on (no bypass_csp): wait_for_function takes
    # "() => ..." functions, which Playwright runs without the page's eval.
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    page.set_default_timeout(GENERATION_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def open_with_key(page, url: str) -> None:
    """Load a page; with no key stored it asks for one (its first API call got a 401)."""
    page.goto(url)
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    dialog.wait_for(state="hidden")


def open_chat(page, server, **settings: str) -> None:
    open_with_key(page, server.base_url + "/")
    page.wait_for_function("() => document.getElementById('model-name').textContent.length > 0")
    for field, value in settings.items():
        page.fill(f"#{field.replace('_', '-')}", value)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_reply(page):
    return page.locator(".msg.assistant").last


def wait_finished(page, state: str = "done") -> None:
    page.locator(f".msg.assistant:last-child .status[data-state={state}]").wait_for(state="attached")


def abort_count(metrics: dict[str, float]) -> float:
    return metrics.get('pinfer:request_success_total{finished_reason="abort"}', 0.0)


def test_chat_streams_a_reply_and_keeps_the_conversation(page, web_server):
    open_chat(page, web_server, temperature="0", max_tokens="48")
    # record the reply's length at every DOM change while it streams
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const reply = document.querySelector('.msg.assistant .content.text');
            if (reply && document.querySelector('.msg.assistant .status').dataset.state === 'streaming')
                window.__lengths.push(reply.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    requests: list[dict] = []
    page.on("request", lambda r: requests.append({**json.loads(r.post_data), "auth": r.headers.get("authorization")})
            if r.url.endswith("/v1/chat/completions") else None)
    send(page, "Write a short poem about the sea.")
    wait_finished(page)
    lengths = page.evaluate("window.__lengths")
    growth = sorted(set(n for n in lengths if n > 0))
    assert len(growth) >= 3, f"the reply did not arrive in pieces: {lengths}"
    assert lengths == sorted(lengths), "streamed text only grows"
    first = last_reply(page).locator(".content.text").inner_text()
    assert first.strip()
    assert "tokens" in last_reply(page).locator(".stats").inner_text()
    assert requests[0]["stream"] is True and requests[0]["max_tokens"] == 48 and requests[0]["temperature"] == 0
    assert requests[0]["auth"] == AUTH["Authorization"]
    screenshot(page, "chat")

    page.fill("#max-tokens", "4")
    send(page, "Thanks!")
    wait_finished(page)
    history = requests[1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[0]["content"] == "Write a short poem about the sea." and history[2]["content"] == "Thanks!"
    assert page.locator(".msg").count() == 4


def test_stop_aborts_the_request_and_frees_its_kv_blocks(page, web_server, read_metrics, wait_until_idle):
    base = web_server.base_url
    open_chat(page, web_server, temperature="0.8", seed="1", max_tokens="")  # empty: up to the context length
    before = abort_count(read_metrics(base, AUTH))
    send(page, "Write a very long and detailed essay about the history of the Roman Empire.")
    page.wait_for_function("() => document.querySelector('.msg.assistant .content.text').textContent.length > 30")
    busy = read_metrics(base, AUTH)
    assert busy["pinfer:num_requests_running"] == 1 and busy["pinfer:kv_cache_usage_perc"] > 0, busy
    page.click("#stop")
    wait_finished(page, "stopped")
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    assert len(last_reply(page).locator(".content.text").inner_text()) > 30  # the partial reply stays
    idle = wait_until_idle(base, timeout=15, headers=AUTH)  # running 0, KV usage 0, every block free
    assert abort_count(idle) == before + 1
    screenshot(page, "chat_stopped")


def test_logprobs_hover_shows_probability_and_alternatives(page, web_server):
    open_chat(page, web_server, temperature="0", max_tokens="12", top_logprobs="5")
    page.check("#logprobs")
    send(page, "What is the capital of France?")
    wait_finished(page)
    tokens = last_reply(page).locator(".tok")
    count = tokens.count()
    assert count >= 1
    assert last_reply(page).locator(".stats").inner_text().startswith(f"{count} tokens")
    tokens.first.hover()
    tooltip = page.locator("#tooltip")
    tooltip.wait_for(state="visible")
    assert tooltip.locator(".tip-p").inner_text().startswith("p = ")
    rows = tooltip.locator("tr.alt")
    assert rows.count() == 5
    probs = [float(t.rstrip("%")) for t in tooltip.locator(".alt-p").all_inner_texts()]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.05
    # temperature 0 picks the most likely token: the first alternative is the chosen one, same p
    assert "chosen" in rows.first.get_attribute("class")
    chosen_p = float(tooltip.locator(".tip-p").inner_text().split("=")[1].split("%")[0])
    assert math.isclose(chosen_p, probs[0], abs_tol=0.05)
    screenshot(page, "logprobs_tooltip")
    last_reply(page).locator("button[data-view=text]").click()
    assert last_reply(page).locator(".content.text").is_visible()


EVIL = "<script>window.__pwned=1</script>"
CRAFTED_REPLY = (f"Look: {EVIL}\n\n<img src=x onerror=\"window.__pwned=2\">\n\n"
                 "**bold** and [a link](javascript:window.__pwned=3)\n\n"
                 "```html\n<script>window.__pwned=4</script>\n```\n")


def crafted_sse(text: str) -> str:
    """A /v1/chat/completions stream saying `text`, 9 characters a chunk, with logprobs."""
    def event(choice: dict) -> str:
        return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [choice]}) + "\n\n"

    body = event({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
    pieces = [text[i:i + 9] for i in range(0, len(text), 9)]
    for i, piece in enumerate(pieces):
        entry = {"token": piece, "logprob": -0.25, "bytes": [],
                 "top_logprobs": [{"token": piece, "logprob": -0.25, "bytes": []},
                                  {"token": "<b>alt</b>", "logprob": -2.0, "bytes": []}]}
        body += event({"index": 0, "delta": {"content": piece}, "logprobs": {"content": [entry]},
                       "finish_reason": "stop" if i == len(pieces) - 1 else None})
    return body + "data: [DONE]\n\n"


def test_html_in_a_reply_renders_as_text(page, web_server):
    open_chat(page, web_server)
    page.check("#logprobs")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=crafted_sse(CRAFTED_REPLY)))
    send(page, "say something nasty")
    wait_finished(page)
    reply = last_reply(page)
    # token view: every token is text
    assert EVIL in reply.locator(".content.tokens").inner_text()
    reply.locator(".tok").nth(1).hover()
    assert "<b>alt</b>" in page.locator("#tooltip").inner_text()
    # markdown view: formatting rendered, HTML shown as text, nothing executable
    reply.locator("button[data-view=text]").click()
    text = reply.locator(".content.text")
    assert EVIL in text.inner_text() and '<img src=x onerror="window.__pwned=2">' in text.inner_text()
    assert text.locator("strong").inner_text() == "bold"
    assert "<script>window.__pwned=4</script>" in text.locator("pre code").inner_text()
    assert page.locator("#messages script, #messages img, #tooltip b").count() == 0
    assert not (text.locator("a").get_attribute("href") or "").startswith("javascript:")
    text.locator("a").click()
    assert page.evaluate("typeof window.__pwned") == "undefined"
    screenshot(page, "html_as_text")


def test_dashboard_shows_engine_numbers_and_updates(page, web_server):
    open_with_key(page, web_server.base_url + "/dashboard")
    page.wait_for_function("() => document.getElementById('v-running').textContent !== '–'")
    finished = int(page.locator("#v-finished").inner_text())
    response = httpx.post(f"{web_server.base_url}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 16, "temperature": 0})
    assert response.status_code == 200, response.text
    page.wait_for_function(f"() => Number(document.getElementById('v-finished').textContent) === {finished + 1}",
                           timeout=15_000)
    assert page.locator("#v-ttft").inner_text().count("/") == 2 and "–" not in page.locator("#v-ttft").inner_text()
    assert int(page.locator("#c-latency").get_attribute("data-points")) >= 1
    assert int(page.locator("#c-requests").get_attribute("data-points")) >= 2
    stats = httpx.get(f"{web_server.base_url}/dashboard/stats", headers=AUTH, timeout=10).json()
    assert max(stats["series"]["generation_tokens_per_s"]) > 0
    assert page.locator("#v-kv").inner_text().endswith("%")
    screenshot(page, "dashboard")
