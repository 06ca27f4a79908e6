"""Prometheus metrics for /metrics, named like vLLM's (`vllm:` -> `pinfer:`).

Each app has its own CollectorRegistry, so several servers can live in one
process (tests). Engine state (running, waiting, KV usage, token counters) is
read from the worker's last published snapshot when /metrics is scraped;
per-request latencies are observed when a request finishes.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pinfer.outputs import RequestOutput
from pinfer.serving.async_engine import ServerStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0)


class _EngineCollector:
    """Gauges and counters read from the engine snapshot at scrape time."""

    def __init__(self, stats: Callable[[], ServerStats], num_in_flight: Callable[[], int]):
        self._stats = stats
        self._num_in_flight = num_in_flight

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = [
            ("pinfer:num_requests_running", "Sequences in the engine's running batch (n > 1 requests count n).",
             s.num_running),
            ("pinfer:num_requests_waiting", "Sequences in the engine's waiting queue plus requests not yet handed "
                                            "to it.", s.num_waiting),
            ("pinfer:num_requests_in_flight", "HTTP requests with unfinished engine requests.", self._num_in_flight()),
            ("pinfer:kv_cache_usage_perc", "Fraction of KV blocks held by live sequences (0..1).", s.kv_cache_usage),
            ("pinfer:prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache.",
             s.prefix_cache_hit_rate),
            ("pinfer:kv_cache_free_blocks", "KV blocks not held by any live sequence.", s.num_free_blocks),
            ("pinfer:kv_cache_total_blocks", "KV blocks in the pool.", s.num_blocks),
            ("pinfer:weight_version", "Weight updates applied since start (POST /update_weights).",
             s.weight_version),
            ("pinfer:engine_paused", "1 while the engine is paused (POST /pause), else 0.", int(s.paused)),
            ("pinfer:engine_sleeping", "1 while the engine is asleep (POST /sleep), else 0.", int(s.sleeping)),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("pinfer:prompt_tokens", "Prompt tokens processed.", s.num_prompt_tokens),
            ("pinfer:generation_tokens", "Tokens generated.", s.num_generated_tokens),
            ("pinfer:num_preemptions", "Sequences preempted for lack of KV blocks.", s.num_preemptions),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, stats: Callable[[], ServerStats], num_in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, num_in_flight))
        r = self.registry
        self.request_success = Counter("pinfer:request_success",
                                       "Finished requests by finish reason (each choice of an n > 1 request counts).",
                                       ["finished_reason"], registry=r)
        self.time_to_first_token = Histogram("pinfer:time_to_first_token_seconds",
                                             "Time from HTTP arrival to the first generated token.",
                                             buckets=_TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("pinfer:time_per_output_token_seconds",
                                               "Mean time between output tokens of a request, after the first.",
                                               buckets=_TPOT_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("pinfer:e2e_request_latency_seconds",
                                             "Time from HTTP arrival to the last token.",
                                             buckets=_E2E_BUCKETS, registry=r)

    def observe_finished(self, output: RequestOutput) -> None:
        for completion in output.outputs:
            self.request_success.labels(finished_reason=completion.finish_reason or "unknown").inc()
        m = output.metrics
        finished = m.finished_time or time.time()
        self.e2e_request_latency.observe(max(0.0, finished - m.arrival_time))
        if m.first_token_time is not None:
            self.time_to_first_token.observe(max(0.0, m.first_token_time - m.arrival_time))
            num_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
            if num_tokens > 1:
                self.time_per_output_token.observe(max(0.0, finished - m.first_token_time) / (num_tokens - 1))

    def observe_abort(self, reason: str) -> None:
        """A request aborted (client gone, shutdown: "abort") or failed ("error") before it finished."""
        self.request_success.labels(finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
