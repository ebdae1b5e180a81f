"""The FastAPI application: routes, error envelopes, middleware order.

Bodies are parsed by hand (`protocol.parse_json_object` + pydantic) so that every bad body becomes an
OpenAI error envelope with a 4xx status, never FastAPI's 422 or a 500.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response

from strata.core.sampling_params import ParameterError
from strata.serve.chat import chat_response, chat_stream, start_chat
from strata.serve.completions import completion_response, completion_stream, start_completion
from strata.serve.errors import APIError, error_response, from_exception
from strata.serve.middleware import GuardMiddleware
from strata.serve.prompts import check_token_ids
from strata.serve.protocol import (DetokenizeRequest, TokenizeRequest, normalize_messages, parse_json_object,
                                   parse_model)
from strata.serve.state import ServerState
from strata.serve.streaming import ClientDisconnected, SSEResponse, run_or_disconnect
from strata.serve.tools import check_tools, template_messages

logger = logging.getLogger("strata.serve")

try:
    from importlib.metadata import version as _pkg_version
    VERSION = _pkg_version("strata")
except Exception:  # noqa: BLE001
    VERSION = "0+unknown"


def _json(obj: dict, status: int = 200) -> Response:
    from strata.serve.streaming import dumps
    return Response(dumps(obj), status_code=status, media_type="application/json")


async def _body(request: Request) -> dict:
    return parse_json_object(await request.body())


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="strata", version=VERSION, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.strata = state

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return error_response(e)

    @app.exception_handler(ParameterError)
    async def _param_error(_req, e: ParameterError):
        return error_response(from_exception(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, e: StarletteHTTPException):
        msg = {404: "Not found", 405: "Method not allowed"}.get(e.status_code, str(e.detail))
        return error_response(APIError(e.status_code, f"{msg}: {_req.method} {_req.url.path}"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, e: RequestValidationError):
        return error_response(APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def _any_error(_req, e: Exception):
        logger.exception("unhandled error")
        return error_response(from_exception(e))

    # ------------------------------------------------------------------ open endpoints
    @app.get("/health")
    async def health():
        if state.engine.is_dead:
            return _json({"status": "dead", "error": repr(state.engine.dead_error)}, 503)
        if not state.healthy:
            return _json({"status": "draining"}, 503)
        return _json({"status": "ok"})

    @app.get("/ping")
    async def ping():
        return await health()

    @app.get("/version")
    async def version():
        return _json({"version": VERSION})

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.engine),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ models
    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "strata",
                "root": state.model_name, "parent": None, "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def models():
        return _json({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if not state.accepts_model(model_id):
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return _json(model_card())

    # ------------------------------------------------------------------ generation
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        p, sub = await start_completion(state, body)
        if p.req.stream:
            return SSEResponse(completion_stream(state, p, sub))
        try:
            return _json(await run_or_disconnect(request.receive, completion_response(state, p, sub)))
        except ClientDisconnected:
            sub.abort_unfinished()
            return Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        p, sub = await start_chat(state, body)
        if p.req.stream:
            return SSEResponse(chat_stream(state, p, sub))
        try:
            return _json(await run_or_disconnect(request.receive, chat_response(state, p, sub)))
        except ClientDisconnected:
            sub.abort_unfinished()
            return Response(status_code=499)

    # ------------------------------------------------------------------ tokenizer
    @app.post("/tokenize")
    async def tokenize(request: Request):
        req: TokenizeRequest = parse_model(TokenizeRequest, await _body(request))
        if not state.accepts_model(req.model):
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        tok = state.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise ParameterError("prompt", "give exactly one of 'prompt' or 'messages'")
        if req.prompt is not None:
            ids = tok.encode(req.prompt, True if req.add_special_tokens is None else req.add_special_tokens)
        else:
            msgs = template_messages(normalize_messages(req.messages))
            kwargs = dict(req.chat_template_kwargs or {})
            if req.tools:
                kwargs["tools"] = check_tools(req.tools)
            text = tok.render_chat(msgs, add_generation_prompt=req.add_generation_prompt and
                                   not req.continue_final_message,
                                   continue_final_message=req.continue_final_message,
                                   chat_template=req.chat_template, kwargs=kwargs)
            ids = tok.encode(text, bool(req.add_special_tokens))
        out = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = tok.token_strs(ids)
        return _json(out)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req: DetokenizeRequest = parse_model(DetokenizeRequest, await _body(request))
        if not state.accepts_model(req.model):
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        check_token_ids(req.tokens, state.tokenizer.vocab_size, param="tokens")
        return _json({"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)})

    # ------------------------------------------------------------------ Batch API
    from strata.serve.batch_api import add_batch_routes
    add_batch_routes(app, state)

    # ------------------------------------------------------------------ middleware (last added = outermost)
    app.add_middleware(GuardMiddleware, state=state)
    if state.args.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.args.allowed_origins,
                           allow_credentials=state.args.allow_credentials, allow_methods=["*"],
                           allow_headers=["*"])
    return app


__all__ = ["build_app"]
