"""Engine traces in Chrome's Trace Event Format: open the file in https://ui.perfetto.dev.

    tracer = Tracer("trace.json", process_name="pinfer")
    with tracer.span("decode", batch_size=16):      # an "X" (complete) event
        ...
    tracer.counter("TTFT", ms=42.0)                  # a "C" (counter) event
    tracer.close()                                    # the file is valid JSON after every flush()

Why a small writer and not a library: torch.profiler exports Chrome traces but
records every aten op (tens of thousands of events per step, and slow while on);
viztracer traces every Python call. We want a handful of spans per step, named
after the engine's phases, cheap enough to leave on while serving.

The file uses the format's JSON Array form: `[event, event, ...]`. Events are
buffered and appended at each flush(), which then writes the closing `]` and
steps back over it, so the file on disk is always a complete JSON array (and the
format lets viewers read one cut short, should the process die mid-write).
Times are microseconds since the tracer started (perf_counter), as the format wants.

When tracing is off the engine holds NULL_TRACER: span() returns one shared
no-op context manager and `enabled` is False, so callers skip building args.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import time
from typing import Any

_CLOSING = b"\n]\n"
_FLUSH_EVERY = 20_000  # buffered events: bounds memory on a long-running server


class _Span:
    """Context manager for one X event; records its own start and end."""

    __slots__ = ("tracer", "name", "cat", "args", "start")

    def __init__(self, tracer: "Tracer", name: str, cat: str, args: dict[str, Any]):
        self.tracer, self.name, self.cat, self.args = tracer, name, cat, args

    def __enter__(self) -> "_Span":
        self.start = time.perf_counter_ns()
        return self

    def __exit__(self, *exc) -> None:
        self.tracer.complete(self.name, self.start, time.perf_counter_ns(), self.cat, self.args)


class Tracer:
    enabled = True

    def __init__(self, path: str | os.PathLike, process_name: str = "pinfer", thread_name: str = "engine"):
        self.path = os.fspath(path)
        self.pid = os.getpid()
        self.tid = 1  # one engine thread steps the engine; all spans go on one track, nested in time
        self._origin = time.perf_counter_ns()
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # flush() may run from atexit while a worker thread traces
        self._file = open(self.path, "wb")
        self._file.write(b"[")
        self._empty = True  # nothing written yet: the next event needs no leading comma
        self._closed = False
        self.metadata("process_name", name=process_name)
        self.metadata("thread_name", name=thread_name, tid=self.tid)
        self.flush()
        atexit.register(self.close)

    # ---- events ------------------------------------------------------------------

    def span(self, name: str, cat: str = "engine", **args: Any) -> _Span:
        return _Span(self, name, cat, args)

    def complete(self, name: str, start_ns: int, end_ns: int, cat: str = "engine",
                 args: dict[str, Any] | None = None) -> None:
        """An X event from perf_counter_ns() readings."""
        event = {"name": name, "cat": cat, "ph": "X", "ts": self._us(start_ns), "dur": (end_ns - start_ns) / 1000,
                 "pid": self.pid, "tid": self.tid}
        if args:
            event["args"] = args
        self._add(event)

    def counter(self, name: str, **values: float) -> None:
        """A C event: each keyword is one series of the counter track `name`."""
        self._add({"name": name, "ph": "C", "ts": self._us(time.perf_counter_ns()), "pid": self.pid,
                   "args": values})

    def metadata(self, kind: str, name: str, tid: int | None = None) -> None:
        """process_name / thread_name: how the viewer labels the tracks."""
        event = {"name": kind, "ph": "M", "pid": self.pid, "args": {"name": name}}
        if tid is not None:
            event["tid"] = tid
        self._add(event)

    def _us(self, ns: int) -> float:
        return (ns - self._origin) / 1000

    def _add(self, event: dict[str, Any]) -> None:
        if self._closed:  # e.g. closed at exit while a worker thread still steps the engine
            return
        self._events.append(event)
        if len(self._events) >= _FLUSH_EVERY:
            self.flush()

    # ---- the file ----------------------------------------------------------------

    def flush(self) -> None:
        """Append the buffered events; the file is then a complete JSON array."""
        with self._lock:
            if self._closed:
                return
            events, self._events = self._events, []
            if events:
                sep = b"\n" if self._empty else b",\n"
                self._file.write(sep + b",\n".join(json.dumps(e, separators=(",", ":")).encode() for e in events))
                self._empty = False
            self._file.write(_CLOSING)
            self._file.flush()
            self._file.seek(-len(_CLOSING), os.SEEK_CUR)  # the next events overwrite the `]`

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        with self._lock:
            self._closed = True
            self._file.close()
        atexit.unregister(self.close)


class _NullTracer:
    """Tracing off: every call is a no-op (engine code checks `enabled` before building args)."""

    enabled = False
    path = None
    _span = contextlib.nullcontext()

    def span(self, name: str, cat: str = "engine", **args: Any) -> contextlib.nullcontext:
        return self._span

    def complete(self, *args: Any, **kwargs: Any) -> None:
        pass

    def counter(self, name: str, **values: float) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


NULL_TRACER = _NullTracer()


def make_tracer(path: str | os.PathLike | None, process_name: str = "pinfer") -> Tracer | _NullTracer:
    return Tracer(path, process_name) if path else NULL_TRACER


class LayerSpans:
    """One span per decoder layer, from forward hooks (installed only with trace_layers).

    Spans measure host time: on CPU that is the layer's compute; on CUDA, where
    kernels run asynchronously, it is mostly launch time.
    """

    def __init__(self, tracer: Tracer, layers) -> None:
        self.tracer = tracer
        self._starts: list[int] = []
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._before))
            self.handles.append(layer.register_forward_hook(self._after_hook(f"layer {index}")))

    def _before(self, module, args) -> None:
        self._starts.append(time.perf_counter_ns())

    def _after_hook(self, name: str):
        def after(module, args, output) -> None:
            self.tracer.complete(name, self._starts.pop(), time.perf_counter_ns(), "layer")
        return after

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
