"""Edge: the gunicorn worker `knocker serve` runs by default. gevent's worker, plus deadlines.

Owns what a slow or idle client may cost: a connection (a greenlet and its buffers, bounded
by gunicorn's `worker_connections`), never a worker thread, and never for long. A request's
head (and the idle time before it on a kept-alive connection) must arrive within
HEAD_TIMEOUT, its body within BODY_TIMEOUT of the head; a connection whose body the app left
unread (an early 401/429/413) is closed, not drained. Imported only by gunicorn, in workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

HEAD_TIMEOUT = 10.0  # seconds for a whole request head, idle keep-alive time included
BODY_TIMEOUT = 10.0  # seconds for a whole request body, counted from the end of its head
WORKER_CONNECTIONS = 1000  # connections one worker holds at once (gunicorn's default)

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class KnockerWorker(GeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker with a deadline on the request head and on the body."""

    wsgi: App

    def timeout_ctx(self) -> gevent.Timeout:
        # gunicorn reads each request head (after draining nothing: see guard) inside this
        # context; on expiry the `with` ends silently, no request is returned, and the
        # connection is closed.
        return gevent.Timeout(HEAD_TIMEOUT, False)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = guard(self.wsgi, BODY_TIMEOUT)


def guard(app: App, body_timeout: float, clock: Callable[[], float] = time.monotonic) -> App:
    """`app` with its request body behind a deadline, and connections closed when the
    app answered without reading the whole body (nothing left to drain for a trickler)."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = DeadlineInput(environ.get("wsgi.input"), environ, clock() + body_timeout, clock)
        environ["wsgi.input"] = body

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if not body.finished:
                force_close = getattr(
                    getattr(start_response, "__self__", None), "force_close", None
                )
                if force_close is not None:  # gunicorn's Response: "Connection: close"
                    force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return guarded


class DeadlineInput:
    """wsgi.input whose reads fail with TimeoutError once the deadline has passed, and
    which knows whether the whole body has been read."""

    def __init__(
        self, stream: Any, environ: dict[str, Any], deadline: float, clock: Callable[[], float]
    ) -> None:
        self._stream = stream
        self._deadline = deadline
        self._clock = clock
        length = environ.get("CONTENT_LENGTH") or ""
        self._left: int | None = int(length) if length.isdigit() else None
        self._chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        self.finished = stream is None or (
            self._left == 0 if self._left is not None else not self._chunked
        )

    def read(self, size: int = -1) -> bytes:
        return self._timed("read", size)

    def readline(self, size: int = -1) -> bytes:
        return self._timed("readline", size)

    def _timed(self, method: str, size: int) -> bytes:
        if self._stream is None:
            return b""
        left = self._deadline - self._clock()
        if left <= 0:
            raise TimeoutError("request body not received in time")
        with gevent.Timeout(left, TimeoutError("request body not received in time")):
            data: bytes = getattr(self._stream, method)(size)
        if self._left is not None:
            self._left -= len(data)
            self.finished = self._left <= 0
        elif not data and size != 0:
            self.finished = True
        return data
