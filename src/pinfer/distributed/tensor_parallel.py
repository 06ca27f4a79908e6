"""Tensor parallelism over processes with torch.distributed (gloo on CPU, NCCL on CUDA).

Rank 0 is the engine's own process: it schedules, prepares each step's inputs and
samples. Ranks 1..N-1 are worker processes started here, each holding a shard of
the model (parallel_layers.py) and a KV pool for its own KV heads. One step:

    rank 0                                      worker rank r
    ------                                      -------------
    header (shapes, row lists) --- pipe ---->   recv header
    broadcast(step tensors) ---- collective --  broadcast(into an empty buffer)
    model forward       <- all-reduces ->       same forward on its shard
    logits (gather)     <- gather ------------  logits of its vocab slice
    sample

Why a pipe for the header: a worker waits for the next step for as long as the
engine is idle (a server may idle for hours), and a collective would time out;
a pipe waits forever and tells the worker when rank 0 is gone (EOF). The step's
tensors go through the collective, which on CUDA moves device memory directly.

Failures: a dead worker is seen before each step (Process.is_alive) and, mid-step,
as a failed collective (gloo notices the closed connection; the process group's
timeout bounds the rest). Either way the step raises TensorParallelError naming
the rank, and every later step raises it again: the group cannot be repaired.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.connection
import os
import signal
import socket
import sys
import traceback
import weakref
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pinfer.errors import PinferError
from pinfer.model.attention.base import AttentionMetadata

# A rank waiting this long inside one collective fails it (a stuck or dead peer).
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
# Workers must start, join the group and load their shard within this.
STARTUP_TIMEOUT_S = 600.0


class TensorParallelError(PinferError):
    """A tensor-parallel worker died or a collective failed: the engine cannot go on."""


@dataclass
class WorkerSpec:
    """Everything a worker needs to build its shard; picklable (sent to the spawned process)."""

    model: str
    dtype: torch.dtype
    device_type: str  # "cpu" or "cuda"; rank r uses cuda:r
    max_model_len: int
    block_size: int
    num_blocks: int
    attention_backend: str
    deterministic: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    world_size: int
    init_method: str
    num_threads: int  # torch intra-op threads per rank on CPU
    kv_cache_dtype: str = "auto"


@dataclass
class StepHeader:
    """One step's shapes and host-side lists; the integer tensors follow as one broadcast."""

    query_lens: list[int]
    context_lens: list[int]
    table_width: int
    block_size: int
    sample_rows: list[int]  # rows whose logits rank 0 samples from (compute_logits #1)
    prompt_rows: list[int]  # rows whose logits score prompt tokens (compute_logits #2)

    def sizes(self) -> list[int]:
        """Lengths of input_ids, positions, slot_mapping, query_start_loc, query_lens,
        context_lens, block_tables (flattened) inside the packed tensor."""
        t, s = sum(self.query_lens), len(self.query_lens)
        return [t, t, t, s + 1, s, s, s * self.table_width]


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """The step's int64 tensors in one flat tensor: one broadcast instead of seven."""
    return torch.cat([input_ids, positions, meta.slot_mapping, meta.query_start_loc, meta.query_lens,
                      meta.context_lens, meta.block_tables.flatten()])


def unpack_step(flat: torch.Tensor, header: StepHeader) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    input_ids, positions, slots, starts, qlens, clens, tables = flat.split(header.sizes())
    meta = AttentionMetadata(
        query_start_loc=starts, query_lens=qlens, context_lens=clens,
        block_tables=tables.view(len(header.query_lens), header.table_width), slot_mapping=slots,
        query_lens_cpu=header.query_lens, context_lens_cpu=header.context_lens, block_size=header.block_size,
    )
    return input_ids, positions, meta


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def threads_per_rank(world_size: int) -> int:
    """CPU: split this process's torch threads between the ranks (2 cores, TP=2: one each);
    more threads than cores would make the ranks fight over them."""
    return max(1, torch.get_num_threads() // world_size)


# ---- rank 0 --------------------------------------------------------------------------


@dataclass
class _Worker:
    rank: int
    process: mp.Process
    conn: multiprocessing.connection.Connection

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if code is None:
            return "is still running"
        if code < 0:
            return f"was killed by signal {signal.Signals(-code).name}"
        return f"exited with code {code}"


class TensorParallelGroup:
    """Rank 0's handle on the workers: starts them, sends each step, notices when one dies."""

    def __init__(self, spec: WorkerSpec):
        if dist.is_initialized():
            raise TensorParallelError(
                "tensor_parallel_size > 1 needs this process's default torch.distributed group, but one is "
                "already initialized (a trainer's?); run the engine in its own process")
        self.spec = spec
        self.world_size = spec.world_size
        self.device = _device(spec.device_type, 0)
        self.broken: str | None = None  # why the group failed; every later step raises it
        self._threads_before = torch.get_num_threads()
        self._in_group = False  # this group's; a later engine may own the process's default group
        ctx = mp.get_context("spawn")  # fork would copy the parent's threads and CUDA state
        self.workers: list[_Worker] = []
        for rank in range(1, spec.world_size):
            parent_conn, child_conn = ctx.Pipe()
            process = ctx.Process(target=worker_entry, args=(rank, spec, child_conn), daemon=True,
                                  name=f"pinfer-tp-rank{rank}")
            process.start()
            child_conn.close()
            self.workers.append(_Worker(rank, process, parent_conn))
        # Shut the workers down at exit even if nobody calls close() (a weakref: this keeps nothing alive).
        atexit.register(_shutdown_at_exit, weakref.ref(self))
        try:
            self._wait_for("started")
            if spec.device_type == "cpu":
                torch.set_num_threads(spec.num_threads)  # this process is a rank too; restored by shutdown()
            dist.init_process_group(_backend(spec.device_type), init_method=spec.init_method, rank=0,
                                    world_size=spec.world_size, timeout=COLLECTIVE_TIMEOUT)
            self._in_group = True
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def start(cls, config, dtype: torch.dtype, device: torch.device, max_model_len: int,
              num_blocks: int) -> TensorParallelGroup:
        """Workers for an EngineConfig: they load the same checkpoint and shard it."""
        tp = config.tensor_parallel_size
        return cls(WorkerSpec(
            model=str(config.model), dtype=dtype, device_type=device.type, max_model_len=max_model_len,
            block_size=config.block_size, num_blocks=num_blocks, attention_backend=config.attention_backend,
            deterministic=config.deterministic, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, world_size=tp,
            init_method=f"tcp://127.0.0.1:{_free_port()}", num_threads=threads_per_rank(tp),
            kv_cache_dtype=config.kv_cache_dtype,
        ))

    def wait_ready(self) -> None:
        """Block until every worker has loaded its shard and allocated its KV pool."""
        try:
            self._wait_for("ready")
        except BaseException:
            self.shutdown()
            raise

    def _wait_for(self, state: str) -> None:
        for worker in self.workers:
            conns = [worker.conn, worker.process.sentinel]
            if not multiprocessing.connection.wait(conns, timeout=STARTUP_TIMEOUT_S):
                raise TensorParallelError(f"tensor-parallel worker rank {worker.rank} did not get {state} "
                                          f"within {STARTUP_TIMEOUT_S:.0f} s")
            message = self._poll(worker)
            if message is None or message[0] != state:
                worker.process.join(timeout=5)  # it is exiting: let its exit code be known
                detail = f": {message[1]}" if message and message[0] == "error" else ""
                raise TensorParallelError(f"tensor-parallel worker rank {worker.rank} failed while starting "
                                          f"(it {worker.describe_exit()}){detail}")

    @staticmethod
    def _poll(worker: _Worker) -> tuple | None:
        try:
            return worker.conn.recv() if worker.conn.poll() else None
        except (EOFError, OSError):
            return None

    # ---- every step ----------------------------------------------------------------

    def check_workers(self) -> None:
        if self.broken is not None:
            raise TensorParallelError(self.broken)
        for worker in self.workers:
            if not worker.process.is_alive():
                self._fail(f"tensor-parallel worker rank {worker.rank} (pid {worker.process.pid}) "
                           f"{worker.describe_exit()}")

    def send_step(self, header: StepHeader, flat: torch.Tensor) -> None:
        """Start a step on every worker: the header through its pipe, the tensors by broadcast."""
        self.check_workers()
        for worker in self.workers:
            worker.conn.send(("step", header))
        dist.broadcast(flat, src=0)

    @contextlib.contextmanager
    def guard(self):
        """Around one step on rank 0: any failure inside becomes a TensorParallelError that names
        the dead rank if there is one (a failed collective usually means a peer died)."""
        try:
            yield
        except TensorParallelError:
            raise
        except BaseException as exc:
            if not isinstance(exc, Exception):  # e.g. Ctrl-C: the workers may be inside a collective
                self.broken = f"a step was interrupted ({type(exc).__name__}); the ranks are out of step, " \
                              f"the engine cannot continue (create a new one)"
                raise
            # A killed worker's connections can close before it has exited: wait briefly for that,
            # then join (a blocking waitpid: its sentinel closes a moment before its exit code is known).
            ended = multiprocessing.connection.wait([w.process.sentinel for w in self.workers], timeout=2.0)
            for worker in self.workers:
                if worker.process.sentinel in ended:
                    worker.process.join()
            dead = [w for w in self.workers if not w.process.is_alive()]
            if not dead:
                self._fail(f"tensor-parallel step failed: {type(exc).__name__}: {exc}", exc)
            reports = [self._poll(w) for w in dead]
            details = "".join(f"\n{r[1]}" for r in reports if r and r[0] == "error")
            self._fail("; ".join(f"tensor-parallel worker rank {w.rank} (pid {w.process.pid}) "
                                 f"{w.describe_exit()}" for w in dead) + details, exc)

    def _fail(self, reason: str, cause: BaseException | None = None):
        self.broken = f"{reason}; the engine cannot continue (create a new one)"
        raise TensorParallelError(self.broken) from cause

    def shutdown(self) -> None:
        """Stop the workers and leave the process group. Idempotent."""
        if not self.workers and not self._in_group:
            return
        for worker in self.workers:
            with contextlib.suppress(OSError, ValueError):
                if worker.process.is_alive():
                    worker.conn.send(("shutdown",))
        for worker in self.workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        healthy = self.broken is None and all(w.process.exitcode == 0 for w in self.workers)
        self.workers = []
        if self.spec.device_type == "cpu":
            torch.set_num_threads(self._threads_before)
        self.broken = self.broken or "the tensor-parallel workers were shut down (engine closed)"
        if self._in_group:
            self._in_group = False
            if healthy:
                dist.destroy_process_group()
            else:  # a group with a dead peer can block in a clean destroy: drop it
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()


def _shutdown_at_exit(ref: weakref.ref) -> None:
    group = ref()
    if group is not None:
        group.shutdown()


# ---- worker ranks --------------------------------------------------------------------


def worker_main(rank: int, spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    """A worker process: join the group, load and shard the model, then run steps until told to stop."""
    try:
        if spec.device_type == "cpu":
            torch.set_num_threads(spec.num_threads)
        conn.send(("started",))
        dist.init_process_group(_backend(spec.device_type), init_method=spec.init_method, rank=rank,
                                world_size=spec.world_size, timeout=COLLECTIVE_TIMEOUT)
        runner = _build_runner(rank, spec)
        conn.send(("ready",))
        while True:
            try:
                message = conn.recv()
            except EOFError:  # rank 0 exited without saying goodbye
                return
            if message[0] == "shutdown":
                break
            _run_step(runner, message[1])
        dist.destroy_process_group()
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
        raise


def worker_entry(rank: int, spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    """The spawned process's target: worker_main, then exit at once. Why: a normal interpreter
    exit runs C++ static destructors, and gloo's background threads then sometimes abort the
    process (SIGABRT, "terminate called without an active exception") after a clean shutdown."""
    try:
        worker_main(rank, spec, conn)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _build_runner(rank: int, spec: WorkerSpec):
    # Imported here: the engine imports this module, and workers need the same loading path.
    from pinfer.config import ModelConfig
    from pinfer.distributed.parallel_layers import shard_model
    from pinfer.engine.model_runner import ModelRunner
    from pinfer.loading.loader import load_model, open_checkpoint

    device = _device(spec.device_type, rank)
    checkpoint = open_checkpoint(spec.model)
    config = ModelConfig.from_hf_config(checkpoint.config)
    model = load_model(checkpoint, config, spec.dtype, device, spec.max_model_len)
    shard_model(model, rank, spec.world_size)
    return ModelRunner(model, config, spec.dtype, device, spec.block_size, spec.num_blocks,
                       spec.attention_backend, spec.deterministic, max_num_seqs=spec.max_num_seqs,
                       max_num_tokens=spec.max_num_batched_tokens, max_model_len=spec.max_model_len,
                       tensor_parallel_size=spec.world_size, kv_cache_dtype=spec.kv_cache_dtype)


@torch.inference_mode()
def _run_step(runner, header: StepHeader) -> None:
    """The worker's half of ModelRunner.execute: the same collectives in the same order
    (broadcast, forward, logits of the sampled rows, logits of the prompt rows)."""
    flat = torch.empty(sum(header.sizes()), dtype=torch.long, device=runner.device)
    dist.broadcast(flat, src=0)
    input_ids, positions, meta = unpack_step(flat, header)
    with runner.forward_context():
        runner.zero_new_blocks(meta.block_tables)
        hidden = runner.model(input_ids, positions, runner.kv_caches, meta, runner.backend)
        if header.sample_rows:
            runner.model.compute_logits(hidden[header.sample_rows])
        if header.prompt_rows:
            runner.model.compute_logits(hidden[header.prompt_rows])
