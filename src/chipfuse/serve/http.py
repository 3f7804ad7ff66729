"""An OpenAI-compatible HTTP API over a serving Engine (starlette; run by uvicorn).

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
"stream": true as server-sent events, ending with `data: [DONE]`). With an API key every /v1 route wants
`Authorization: Bearer KEY`. A malformed request gets a 4xx with an OpenAI-style error body naming the
field. A client that disconnects while its answer streams (or waits) has its request cancelled, which
frees its slot and its KV caches on every stage.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from chipfuse.errors import ChipfuseError
from chipfuse.serve.engine import Engine, Request


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _error(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


@dataclass(kw_only=True)
class Params:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stream: bool


def _number(body: dict, key: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key, default)
    if v is None:
        v = default
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{key}' is {v!r}; it must be {kind} in [{lo}, {hi}]", key)
    return v


class API:
    def __init__(self, engine: Engine, tokenizer: Any, *, model_name: str, api_key: str | None = None):
        self.engine, self.tok, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.context_len = engine.plan.context_len
        self.created = int(time.time())

    # ---------------------------------------------------------------- parsing
    async def _body(self, request: HTTPRequest) -> dict:
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise BadRequest("invalid or missing API key (send 'Authorization: Bearer KEY')", status=401)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest(f"model {model!r} is not served here; this server serves {self.model_name!r}", "model",
                             status=404)
        return body

    def _params(self, body: dict, prompt_ids: list[int]) -> Params:
        if not prompt_ids:
            raise BadRequest("the prompt is empty", "prompt")
        room = self.context_len - len(prompt_ids)
        if room < 1:
            raise BadRequest(f"the prompt has {len(prompt_ids)} tokens; the context is {self.context_len}", "prompt")
        max_tokens = _number(body, "max_tokens", min(16, room), 1, room, integer=True)
        if "max_completion_tokens" in body:
            max_tokens = _number(body, "max_completion_tokens", max_tokens, 1, room, integer=True)
        if body.get("n", 1) != 1:
            raise BadRequest("only n = 1 is supported", "n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"'stream' is {stream!r}; it must be true or false", "stream")
        return Params(prompt_ids=prompt_ids, max_tokens=max_tokens,
                      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                      top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
                      seed=_number(body, "seed", 0, 0, 2**62, integer=True), stream=stream)

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def _chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise BadRequest(f"messages[{i}] must be an object with string 'role' and 'content'", f"messages[{i}]")
        if getattr(self.tok, "chat_template", None):
            return list(self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
        # No chat template in the folder: a plain transcript ending with the assistant's turn.
        text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:"
        return self._encode(text)

    # ---------------------------------------------------------------- generation
    async def _run(self, p: Params, request: HTTPRequest) -> AsyncIterator[tuple[str, Any]]:
        """Yields ("token", id) then ("done", reason); cancels the request if the client goes away."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def on_event(ev: tuple) -> None:
            loop.call_soon_threadsafe(q.put_nowait, ev)

        req = Request(prompt=p.prompt_ids, max_new=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                      seed=p.seed, stop_ids=tuple(self._stop_ids()), on_event=on_event)
        rid = self.engine.submit(req)
        finished = False
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield ev
                if ev[0] != "token":
                    finished = True
                    return
        finally:
            if not finished:
                self.engine.cancel(rid)

    def _stop_ids(self) -> list[int]:
        eos = getattr(self.tok, "eos_token_id", None)
        return [eos] if isinstance(eos, int) else []

    async def _collect(self, p: Params, request: HTTPRequest) -> tuple[list[int], str]:
        toks, reason = [], "length"
        async for kind, val in self._run(p, request):
            if kind == "token":
                toks.append(val)
            elif kind == "error":
                raise ChipfuseError(val)
            else:
                reason = val
        return toks, _finish(reason)

    # ---------------------------------------------------------------- routes
    async def health(self, request: HTTPRequest) -> Response:
        e = self.engine
        ok = e.failed is None
        return JSONResponse({"status": "ok" if ok else "failed", "devices": list(e.plan.devices), "lost": e.lost,
                             "emulated": e.pool.emulated, "notes": e.notes, "error": e.failed}, status_code=200 if ok else 503)

    async def models(self, request: HTTPRequest) -> Response:
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            return _error("invalid or missing API key (send 'Authorization: Bearer KEY')", 401)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "chipfuse"}]})

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._endpoint(request, chat=False)

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._endpoint(request, chat=True)

    async def _endpoint(self, request: HTTPRequest, *, chat: bool) -> Response:
        try:
            body = await self._body(request)
            if chat:
                ids = self._chat_prompt(body)
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
                    ids = list(prompt)
                elif isinstance(prompt, str):
                    ids = self._encode(prompt)
                else:
                    raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")
                vocab = self.engine.plan.model.vocab_size
                if any(not 0 <= x < vocab for x in ids):
                    raise BadRequest(f"a prompt token id is outside the vocabulary 0..{vocab - 1}", "prompt")
            p = self._params(body, ids)
            if self.engine.failed:
                return _error(self.engine.failed, 503, kind="server_error")
        except BadRequest as e:
            return _error(str(e), e.status, e.param)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if p.stream:
            return StreamingResponse(self._stream(p, request, rid, chat), media_type="text/event-stream")
        try:
            toks, reason = await self._collect(p, request)
        except ChipfuseError as e:
            return _error(str(e), 503, kind="server_error")
        text = self.tok.decode(toks, skip_special_tokens=True)
        usage = {"prompt_tokens": len(p.prompt_ids), "completion_tokens": len(toks),
                 "total_tokens": len(p.prompt_ids) + len(toks)}
        if chat:
            choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": [choice],
                             "usage": usage})

    async def _stream(self, p: Params, request: HTTPRequest, rid: str, chat: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        toks: list[int] = []
        sent = ""

        def chunk(text: str, reason: str | None, first: bool = False) -> str:
            if chat:
                delta: dict = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                choice: dict = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": int(time.time()),
                                          "model": self.model_name, "choices": [choice]}) + "\n\n"

        if chat:
            yield chunk("", None, first=True)
        async for kind, val in self._run(p, request):
            if kind == "token":
                toks.append(val)
                # Decode the whole answer and send what is new, so multi-token characters arrive whole.
                text = self.tok.decode(toks, skip_special_tokens=True)
                if len(text) > len(sent) and not text.endswith("\ufffd"):
                    yield chunk(text[len(sent):], None)
                    sent = text
            elif kind == "error":
                yield "data: " + json.dumps({"error": {"message": val, "type": "server_error"}}) + "\n\n"
                return
            else:
                yield chunk("", _finish(val))
        yield "data: [DONE]\n\n"


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length", "context": "length"}.get(reason, reason)


def make_app(engine: Engine, tokenizer: Any, *, model_name: str, api_key: str | None = None) -> Starlette:
    api = API(engine, tokenizer, model_name=model_name, api_key=api_key)
    return Starlette(routes=[
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
    ])
