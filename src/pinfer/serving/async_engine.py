"""The bridge between asyncio and the engine.

`LLMEngine` is not thread-safe, so one worker thread owns it: only that thread
calls add_request / step / abort_request. The event loop hands it work through
a thread-safe command queue; the worker hands outputs back with
`loop.call_soon_threadsafe` into one RequestStream per HTTP request. Every
concurrent HTTP request is therefore a request in the same engine batch
(continuous batching), and the event loop never waits on the model.

    event loop                         worker thread
    ----------                         -------------
    submit()  --("add", ...)-->        engine.add_request
    RequestStream <--outputs--         engine.step()
    abort()   --("abort", ids)-->      engine.abort_request (blocks freed now)
    pause() / sleep() / update_weights() ...
              --("call", fn, future)-> fn(routes) between two steps; result or error -> future

The worker should also be the thread that built the engine: PyTorch's OpenMP
pool belongs to the thread that first ran an op, and a model loaded on one
thread and stepped on another ran 1.2-2.4x slower on 2 cores (measured: batch-64
decode step 310 ms vs 390-760 ms). Pass a factory (`AsyncEngine(lambda:
LLMEngine(config))`) and the worker builds the engine itself.

RL controls (pause, resume, sleep, wake_up, update_weights) mutate the engine,
so they run on the worker too, as "call" commands, never during a step. While
the engine is paused or asleep the worker blocks on its queue instead of calling
a step() that would return at once (a busy spin).

Failures: a request whose output carries `error` fails alone; if `step()`
itself raises, every request in flight fails (and is aborted in the engine so
its blocks are freed) and the worker keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch

from pinfer.engine.llm_engine import LLMEngine
from pinfer.outputs import RequestOutput
from pinfer.sampling_params import SamplingParams

logger = logging.getLogger("pinfer.serving")

T = TypeVar("T")


class ServerOverloadedError(Exception):
    """Too many requests are waiting; the client should retry later (HTTP 503)."""


class ServerShuttingDownError(Exception):
    """The server is shutting down and does not take or finish this request (HTTP 503)."""


class RequestFailedError(Exception):
    """The engine failed while serving this request (HTTP 500)."""


class EngineSleepingError(Exception):
    """The engine is asleep (or still owes weights) and serves no request until woken up (HTTP 503)."""


class EngineBusyError(Exception):
    """An RL control needs an idle (or awake) engine and the engine is not (HTTP 409)."""


@dataclass
class EngineRequest:
    """One engine request of an HTTP request (a completions call with k prompts makes k)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass
class ServerStats:
    """What /metrics reports about the engine, as last published by the worker."""

    num_running: int = 0
    num_waiting: int = 0  # in the engine's queue plus submitted but not yet handed to the engine
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    # RL controls
    paused: bool = False
    sleeping: bool = False
    weight_version: int = 0
    num_weights_pending: int = 0  # after wake_up(reload_weights=False): tensors update_weights still owes


class RequestStream:
    """Async iterator over the outputs of the engine requests of one HTTP request.

    Yields RequestOutputs (cumulative, per engine request) as the worker produces
    them and stops once all requests have finished; raises the error of a failed
    one. Outputs are cumulative, so only the newest of each request is kept: a
    consumer that falls behind (a slow client) skips states instead of queueing
    them. `abort()` (idempotent) stops whatever has not finished.
    """

    def __init__(self, owner: "AsyncEngine", request_ids: list[str]):
        self._owner = owner
        self.request_ids = request_ids
        self._unfinished = set(request_ids)
        self._latest: dict[str, RequestOutput] = {}  # newest undelivered output per request, oldest first
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._error is not None:
                reason = "abort" if isinstance(self._error, ServerShuttingDownError) else "error"
                self.abort(reason)
                raise self._error
            if self._latest:
                output = self._latest.pop(next(iter(self._latest)))
                if output.finished and output.request_id in self._unfinished:
                    self._unfinished.discard(output.request_id)
                    self._owner._on_finished(output)
                    if not self._unfinished:
                        self._owner._active.discard(self)
                return output
            if not self._unfinished:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hand over an output or an error (on the event loop)."""
        if isinstance(item, BaseException):
            self._error = self._error or item
        elif item.request_id in self._unfinished:
            self._latest.pop(item.request_id, None)  # keep arrival order of the newest states
            self._latest[item.request_id] = item
        self._ready.set()

    def abort(self, reason: str = "abort") -> None:
        """Stop the unfinished requests; the worker frees their KV blocks at once."""
        if self._unfinished:
            ids = sorted(self._unfinished)
            self._unfinished.clear()
            self._latest.clear()
            self._owner._send(("abort", ids))
            if self._owner.on_abort is not None:
                for _ in ids:
                    self._owner.on_abort(reason)
        self._owner._active.discard(self)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_waiting: int = 256):
        """engine: a built engine, or a factory the worker thread calls now to build it (the fast
        way, see the module docstring); waits for the build and raises its error."""
        self.max_waiting = max_waiting
        # set by the server to record per-request metrics; called on the event loop
        self.on_finished: Callable[[RequestOutput], None] | None = None
        self.on_abort: Callable[[str], None] | None = None  # reason: "abort" or "error"
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _num_queued and _stats (worker writes, loop reads)
        self._num_queued = 0  # submitted, not yet added to the engine by the worker
        self._active: set[RequestStream] = set()  # streams with unfinished requests (event loop only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._draining = False
        self._dead: BaseException | None = None
        # set on the event loop as soon as sleep() is decided, so no request slips in behind it
        self._sleep_level: int | None = None
        if not callable(engine):
            self.engine = engine
            self._stats = self._read_engine_stats()
            return
        built = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run_worker, args=(engine, built, failure),
                                        name="pinfer-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            raise failure[0]

    # ---- lifecycle (event loop) ----------------------------------------------------

    def start(self) -> None:
        """Attach to the running event loop; start the worker unless it built the engine already."""
        self._loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_worker, name="pinfer-engine", daemon=True)
            self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def num_in_flight(self) -> int:
        return len(self._active)

    async def drain(self, timeout: float) -> None:
        """Stop taking requests; let in-flight ones finish for up to `timeout` seconds, then fail them."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._active:
            logger.warning("shutdown: ending %d request(s) still running after %.0f s", len(self._active), timeout)
        for stream in list(self._active):
            stream.put(ServerShuttingDownError(
                f"the server is shutting down and ended this request after the {timeout:g} s grace period"))

    async def stop(self, timeout: float = 10.0) -> None:
        """Fail whatever is still running and stop the worker thread."""
        await self.drain(0.0)
        if self._thread is not None and self._thread.is_alive():
            self._send(("stop",))
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                logger.error("engine worker did not stop within %.0f s (a model step is still running)", timeout)

    # ---- requests (event loop) -----------------------------------------------------

    def submit(self, requests: list[EngineRequest]) -> RequestStream:
        """Queue validated requests for the worker; raise if the server cannot take them now."""
        if self._draining:
            raise ServerShuttingDownError("the server is shutting down and does not accept new requests")
        if not self.is_running:
            raise RequestFailedError(f"the engine worker is not running ({self._dead or 'not started'})")
        self._check_awake()
        with self._lock:
            waiting = self._num_queued + self._stats.num_waiting
            if waiting >= self.max_waiting:
                raise ServerOverloadedError(
                    f"the server is overloaded: {waiting} requests are waiting (max_waiting={self.max_waiting}); "
                    "retry later")
            self._num_queued += len(requests)
        stream = RequestStream(self, [r.request_id for r in requests])
        self._active.add(stream)
        self._send(("add", requests, stream))
        return stream

    def _check_awake(self) -> None:
        if self._sleep_level is not None:
            raise EngineSleepingError(
                f"the engine is asleep (POST /sleep, level {self._sleep_level}) and serves no requests; "
                "call POST /wake_up first")
        with self._lock:
            pending = self._stats.num_weights_pending
        if pending:
            raise EngineSleepingError(
                f"the engine was woken up without its weights (reload_weights=false) and still needs {pending} "
                "tensor(s): push them with POST /update_weights first")

    def stats(self) -> ServerStats:
        with self._lock:
            stats = ServerStats(**vars(self._stats))
            stats.num_waiting += self._num_queued
        return stats

    # ---- RL controls (event loop; the work runs on the worker between two steps) ----------

    @property
    def sleep_level(self) -> int | None:
        """1 or 2 while asleep, None while awake."""
        return self._sleep_level

    async def update_weights(self, read_weights: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                             reset_prefix_cache: bool = True) -> tuple[int, int]:
        """Write the weights `read_weights()` yields (read on the worker, so lazily) into the engine.

        Returns (tensors written, new weight_version). The engine checks every name and shape before
        it changes anything, so on an error it keeps its old weights."""
        self.check_can_update_weights()

        def update(routes: dict[str, RequestStream]) -> tuple[int, int]:
            written = self.engine.update_weights(read_weights(), reset_prefix_cache=reset_prefix_cache)
            return written, self.engine.weight_version

        return await self._call(update)

    def check_can_update_weights(self) -> None:
        """Raise EngineBusyError while the weights are released (asleep at level 2): there is nothing to write to."""
        if self._sleep_level == 2:
            raise EngineBusyError("the engine's weights were released by sleep level 2: call POST /wake_up "
                                  '(with {"reload_weights": false} to skip re-reading the checkpoint) first')

    async def pause(self, abort_in_flight: bool = False) -> None:
        """Stop stepping. In-flight requests wait (or, with abort_in_flight, end now with what they have,
        finish_reason "abort"); requests submitted later are queued and run after resume()."""

        def pause(routes: dict[str, RequestStream]) -> None:
            self.engine.pause()
            if abort_in_flight:
                self._abort_in_flight(routes)

        await self._call(pause)

    async def resume(self) -> None:
        await self._call(lambda routes: self.engine.resume())

    async def sleep(self, level: int = 1) -> None:
        """Free the KV pool (level 1) and the weights (level 2); refuses while requests are in flight."""
        if self._active:
            raise EngineBusyError(
                f"cannot sleep with {len(self._active)} request(s) in flight: wait for them to finish, or "
                'POST /pause {"abort_in_flight": true} first')
        previous = self._sleep_level
        self._sleep_level = max(level, previous or 0)  # from now on submit() refuses
        try:
            await self._call(lambda routes: self.engine.sleep(level))
        except Exception:  # not on cancellation: the worker may be running it; /wake_up clears the flag
            self._sleep_level = previous
            raise

    async def wake_up(self, reload_weights: bool = True) -> None:
        await self._call(lambda routes: self.engine.wake_up(reload_weights=reload_weights))
        self._sleep_level = None

    async def _call(self, fn: Callable[[dict[str, RequestStream]], T]) -> T:
        """Run fn(routes) on the worker between two steps; return its result or raise its error."""
        if not self.is_running:
            raise RequestFailedError(f"the engine worker is not running ({self._dead or 'not started'})")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("call", fn, future))
        return await asyncio.wrap_future(future)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)

    def _on_finished(self, output: RequestOutput) -> None:
        if self.on_finished is not None:
            self.on_finished(output)

    # ---- the worker thread -----------------------------------------------------------

    def _read_engine_stats(self) -> ServerStats:
        engine = self.engine
        s = engine.stats()
        return ServerStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate, num_prompt_tokens=s.num_prompt_tokens,
            num_generated_tokens=s.num_generated_tokens, num_preemptions=s.num_preemptions,
            num_free_blocks=s.num_free_blocks, num_blocks=s.num_blocks,
            paused=engine.paused, sleeping=engine.sleeping, weight_version=engine.weight_version,
            num_weights_pending=engine.num_weights_pending,
        )

    def _can_step(self) -> bool:
        engine = self.engine
        return engine.has_unfinished_requests() and not engine.paused and not engine.sleeping

    def _run_worker(self, make_engine: Callable[[], LLMEngine] | None = None, built: threading.Event | None = None,
                    failure: list[BaseException] | None = None) -> None:
        if make_engine is not None:
            try:
                self.engine = make_engine()
                self._stats = self._read_engine_stats()
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                built.set()
        routes: dict[str, RequestStream] = {}  # engine request id -> its stream (worker only)
        try:
            self._worker_loop(routes)
        except BaseException as exc:  # a bug in the loop itself: fail everyone rather than hang them
            logger.exception("engine worker crashed; failing every request from now on")
            self._dead = exc
            error = RequestFailedError(f"the engine worker crashed: {exc!r}")
            for request_id in routes:  # best effort: free their blocks
                try:
                    self.engine.abort_request(request_id)
                except Exception:
                    pass
            self._deliver([(stream, error) for stream in set(routes.values())])
            while True:  # requests submitted before the loop saw _dead, until stop
                command = self._commands.get()
                if command[0] == "add":
                    self._deliver([(command[2], error)])
                elif command[0] == "call":
                    if command[2].set_running_or_notify_cancel():
                        command[2].set_exception(error)
                elif command[0] == "stop":
                    return

    def _worker_loop(self, routes: dict[str, RequestStream]) -> None:
        engine = self.engine
        while True:
            deliveries: list[tuple[RequestStream, object]] = []
            stop = False
            num_added = 0
            # paused or asleep, step() would return at once: wait for a command instead of spinning
            commands = self._take_commands(block=not self._can_step())
            for command in commands:
                kind = command[0]
                if kind == "add":
                    _, requests, stream = command
                    num_added += len(requests)
                    for r in requests:
                        try:
                            engine.add_request(r.prompt_token_ids, r.params, request_id=r.request_id,
                                               arrival_time=r.arrival_time)
                        except Exception as exc:  # validated on the event loop already; defensive
                            deliveries.append((stream, exc))
                        else:
                            routes[r.request_id] = stream
                elif kind == "abort":
                    for request_id in command[1]:
                        routes.pop(request_id, None)
                        engine.abort_request(request_id)
                elif kind == "call":
                    # the call publishes stats: hand over the queued count of the adds so far first,
                    # or /engine_state would count them twice
                    self._publish_stats(num_added)
                    num_added = 0
                    self._run_call(command[1], command[2], routes)
                elif kind == "stop":
                    stop = True
            if commands:
                self._publish_stats(num_added)
            if stop:
                error = ServerShuttingDownError("the server is shutting down")
                for request_id, stream in routes.items():
                    engine.abort_request(request_id)
                    deliveries.append((stream, error))
                routes.clear()
                self._deliver(deliveries)
                self._publish_stats(0)
                engine.write_trace()  # --trace: the file is complete when the server stops
                return
            if self._can_step():
                deliveries.extend(self._step(routes))
                self._publish_stats(0)
            self._deliver(deliveries)

    def _run_call(self, fn: Callable[[dict[str, RequestStream]], Any], future: concurrent.futures.Future,
                  routes: dict[str, RequestStream]) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up before it ran
        try:
            result = fn(routes)
        except BaseException as exc:
            self._publish_stats(0)
            future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self._publish_stats(0)  # before the caller hears back, so /engine_state shows the new state
            future.set_result(result)

    def _abort_in_flight(self, routes: dict[str, RequestStream]) -> None:
        """End every request in the engine now; each stream gets its partial output (finish_reason "abort")."""
        deliveries: list[tuple[RequestStream, object]] = []
        for request_id, stream in routes.items():
            output = self.engine.abort_request(request_id)
            if output is not None:
                deliveries.append((stream, output))
        routes.clear()
        self._deliver(deliveries)

    def _step(self, routes: dict[str, RequestStream]) -> list[tuple[RequestStream, object]]:
        engine = self.engine
        deliveries: list[tuple[RequestStream, object]] = []
        try:
            outputs = engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing the %d request(s) in flight", len(routes))
            error = RequestFailedError(f"the engine failed while running this request: {exc!r}")
            for request_id, stream in routes.items():
                try:
                    engine.abort_request(request_id)
                except Exception:
                    logger.exception("could not abort request %s after the failed step", request_id)
                deliveries.append((stream, error))
            routes.clear()
            return deliveries
        for output in outputs:
            stream = routes.get(output.request_id)
            if stream is None:
                continue  # aborted since it was scheduled
            error = getattr(output, "error", None)
            if error:
                routes.pop(output.request_id)
                if not output.finished:
                    engine.abort_request(output.request_id)
                deliveries.append((stream, RequestFailedError(f"the engine failed on this request: {error}")))
                continue
            if output.finished:
                routes.pop(output.request_id)
            deliveries.append((stream, output))
        return deliveries

    def _take_commands(self, block: bool) -> list[tuple]:
        commands = []
        if block:
            commands.append(self._commands.get())
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _publish_stats(self, num_added: int) -> None:
        stats = self._read_engine_stats()
        with self._lock:
            self._stats = stats
            self._num_queued -= num_added

    def _deliver(self, deliveries: list[tuple[RequestStream, object]]) -> None:
        if not deliveries or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_put_all, deliveries)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _put_all(deliveries: list[tuple[RequestStream, object]]) -> None:
    for stream, item in deliveries:
        stream.put(item)
