"""The OpenAI-compatible HTTP server: FastAPI routes over the AsyncEngine.

    POST /v1/completions        POST /v1/chat/completions     (JSON or SSE stream)
    GET  /v1/models             GET  /health                  GET /metrics
    GET  /  (chat page)         GET  /dashboard               (web.py)

RL controls (modelled on vLLM's and SGLang's), run on the engine worker between
two steps:

    POST /update_weights {"path", "reset_prefix_cache"}   POST /pause {"abort_in_flight"}
    POST /resume    POST /sleep {"level"}    POST /wake_up {"reload_weights"}    GET /engine_state

A request is validated on the event loop (parameters, tokenization, context
length) and only then handed to the engine worker, so a bad request never
reaches the engine. Errors are OpenAI-shaped: `{"error": {"message", "type",
"param", "code"}}` with 400 / 401 / 404 / 500 / 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import anyio
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from safetensors import SafetensorError, safe_open
from starlette.exceptions import HTTPException as StarletteHTTPException

from pinfer.engine.llm_engine import LLMEngine
from pinfer.errors import InvalidRequestError, PinferError
from pinfer.outputs import RequestOutput
from pinfer.sampling_params import SamplingParams
from pinfer.serving.async_engine import (AsyncEngine, EngineBusyError, EngineRequest, EngineSleepingError,
                                         RequestFailedError, RequestStream, ServerOverloadedError,
                                         ServerShuttingDownError)
from pinfer.serving.metrics import CONTENT_TYPE, ServerMetrics
from pinfer.serving.protocol import (ChatCompletionRequest, CompletionRequest, OpenAIError, PauseRequest,
                                     SleepRequest, UpdateWeightsRequest, WakeUpRequest, chat_logprobs,
                                     completion_logprobs, error_body, invalid_request, new_id, now, stop_fields,
                                     usage)
from pinfer.serving.web import add_web_routes, is_public_page

logger = logging.getLogger("pinfer.serving")

RETRY_AFTER_SECONDS = 1


def build_app(
    engine: LLMEngine | AsyncEngine,
    served_model_names: list[str] | None = None,
    api_key: str | None = None,
    max_waiting: int = 256,
) -> FastAPI:
    """The FastAPI app serving `engine`; its lifespan starts and stops the engine worker thread.

    Give an AsyncEngine built with a factory (as `pinfer serve` does) to have the model loaded on the
    worker thread, which runs it faster; max_waiting is then the AsyncEngine's."""
    if isinstance(engine, AsyncEngine):
        async_engine, engine = engine, engine.engine
    else:
        async_engine = AsyncEngine(engine, max_waiting=max_waiting)
    serving = OpenAIServing(engine, async_engine, served_model_names or [engine.config.model])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.stop()

    app = FastAPI(title="pinfer", lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.serving = serving
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            return JSONResponse(error_body("the engine worker is not running", "server_error"), status_code=503)
        if async_engine.draining:
            return JSONResponse(error_body("the server is shutting down", "server_error",
                                           code="server_shutting_down"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": serving.created, "owned_by": "pinfer",
             "root": engine.config.model, "max_model_len": engine.max_model_len}
            for name in serving.served_model_names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat_completions(body, request)

    _add_rl_routes(app, async_engine)
    add_web_routes(app, async_engine)
    return app


# ---- RL controls ------------------------------------------------------------------------


def _add_rl_routes(app: FastAPI, async_engine: AsyncEngine) -> None:
    """Weight updates, pause/resume and sleep/wake_up over HTTP, for a trainer driving the server."""

    @app.post("/update_weights")
    async def update_weights(body: UpdateWeightsRequest) -> dict[str, Any]:
        start = time.perf_counter()
        async_engine.check_can_update_weights()
        files = await asyncio.to_thread(_safetensors_files, body.path)  # cheap checks before the worker waits
        try:
            num_tensors, version = await async_engine.update_weights(lambda: _read_safetensors(files),
                                                                     body.reset_prefix_cache)
        except (PinferError, SafetensorError, OSError) as exc:  # bad names/shapes/data: nothing was written
            raise OpenAIError(400, f"cannot update the weights from {body.path!r}, the engine keeps its "
                                   f"current weights: {exc}", param="path") from exc
        seconds = time.perf_counter() - start
        logger.info("updated %d weight tensors from %s in %.2f s (weight_version %d)", num_tensors, body.path,
                    seconds, version)
        return {"weight_version": version, "num_tensors": num_tensors, "seconds": seconds}

    @app.post("/pause")
    async def pause(body: PauseRequest | None = None) -> dict[str, Any]:
        await async_engine.pause(abort_in_flight=(body or PauseRequest()).abort_in_flight)
        return {"paused": True}

    @app.post("/resume")
    async def resume() -> dict[str, Any]:
        await async_engine.resume()
        return {"paused": False}

    @app.post("/sleep")
    async def sleep(body: SleepRequest | None = None) -> dict[str, Any]:
        level = (body or SleepRequest()).level
        if level not in (1, 2):
            raise OpenAIError(400, f"level must be 1 (free the KV cache) or 2 (the KV cache and the weights), "
                                   f"got {level}", param="level")
        await async_engine.sleep(level)
        return {"sleeping": True, "level": async_engine.sleep_level}

    @app.post("/wake_up")
    async def wake_up(body: WakeUpRequest | None = None) -> dict[str, Any]:
        await async_engine.wake_up(reload_weights=(body or WakeUpRequest()).reload_weights)
        return {"sleeping": False}

    @app.get("/engine_state")
    async def engine_state() -> dict[str, Any]:
        s = async_engine.stats()
        return {"paused": s.paused, "sleeping": s.sleeping, "sleep_level": async_engine.sleep_level,
                "weight_version": s.weight_version, "num_running": s.num_running, "num_waiting": s.num_waiting,
                "num_in_flight": async_engine.num_in_flight}


def _safetensors_files(path: str) -> list[Path]:
    """The .safetensors files at `path` (one file, or every one in a folder), headers read; 400 if unusable."""
    target = Path(path).expanduser()
    if not target.exists():
        raise OpenAIError(400, f"path {path!r} does not exist on the server", param="path")
    if target.is_dir():
        files = sorted(target.glob("*.safetensors"))
        if not files:
            raise OpenAIError(400, f"folder {path!r} has no *.safetensors files", param="path")
    elif target.suffix == ".safetensors":
        files = [target]
    else:
        raise OpenAIError(400, f"path {path!r} is neither a .safetensors file nor a folder of them", param="path")
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise OpenAIError(400, f"cannot read safetensors file {str(file)!r} (corrupt or truncated?): {exc}",
                              param="path") from exc
    return files


def _read_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every file, read one tensor at a time (runs on the engine worker)."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


class OpenAIServing:
    """Request handling shared by both endpoints: validate, submit, then answer in JSON or SSE."""

    def __init__(self, engine: LLMEngine, async_engine: AsyncEngine, served_model_names: list[str]):
        self.engine = engine
        self.async_engine = async_engine
        self.served_model_names = served_model_names
        self.created = now()
        self.metrics = ServerMetrics(async_engine.stats, lambda: async_engine.num_in_flight)
        async_engine.on_finished = self.metrics.observe_finished
        async_engine.on_abort = self.metrics.observe_abort

    # ---- /v1/completions --------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        arrival = time.time()
        model = self._model_name(body.model)
        body.check_supported()
        params = self._sampling_params(body.to_sampling_params)
        request_id = new_id("cmpl")
        requests, echo_texts = [], []
        for i, prompt in enumerate(body.prompts()):
            text, ids = self._tokenize(prompt)
            requests.append(self._engine_request(f"{request_id}-{i}", ids, params, arrival))
            if body.echo:
                echo_texts.append(text if text is not None else self.engine.tokenizer.decode(ids))
        stream = self._submit(requests)
        reply = _CompletionReply(self, body, model, request_id, requests, echo_texts)
        if body.stream:
            return SSEResponse(reply.stream(stream))
        finals = await _collect(stream, request)
        if finals is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse(reply.response(finals))

    # ---- /v1/chat/completions ---------------------------------------------------------

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.time()
        model = self._model_name(body.model)
        body.check_supported()
        aliases = {"max_tokens": body.max_tokens_param, "logprobs": "top_logprobs", "prompt": "messages"}
        params = self._sampling_params(body.to_sampling_params, aliases)
        _, ids = self._tokenize(self._chat_prompt_ids(body), aliases)
        request_id = new_id("chatcmpl")
        requests = [self._engine_request(request_id, ids, params, arrival, aliases)]
        stream = self._submit(requests)
        reply = _ChatReply(self, body, model, request_id, requests[0])
        if body.stream:
            return SSEResponse(reply.stream(stream))
        finals = await _collect(stream, request)
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(reply.response(finals[request_id]))

    def _chat_prompt_ids(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                              param="messages")
        messages = body.template_messages()
        try:
            return self.engine.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        except Exception as exc:  # template errors (e.g. a role the template rejects) are the request's fault
            raise OpenAIError(400, f"messages could not be rendered with the chat template: {exc}",
                              param="messages") from exc

    # ---- validation (event loop; never touches the engine's mutable state) --------------

    def _model_name(self, requested: str | None) -> str:
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise OpenAIError(404, f"The model `{requested}` does not exist; this server serves: "
                                   f"{', '.join(self.served_model_names)}", param="model", code="model_not_found")
        return requested

    @staticmethod
    def _sampling_params(make, aliases: dict[str, str] | None = None) -> SamplingParams:
        try:
            return make()
        except InvalidRequestError as exc:
            raise invalid_request(exc, aliases) from exc
        except TypeError as exc:  # e.g. a comparison with a value of the wrong type
            raise OpenAIError(400, f"invalid sampling parameters: {exc}") from exc

    def _tokenize(self, prompt: str | list[int], aliases: dict[str, str] | None = None) -> tuple[str | None, list[int]]:
        try:
            return self.engine.tokenize(prompt)
        except InvalidRequestError as exc:
            raise invalid_request(exc, aliases) from exc

    def _engine_request(self, request_id: str, ids: list[int], params: SamplingParams, arrival: float,
                        aliases: dict[str, str] | None = None) -> EngineRequest:
        if params.max_tokens is None:  # up to the context length (and what the KV pool can hold)
            room = min(self.engine.max_model_len, self.engine.kv_capacity_tokens) - len(ids)
            if room >= 1:
                try:
                    params = dataclasses.replace(params, max_tokens=room)
                except InvalidRequestError as exc:  # e.g. min_tokens > room
                    raise invalid_request(exc, aliases) from exc
        try:
            self.engine.check_request(ids, params)
        except InvalidRequestError as exc:
            raise invalid_request(exc, aliases) from exc
        return EngineRequest(request_id, ids, params, arrival)

    def _submit(self, requests: list[EngineRequest]) -> RequestStream:
        try:
            return self.async_engine.submit(requests)
        except ServerOverloadedError as exc:
            raise OpenAIError(503, str(exc), "server_error", code="server_overloaded",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from exc
        except ServerShuttingDownError as exc:
            raise OpenAIError(503, str(exc), "server_error", code="server_shutting_down") from exc
        except RequestFailedError as exc:
            raise OpenAIError(500, str(exc), "server_error", code="engine_error") from exc
        except EngineSleepingError as exc:
            raise OpenAIError(503, str(exc), "server_error", code="engine_sleeping") from exc

    def decode_token(self, token: int) -> str:
        return self.engine.tokenizer.decode([token])


# ---- replies ----------------------------------------------------------------------------


class _ChoiceProgress:
    """What a stream has sent of one choice so far."""

    def __init__(self) -> None:
        self.chars = 0
        self.tokens = 0
        self.text_offset = 0
        self.started = False
        self.finished = False

    def news(self, completion) -> tuple[str, list[int], bool] | None:
        """(new text, new token ids, finished) of a cumulative completion, or None if nothing to send."""
        if self.finished:
            return None
        delta = completion.text[self.chars:]
        new_ids = completion.token_ids[self.tokens:]
        finished = completion.finish_reason is not None
        if not (delta or new_ids or finished):
            return None
        return delta, new_ids, finished


class _CompletionReply:
    def __init__(self, serving: OpenAIServing, body: CompletionRequest, model: str, request_id: str,
                 requests: list[EngineRequest], echo_texts: list[str]):
        self.serving, self.body, self.model, self.id = serving, body, model, request_id
        self.requests = requests
        self.echo_texts = echo_texts
        self.created = now()
        self.prompt_index = {r.request_id: i for i, r in enumerate(requests)}

    def _logprobs(self, output: RequestOutput, completion, start: int, echo: bool, offset: int):
        ids, entries = completion.token_ids[start:], (completion.logprobs or [])[start:]
        if echo:
            ids = output.prompt_token_ids + ids
            entries = list(output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + entries
        return completion_logprobs(ids, entries, offset, self.serving.decode_token)

    def _choice(self, output: RequestOutput, completion, text: str, logprobs, token_ids: list[int],
                first: bool, finished: bool) -> dict[str, Any]:
        p = self.prompt_index[output.request_id]
        choice = {"index": p * self.body.n + completion.index, "text": text, "logprobs": logprobs,
                  "finish_reason": None, "stop_reason": None}
        if finished:
            choice.update(stop_fields(completion))
        if self.body.return_token_ids:
            if first:
                choice["prompt_token_ids"] = output.prompt_token_ids
            choice["token_ids"] = token_ids
        return choice

    def _usage(self, finals: dict[str, RequestOutput]) -> dict[str, int]:
        return usage(sum(len(r.prompt_token_ids) for r in self.requests),
                     sum(len(c.token_ids) for o in finals.values() for c in o.outputs))

    def response(self, finals: dict[str, RequestOutput]) -> dict[str, Any]:
        choices = []
        for p, r in enumerate(self.requests):
            output = finals[r.request_id]
            for c in output.outputs:
                echo = self.echo_texts[p] if self.body.echo else ""
                logprobs = self._logprobs(output, c, 0, self.body.echo, 0) if self.body.logprobs is not None \
                    else None
                choices.append(self._choice(output, c, echo + c.text, logprobs, c.token_ids, True, True))
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(finals)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}

    async def stream(self, stream: RequestStream) -> AsyncIterator[str]:
        progress: dict[int, _ChoiceProgress] = {}
        finals: dict[str, RequestOutput] = {}
        try:
            async for output in stream:
                p = self.prompt_index[output.request_id]
                for c in output.outputs:
                    state = progress.setdefault(p * self.body.n + c.index, _ChoiceProgress())
                    news = state.news(c)
                    if news is None:
                        continue
                    delta, new_ids, finished = news
                    first = not state.started
                    echo = first and self.body.echo
                    text = (self.echo_texts[p] if echo else "") + delta
                    logprobs = None
                    if self.body.logprobs is not None:
                        logprobs = self._logprobs(output, c, state.tokens, echo, state.text_offset)
                        if logprobs["tokens"]:
                            state.text_offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                    state.chars = max(state.chars, len(c.text))
                    state.tokens = len(c.token_ids)
                    state.started, state.finished = True, finished
                    yield _sse(self._chunk([self._choice(output, c, text, logprobs, new_ids, first, finished)]))
                if output.finished:
                    finals[output.request_id] = output
            if self.body.include_usage:
                yield _sse({**self._chunk([]), "usage": self._usage(finals)})
        except Exception as exc:
            yield _sse(_stream_error(exc))
        finally:
            stream.abort()
        yield "data: [DONE]\n\n"


class _ChatReply:
    def __init__(self, serving: OpenAIServing, body: ChatCompletionRequest, model: str, request_id: str,
                 request: EngineRequest):
        self.serving, self.body, self.model, self.id, self.request = serving, body, model, request_id, request
        self.created = now()
        self.top_logprobs = body.top_logprobs or 0

    def _extra(self, choice: dict[str, Any], output: RequestOutput, token_ids: list[int], first: bool) -> None:
        if self.body.return_token_ids:
            if first:
                choice["prompt_token_ids"] = output.prompt_token_ids
            choice["token_ids"] = token_ids

    def response(self, output: RequestOutput) -> dict[str, Any]:
        choices = []
        for c in output.outputs:
            logprobs = {"content": chat_logprobs(c.token_ids, c.logprobs or [], self.top_logprobs)} \
                if self.body.logprobs else None
            choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                      "logprobs": logprobs, **stop_fields(c)}
            self._extra(choice, output, c.token_ids, True)
            choices.append(choice)
        body = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices,
                "usage": usage(len(output.prompt_token_ids), sum(len(c.token_ids) for c in output.outputs))}
        if self.body.return_token_ids:
            body["prompt_token_ids"] = output.prompt_token_ids  # where vLLM puts it for chat
        return body

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}

    async def stream(self, stream: RequestStream) -> AsyncIterator[str]:
        progress = [_ChoiceProgress() for _ in range(self.body.n)]
        final: RequestOutput | None = None
        try:
            for index in range(self.body.n):  # the role first, as OpenAI does
                yield _sse(self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
            async for output in stream:
                for c in output.outputs:
                    state = progress[c.index]
                    news = state.news(c)
                    if news is None:
                        continue
                    delta, new_ids, finished = news
                    logprobs = None
                    if self.body.logprobs:
                        logprobs = {"content": chat_logprobs(new_ids, (c.logprobs or [])[state.tokens:],
                                                             self.top_logprobs)}
                    choice = {"index": c.index, "delta": {"content": delta} if delta else {}, "logprobs": logprobs,
                              "finish_reason": None, "stop_reason": None}
                    if finished:
                        choice.update(stop_fields(c))
                    self._extra(choice, output, new_ids, not state.started)
                    state.chars = max(state.chars, len(c.text))
                    state.tokens = len(c.token_ids)
                    state.started, state.finished = True, finished
                    yield _sse(self._chunk([choice]))
                if output.finished:
                    final = output
            if self.body.include_usage and final is not None:
                yield _sse({**self._chunk([]), "usage": usage(len(final.prompt_token_ids),
                                                              sum(len(c.token_ids) for c in final.outputs))})
        except Exception as exc:
            yield _sse(_stream_error(exc))
        finally:
            stream.abort()
        yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _stream_error(exc: Exception) -> dict[str, Any]:
    """An error that happens after a stream's 200 went out is sent as an SSE event, as vLLM does."""
    if isinstance(exc, ServerShuttingDownError):
        return error_body(str(exc), "server_error", code="server_shutting_down")
    if isinstance(exc, RequestFailedError):
        return error_body(str(exc), "server_error", code="engine_error")
    logger.exception("streaming response failed")
    return error_body(f"internal error: {exc!r}", "server_error", code="internal_error")


async def _collect(stream: RequestStream, request: Request) -> dict[str, RequestOutput] | None:
    """Wait for every request of `stream` to finish; None (after aborting them) if the client disconnects."""
    finals: dict[str, RequestOutput] = {}

    async def consume() -> None:
        async for output in stream:
            if output.finished:
                finals[output.request_id] = output

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            consumer.result()  # raises the request's error, if any
            return finals
        return None
    finally:
        consumer.cancel()
        watcher.cancel()
        stream.abort()  # no-op when everything finished


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is http.disconnect when the client goes away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class SSEResponse(StreamingResponse):
    """A server-sent-events stream that stops (and so aborts its requests) as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def run_stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # ASGI >= 2.4 servers raise on send to a closed connection
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(run_stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


class ApiKeyMiddleware:
    """401 for every path but /health and the static pages (which then ask for the key) unless the
    request carries `Authorization: Bearer <api_key>`."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health" or is_public_page(scope["path"]):
            return await self.app(scope, receive, send)
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if secrets.compare_digest(auth.strip(), self.expected):
            return await self.app(scope, receive, send)
        response = JSONResponse(
            error_body("Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key"),
            status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; OpenAI clients expect 400 naming the parameter.
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [x for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
        elif first.get("type") == "missing" and not loc:
            message, param = "the request body must be a JSON object", None
        else:
            param = str(loc[0]) if loc and isinstance(loc[0], str) else None
            where = ".".join(str(x) for x in loc)
            message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestFailedError)
    async def engine_error(request: Request, exc: RequestFailedError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "server_error", code="engine_error"), status_code=500)

    @app.exception_handler(ServerShuttingDownError)
    async def shutting_down(request: Request, exc: ServerShuttingDownError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "server_error", code="server_shutting_down"), status_code=503)

    @app.exception_handler(EngineBusyError)
    async def engine_busy(request: Request, exc: EngineBusyError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), code="engine_busy"), status_code=409)

    @app.exception_handler(InvalidRequestError)
    async def invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        error = invalid_request(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {exc!r}", "server_error", code="internal_error"),
                            status_code=500)


# ---- running it -------------------------------------------------------------------------


class _GracefulServer(uvicorn.Server):
    """uvicorn, plus a bounded drain on SIGTERM/SIGINT: in-flight requests get `grace` seconds to
    finish, then end with a clear 'shutting down' error; the worker thread stops in the lifespan."""

    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine, grace: float):
        super().__init__(config)
        self.async_engine = async_engine
        self.grace = grace

    async def shutdown(self, sockets=None) -> None:
        drain = asyncio.ensure_future(self.async_engine.drain(self.grace))
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
               log_level: str = "info", access_log: bool = True) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            lifespan="on", timeout_graceful_shutdown=shutdown_timeout + 5.0)
    _GracefulServer(config, app.state.async_engine, shutdown_timeout).run()
