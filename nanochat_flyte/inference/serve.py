"""Serve a checkpoint: a chat page in the browser and an OpenAI-compatible chat-completions API (the `nanochat
serve` command, cli/serve.py, and Flyte 2's chat app run it).

    GET  /                     the chat page (one self-contained HTML file: no CDN)
    POST /v1/chat/completions  OpenAI's chat completions, streamed (server-sent events) or not
    GET  /v1/models            the one model served
    GET  /health               liveness, the mode (chat or plain completion) and the load

create_app builds the FastAPI app; uvicorn runs it with BoundedHttp as its protocol. Torch runs on the engine's
decode thread (scheduler.Scheduler): concurrent requests decode together in one batch, and the event loop stays free
to stream (a request's JSON and its prompt's tokens are worked out on another thread). A client that disconnects
mid-answer frees its slot at once; beyond max_concurrent requests (those being read and tokenized count too) the
answer is 429; with an api_key, every /v1
request needs `Authorization: Bearer <that key>`. BoundedHttp gives a connection request_timeout seconds for a
request's headers, and as many again for its body, cuts off a client that reads nothing of a full buffer for as
long, and answers a plain-text 503 beyond max_connections open connections.

OpenAI request fields: messages (roles system, user and assistant; "developer" is taken as "system", as OpenAI's
newer clients name it), model (any name is accepted: one model is served), stream, stream_options (include_usage;
only with stream), max_completion_tokens or max_tokens (1 .. the model's context; default: until the answer ends or
the context is full), temperature (0..2, default 0.6), top_k (an extension, default 50; 0 = whole vocabulary), stop
(a string or up to 4), seed (default: a random one). n must be 1 and top_p 1: other values are refused, not
ignored. Fields that change what is asked (tools, functions, response_format, logprobs) are refused; the remaining
fields (user, penalties, ...) are accepted and ignored.

A base checkpoint is served in plain completion mode: the model continues the last user message as plain text
(it never saw the chat format). Responses then carry `X-Nanochat-Mode: completion` and system_fingerprint
"nanochat-flyte-completion", /health says so, and the page shows it.
"""

import asyncio
import hmac
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import h11
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat_flyte.data.conversation import ConversationError
from nanochat_flyte.inference.engine import CHAT_TEMPERATURE, DEFAULT_TOP_K, Engine, SamplingParams
from nanochat_flyte.inference.scheduler import Request, Scheduler

API_KEY_ENV = "NANOCHAT_API_KEY"
MAX_STOP_STRINGS = 4  # OpenAI's limit
DISCONNECT_POLL_S = 0.05  # is_disconnected() only looks at the connection's queue: cheap
MAX_BODY_BYTES = 1_000_000  # a conversation that fills even a long context is far below this
REQUEST_TIMEOUT = 10.0  # seconds for a request's headers, and again for its body: a 1 MB body needs far less
RETRY_AFTER_S = 2  # a busy server's 429 asks to wait this long: about a short answer's time on a GPU
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # what a browser on this machine names a local server by
MAX_CONNECTIONS = 256  # open at once, idle ones included: each holds a file descriptor (often 1024 a process)
PAGE = Path(__file__).parent / "static" / "chat.html"  # package data (pyproject.toml)
REFUSED_FIELDS = ("tools", "functions", "tool_choice", "function_call", "response_format", "logprobs",
                  "top_logprobs")

log = logging.getLogger("nanochat_flyte.inference.serve")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        headers = {}
        if self.status in (408, 413):  # a body cut short or not read leaves the connection unfit for another request
            headers["Connection"] = "close"
        if self.status == 429:  # OpenAI's clients wait this long before their next try
            headers["Retry-After"] = str(RETRY_AFTER_S)
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


@dataclass
class ChatRequest:
    """A checked POST /v1/chat/completions body."""
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


@dataclass
class ServerState:
    engine: Engine
    scheduler: Scheduler
    api_key: str | None
    max_body_bytes: int
    request_timeout: float
    # one thread parses and tokenizes requests, one at a time: a burst of long prompts takes one core at most,
    # and the event loop and the decode thread keep theirs
    parse_thread: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "parse-request"))
    parsing: int = 0  # requests given to parse_thread and not yet parsed: they count towards max_concurrent
    active: set[Request] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: {"completed": 0, "cancelled": 0, "failed": 0})

    def running(self) -> int:
        self.active = {request for request in self.active if not request.done}
        return len(self.active)


# ---------------------------------------------------------------------------- request checking


def _number(body: dict, name: str, default, minimum, maximum, integer: bool):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not minimum <= value <= maximum:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{name}: must be {what} from {minimum} to {maximum}, got {value!r}", name,
                       "invalid_value")
    return value


def _messages(body: dict) -> list[dict]:
    """OpenAI messages as {role, content: str}: text content parts are joined, other parts refused."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list of {role, content}", "messages")
    plain = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{index}]: must be an object with role and content", "messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported", "messages")
            content = "".join(part["text"] for part in content)
        role = message.get("role")
        plain.append({"role": "system" if role == "developer" else role, "content": content})
    return plain


def check_fits_context(engine: Engine, messages: list[dict]) -> None:
    """Refuse, before tokenizing, a conversation of more text than the context can hold however it tokenizes: no
    token spans more than engine.max_token_bytes bytes. (A megabyte of history would take seconds to tokenize, and
    its calculator annotations to check, only to be refused.) Plain completion mode reads the last message only."""
    read = messages if engine.chat_mode else messages[-1:]
    text_bytes = sum(len(message["content"].encode("utf-8", "surrogatepass")) for message in read
                     if isinstance(message["content"], str))
    if text_bytes > engine.context * engine.max_token_bytes:
        raise ApiError(400, f"messages: the conversation is {text_bytes:,} bytes of text, more than this model's "
                            f"context of {engine.context} tokens can hold (a token is at most "
                            f"{engine.max_token_bytes} bytes)", "messages", "context_length_exceeded")


def parse_chat_request(state: ServerState, raw: bytes) -> ChatRequest:
    """A request body checked and its prompt tokenized: work that takes a while for a long prompt, so it runs off
    the event loop."""
    body = _json_object(raw)
    for name in REFUSED_FIELDS:
        if body.get(name) not in (None, False, []):
            raise ApiError(400, f"{name}: not supported by this server", name, "unsupported_parameter")
    if body.get("n") not in (None, 1) or body.get("n") is True:  # (True == 1 in Python, not in JSON)
        raise ApiError(400, f"n: only 1 is supported (one answer per request), got {json.dumps(body['n'])}", "n",
                       "unsupported_value")
    if body.get("top_p") not in (None, 1, 1.0) or body.get("top_p") is True:
        raise ApiError(400, f"top_p: only 1 is supported (nucleus sampling is not implemented; use top_k), "
                            f"got {json.dumps(body['top_p'])}", "top_p", "unsupported_value")
    engine = state.engine
    messages = _messages(body)
    check_fits_context(engine, messages)
    try:
        prompt = engine.chat_prompt(messages)
    except ConversationError as error:
        raise ApiError(400, str(error), "messages") from None
    if len(prompt) >= engine.context:
        raise ApiError(400, f"messages: the conversation is {len(prompt)} tokens; this model's context is "
                            f"{engine.context} tokens, and the answer needs at least one more",
                       "messages", "context_length_exceeded")
    length_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, length_field, engine.context, 1, engine.context, integer=True)
    stop = _stop_strings(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "stream: must be true or false", "stream")
    include_usage = _include_usage(body, bool(stream))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", CHAT_TEMPERATURE, 0, 2, integer=False),
        top_k=_number(body, "top_k", DEFAULT_TOP_K, 0, engine.tokenizer.n_vocab, integer=True) or None,
        seed=_number(body, "seed", secrets.randbelow(2**31), -2**63, 2**63 - 1, integer=True),
        stop=stop)
    return ChatRequest(prompt, params, bool(stream), include_usage)


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    except ValueError as error:  # a number of more than 4,300 digits: Python will not read it
        raise ApiError(400, f"the request body has a number this server cannot read: {error}",
                       code="invalid_json") from None
    except RecursionError:  # [[[[... far deeper than any request: the parser's stack runs out
        raise ApiError(400, "the request body is not valid JSON: nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"stop: must be a non-empty string or a list of up to {MAX_STOP_STRINGS}", "stop")
    return tuple(stop)


def _include_usage(body: dict, stream: bool) -> bool:
    stream_options = body.get("stream_options")
    if stream_options is None:
        return False
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options: must be an object", "stream_options")
    if not stream:  # as OpenAI: the options of a stream that is not asked for are a mistake
        raise ApiError(400, "stream_options: only allowed when stream is true", "stream_options")
    include_usage = stream_options.get("include_usage")
    include_usage = False if include_usage is None else include_usage  # null, as for stream: false
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage: must be true or false", "stream_options")
    return include_usage


async def read_body(state: ServerState, http: HttpRequest) -> bytes:
    """The request's body, within the size limit and the request timeout."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise ApiError(413, f"the request body ({declared} bytes) is over the limit of {state.max_body_bytes} bytes",
                       code="request_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(state.request_timeout):
            async for chunk in http.stream():  # also bounds bodies sent without a Content-Length
                body += chunk
                if len(body) > state.max_body_bytes:
                    raise ApiError(413, f"the request body is over the limit of {state.max_body_bytes} bytes",
                                   code="request_too_large")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {state.request_timeout:g} s",
                       code="request_timeout") from None
    return bytes(body)


def check_api_key(state: ServerState, http: HttpRequest) -> None:
    if state.api_key is None:
        return
    scheme, _, token = http.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise ApiError(401, f"a valid API key is needed: send `Authorization: Bearer <key>` (the key in "
                            f"${API_KEY_ENV} on the server)", code="invalid_api_key")


# ---------------------------------------------------------------------------- responses


def _mode(engine: Engine) -> str:
    return "chat" if engine.chat_mode else "completion"


def _usage(request: Request) -> dict:
    prompt, completion = len(request.sequence.prompt), len(request.sequence.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Answer:
    """One request's text, arriving from the decode thread through an asyncio.Event."""

    def __init__(self, state: ServerState, chat: ChatRequest):
        self.state = state
        loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()

        def notify() -> None:  # called on the decode thread
            try:
                loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        self.request = state.scheduler.submit(chat.prompt, chat.params, notify)
        state.active.add(self.request)

    async def deltas(self):
        """Text deltas until the answer is finished. Raises ApiError if decoding failed."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            deltas, finished = self.request.take()
            for delta in deltas:
                yield delta
            if finished:
                break
        if self.request.error is not None:
            self.state.counts["failed"] += 1
            log.error("generation failed: %r", self.request.error)
            raise ApiError(500, f"generation failed: {type(self.request.error).__name__}", kind="server_error")
        self.state.counts["completed"] += 1

    def abandon(self) -> None:
        """The client is gone (or the server stops): stop decoding now, free the slot."""
        if not self.request.done:
            self.request.cancel()
            self.state.counts["cancelled"] += 1
            log.info("client went away: generation cancelled after %d tokens", len(self.request.sequence.tokens))


def model_name_of(checkpoint: str) -> str:
    """The checkpoint's directory name ("s3://bucket/runs/d20/checkpoint/" -> "d20-checkpoint")."""
    parts = [part for part in PurePosixPath(checkpoint.split("://", 1)[-1].rstrip("/")).parts if part != "/"]
    return "-".join(parts[-2:]) or "nanochat"


def create_app(engine: Engine, *, model_name: str, max_concurrent: int = 4, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, request_timeout: float = REQUEST_TIMEOUT,
               allowed_hosts: tuple[str, ...] | None = None) -> FastAPI:
    """allowed_hosts: the Host headers answered (others get 400), for a server on a loopback address: a page of
    another site whose name has been pointed at 127.0.0.1 (DNS rebinding) would otherwise read its answers."""
    state = ServerState(engine, Scheduler(engine), api_key or None, max_body_bytes, request_timeout)
    app = FastAPI(title="nanochat-flyte", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    headers = {"X-Nanochat-Mode": _mode(engine)}
    fingerprint = f"nanochat-flyte-{_mode(engine)}"

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):  # unknown routes, wrong methods: OpenAI's shape too
        response = ApiError(error.status_code, str(error.detail), code=None).response()
        response.headers.update(error.headers or {})  # a 405's Allow: the methods the path takes
        return response

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_, error: ClientDisconnect):
        log.info("client went away while sending its request")
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def unexpected_error(_, error: Exception):
        log.exception("unexpected error")
        return ApiError(500, f"internal error: {type(error).__name__}", kind="server_error").response()

    # HEAD too: load balancers and uptime checks ask with it
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", "model": model_name, "phase": engine.phase, "mode": _mode(engine),
                "context": engine.context, "vocab_size": engine.tokenizer.n_vocab, "auth": state.api_key is not None,
                "active": state.running(), "max_concurrent": max_concurrent, "requests": dict(state.counts)}

    model = {"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat-flyte"}

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        check_api_key(state, http)
        return {"object": "list", "data": [model]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, http: HttpRequest):
        check_api_key(state, http)
        if model_id != model_name:
            raise ApiError(404, f"no model {model_id!r} here; this server serves {model_name!r}", "model",
                           code="model_not_found")
        return model

    def check_capacity() -> None:
        if state.running() + state.parsing >= max_concurrent:
            requests = "1 request is" if max_concurrent == 1 else f"{max_concurrent} requests are"
            raise ApiError(429, f"the server is busy: {requests} being tokenized or answered; retry shortly",
                           code="rate_limit_exceeded", kind="rate_limit_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        check_api_key(state, http)
        check_capacity()  # before the body is read and tokenized: a busy server refuses at once
        body = await read_body(state, http)
        # JSON only: a page of another site can send a form or text to a local server without asking the browser
        if http.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "the body must be JSON, sent with `Content-Type: application/json`",
                           code="unsupported_media_type")
        if await http.is_disconnected():
            return Response(status_code=499)  # nobody waits for it: no parsing
        # the requests read meanwhile, and counted with no await between: parsing queues at most max_concurrent
        check_capacity()
        state.parsing += 1
        try:
            chat = await asyncio.get_running_loop().run_in_executor(state.parse_thread, parse_chat_request, state,
                                                                    body)
        finally:
            state.parsing -= 1
        check_capacity()
        answer = Answer(state, chat)
        base = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_name,
                "system_fingerprint": fingerprint}
        if chat.stream:
            # X-Accel-Buffering: a reverse proxy (nginx) passes each event on at once instead of buffering them
            return StreamingResponse(stream_events(answer, chat, base), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = []
        collecting = asyncio.ensure_future(_collect(answer, text))
        try:
            # a non-streamed answer has no writes to notice a disconnect by: poll, often enough that a client gone
            # early frees its slot before a short answer would have finished anyway
            while not collecting.done():
                await asyncio.wait([collecting], timeout=DISCONNECT_POLL_S)
                if not collecting.done() and await http.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; finally frees the slot
            collecting.result()  # raises the ApiError of a failed generation
        finally:
            collecting.cancel()
            answer.abandon()
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                  "finish_reason": answer.request.sequence.finish_reason, "logprobs": None}
        return JSONResponse({**base, "object": "chat.completion", "choices": [choice],
                             "usage": _usage(answer.request)}, headers=headers)

    return app


async def _collect(answer: Answer, text: list[str]) -> None:
    async for delta in answer.deltas():
        text.append(delta)


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_events(answer: Answer, chat: ChatRequest, base: dict):
    """Server-sent events in OpenAI's chunk format: the role, the text deltas, the finish reason, [DONE]."""
    chunk = {**base, "object": "chat.completion.chunk"}

    def choice(delta: dict, finish_reason: str | None = None) -> dict:
        return {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    try:  # a disconnect cancels this generator at an await: finally frees the slot
        yield _event(choice({"role": "assistant", "content": ""}))
        try:
            async for delta in answer.deltas():
                yield _event(choice({"content": delta}))
        except ApiError as error:  # the status line is sent already: the error goes into the stream
            yield _event({"error": json.loads(error.response().body)["error"]})
            yield _event("[DONE]")
            return
        yield _event(choice({}, answer.request.sequence.finish_reason))
        if chat.include_usage:
            yield _event({**chunk, "choices": [], "usage": _usage(answer.request)})
        yield _event("[DONE]")
    finally:
        answer.abandon()


# ---------------------------------------------------------------------------- connections


TOO_MANY_CONNECTIONS = b"too many open connections: retry shortly\n"


class BoundedHttp(H11Protocol):
    """uvicorn's HTTP/1.1 connection with the limits it lacks: the request's headers must arrive within
    request_timeout seconds of the connection opening (or of its last answer), else it is closed; a client that
    takes nothing of what is written to it for as long, once the buffers are full, is cut off; and beyond
    max_connections open connections, a new one gets a plain-text 503 and is closed."""

    def __init__(self, *args, request_timeout: float, max_connections: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_timeout, self.max_connections = request_timeout, max_connections
        self.deadline: asyncio.TimerHandle | None = None
        self.stalled: asyncio.TimerHandle | None = None  # set while the client reads nothing of a full buffer

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("%d connections are open: one more refused", self.max_connections)
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
                            b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                            % (len(TOO_MANY_CONNECTIONS), TOO_MANY_CONNECTIONS))
            transport.close()
            return
        self.await_request()

    def await_request(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.loop.call_later(self.request_timeout, self.close_if_no_request)

    def close_if_no_request(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # its headers are not all in
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:  # answered before its body was in (401, 429, 404): the rest of
            self.transport.close()  # it, unread, would hold the connection past every timeout, for good
            return
        self.await_request()  # the next request on this connection

    def pause_writing(self) -> None:
        super().pause_writing()
        # a stream, or answers to pipelined requests, that the client stopped reading: without a limit the
        # connection waits for it for good. abort(): close() would wait for the buffer to be sent first
        self.stalled = self.loop.call_later(self.request_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        if self.stalled is not None:
            self.stalled.cancel()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.deadline, self.stalled):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)
