"""The server's Prometheus metrics (GET /metrics), in a registry of its own (two servers in one process, as in the
tests, keep theirs apart). The engine's state (requests running and waiting, cache use, prefix-cache counts) is read
from the snapshot the engine loop takes after every step, so a scrape never waits for a step to end."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                   80.0, 160.0, 640.0)


class _EngineState:
    """A collector of the engine's snapshot: gauges and the counters the engine itself keeps."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        gauges = (("dsv2_requests_running", "Sequences in the running batch", s["running"]),
                  ("dsv2_requests_waiting", "Sequences waiting to be scheduled, and requests not yet taken",
                   s["waiting"]),
                  ("dsv2_kv_cache_usage_ratio", "Fraction of the paged cache's blocks in use",
                   1 - s["free_blocks"] / s["num_blocks"]))
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        counters = (("dsv2_prefix_cache_queries", "Full prompt blocks looked up in the prefix cache",
                     s["prefix_queries"]),
                    ("dsv2_prefix_cache_hits", "Full prompt blocks found in the prefix cache", s["prefix_hits"]),
                    ("dsv2_num_preemptions", "Sequences preempted (their cache freed, recomputed later)",
                     s["preemptions"]),
                    ("dsv2_prompt_logprobs_uncached", "Prompts computed whole, past the prefix cache, for their "
                     "log-probabilities (echo + logprobs, prompt_logprobs)", s["prompt_logprobs_uncached"]))
        for name, doc, value in counters:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c


class Metrics:
    def __init__(self, snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineState(snapshot))
        r = self.registry
        self.prompt_tokens = Counter("dsv2_prompt_tokens", "Prompt tokens of the requests taken", registry=r)
        self.generation_tokens = Counter("dsv2_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("dsv2_request_success", "Requests finished, by reason", ["finished_reason"],
                                registry=r)
        self.ttft = Histogram("dsv2_time_to_first_token_seconds", "From the request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("dsv2_time_per_output_token_seconds", "Mean time per output token after the first, "
                              "per request", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("dsv2_e2e_request_latency_seconds", "From the request's arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
