"""The OpenAI-compatible server (`pinfer serve`).

    async_engine.py  one worker thread owns the LLMEngine; asyncio requests talk to it through queues
    protocol.py      request bodies, SamplingParams mapping, response and error JSON
    api_server.py    FastAPI routes, SSE streaming, auth, error handlers, graceful shutdown: build_app, run_server
    metrics.py       Prometheus /metrics (pinfer:* names, like vLLM's vllm:*)
    cli.py           the `serve` subcommand

Nothing is imported here, so `pinfer generate` does not load FastAPI.
"""
