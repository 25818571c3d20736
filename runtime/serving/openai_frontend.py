"""An OpenAI-compatible endpoint (`/v1/completions`, `/v1/chat/completions`, `/v1/models`) in front of Triton.

Starlette + uvicorn; each request is tokenized here (the chat with the Llama-2 chat template,
`runtime.chat.chat_prompt_ids`) and forwarded to the Triton model as `input_ids` over gRPC streaming
(`tritonclient.grpc.aio`), so usage counts are exact and a client that goes away cancels the Triton request
(the streaming response is cancelled, which cancels the gRPC call). Streaming answers are server-sent events
ending with `data: [DONE]`. The nvidia-pytriton wheel's tritonserver has no OpenAI frontend of its own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..chat import ChatFormatError, chat_prompt_ids

from .client import infer_inputs

DRAIN_S = 30.0  # the longest a finished stream is waited for to close in the background
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the window


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def error_response(err: BadRequest) -> JSONResponse:
    kind = {429: "rate_limit_error", 503: "server_error"}.get(err.status, "invalid_request_error")
    return JSONResponse({"error": {"message": str(err), "type": kind, "param": err.param, "code": None}},
                        status_code=err.status)


def _number(body: dict, name: str, kind, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    return kind(value)


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {value!r}", name)
    return value


def _salt(body: dict) -> str | None:
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise BadRequest(f"cache_salt must be a string, got {salt!r}", "cache_salt")
    return salt or None


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a non-empty string or a list of them", "stop")
    return stops


class Frontend:
    def __init__(self, grpc_url: str, model: str, tokenizer, window: int):
        self.grpc_url, self.model, self.tokenizer, self.window = grpc_url, model, tokenizer, window
        self._client = None

    def client(self):
        if self._client is None:  # created inside the server's event loop
            from tritonclient.grpc.aio import InferenceServerClient

            self._client = InferenceServerClient(self.grpc_url)
        return self._client

    def inputs(self, ids: list[int], body: dict, default_max_tokens: int):
        import tritonclient.grpc

        if body.get("n", 1) != 1:
            raise BadRequest("n must be 1: this server returns one choice per request", "n")
        max_tokens = _number(body, "max_tokens", int, None)
        if max_tokens is None:
            max_tokens = _number(body, "max_completion_tokens", int, default_max_tokens)
        seed = _number(body, "seed", int, None)
        return infer_inputs(tritonclient.grpc, input_ids=ids, max_tokens=max_tokens, stream=True,
                            temperature=_number(body, "temperature", float, 1.0),
                            top_p=_number(body, "top_p", float, 1.0),
                            seed=secrets.randbelow(2**31) if seed is None else seed, stop=_stops(body) or None,
                            ignore_eos=bool(body.get("ignore_eos", False)),  # vLLM's and llama.cpp's extension
                            cache_prompt=_flag(body, "cache_prompt", True),  # llama.cpp's
                            cache_salt=_salt(body))  # vLLM's

    async def generate(self, inputs):
        """(text, new token ids, finish_reason or None, cached prompt tokens or None) per Triton response, over
        one gRPC stream (the last two are given in the last piece).

        The stream is read to its end (the server closes it after the final response) before the final piece is
        given out, and it is cancelled only while its request is still running: a gRPC stream cancelled after its
        final response can leave tritonserver 2.51 holding the request, so that the model never unloads and a stop
        waits for the exit timeout (docs/serving.md, "Stopping")."""
        async def one():
            yield {"model_name": self.model, "inputs": inputs, "request_id": uuid.uuid4().hex}

        call = self.client().stream_infer(one())
        final = error = None  # the last piece; the error that ended the request instead
        answered = ended = False  # the final response came; the server closed the stream
        try:
            async for result, err in call:
                if err is not None:  # an error is its request's final response
                    error, answered = str(err), True
                    continue
                text = result.as_numpy("text_output")
                tokens = result.as_numpy("token_ids")
                reason = result.as_numpy("finish_reason")
                reason = reason.reshape(-1)[0].decode() if reason is not None and reason.size else ""
                cached = result.as_numpy("cached_tokens")
                piece = (b"".join(text.reshape(-1)).decode("utf-8") if text is not None else "",
                         [] if tokens is None else tokens.reshape(-1).tolist(), reason or None,
                         int(cached.reshape(-1)[0]) if cached is not None and cached.size else None)
                if reason:
                    final, answered = piece, True  # given out once the server has closed the stream
                else:
                    yield piece
            ended = True
        finally:
            if not answered and not ended:  # the client went away mid-answer: cancel the Triton request
                call.cancel()
            elif not ended:  # the final response came but the stream is still open: let it close by itself
                _drain_later(call)
        if error is not None:
            raise BadRequest(error, status=_status_of(error))
        if final is not None:
            yield final

    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                         "owned_by": "llama-export"}]})

    async def _serve(self, request: Request, chat: bool):
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRequest("the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list):
                    raise BadRequest("messages must be a list of {role, content}", "messages")
                try:
                    ids = chat_prompt_ids(self.tokenizer, messages)
                except ChatFormatError as err:
                    raise BadRequest(str(err), "messages") from None
                default_max = max(self.window - len(ids), 1)
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
                    ids = prompt  # token ids, as OpenAI's API allows
                elif isinstance(prompt, str) and prompt:
                    ids = self.tokenizer.encode(prompt)
                else:
                    raise BadRequest("prompt must be one non-empty string or a list of token ids", "prompt")
                default_max = COMPLETIONS_DEFAULT_MAX_TOKENS
            inputs = self.inputs(ids, body, default_max)
            stream = bool(body.get("stream", False))
            usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
            tokens = _flag(body, "return_tokens", False)  # llama.cpp's: each piece's token ids too
        except BadRequest as err:
            return error_response(err)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": ident, "created": created, "model": self.model}
        if stream:
            return StreamingResponse(self._events(head, chat, inputs, len(ids), usage_in_stream, tokens),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces, new, reason, cached = [], [], None, 0
        try:
            async for text, new_ids, finish, reused in self.generate(inputs):
                pieces.append(text)
                new, reason, cached = new + new_ids, finish or reason, reused if reused is not None else cached
        except BadRequest as err:
            return error_response(err)
        text = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = _openai_reason(reason)
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                             "usage": _usage(len(ids), len(new), cached), **({"tokens": new} if tokens else {})})

    async def _events(self, head: dict, chat: bool, inputs, prompt_tokens: int, usage_in_stream: bool,
                      tokens: bool = False):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, **extra):
            return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra})}\n\n"

        if chat:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        count = cached = 0
        try:
            async for text, new_ids, finish, reused in self.generate(inputs):
                count, cached = count + len(new_ids), reused if reused is not None else cached
                if text or (new_ids and tokens):
                    piece = {"content": text} if chat else None
                    yield event([{"index": 0, **({"delta": piece} if chat else {"text": text, "logprobs": None}),
                                  "finish_reason": None}], **({"tokens": new_ids} if tokens else {}))
                if finish:
                    yield event([{"index": 0, **({"delta": {}} if chat else {"text": "", "logprobs": None}),
                                  "finish_reason": _openai_reason(finish)}])
        except BadRequest as err:
            yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'invalid_request_error'}})}\n\n"
        if usage_in_stream:
            yield event([], usage=_usage(prompt_tokens, count, cached))
        yield "data: [DONE]\n\n"


def _status_of(message: str) -> int:
    if "queue is full" in message:
        return 429
    if "server is stopping" in message:
        return 503
    return 400


_draining: set = set()


def _drain_later(call) -> None:
    """Read a stream whose final response has come to its end in the background (bounded), holding it meanwhile:
    a stream dropped unfinished is cancelled by gRPC."""
    async def drain():
        async def to_the_end():
            async for _ in call:
                pass

        try:
            await asyncio.wait_for(to_the_end(), DRAIN_S)
        except (Exception, asyncio.CancelledError):
            pass
        finally:
            _draining.discard(task)

    task = asyncio.get_running_loop().create_task(drain())
    _draining.add(task)


def _openai_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def create_app(grpc_url: str, model: str, tokenizer, window: int) -> Starlette:
    frontend = Frontend(grpc_url, model, tokenizer, window)
    return Starlette(routes=[Route("/v1/completions", frontend.completions, methods=["POST"]),
                             Route("/v1/chat/completions", frontend.chat_completions, methods=["POST"]),
                             Route("/v1/models", frontend.models, methods=["GET"])])


def make_server(grpc_url: str, model: str, tokenizer, window: int, host: str, port: int, graceful_s: float = 30):
    """A uvicorn server for the app (not started) and its port (a free one for 0); once told to stop it waits at
    most `graceful_s` for its open connections."""
    import uvicorn

    from .server import free_port

    port = port or free_port(host)
    config = uvicorn.Config(create_app(grpc_url, model, tokenizer, window), host=host, port=port,
                            log_level="warning", lifespan="off", timeout_graceful_shutdown=graceful_s)
    return uvicorn.Server(config), port
