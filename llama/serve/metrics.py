"""The server's /metrics, in Prometheus' text format (prometheus-client): requests by
endpoint and status, the queue and the running rows, tokens in and out, and histograms of
the time to the first token and between tokens. One registry per server, so that two servers
in one process (tests) count apart."""

from typing import Callable, Dict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: from a few milliseconds (a tiny model's token) to minutes (a long queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, status: Callable[[], Dict[str, object]]):
        """status: the engine service's counts (running, waiting), read at each scrape."""
        self.registry = CollectorRegistry()
        self.requests = Counter("llama_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("llama_prompt_tokens", "prompt tokens of requests admitted",
                                     registry=self.registry)
        self.generated_tokens = Counter("llama_generated_tokens", "tokens generated and sent",
                                        registry=self.registry)
        self.first_token = Histogram("llama_time_to_first_token_seconds",
                                     "from a request's arrival to its first token", buckets=LATENCY_BUCKETS,
                                     registry=self.registry)
        self.between_tokens = Histogram("llama_time_per_output_token_seconds",
                                        "between consecutive tokens of one answer", buckets=LATENCY_BUCKETS,
                                        registry=self.registry)
        Gauge("llama_requests_running", "requests holding a cache row", registry=self.registry).set_function(
            lambda: float(status()["running"]))
        Gauge("llama_requests_waiting", "requests waiting for a cache row", registry=self.registry).set_function(
            lambda: float(status()["waiting"]))
        # Counters kept by the engine, shown as they stand (gauges: prometheus_client's Counter counts here).
        Gauge("llama_prefill_tokens", "prompt tokens prefilled since start", registry=self.registry).set_function(
            lambda: float(status()["prefill_tokens"]))
        Gauge("llama_prefix_reused_tokens", "prompt tokens not prefilled: their keys and values were cached "
              "(prefix caching)", registry=self.registry).set_function(lambda: float(status()["prefix_reused_tokens"]))

    def text(self) -> bytes:
        return generate_latest(self.registry)
