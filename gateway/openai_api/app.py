"""The FastAPI application of the OpenAI-compatible API: routes, body parsing, the request scope.

Routes (OpenAI's and vLLM's shapes): ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /health``, ``POST /tokenize``, ``POST /detokenize``.

:class:`RequestScope` wraps every request (a plain ASGI middleware, so streams are not buffered):
the request id (``x-request-id``, else a fresh one) is bound on every log line and returned as
the ``x-request-id`` header (one that breaks the request-id rule is refused with 400, and a
fresh one returned); bearer tokens are checked (the gRPC API's, ``/health`` stays open);
``pdserve_http_requests_total{route,status}`` counts each request.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TypeVar

import grpc
import structlog
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import EngineError, InvalidRequestError
from gateway.openai_api import protocol as p
from gateway.openai_api.convert import chat_messages, unsupported
from gateway.openai_api.errors import APIError, error_body, error_response
from gateway.openai_api.serving import CLIENT_GONE, Call, OpenAIServing
from gateway.prompts import ChatPrompt, PromptInput, TextPrompt, TokenPrompt
from gateway.validation import validate_request_id
from server_runtime.grpc_runtime import Refused
from server_runtime.interceptors import REQUEST_ID_KEY, bearer_refusal
from server_runtime.metrics import GatewayMetrics

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=BaseModel)
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/tokenize",
    "/detokenize",
)
OPEN_ROUTES = frozenset({"/health"})
TIMEOUT_HEADER = "x-request-timeout"  # seconds: the request's deadline (504 past it)


def build_app(
    serving: OpenAIServing,
    auth_tokens: tuple[str, ...] = (),
    metrics: GatewayMetrics | None = None,
) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    served, core = serving.served, serving.core

    @app.exception_handler(HTTPException)
    async def http_exception(request: Request, exc: HTTPException) -> Response:
        kind = "invalid_request_error"
        body = error_body(kind, None, f"{exc.detail}: {request.method} {request.url.path}")
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(APIError)
    @app.exception_handler(EngineError)
    @app.exception_handler(Refused)
    async def domain_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse(request, p.CompletionRequest)
        return await serving.completion(body, call_of(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse(request, p.ChatCompletionRequest)
        return await serving.chat(body, call_of(request))

    @app.get("/v1/models")
    async def models() -> Response:
        card = p.ModelCard(
            id=served.id,
            created=served.created,
            root=served.root,
            max_model_len=served.max_model_len,
        )
        return JSONResponse(p.ModelList(data=[card]).model_dump())

    @app.get("/health")
    async def health() -> Response:
        if serving.lifecycle.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not core.router.registry.decode.routable():
            summary = core.router.registry.decode.summary()
            return JSONResponse({"status": f"no decode worker ({summary})"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await parse(request, p.TokenizeRequest)
        served.resolve(body.model)
        tokens = core.prompts.tokenize(tokenize_input(body))
        strs = core.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return JSONResponse(
            {
                "count": len(tokens),
                "max_model_len": served.max_model_len,
                "tokens": tokens,
                "token_strs": strs,
            }
        )

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = await parse(request, p.DetokenizeRequest)
        served.resolve(body.model)
        if body.tokens:
            core.prompts.tokenize(TokenPrompt(tuple(body.tokens)))  # ids inside the vocabulary
        return JSONResponse({"prompt": core.tokenizer.decode(body.tokens)})

    return RequestScope(app, auth_tokens, metrics)  # type: ignore[return-value]


def tokenize_input(body: p.TokenizeRequest) -> PromptInput:
    for name, neutral in (("continue_final_message", False), ("add_special_tokens", None)):
        value = getattr(body, name)
        if value is not None and value != neutral:
            default = "the default" if neutral is None else repr(neutral)
            raise unsupported(f"{name}={value!r} is not supported yet (only {default})", name)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("set exactly one of prompt or messages")
    if body.prompt is not None:
        return TextPrompt(body.prompt)
    return ChatPrompt(chat_messages(body.messages or []), body.add_generation_prompt)


def call_of(request: Request) -> Call:
    request_id = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
    raw = request.headers.get(TIMEOUT_HEADER)
    deadline = None
    if raw is not None:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise InvalidRequestError(f"{TIMEOUT_HEADER} must be a positive number of seconds")
        deadline = time.monotonic() + seconds
    return Call(request, request_id, deadline)


async def parse(request: Request, model: type[M]) -> M:
    """The body as ``model``: 400 naming malformed JSON (nested too deeply, or a string that
    is not Unicode text: an escaped lone surrogate), a body that is not an object, unknown
    fields, or bad values."""
    raw = await request.body()
    try:
        data = json.loads(raw)
        if b"\\u" in raw:  # only an escape can make a lone surrogate: UTF-8 cannot carry one
            json.dumps(data, ensure_ascii=False).encode()
    except json.JSONDecodeError as exc:
        raise APIError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"malformed JSON body: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except UnicodeError as exc:
        raise APIError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise APIError(
            grpc.StatusCode.INVALID_ARGUMENT, "malformed JSON body: nested too deeply"
        ) from None
    if not isinstance(data, dict):
        raise APIError(grpc.StatusCode.INVALID_ARGUMENT, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(grpc.StatusCode.INVALID_ARGUMENT, message, param) from None


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """One line per field: unknown and missing fields named, else the first complaint."""
    seen: dict[str, str] = {}
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        field = loc[0] if loc else "body"
        if field in seen:
            continue  # a union's other branches: one complaint per field is enough
        path = ".".join(loc)
        if error["type"] == "extra_forbidden":
            seen[field] = f"unknown field {path!r}"
        elif error["type"] == "missing":
            seen[field] = f"missing required field {path!r}"
        else:
            seen[field] = f"{path}: {error['msg']}"
    return "; ".join(seen.values()) or "invalid request", next(iter(seen), None)


class RequestScope:
    """Request id, authentication and the per-route counter around the whole app."""

    def __init__(
        self, app: ASGIApp, auth_tokens: tuple[str, ...], metrics: GatewayMetrics | None
    ) -> None:
        self.app = app
        self.tokens = [t.encode() for t in auth_tokens if t]
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get(REQUEST_ID_KEY)
        refusal: APIError | None = None
        try:
            if given:
                validate_request_id(given, REQUEST_ID_KEY)
        except InvalidRequestError as exc:
            refusal = APIError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), REQUEST_ID_KEY)
            given = None  # neither echoed nor logged: the response carries a fresh one
        request_id = given or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = CLIENT_GONE  # unless a response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_KEY.encode(), request_id.encode()),
                ]
            await send(message)

        path = scope["path"]
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                if self.tokens and path not in OPEN_ROUTES:
                    why = bearer_refusal(headers.get("authorization"), self.tokens)
                    if why is not None:  # authentication first, as on the gRPC API
                        refusal = APIError(grpc.StatusCode.UNAUTHENTICATED, why)
                if refusal is not None:
                    await error_response(refusal)(scope, receive, send_with_id)
                else:
                    await self.app(scope, receive, send_with_id)
            finally:
                if self.metrics is not None:
                    self.metrics.http_request(path if path in ROUTES else "other", status)
