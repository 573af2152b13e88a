"""The OpenAI-compatible HTTP front (aiohttp.web): thin over the scheduler and the protocol.

    POST /v1/completions        text (with a tokenizer.json) or token-id prompts; stream (SSE) or not; usage;
                                vLLM's return_token_ids
    POST /v1/chat/completions   400 unless the tokenizer has a chat template (none is read yet)
    GET  /v1/models             the one model served
    GET  /health                200 while the scheduler runs (no API key needed)
    GET  /metrics               Prometheus text (epsjax.serve.metrics)

Every error is an OpenAI error body with its status: 400 bad input, 401 no or wrong API key, 404, 405, 413 a body
over max_body bytes (refused before it is read), 429 the waiting queue is full, 500 the engine failed on the
request, 503 the scheduler is stopped (/health says so too). A handler task runs per request on the event loop;
it submits to the scheduler and reads its Outputs from an asyncio.Queue the scheduler thread fills with
loop.call_soon_threadsafe. A client that goes away (its handler is cancelled, or a streamed write fails) cancels
its request, which frees its slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import traceback
import uuid

from aiohttp import web

from epsjax.serve.metrics import Metrics
from epsjax.serve.protocol import BadRequest, Limits, error_body, parse_completion
from epsjax.serve.scheduler import Output, QueueFull, Scheduler, ShuttingDown

MAX_BODY = 1 << 20


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> web.Response:
    return web.json_response(error_body(message, type, param, code), status=status)


class Server:
    """The aiohttp application of one scheduler. model_name: what /v1/models lists; api_key: None or the key
    every endpoint but /health wants as `Authorization: Bearer KEY`."""

    def __init__(self, scheduler: Scheduler, limits: Limits, *, model_name: str, tokenizer=None,
                 api_key: str | None = None, metrics: Metrics | None = None, max_body: int = MAX_BODY):
        self.scheduler, self.limits, self.model_name = scheduler, limits, model_name
        self.tokenizer, self.api_key, self.max_body = tokenizer, api_key, max_body
        self.metrics = metrics if metrics is not None else (scheduler.metrics or Metrics())
        self.created = int(time.time())
        self.app = web.Application(middlewares=[self._guard], client_max_size=max_body)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.prometheus)

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """API key, body size, and every error as an OpenAI error body."""
        if self.api_key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                self._outcome("unauthorized")
                return _error(401, "a valid API key is required: Authorization: Bearer <key>",
                              "authentication_error", code="invalid_api_key")
        if request.content_length is not None and request.content_length > self.max_body:
            self._outcome("invalid")
            return _error(413, f"the request body ({request.content_length} bytes) is over the limit of "
                               f"{self.max_body} bytes")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            self._outcome("invalid")
            return _error(413, f"the request body is over the limit of {self.max_body} bytes")
        except web.HTTPException as e:  # 404, 405 from the router
            return _error(e.status, e.reason, "not_found_error" if e.status == 404 else "invalid_request_error")
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:  # noqa: BLE001 - a bug answers 500 with an error body; the server goes on
            traceback.print_exception(e)
            return _error(500, f"internal error: {type(e).__name__}", "server_error")

    def _outcome(self, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()

    async def _json(self, request: web.Request):
        raw = await request.read()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise BadRequest(f"the request body is not valid JSON: {str(e)[:200] or type(e).__name__}") from None

    # Endpoints -------------------------------------------------------------------------------------------------

    async def health(self, request):
        if not self.scheduler.alive:
            return _error(503, "the scheduler is not running", "server_error")
        return web.json_response({"status": "ok"})

    async def prometheus(self, request):
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def models(self, request):
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "epsjax",
             "max_model_len": self.limits.context}]})

    async def chat(self, request):
        try:
            await self._json(request)
        except BadRequest as e:
            self._outcome("invalid")
            return _error(400, e.message)
        self._outcome("invalid")
        return _error(400, "this model has no chat template (its tokenizer files hold none): use /v1/completions",
                      param="messages")

    async def completions(self, request: web.Request):
        try:
            req = parse_completion(await self._json(request), self.limits, self.tokenizer)
        except BadRequest as e:
            self._outcome("invalid")
            return _error(e.status, e.message, param=e.param, code=e.code)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        rid = f"cmpl-{uuid.uuid4().hex}"

        def emit(output: Output) -> None:  # on the scheduler thread
            loop.call_soon_threadsafe(queue.put_nowait, output)

        try:
            self.scheduler.submit(rid, req.prompt, req.sampling, emit, stop=req.stop, stop_at_eos=req.stop_at_eos)
        except QueueFull as e:
            self._outcome("rejected")
            return _error(429, str(e), "rate_limit_error", code="queue_full")
        except ShuttingDown as e:
            self._outcome("rejected")
            return _error(503, str(e), "server_error")
        done = False
        try:
            if req.stream:
                response = await self._stream(request, req, rid, queue)
            else:
                response = await self._whole(req, rid, queue)
            done = True
            return response
        finally:
            if not done:  # the client went away (the handler was cancelled or a write failed)
                self.scheduler.cancel(rid)

    def _choice(self, req, text: str, tokens: list[int], reason: str | None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        if req.return_token_ids:
            choice["token_ids"] = tokens
        return choice

    def _head(self, rid: str) -> dict:
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}

    @staticmethod
    def _usage(output: Output) -> dict:
        return {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
                "total_tokens": output.prompt_tokens + output.completion_tokens}

    async def _whole(self, req, rid: str, queue: asyncio.Queue) -> web.Response:
        text, tokens = [], []
        while True:
            output = await queue.get()
            if output.error is not None:
                return _error(500, output.error, "server_error")
            text.append(output.text)
            tokens += output.tokens
            if output.finished:
                choice = self._choice(req, "".join(text), tokens, output.finish_reason)
                if req.return_token_ids:  # vLLM: the prompt's ids beside the choice's
                    choice["prompt_token_ids"] = list(req.prompt)
                body = self._head(rid) | {"choices": [choice], "usage": self._usage(output)}
                return web.json_response(body)

    async def _stream(self, request, req, rid: str, queue: asyncio.Queue) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(body: dict) -> None:
            await response.write(b"data: " + json.dumps(body).encode() + b"\n\n")

        while True:
            output = await queue.get()
            if output.error is not None:
                await send(error_body(output.error, "server_error"))
                break
            chunk = self._head(rid) | {"choices": [self._choice(req, output.text, output.tokens,
                                                                output.finish_reason)]}
            if req.include_usage:
                chunk["usage"] = None
            await send(chunk)
            if output.finished:
                if req.include_usage:
                    await send(self._head(rid) | {"choices": [], "usage": self._usage(output)})
                break
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def start(server: Server, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listens on host:port (0: a free port); returns the runner (await runner.cleanup() to stop) and the port."""
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]
