"""An OpenAI-style HTTP server over a :class:`~prinmix_jax.serving.DeltaBank` (Starlette on uvicorn):
``GET /v1/models`` and ``POST /v1/completions``, where ``model`` picks the fine-tune by name (the base under
its own name).

Requests that arrive together are answered by one mixed batch: a single worker collects whatever is waiting
(up to ``max_batch`` rows, waiting at most ``batch_window`` seconds after the first request) and runs one
:meth:`DeltaBank.generate` for all of them, each row through its own delta. Bad requests get a 4xx JSON error
``{"error": {"message", "type", "param", "code"}}`` and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["make_app", "serve", "Completion", "RequestError", "parse_completion"]


class RequestError(Exception):
    """A client error: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclasses.dataclass
class Completion:
    """One parsed request: its row of the next batch."""
    model: str
    delta: str | None
    ids: list
    max_tokens: int
    temperature: float
    top_p: float
    seed: int


def _number(body: dict, key: str, default, kind, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", key)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(400, f"'{key}' must be in [{lo}, {hi if hi is not None else '∞'}], got {v}", key)
    return v


def parse_completion(body, models: dict, tokenizer, context: int) -> Completion:
    """Validates a /v1/completions body against the served ``models`` (``{name: delta name or None}``)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(400, "'model' is required (a string: one of GET /v1/models)", "model")
    if model not in models:
        raise RequestError(404, f"the model {model!r} does not exist; served: {', '.join(models)}", "model",
                           "model_not_found")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise RequestError(400, "'prompt' must be a string or a non-empty list of token ids", "prompt")
    if not ids:
        raise RequestError(400, "'prompt' encodes to no tokens", "prompt")
    max_tokens = _number(body, "max_tokens", 16, int, 1)
    if len(ids) + max_tokens > context:
        raise RequestError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {context} tokens", "prompt", "context_length_exceeded")
    if _number(body, "n", 1, int, 1) != 1:
        raise RequestError(400, "only n=1 is supported", "n")
    return Completion(model, models[model], ids, max_tokens, _number(body, "temperature", 1.0, float, 0.0, 2.0),
                      _number(body, "top_p", 1.0, float, 0.0, 1.0),
                      _number(body, "seed", 0, int, 0) if body.get("seed") is not None else uuid.uuid4().int % 2**32)


class Batcher:
    """Collects waiting requests into mixed batches and runs each on a worker thread."""

    def __init__(self, bank, tokenizer, max_batch: int = 16, batch_window: float = 0.01):
        self.bank, self.tokenizer, self.max_batch, self.window = bank, tokenizer, max_batch, batch_window
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches = 0

    async def submit(self, c: Completion):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((c, fut))
        return await fut

    async def run(self):
        while True:
            items = [await self.queue.get()]
            deadline = time.monotonic() + self.window
            while len(items) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left) if left > 0
                                 else self.queue.get_nowait())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            try:
                outs = await asyncio.to_thread(self._generate, [c for c, _ in items])
            except Exception as e:  # noqa: BLE001 -- every waiting request gets the error, the server lives on
                outs = [e] * len(items)
            self.batches += 1
            for (_, fut), out in zip(items, outs):
                if not fut.done():
                    if isinstance(out, Exception):
                        fut.set_exception(out)
                    else:
                        fut.set_result((out, len(items)))

    def _generate(self, cs: list[Completion]):
        return self.bank.generate([c.ids for c in cs], [c.delta for c in cs], [c.max_tokens for c in cs],
                                  temperature=[c.temperature for c in cs], top_p=[c.top_p for c in cs],
                                  seed=[c.seed for c in cs], eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)


def make_app(bank, tokenizer, base_name: str, *, max_batch: int = 16, batch_window: float = 0.01) -> Starlette:
    """The Starlette app serving ``bank`` (the base as ``base_name``, each delta under its bank name)."""
    batcher = Batcher(bank, tokenizer, max_batch, batch_window)
    created = int(time.time())

    def models() -> dict:
        return {base_name: None, **{n: n for n in bank.names}}

    async def list_models(request: Request):
        data = [{"id": m, "object": "model", "created": created, "owned_by": "prinmix",
                 "root": base_name, "parent": None if d is None else base_name} for m, d in models().items()]
        return JSONResponse({"object": "list", "data": data})

    async def completions(request: Request):
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the request body is not valid JSON ({e})") from None
            c = parse_completion(body, models(), tokenizer, bank.config.max_position_embeddings)
            out, rows = await batcher.submit(c)
        except RequestError as e:
            return e.response()
        except KeyError as e:         # the delta was removed between parsing and running
            return RequestError(404, str(e).strip("'\""), "model", "model_not_found").response()
        except Exception as e:  # noqa: BLE001
            return RequestError(500, f"generation failed: {type(e).__name__}: {e}").response()
        eos = tokenizer.eos_id
        stopped = eos is not None and bool(out) and out[-1] == eos
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": c.model,
            "choices": [{"text": tokenizer.decode(out), "index": 0, "logprobs": None,
                         "finish_reason": "stop" if stopped else "length"}],
            "usage": {"prompt_tokens": len(c.ids), "completion_tokens": len(out),
                      "total_tokens": len(c.ids) + len(out)}}, headers={"x-prinmix-batch-rows": str(rows)})

    async def not_found(request: Request, exc):
        return RequestError(404, f"no route {request.method} {request.url.path}").response()

    async def method_not_allowed(request: Request, exc):
        return RequestError(getattr(exc, "status_code", 405), f"{request.method} {request.url.path}: "
                            f"{getattr(exc, 'detail', 'not allowed')}").response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            worker.cancel()

    app = Starlette(routes=[Route("/v1/models", list_models, methods=["GET"]),
                            Route("/v1/completions", completions, methods=["POST"])],
                    exception_handlers={404: not_found, 405: method_not_allowed}, lifespan=lifespan)
    app.state.batcher = batcher
    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, announce=None, log_level: str = "warning") -> None:
    """Runs ``app`` with uvicorn until SIGINT/SIGTERM (a clean shutdown: requests in flight are answered).

    The socket is bound first, so ``port=0`` picks a free port; ``announce(url)`` is called with the address
    once it is bound."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)            # connections queue from here on, before uvicorn accepts them
    url_host = f"[{host}]" if family == socket.AF_INET6 else host
    if announce is not None:
        announce(f"http://{url_host}:{sock.getsockname()[1]}")
    server = _server_class()(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30))
    server.run(sockets=[sock])


def _server_class():
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM / SIGINT end :func:`serve` normally after the graceful
        shutdown (uvicorn re-raises the signal, which would end the process with status -15 / 130)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server


def bank_tokenizer(base_dir: str, delta_dirs=()):
    """The tokenizer prompts are encoded with: the base folder's, else the first delta's kept fine-tune files.

    Raises:
      CalibrationDataError: neither holds tokenizer files.
    """
    import os

    from prinmix_jax.evaluation import load_prompt_tokenizer
    from prinmix_jax.models.checkpoint_files import TOKENIZER_CORE_FILES

    for d in [base_dir, *(os.path.join(p, "hf") for p in delta_dirs)]:
        if any(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_CORE_FILES):
            return load_prompt_tokenizer(d, "encode prompts")
    return load_prompt_tokenizer(base_dir, "encode prompts", "save the base model's tokenizer in its folder")
