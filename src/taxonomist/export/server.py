"""``taxonomist serve``: MLflow's own scoring server for a packaged model, with guards at the door.

The app is MLflow's (:func:`mlflow.pyfunc.scoring_server.init`: the same ``/invocations``,
``/ping``, ``/health`` and ``/version``, the same request and response formats as
``mlflow models serve``), wrapped in :class:`Guard`, an ASGI middleware that adds what MLflow's
server lacks:

* a **body limit**: a request body over ``max_body_mb`` is refused with HTTP 413 and never held
  in memory (its rest is read and dropped first, see :meth:`Guard._drain`; the model's own
  limits then bound the images inside an accepted body:
  :class:`~taxonomist.export.serving.Limits`);
* a **concurrency limit**: at most ``concurrency`` requests are read and classified at once
  (the others wait), so the server's memory is bounded by ``concurrency`` requests;
* **one-line errors**: every error response is ``{"error_code": ..., "message": ...}`` with a
  one-line message (what MLflow said after its last ``Error:``), never a stack trace or the
  request's data.

The model limits still hold without the guard (``mlflow models serve``, ``mlflow models
build-docker``); there, MLflow's error messages carry its own wording around the one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
GUARDED_PATHS = ("/invocations",)
_LAST_ERROR = re.compile(r".*\bError: ", re.DOTALL)


def one_line(message: str) -> str:
    """The part of an MLflow error message a user acts on: after its last ``Error:``, first line."""
    tail = _LAST_ERROR.sub("", message).strip()
    return (tail.splitlines() or [""])[0].strip()[:500]


DRAIN_BYTES = 256 * 2**20  # of a refused body, read and dropped so the client can read the 413
DRAIN_SECONDS = 10.0


class Guard:
    """ASGI middleware: body limit, concurrency limit and one-line errors (module docstring)."""

    def __init__(self, app: ASGIApp, max_body_mb: float, concurrency: int) -> None:
        self.app = app
        self.max_body = int(max_body_mb * 1e6)
        self.slots = asyncio.Semaphore(max(1, concurrency))

    async def _reply(self, send: Send, status: int, code: str, message: str) -> None:
        body = json.dumps({"error_code": code, "message": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _drain(self, receive: Receive) -> None:
        """Read and drop what is left of a body about to be refused (at most :data:`DRAIN_BYTES`,
        for :data:`DRAIN_SECONDS`), so a client that sends the whole body before it reads the
        answer gets the 413 instead of a connection reset under it; nothing is kept. (Once the
        answer is sent, the server no longer reads the body: this comes first.)"""
        drained = 0

        async def drain() -> None:
            nonlocal drained
            while drained <= DRAIN_BYTES:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body"):
                    return
                drained += len(message.get("body", b""))

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drain(), DRAIN_SECONDS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in GUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        too_big = f"the request body is over the limit of {self.max_body / 1e6:g} MB (taxonomist serve --max-body-mb)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            if int(length) <= DRAIN_BYTES:
                await self._drain(receive)
            await self._reply(send, 413, "REQUEST_TOO_LARGE", too_big)
            return
        async with self.slots:
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    del chunks
                    if message.get("more_body"):
                        await self._drain(receive)
                    await self._reply(send, 413, "REQUEST_TOO_LARGE", too_big)
                    return
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            del chunks
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, _OneLineErrors(send))


class _OneLineErrors:
    """A ``send`` that rewrites a JSON error response to ``{"error_code", "message"}`` in one line."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.start: Message | None = None
        self.parts: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                await self.send(message)
                return
            self.start = message  # held until the whole body is known
            return
        if self.start is None:
            await self.send(message)
            return
        self.parts.append(message.get("body", b""))
        if message.get("more_body"):
            return
        raw = b"".join(self.parts)
        try:
            error = json.loads(raw)
            code, text = str(error.get("error_code", "BAD_REQUEST")), str(error.get("message", ""))
        except (ValueError, AttributeError):
            code, text = "BAD_REQUEST", raw.decode("utf-8", "replace")
        body = json.dumps({"error_code": code, "message": one_line(text)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self.send({"type": "http.response.start", "status": self.start["status"], "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


BASE64_OVERHEAD = 4 / 3  # JSON carries image bytes as base64


def create_app(model_uri: str, max_body_mb: float | None = None, concurrency: int | None = None) -> Guard:
    """MLflow's scoring app for the MLflow model at ``model_uri`` (``models:/...``, ``runs:/...``
    or a local MLflow model folder), behind a :class:`Guard`. By default the body limit lets
    through the model's ``max_request_mb`` of images as base64 JSON (plus 1 MB), and as many
    requests run at once as this process has cores."""
    from mlflow.pyfunc import scoring_server

    from taxonomist.data.parallel import default_workers

    model = scoring_server.load_model_with_mlflow_config(model_uri)
    if max_body_mb is None:
        limits = getattr(model.unwrap_python_model(), "limits", None)
        max_body_mb = (limits.max_request_mb if limits else 64.0) * BASE64_OVERHEAD + 1.0
    return Guard(scoring_server.init(model), max_body_mb=max_body_mb, concurrency=concurrency or default_workers())


def serve(model_uri: str, host: str, port: int, max_body_mb: float | None, concurrency: int | None) -> None:
    """Run :func:`create_app` under uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model_uri, max_body_mb, concurrency), host=host, port=port, log_level="warning")
