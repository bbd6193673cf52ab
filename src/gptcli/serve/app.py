"""The HTTP routes of `gptcli serve`: OpenAI's API over a BatchEngine, and the web page.

    GET  /                     the chat or completion page (page.html, no external assets)
    GET  /health               liveness and load: {"status", "model", "running", "waiting", "finished"},
                               and "speculation" with --draft
    GET  /v1/models            the one model served
    POST /v1/completions       text continuations (a base or any language model)
    POST /v1/chat/completions  replies under the checkpoint's chat template
    POST /v1/classify          labels and probabilities (a classifier checkpoint)

Handlers run on the event loop and only encode prompts and move text: generation happens
on the engine's thread, which hands each piece of text back through `call_soon_threadsafe`
into the request's queue. A streamed answer that loses its client is cancelled (Starlette
cancels the response's generator), which frees its batch rows at the engine's next step;
a non-streamed one checks for a lost client every second while it waits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gptcli.errors import GptcliError, shorten
from gptcli.infer.engine import BatchEngine, Job, Update
from gptcli.infer.generate import SamplingSettings
from gptcli.infer.load import Classifier, Loaded
from gptcli.infer.session import GenerationSession, Prompt, check_utf8
from gptcli.serve.protocol import (
    ApiError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    parse,
)

LOST_CLIENT_POLL_S = 1.0  # how often a non-streamed request checks that its client is still there


@dataclass
class Served:
    """The checkpoint a server answers for. `engine` is None for a classifier."""

    model_id: str
    loaded: Loaded
    worker: Executor  # the one thread that runs the model (BatchEngine.start says why)
    engine: BatchEngine | None
    api_key: str | None = None
    max_batch: int = 16
    draft: str | None = None  # what proposes guesses to the engine (a checkpoint or "ngram"), if anything
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def task(self) -> str:
        """What clients may ask of it: "lm", "chat" or "classify"."""
        return "classify" if isinstance(self.loaded, Classifier) else self.loaded.kind

    @property
    def context(self) -> int:
        return self.loaded.model.config.block_size

    @cached_property
    def session(self) -> GenerationSession:
        """The language model's generation session (not for a classifier)."""
        return GenerationSession(self.loaded)


def build_app(served: Served) -> FastAPI:
    app = FastAPI(title="gptcli", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Unknown routes and methods, in OpenAI's error shape too."""
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").body(),
                            status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("gptcli.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict:
        """`running` rows and `waiting` requests now; `finished`: choices ended so far, by
        reason (stop, length, cancelled, error); `speculation` (with --draft): the draft, k,
        and how its guesses fared so far (verifications happen while one row decodes alone)."""
        engine = served.engine
        running, waiting = engine.load if engine else (0, 0)
        health = {"status": "ok", "model": served.model_id, "running": running, "waiting": waiting,
                  "finished": dict(engine.finished) if engine else {}}
        if engine and engine.speculation:
            health["speculation"] = {"draft": served.draft, "draft_tokens": engine.speculation.k,
                                     **engine.speculation.stats.as_dict()}
        return health

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request) -> dict:
        _authorize(served, request)
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        _authorize(served, request)
        _check_model(served, model_id)
        return _model_card(served)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _authorize(served, request)
        body: CompletionRequest = parse(CompletionRequest, await _json(request))
        _check_generation(served, body)
        session = served.session
        prompts = [_encode(served, lambda: session.prompt(text, raw=True)) for text in body.prompts()]
        return await _answer(served, request, body, prompts, body.budget, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(served, request)
        body: ChatRequest = parse(ChatRequest, await _json(request))
        _check_generation(served, body)
        if served.task != "chat":
            raise ApiError(400, f"{served.model_id} has no chat template (it is a base language model); use "
                                f"/v1/completions, or finetune it with --task instruct", "messages")
        turns = [m.as_turn() for m in body.messages]
        prompt = _encode(served, lambda: served.session.chat_prompt(turns))
        return await _answer(served, request, body, [prompt], body.budget, chat=True)

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict:
        _authorize(served, request)
        body: ClassifyRequest = parse(ClassifyRequest, await _json(request))
        _check_model(served, body.model)
        if served.task != "classify":
            raise ApiError(400, f"{served.model_id} is not a classifier; use /v1/completions")
        body.check()
        try:
            for i, text in enumerate(body.texts()):
                check_utf8(text, f"input[{i}]")
        except GptcliError as exc:
            raise ApiError(400, str(exc)) from None
        loop = asyncio.get_running_loop()
        results = [await loop.run_in_executor(served.worker, served.loaded.probabilities, text)
                   for text in body.texts()]
        return {"object": "list", "model": served.model_id,
                "data": [{"index": i, "label": next(iter(probs)), "probabilities": probs}
                         for i, probs in enumerate(results)]}

    return app


def _authorize(served: Served, request: Request) -> None:
    if served.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), served.api_key.encode()):
        raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


async def _json(request: Request) -> object:
    """The decoded JSON body, or an ApiError: 415 for a body declared as something other
    than JSON (a form, plain text: it would be parsed as what it is not), 400 for one that
    does not parse. A body without a Content-Type is read as JSON, as most servers do."""
    declared = request.headers.get("content-type")
    if declared is not None and not _is_json(declared):
        raise ApiError(415, f"the request body is declared as {shorten(declared, 100)!r} (Content-Type); the API "
                            f"takes JSON: send it with 'Content-Type: application/json'")
    body = await request.body()
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an integer of 4,300+ digits, deep nesting
        raise ApiError(400, f"the request body is not valid JSON ({shorten(str(exc), 200)})") from None


def _is_json(content_type: str) -> bool:
    """application/json, or a JSON-based type (application/problem+json), with any parameters."""
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _model_card(served: Served) -> dict:
    """OpenAI's model object, plus what a client needs to know to use it (the page reads
    these): the context length and what the checkpoint does."""
    return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "gptcli",
            "context_length": served.context, "task": served.task, "max_batch": served.max_batch}


def _check_model(served: Served, model_id: str | None) -> None:
    if model_id is not None and model_id != served.model_id:
        raise ApiError(404, f"the model '{model_id}' does not exist; this server has '{served.model_id}'",
                       "model", "model_not_found")


def _check_generation(served: Served, body: CompletionRequest | ChatRequest) -> None:
    _check_model(served, body.model)
    if served.engine is None:
        raise ApiError(400, f"{served.model_id} is a classifier; use POST /v1/classify")
    body.check(served.max_batch)


def _encode(served: Served, encode) -> Prompt:
    """A prompt (from the session: text checked once, ids in the model's format), or a
    400: text that is not UTF-8 or holds a special token, a chat template that refuses the
    conversation, or a prompt that leaves no room in the context."""
    try:
        prompt = encode()
    except GptcliError as exc:
        raise ApiError(400, str(exc)) from None
    tokens = len(prompt.ids) + prompt.cropped
    if tokens >= served.context:
        raise ApiError(400, f"the prompt is {tokens} tokens; the model's context is {served.context}, "
                            f"which must also hold the reply: shorten it", code="context_length_exceeded")
    return prompt


async def _answer(served: Served, request: Request, body: CompletionRequest | ChatRequest,
                  prompts: list[Prompt], budget: int | None, chat: bool):
    """Submit one job per prompt (n choices each); answer with one JSON or a stream."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
    settings = SamplingSettings(body.temperature, body.top_k, body.top_p)
    jobs = []
    for p, prompt in enumerate(prompts):
        room = served.context - len(prompt.ids)
        jobs.append(Job(prompt.ids, room if budget is None else min(budget, room), settings,
                        _emitter(loop, queue, p * body.n), n=body.n, seed=body.seed,
                        stops=body.stops(), stop_ids=prompt.stop_ids))
    reply = _Reply(served.model_id, chat, sum(len(p.ids) for p in prompts), len(prompts) * body.n)
    try:
        for job in jobs:
            served.engine.submit(job)
    except RuntimeError:  # stopped between the request's arrival and now
        _cancel(jobs)
        raise ApiError(503, "the server is shutting down") from None
    if body.stream:
        return StreamingResponse(_stream(reply, queue, jobs, body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(reply, queue, jobs, request)


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, first_index: int):
    """The engine-thread callback of one job: its updates, numbered among the request's
    choices, into the request's queue on the event loop."""
    def emit(update: Update) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (first_index + update.choice, update))
        except RuntimeError:  # the loop is closed: the server has stopped and nobody is listening
            pass

    return emit


def _cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancel()


class _Reply:
    """The text, finish reasons and token counts of a request's choices as updates arrive,
    and their rendering as OpenAI's JSON (whole, or chunk by chunk)."""

    def __init__(self, model_id: str, chat: bool, prompt_tokens: int, choices: int):
        self.model_id, self.chat, self.prompt_tokens = model_id, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = [""] * choices
        self.finish: list[str | None] = [None] * choices
        self.tokens = [0] * choices

    @property
    def pending(self) -> bool:
        return None in self.finish

    def take(self, index: int, update: Update) -> None:
        self.texts[index] += update.text
        if update.finish:
            self.finish[index], self.tokens[index] = update.finish, update.tokens

    def failed(self) -> ApiError | None:
        """Why the answer cannot be given: the server stopped, or the engine failed."""
        if "error" in self.finish:
            return ApiError(500, "generation failed on the server; see its log")
        if "cancelled" in self.finish:
            return ApiError(503, "the server is shutting down")
        return None

    def usage(self) -> dict:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def whole(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                       for i, (text, reason) in enumerate(zip(self.texts, self.finish))]
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                       for i, (text, reason) in enumerate(zip(self.texts, self.finish))]
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self.usage()}

    def chunk(self, index: int, text: str | None, finish: str | None) -> dict:
        """One streamed piece: `text` for choice `index` (None: the role announcement of a
        chat choice), or its finish reason."""
        if not self.chat:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**self._head("text_completion"), "choices": [choice]}
        if finish is not None:
            delta = {}
        elif text is None:
            delta = {"role": "assistant", "content": ""}
        else:
            delta = {"content": text}
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self.usage()}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}


async def _collect(reply: _Reply, queue: asyncio.Queue, jobs: list[Job], request: Request) -> dict:
    watcher = asyncio.create_task(_cancel_when_lost(request, jobs))
    try:
        while reply.pending:
            reply.take(*await queue.get())
    finally:
        watcher.cancel()
        _cancel(jobs)  # a no-op for finished jobs; frees the rows of any other way out
    failure = reply.failed()
    if failure:
        raise failure
    return reply.whole()


async def _cancel_when_lost(request: Request, jobs: list[Job]) -> None:
    """Cancel `jobs` once the client has gone (checked every LOST_CLIENT_POLL_S)."""
    while not await request.is_disconnected():
        await asyncio.sleep(LOST_CLIENT_POLL_S)
    _cancel(jobs)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(reply: _Reply, queue: asyncio.Queue, jobs: list[Job], include_usage: bool
                  ) -> AsyncIterator[str]:
    """Server-sent events: each choice's text as it arrives, its finish reason, (usage),
    then `[DONE]`. A chat choice opens with its role. If the client goes away, Starlette
    cancels this generator and `finally` cancels the jobs."""
    try:
        if reply.chat:
            for index in range(len(reply.texts)):
                yield _sse(reply.chunk(index, None, None))
        while reply.pending:
            index, update = await queue.get()
            reply.take(index, update)
            if update.text:
                yield _sse(reply.chunk(index, update.text, None))
            if update.finish:
                failure = reply.failed()
                if failure:
                    yield _sse(failure.body())
                    return
                yield _sse(reply.chunk(index, None, update.finish))
        if include_usage:
            yield _sse(reply.usage_chunk())
        yield _sse("[DONE]")
    finally:
        _cancel(jobs)
