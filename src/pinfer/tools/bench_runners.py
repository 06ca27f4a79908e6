"""Engines the benchmark can drive. A runner loads one configuration and runs a
workload; the harness (bench_worker.py) does warm-up, repeats and the meters.

A peer (transformers, llama.cpp, ...) implements the same three things:

    class MyRunner:
        name = "mine"
        def __init__(self, spec: dict): ...                # load the model once
        def describe(self) -> dict: ...                    # resolved model, dtype, quantization, threads
        def run(self, workload: Workload) -> RunResult: ...  # generate, time each request

and registers itself in RUNNERS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from pinfer.tools.workloads import Workload


@dataclass
class RequestTiming:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float | None  # arrival -> first generated token
    tpot_s: float | None  # mean time between the following tokens (None for a 1-token output)


@dataclass
class RunResult:
    seconds: float  # wall time of the whole batch, first request in to last token out
    requests: list[RequestTiming] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return sum(r.generated_tokens for r in self.requests)


class Runner(Protocol):
    name: str

    def describe(self) -> dict[str, Any]: ...

    def run(self, workload: Workload) -> RunResult: ...


class PinferRunner:
    """pinfer's offline LLM: spec["engine"] holds EngineConfig fields, spec["threads"] torch's
    intra-op thread count (None: torch's default)."""

    name = "pinfer"

    def __init__(self, spec: dict[str, Any]):
        import torch

        from pinfer.entrypoints.llm import LLM

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        self.llm = LLM(**spec["engine"])
        self._prompt_ids: dict[tuple, list[list[int]]] = {}

    def describe(self) -> dict[str, Any]:
        import torch

        engine = self.llm.engine
        config = engine.config
        return {
            "engine": self.name,
            "model": _short_model_name(str(config.model)),
            "model_path": str(config.model),
            "architecture": engine.model_config.architecture,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "quantization": config.quantization or "none",
            "kv_cache_dtype": config.kv_cache_dtype,
            "attention_backend": config.attention_backend,
            "threads": torch.get_num_threads(),
            "device": str(engine.device),
            "max_num_seqs": config.max_num_seqs,
            "deterministic": config.deterministic,
            "cpu_kernels": engine.runner.cpu_kernels,
            "kv_capacity_tokens": engine.kv_capacity_tokens,
        }

    def run(self, workload: Workload) -> RunResult:
        prompts = self._templated(workload)
        params = workload.sampling_params()
        # Every run prefills from scratch: a warm prefix cache would make later repeats' TTFT look better.
        self.llm.engine.block_manager.reset_prefix_cache()
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        requests = []
        for output in outputs:
            completion = output.outputs[0]
            if output.error:
                raise RuntimeError(f"request {output.request_id} failed: {output.error}")
            n = len(completion.token_ids)
            if workload.logprobs and len(completion.token_logprobs or []) != n:
                raise RuntimeError(f"request {output.request_id}: logprobs missing for some tokens")
            m = output.metrics
            ttft = m.time_to_first_token
            tpot = (m.finished_time - m.first_token_time) / (n - 1) if n > 1 and m.finished_time else None
            requests.append(RequestTiming(len(output.prompt_token_ids), n, ttft, tpot))
        return RunResult(seconds, requests)

    def _templated(self, workload: Workload) -> list[list[int]]:
        key = tuple(tuple(tuple(m.items()) for m in c) for c in workload.conversations)
        if key not in self._prompt_ids:
            self._prompt_ids[key] = [self.llm.apply_chat_template(list(c)) for c in workload.conversations]
        return self._prompt_ids[key]


def _short_model_name(model: str) -> str:
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name if path.exists() else model


def _transformers_runner(spec: dict[str, Any]) -> Runner:
    from pinfer.tools.bench_peers import TransformersRunner  # imports transformers only when asked for

    return TransformersRunner(spec)


def _llamacpp_runner(spec: dict[str, Any]) -> Runner:
    from pinfer.tools.bench_llamacpp import LlamaCppRunner  # imports llama_cpp only when asked for

    return LlamaCppRunner(spec)


RUNNERS: dict[str, Callable[[dict[str, Any]], Runner]] = {
    "pinfer": PinferRunner, "transformers": _transformers_runner, "llama.cpp": _llamacpp_runner}
