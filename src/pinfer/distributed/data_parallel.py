"""Data parallelism: N whole-engine replicas as Ray actors behind one engine-shaped object.

    engine = DataParallelEngine(EngineConfig(model=..., data_parallel_size=2))
    engine.generate(prompts, params)          # offline: one contiguous share per replica, input order
    engine.add_request(...); engine.step()    # the LLMEngine interface AsyncEngine drives (serving)

Each replica (`EngineReplica`) is one `LLMEngine` in its own Ray worker process
with `CPUs / N` torch threads (a GPU each when the cluster has them). The driver
keeps the tokenizer and model limits, so prompts are tokenized and validated
here by the single engine's own code before any replica sees them, and it draws
the seed of every request that has none from `config.seed` in input order, as
one engine would: outputs do not depend on N or on which replica ran them.

Offline, `generate` cuts the prompts into N contiguous shares of about equal
work (n * (prompt + max_tokens) tokens; contiguous keeps repeated prompts on one
replica's prefix cache) and runs each share in one remote call, so replicas
never wait for each other. Serving, `add_request` routes each request to the
replica with the fewest unfinished requests and `step()` steps the busy
replicas in parallel and merges their outputs.

A replica that dies (its process killed, OOM, a lost node) is detected by Ray at
the next call to it: `generate` raises ReplicaDiedError ("data-parallel replica
1 died: ..."); `step()` ends that replica's requests with that error and goes on
with the others; later requests use the survivors; with none left,
`add_request` raises. Dead replicas are not restarted.

Ray: an already initialised session is used as it is; otherwise `RAY_ADDRESS`
(e.g. `auto`, after `ray start --head` here and `ray start --address=HEAD:6379`
on the other nodes) joins a cluster; otherwise a private local Ray instance is
started for this process.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence as Seq

from pinfer.config import EngineConfig, ModelConfig
from pinfer.engine.llm_engine import EngineStats, LLMEngine
from pinfer.errors import InvalidRequestError, PinferError
from pinfer.loading.loader import open_checkpoint
from pinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pinfer.sampling_params import SamplingParams

logger = logging.getLogger("pinfer.distributed")

Prompt = str | list[int]


class ReplicaDiedError(PinferError):
    """A data-parallel replica's process is gone; the requests it held are lost."""


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise PinferError("data_parallel_size > 1 runs replicas on Ray: pip install 'pinfer[ray]' "
                          "(or pip install 'ray>=2.9')") from exc
    return ray


def connect_ray() -> None:
    """Use the current Ray session, else the cluster at RAY_ADDRESS, else start a private local one."""
    ray = _ray()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # Ray reads RAY_ADDRESS itself ("auto", "HOST:6379", "ray://...")
        return
    # "local": never attach by surprise to a cluster some other `ray start` left running here
    ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False)


@dataclass
class ReplicaState:
    """What the driver needs after every call, returned with it (no extra round trips)."""

    stats: EngineStats
    has_unfinished: bool
    weight_version: int
    num_weights_pending: int


@dataclass
class ReplicaInfo:
    max_model_len: int
    kv_capacity_tokens: int
    pid: int
    node_ip: str
    num_threads: int


class EngineReplica:
    """One LLMEngine in a Ray worker process (made a Ray actor by DataParallelEngine)."""

    def __init__(self, config: EngineConfig, num_threads: int):
        import torch

        torch.set_num_threads(num_threads)  # the replicas on a node share its cores
        self.engine = LLMEngine(config)

    def info(self) -> ReplicaInfo:
        import ray
        import torch

        return ReplicaInfo(self.engine.max_model_len, self.engine.kv_capacity_tokens, os.getpid(),
                           ray.util.get_node_ip_address(), torch.get_num_threads())

    def state(self) -> ReplicaState:
        e = self.engine
        return ReplicaState(e.stats(), e.has_unfinished_requests(), e.weight_version, e.num_weights_pending)

    def generate(self, requests: list[tuple[str, Prompt, SamplingParams]]
                 ) -> tuple[list[RequestOutput], ReplicaState]:
        """Run a share of an offline generate() to completion; outputs in the order given."""
        from pinfer.entrypoints.llm import run_to_completion

        ids = [self.engine.add_request(prompt, params, request_id=rid, final_only=True)
               for rid, prompt, params in requests]
        return run_to_completion(self.engine, ids, use_tqdm=False), self.state()

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str,
                    arrival_time: float | None) -> ReplicaState:
        self.engine.add_request(prompt, params, request_id=request_id, arrival_time=arrival_time)
        return self.state()

    def step(self) -> tuple[list[RequestOutput], ReplicaState]:
        return self.engine.step(), self.state()

    def abort_request(self, request_id: str) -> tuple[RequestOutput | None, ReplicaState]:
        return self.engine.abort_request(request_id), self.state()

    def call(self, method: str, *args: Any, **kwargs: Any) -> tuple[Any, ReplicaState]:
        """The RL controls and the trace: update_weights, sleep, wake_up, write_trace."""
        return getattr(self.engine, method)(*args, **kwargs), self.state()


@dataclass
class Replica:
    """The driver's view of one replica."""

    index: int
    actor: Any  # ray.actor.ActorHandle of EngineReplica
    info: ReplicaInfo
    state: ReplicaState
    dead: str | None = None  # why it died

    @property
    def alive(self) -> bool:
        return self.dead is None


@dataclass
class _Owned:
    """A serving request on a replica: enough to report it if the replica dies."""

    replica: Replica
    prompt: str | None
    prompt_token_ids: list[int]
    n: int
    arrival_time: float


def balanced_shares(costs: Seq[float], num_shares: int) -> list[range]:
    """Cut indices 0..len(costs) into num_shares contiguous ranges of about equal total cost (some may be empty)."""
    prefix = list(itertools.accumulate(costs, initial=0))
    total = prefix[-1]
    bounds = [0]
    for k in range(1, num_shares):
        target = total * k / num_shares
        i = bisect.bisect_left(prefix, target)  # first boundary at or past the target ...
        if i > 0 and target - prefix[i - 1] < prefix[min(i, len(prefix) - 1)] - target:
            i -= 1  # ... or the one before it, if closer
        bounds.append(min(max(i, bounds[-1]), len(costs)))
    bounds.append(len(costs))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class DataParallelEngine:
    # Tokenizing, chat templates and request checks are the single engine's own code, run on the
    # driver: they read only tokenizer, model_config, max_model_len and kv_capacity_tokens.
    tokenize = LLMEngine.tokenize
    apply_chat_template = LLMEngine.apply_chat_template
    check_request = LLMEngine.check_request

    def __init__(self, config: EngineConfig):
        if config.data_parallel_size < 2:
            raise PinferError(f"DataParallelEngine needs data_parallel_size >= 2, got {config.data_parallel_size}")
        if config.tensor_parallel_size > 1:
            raise PinferError("data_parallel_size > 1 with tensor_parallel_size > 1 is not supported yet")
        ray = _ray()
        self.config = config
        checkpoint = open_checkpoint(config.model)  # fail fast, before any replica starts
        self.model_config = ModelConfig.from_hf_config(checkpoint.config)
        self.tokenizer = checkpoint.load_tokenizer()
        connect_ray()
        self.replicas = self._start_replicas(ray, config)
        first = self.replicas[0].info
        self.max_model_len = first.max_model_len
        self.kv_capacity_tokens = first.kv_capacity_tokens  # per replica: one request must fit one replica
        self._owned: dict[str, _Owned] = {}  # serving requests in flight -> where
        self._request_ids = itertools.count()
        self._seed_rng = random.Random(config.seed)  # the same draws a single engine would make
        self.paused = False  # the driver just stops stepping; replicas need not know
        self.sleeping = False

    def _start_replicas(self, ray, config: EngineConfig) -> list[Replica]:
        n = config.data_parallel_size
        resources = ray.cluster_resources()
        cpus = resources.get("CPU", 1.0) / n
        threads = max(1, int(cpus))
        free = ray.available_resources().get("CPU", 0.0)
        if free + 1e-6 < cpus * n:  # Ray would queue the actors forever: say so instead
            raise PinferError(f"data_parallel_size={n} asks Ray for {n} x {cpus:g} CPUs but only {free:g} of "
                              f"{resources.get('CPU', 0):g} are free (other actors hold the rest)")
        wants_gpu = str(config.device or "").startswith("cuda") or (
            config.device is None and resources.get("GPU", 0) >= n)
        actor_class = ray.remote(EngineReplica).options(
            num_cpus=cpus, num_gpus=1 if wants_gpu else 0, max_restarts=0,
            scheduling_strategy="SPREAD")  # on a cluster: one replica per node first
        actors = [actor_class.remote(self._replica_config(config, i), threads) for i in range(n)]
        replicas = []
        for i, actor in enumerate(actors):
            try:
                info, state = ray.get([actor.info.remote(), actor.state.remote()])
            except Exception as exc:
                for a in actors:
                    ray.kill(a)
                raise _unwrap(exc, i) from None
            replicas.append(Replica(i, actor, info, state))
        logger.info("data parallel: %d replicas (%s), %d torch thread(s) each", n,
                    ", ".join(f"pid {r.info.pid} on {r.info.node_ip}" for r in replicas), threads)
        return replicas

    @staticmethod
    def _replica_config(config: EngineConfig, index: int) -> EngineConfig:
        trace_file = config.trace_file
        if trace_file:  # one trace per replica process
            path = Path(trace_file)
            trace_file = str(path.with_name(f"{path.stem}.dp{index}{path.suffix}"))
        return dataclasses.replace(config, data_parallel_size=1, trace_file=trace_file)

    @property
    def live_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def _resolve_seed(self, params: SamplingParams) -> SamplingParams:
        if params.seed is not None:
            return params
        return dataclasses.replace(params, seed=self._seed_rng.getrandbits(31))

    def _check_awake(self) -> None:
        if self.sleeping:
            raise InvalidRequestError("the engine is asleep; call wake_up() first")
        self._require_live()

    def _require_live(self) -> None:
        if not self.live_replicas:
            raise ReplicaDiedError("every data-parallel replica died: "
                                   + "; ".join(f"replica {r.index}: {r.dead}" for r in self.replicas))

    # ---- offline ------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool = False
                 ) -> list[RequestOutput]:
        """Run validated prompts on the replicas, one contiguous share each; outputs in input order."""
        from tqdm.auto import tqdm

        ray = _ray()
        self._check_awake()
        params = [self._resolve_seed(p) for p in params]
        request_ids = [str(next(self._request_ids)) for _ in prompts]
        costs = []
        for prompt, p in zip(prompts, params):
            _, ids = self.tokenize(prompt)
            costs.append(p.n * (len(ids) + self.check_request(ids, p)))
        replicas = self.live_replicas
        jobs: dict[Any, tuple[Replica, range]] = {}
        for replica, share in zip(replicas, balanced_shares(costs, len(replicas))):
            if share:
                share_requests = [(request_ids[i], prompts[i], params[i]) for i in share]
                jobs[replica.actor.generate.remote(share_requests)] = (replica, share)
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            pending = list(jobs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                replica, share = jobs[done[0]]
                try:
                    outputs, replica.state = ray.get(done[0])
                except Exception as exc:
                    raise self._failed(replica, exc) from None  # the other shares run on, unread
                for i, output in zip(share, outputs):
                    results[i] = output
                bar.update(len(share))
        finally:
            bar.close()
        return results

    def _failed(self, replica: Replica, exc: BaseException) -> Exception:
        """The error to raise for a failed call; a death marks the replica dead."""
        error = _unwrap(exc, replica.index, replica.info)
        if isinstance(error, ReplicaDiedError) and replica.alive:
            replica.dead = str(error)
            logger.error("%s; %d replica(s) left", error, len(self.live_replicas))
        return error

    # ---- the engine interface (serving: AsyncEngine's worker thread) -------------------

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    arrival_time: float | None = None) -> str:
        ray = _ray()
        params = params or SamplingParams()
        params.validate()
        self._check_awake()
        text, prompt_ids = self.tokenize(prompt)
        self.check_request(prompt_ids, params)
        request_id = request_id if request_id is not None else str(next(self._request_ids))
        if request_id in self._owned:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params = self._resolve_seed(params)
        arrival_time = arrival_time if arrival_time is not None else time.time()
        while True:
            replica = self._least_loaded()
            try:
                replica.state = ray.get(replica.actor.add_request.remote(prompt, params, request_id, arrival_time))
            except Exception as exc:
                error = self._failed(replica, exc)
                if isinstance(error, ReplicaDiedError):
                    continue  # try the next replica; its other requests fail at the next step()
                raise error from None
            self._owned[request_id] = _Owned(replica, text, prompt_ids, params.n, arrival_time)
            return request_id

    def _least_loaded(self) -> Replica:
        self._check_awake()
        load = {r.index: 0 for r in self.live_replicas}
        for owned in self._owned.values():
            if owned.replica.alive:
                load[owned.replica.index] += 1
        return self.replicas[min(load, key=lambda i: (load[i], i))]

    def _fail_lost_requests(self) -> list[RequestOutput]:
        """Finished outputs, with the death as their error, for the requests that were on dead replicas."""
        outputs = []
        for request_id, owned in list(self._owned.items()):
            if not owned.replica.alive:
                del self._owned[request_id]
                completions = [CompletionOutput(i, "", [], None, None, "error") for i in range(owned.n)]
                outputs.append(RequestOutput(request_id, owned.prompt, owned.prompt_token_ids, None, completions,
                                             True, RequestMetrics(owned.arrival_time, finished_time=time.time()),
                                             error=owned.replica.dead))
        return outputs

    def step(self) -> list[RequestOutput]:
        """One step of every busy replica, in parallel; their outputs merged (replica order)."""
        ray = _ray()
        if self.paused or self.sleeping:
            return []
        calls = [(r, r.actor.step.remote()) for r in self.live_replicas if r.state.has_unfinished]
        outputs: list[RequestOutput] = []
        error: Exception | None = None
        for replica, ref in calls:  # collect every replica's step before raising anything
            try:
                step_outputs, replica.state = ray.get(ref)
            except Exception as exc:
                failure = self._failed(replica, exc)
                if not isinstance(failure, ReplicaDiedError):
                    error = error or failure
                continue
            for output in step_outputs:
                if output.finished:
                    self._owned.pop(output.request_id, None)
            outputs.extend(step_outputs)
        outputs.extend(self._fail_lost_requests())
        if error is not None:
            raise error
        return outputs

    def abort_request(self, request_id: str) -> RequestOutput | None:
        owned = self._owned.pop(request_id, None)
        if owned is None or not owned.replica.alive:
            return None
        replica = owned.replica
        try:
            output, replica.state = _ray().get(replica.actor.abort_request.remote(request_id))
        except Exception as exc:
            raise self._failed(replica, exc) from None
        return output

    def has_unfinished_requests(self) -> bool:
        return any(r.state.has_unfinished for r in self.live_replicas) or any(
            not o.replica.alive for o in self._owned.values())  # their error outputs are still due

    @property
    def num_prompt_tokens(self) -> int:
        return self.stats().num_prompt_tokens

    @property
    def num_generated_tokens(self) -> int:
        return self.stats().num_generated_tokens

    def stats(self) -> EngineStats:
        """Summed over the live replicas (as of their last call); rates weighted by blocks / prompt tokens."""
        stats = [r.state.stats for r in self.live_replicas] or [r.state.stats for r in self.replicas]
        blocks = sum(s.num_blocks for s in stats)
        prompt_tokens = sum(s.num_prompt_tokens for s in stats)
        return EngineStats(
            num_running=sum(s.num_running for s in stats),
            num_waiting=sum(s.num_waiting for s in stats),
            kv_cache_usage=sum(s.kv_cache_usage * s.num_blocks for s in stats) / max(blocks, 1),
            prefix_cache_hit_rate=sum(s.prefix_cache_hit_rate * s.num_prompt_tokens for s in stats)
            / max(prompt_tokens, 1),
            num_prompt_tokens=prompt_tokens,
            num_generated_tokens=sum(s.num_generated_tokens for s in stats),
            num_preemptions=sum(s.num_preemptions for s in stats),
            num_free_blocks=sum(s.num_free_blocks for s in stats),
            num_blocks=blocks,
        )

    # ---- RL controls and the trace: the same call on every live replica ----------------

    def _call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        ray = _ray()
        self._require_live()
        calls = [(r, r.actor.call.remote(method, *args, **kwargs)) for r in self.live_replicas]
        results, error = [], None
        for replica, ref in calls:
            try:
                result, replica.state = ray.get(ref)
                results.append(result)
            except Exception as exc:
                error = error or self._failed(replica, exc)
        if error is not None:
            raise error
        return results

    @property
    def weight_version(self) -> int:
        return max(r.state.weight_version for r in self.live_replicas or self.replicas)

    @property
    def num_weights_pending(self) -> int:
        return max(r.state.num_weights_pending for r in self.live_replicas or self.replicas)

    def update_weights(self, weights, reset_prefix_cache: bool = True) -> int:
        """Send the weights once to Ray's object store; every replica copies them in (see LLMEngine.update_weights)."""
        items = list(weights.items() if hasattr(weights, "items") else weights)
        ref = _ray().put(items)
        return self._call_all("update_weights", ref, reset_prefix_cache)[0]

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def sleep(self, level: int = 1) -> None:
        if self.has_unfinished_requests():
            raise InvalidRequestError("cannot sleep with unfinished requests; abort or finish them first")
        self._call_all("sleep", level)
        self.sleeping = True

    def wake_up(self, reload_weights: bool = True) -> None:
        self._call_all("wake_up", reload_weights)
        self.sleeping = False

    def write_trace(self) -> None:
        if self.config.trace_file:
            self._call_all("write_trace")

    def shutdown(self) -> None:
        """Stop the replica processes (the Ray session stays)."""
        ray = _ray()
        for replica in self.replicas:
            if replica.alive:
                ray.kill(replica.actor)
                replica.dead = "shut down"


def _unwrap(exc: BaseException, index: int, info: ReplicaInfo | None = None) -> Exception:
    """Ray's exceptions -> ours: a dead actor -> ReplicaDiedError, an error raised inside -> that error."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayActorError):
        reason = str(exc).strip().splitlines()
        where = f" (pid {info.pid} on {info.node_ip})" if info is not None else ""
        return ReplicaDiedError(f"data-parallel replica {index}{where} died: "
                                f"{reason[0] if reason else type(exc).__name__}")
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, PinferError):
        return exc.cause  # a bad request or control: the engine's own error, as a single engine raises it
    # anything else keeps Ray's wrapper, which carries the replica's traceback
    return exc if isinstance(exc, Exception) else PinferError(repr(exc))
