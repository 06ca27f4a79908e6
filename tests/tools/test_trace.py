"""--trace writes a valid Chrome Trace (Trace Event Format) of the engine's steps:
nested spans per phase, per-layer spans only with trace_layers, TTFT/TPOT counters
that agree with the requests' metrics, and a file that is valid JSON after every flush."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pinfer import LLM, SamplingParams
from pinfer.entrypoints.cli import main
from pinfer.tools.trace import NULL_TRACER, Tracer

PHASES = {"step", "schedule", "prepare_inputs", "prefill", "decode", "logits", "sample", "postprocess"}


def load_events(path) -> list[dict]:
    events = json.loads(path.read_text())  # JSON Array form of the format
    assert isinstance(events, list) and events
    for e in events:
        assert e["ph"] in ("X", "C", "M") and isinstance(e["name"], str) and isinstance(e["pid"], int)
        if e["ph"] == "X":
            assert isinstance(e["ts"], (int, float)) and e["dur"] >= 0 and isinstance(e["tid"], int)
        elif e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values())
        else:
            assert e["name"] in ("process_name", "thread_name") and e["args"]["name"]
    return events


def spans(events: list[dict]) -> list[dict]:
    return [e for e in events if e["ph"] == "X"]


def parent_of(events: list[dict]) -> dict[int, dict | None]:
    """Check that spans nest (no partial overlaps) and map each span to its innermost parent."""
    eps = 1e-3  # µs: float rounding of ns -> µs
    ordered = sorted(spans(events), key=lambda e: (e["ts"], -e["dur"]))
    stack: list[dict] = []
    parents = {}
    for e in ordered:
        while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - eps:
            stack.pop()
        if stack:
            top = stack[-1]
            assert e["ts"] + e["dur"] <= top["ts"] + top["dur"] + eps, f"{e['name']} overlaps {top['name']}"
        parents[id(e)] = stack[-1] if stack else None
        stack.append(e)
    return parents


def test_tracer_file_is_valid_json_after_every_flush(tmp_path):
    path = tmp_path / "t.json"
    tracer = Tracer(path, process_name="test")
    assert load_events(path)  # metadata only, already valid
    with tracer.span("outer", answer=42):
        with tracer.span("inner"):
            pass
    tracer.counter("TTFT", ms=1.5)
    tracer.flush()
    first = load_events(path)
    with tracer.span("later"):
        pass
    tracer.close()
    events = load_events(path)
    assert [e["name"] for e in spans(events)] == ["inner", "outer", "later"]
    assert events[: len(first)] == first
    outer = next(e for e in events if e["name"] == "outer")
    assert outer["args"] == {"answer": 42}
    assert parent_of(events)[id(next(e for e in events if e["name"] == "inner"))] is outer
    assert {"name": "TTFT", "ph": "C", "ts": pytest.approx(0, abs=1e9), "pid": outer["pid"],
            "args": {"ms": 1.5}} in events
    tracer.close()  # idempotent
    assert not NULL_TRACER.enabled and NULL_TRACER.span("x").__enter__() is None


def test_generate_with_trace_layers(tmp_path, smollm2_gguf):
    path = tmp_path / "trace.json"
    llm = LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory="64MiB", trace_file=str(path), trace_layers=True)
    prompts = [[1, 9690, 198, 504, 3458], [1, 9690, 198]]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True, seed=0), use_tqdm=False)
    assert llm.engine.write_trace() == str(path)
    events = load_events(path)
    names = Counter(e["name"] for e in spans(events))
    assert PHASES <= set(names)
    num_layers = llm.engine.model_config.num_layers
    num_forwards = names["prefill"] + names["decode"] + names["mixed"]
    assert num_forwards == names["step"] == 4  # one prefill step, then three decodes of both sequences
    assert all(names[f"layer {i}"] == num_forwards for i in range(num_layers))

    parents = parent_of(events)
    for e in spans(events):
        parent = parents[id(e)]
        if e["name"] == "step":
            assert parent is None
        elif e["name"].startswith("layer "):
            assert parent["name"] in ("prefill", "decode", "mixed") and e["cat"] == "layer"
        else:
            assert parent["name"] == "step", e["name"]
    prefill = next(e for e in spans(events) if e["name"] == "prefill")
    assert prefill["args"]["batch_size"] == 2 and prefill["args"]["num_tokens"] == sum(map(len, prompts))
    decode = next(e for e in spans(events) if e["name"] == "decode")
    assert decode["args"]["batch_size"] == decode["args"]["num_tokens"] == decode["args"]["num_decode_seqs"] == 2

    counters = [e for e in events if e["ph"] == "C"]
    ttft = sorted(e["args"]["ms"] for e in counters if e["name"] == "TTFT")
    tpot = sorted(e["args"]["ms"] for e in counters if e["name"] == "TPOT")
    metrics = [o.metrics for o in outputs]
    assert ttft == pytest.approx(sorted(1000 * m.time_to_first_token for m in metrics))
    assert tpot == pytest.approx(sorted(1000 * (m.finished_time - m.first_token_time) / 3 for m in metrics))
    assert {"scheduler", "kv_cache_usage"} <= {e["name"] for e in counters}

    llm.engine.close()
    assert load_events(path) == events  # nothing new after the last write; still valid JSON
    llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)  # closed: the engine runs untraced
    assert load_events(path) == events


def test_cli_generate_trace(tmp_path, smollm2_gguf, capsys):
    path = tmp_path / "cli.json"
    code = main(["generate", "--model", str(smollm2_gguf), "--prompt", "Hi", "--max-tokens", "2",
                 "--kv-cache-memory", "64MiB", "--json", "--trace", str(path)])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["generated_tokens"] == 2
    # Written when the CLI's engine went away (or at exit): no layer spans without --trace-layers.
    names = {e["name"] for e in spans(load_events(path))}
    assert PHASES <= names
    assert not any(n.startswith("layer ") for n in names)
