"""The browser pages: a chat UI and a live engine dashboard, served by `pinfer serve`.

    GET /                  the chat page (static/index.html)
    GET /dashboard         the dashboard (static/dashboard.html)
    GET /static/...        their JS and CSS, and the vendored marked and DOMPurify
    GET /dashboard/stats   JSON for the dashboard: the last minutes of engine state and request latencies

The pages are static files holding no data, so they load without the API key;
they ask for it and send it as `Authorization: Bearer` on every API call they
make (/v1/*, /dashboard/stats), which the key still protects.

Why /dashboard/stats and not the page parsing /metrics: the history lives on
the server, so a freshly opened dashboard shows the last five minutes instead of
an empty chart, and TTFT/TPOT percentiles come from each request's own
latencies rather than from interpolating between histogram buckets.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from pinfer.outputs import RequestOutput
from pinfer.serving.async_engine import AsyncEngine, ServerStats

STATIC_DIR = Path(__file__).parent / "static"
PAGES = {"/": "index.html", "/dashboard": "dashboard.html"}
HISTORY_SECONDS = 300.0  # what the dashboard plots
SAMPLE_INTERVAL_S = 1.0
MAX_RECENT_REQUESTS = 5000  # latencies kept for percentiles (within HISTORY_SECONDS)

# Model output is rendered in these pages; even if some HTML slipped past the
# sanitizer, no inline or foreign script runs and nothing is fetched from elsewhere.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                           "form-action 'none'")


def is_public_page(path: str) -> bool:
    """The paths the API key does not protect: the pages and their static files."""
    return path in PAGES or (path.startswith("/static/") and ".." not in path)


@dataclass
class _Sample:
    time: float
    running: int
    waiting: int
    in_flight: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    prompt_tokens: int  # cumulative
    generation_tokens: int  # cumulative
    preemptions: int  # cumulative


@dataclass
class _Latency:
    finished: float  # wall time
    ttft: float | None
    tpot: float | None
    e2e: float


class DashboardHistory:
    """Ring buffers of engine samples (one a second) and of finished requests' latencies."""

    def __init__(self, stats: Callable[[], ServerStats], num_in_flight: Callable[[], int],
                 seconds: float = HISTORY_SECONDS, interval: float = SAMPLE_INTERVAL_S):
        self._stats = stats
        self._num_in_flight = num_in_flight
        self.seconds = seconds
        self.interval = interval
        self.samples: deque[_Sample] = deque(maxlen=int(seconds / interval) + 1)
        self.latencies: deque[_Latency] = deque(maxlen=MAX_RECENT_REQUESTS)

    def sample(self) -> None:
        s = self._stats()
        self.samples.append(_Sample(time.time(), s.num_running, s.num_waiting, self._num_in_flight(),
                                    s.kv_cache_usage, s.prefix_cache_hit_rate, s.num_prompt_tokens,
                                    s.num_generated_tokens, s.num_preemptions))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def observe_finished(self, output: RequestOutput) -> None:
        """The same definitions as the pinfer:* latency histograms (metrics.py)."""
        m = output.metrics
        finished = m.finished_time or time.time()
        ttft = tpot = None
        if m.first_token_time is not None:
            ttft = max(0.0, m.first_token_time - m.arrival_time)
            num_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
            if num_tokens > 1:
                tpot = max(0.0, finished - m.first_token_time) / (num_tokens - 1)
        self.latencies.append(_Latency(finished, ttft, tpot, max(0.0, finished - m.arrival_time)))

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        samples = [s for s in self.samples if s.time >= now - self.seconds]
        # tokens/s between consecutive samples (counters only grow; clamp anyway)
        gen_rate, prompt_rate = [0.0], [0.0]
        for a, b in zip(samples, samples[1:]):
            dt = max(b.time - a.time, 1e-6)
            gen_rate.append(max(0, b.generation_tokens - a.generation_tokens) / dt)
            prompt_rate.append(max(0, b.prompt_tokens - a.prompt_tokens) / dt)
        recent = [r for r in self.latencies if r.finished >= now - self.seconds]
        s = self._stats()  # the gauges as of now, not as of the last sample (up to a second old)
        return {
            "time": now,
            "window_seconds": self.seconds,
            "interval_seconds": self.interval,
            "current": {
                "running": s.num_running, "waiting": s.num_waiting, "in_flight": self._num_in_flight(),
                "kv_cache_usage": s.kv_cache_usage, "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
                "generation_tokens_per_s": gen_rate[-1] if samples else 0.0,
                "prompt_tokens_per_s": prompt_rate[-1] if samples else 0.0,
                "generation_tokens": s.num_generated_tokens, "prompt_tokens": s.num_prompt_tokens,
                "preemptions": s.num_preemptions},
            # columns, one entry per sample
            "series": {
                "time": [s.time for s in samples], "running": [s.running for s in samples],
                "waiting": [s.waiting for s in samples],
                "kv_cache_usage": [s.kv_cache_usage for s in samples],
                "prefix_cache_hit_rate": [s.prefix_cache_hit_rate for s in samples],
                "generation_tokens_per_s": gen_rate if samples else [],
                "prompt_tokens_per_s": prompt_rate if samples else []},
            # columns, one entry per request finished in the window
            "requests": {"time": [r.finished for r in recent], "ttft": [r.ttft for r in recent],
                         "tpot": [r.tpot for r in recent], "e2e": [r.e2e for r in recent]},
            "percentiles": {name: _percentiles([getattr(r, name) for r in recent])
                            for name in ("ttft", "tpot", "e2e")},
        }


def _percentiles(values: list[float | None]) -> dict[str, float | None]:
    xs = sorted(v for v in values if v is not None)
    return {"count": len(xs), **{f"p{q}": _quantile(xs, q / 100) for q in (50, 90, 99)}}


def _quantile(sorted_xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_xs:
        return None
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def add_web_routes(app: FastAPI, async_engine: AsyncEngine) -> None:
    """The pages, their static files and /dashboard/stats; samples the engine while the app runs."""
    history = DashboardHistory(async_engine.stats, lambda: async_engine.num_in_flight)
    record_metrics = async_engine.on_finished  # the /metrics histograms keep their hook

    def on_finished(output: RequestOutput) -> None:
        if record_metrics is not None:
            record_metrics(output)
        history.observe_finished(output)

    async_engine.on_finished = on_finished
    _sample_during_lifespan(app, history)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for path, file in PAGES.items():
        app.add_api_route(path, _page(STATIC_DIR / file), methods=["GET"], include_in_schema=False)

    @app.get("/dashboard/stats", include_in_schema=False)
    async def dashboard_stats() -> dict[str, Any]:
        return history.snapshot()


def _page(file: Path) -> Callable[[], Any]:
    async def page() -> FileResponse:
        return FileResponse(file, media_type="text/html",
                            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"})
    return page


def _sample_during_lifespan(app: FastAPI, history: DashboardHistory) -> None:
    """Run the sampler as a task inside the app's own lifespan (which starts the engine worker)."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI):
        async with inner(app_) as state:
            task = asyncio.ensure_future(history.run())
            try:
                yield state
            finally:
                task.cancel()

    app.router.lifespan_context = lifespan
