"""Peers the benchmark runs beside pinfer, on the same workloads (bench_runners.Runner).

TransformersRunner: Hugging Face transformers' `generate()` on the same checkpoint —
for a GGUF, transformers' own GGUF loader (its dequantization, so identical weights) —
one batched `generate` call per workload (left-padded), as a user of transformers
would run it. To match the workloads:
- EOS ignored: `min_new_tokens = max_new_tokens`, the way transformers forces a length.
  It bans EOS rather than ignoring it (a slightly different distribution, the same
  cost), so compare speed here, not tokens;
- sampling is temperature only (transformers' default top_k=50 switched off);
- logprobs: a logits processor keeps the last step's log_softmax and gathers the
  chosen token's logprob at the next step (the cost a user pays for logprobs,
  without holding every step's [batch, vocab] scores as output_scores would);
- TTFT / TPOT: a stopping criterion timestamps every step (the whole batch advances
  together, so every request gets the batch's times).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pinfer.tools.bench_runners import RequestTiming, RunResult, _short_model_name
from pinfer.tools.bench_serve import NotApplicableError
from pinfer.tools.workloads import Workload


class TransformersRunner:
    name = "transformers"

    def __init__(self, spec: dict[str, Any]):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pinfer.loading.resolve import resolve_model

        engine = spec["engine"]
        # settings it has no counterpart for: not applicable, like serve (the bench says n/a, not failed)
        if engine.get("kv_cache_dtype", "auto") != "auto":
            raise NotApplicableError("the transformers peer runs its default KV cache only (kv_cache_dtype auto)")
        if engine.get("quantization"):
            raise NotApplicableError("the transformers peer runs unquantized only (quantization none)")
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        self.model_name = str(engine["model"])
        path = resolve_model(self.model_name)
        dtype = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}[str(engine["dtype"])]
        location = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name) if path.is_file() \
            else dict(pretrained_model_name_or_path=path)
        self.tokenizer = AutoTokenizer.from_pretrained(**location)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(**location, dtype=dtype).eval()
        self.dtype = dtype

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name, "model": _short_model_name(self.model_name), "model_path": self.model_name,
            "architecture": type(self.model).__name__, "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": "none", "attention_backend": self.model.config._attn_implementation,
            "threads": torch.get_num_threads(), "device": str(self.model.device), "max_num_seqs": None,
            "deterministic": False,
        }

    def run(self, workload: Workload) -> RunResult:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        texts = [self.tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
                 for c in workload.conversations]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        prompt_lens = batch["attention_mask"].sum(dim=1).tolist()
        sampling = dict(do_sample=True, temperature=workload.temperature, top_k=0, top_p=1.0) \
            if workload.temperature > 0 else dict(do_sample=False)
        config = GenerationConfig(max_new_tokens=workload.max_tokens, min_new_tokens=workload.max_tokens,
                                  eos_token_id=self.model.generation_config.eos_token_id,
                                  pad_token_id=self.tokenizer.pad_token_id, **sampling)
        clock = _StepClock()
        logprobs = _ChosenLogprobs() if workload.logprobs else None
        torch.manual_seed(workload.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=config, stopping_criteria=StoppingCriteriaList([clock]),
                                      logits_processor=LogitsProcessorList([logprobs] if logprobs else []))
        seconds = time.perf_counter() - start
        generated = out.shape[1] - batch["input_ids"].shape[1]
        if generated != workload.max_tokens:
            raise RuntimeError(f"transformers peer generated {generated} tokens, not {workload.max_tokens}")
        if logprobs is not None and len(logprobs.finish(out)) != generated:
            raise RuntimeError("transformers peer: logprobs missing for some steps")
        first, last = clock.times[0] - start, clock.times[-1] - clock.times[0]
        tpot = last / (generated - 1) if generated > 1 else None
        return RunResult(seconds, [RequestTiming(n, generated, first, tpot) for n in prompt_lens])


class _StepClock:
    """A stopping criterion that never stops: it records when each new token is in."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _ChosenLogprobs:
    """A logits processor: the logprob of each sampled token, float32 log_softmax of the logits."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:  # the token sampled from the previous step's scores is now the last id
            self.chosen.append(self.previous.gather(1, input_ids[:, -1:]))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> list[torch.Tensor]:
        if self.previous is not None:
            self.chosen.append(self.previous.gather(1, sequences[:, -1:]))
            self.previous = None
        return self.chosen
