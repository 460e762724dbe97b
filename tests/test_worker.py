"""knocker.worker's WSGI guard: the body deadline and closing connections whose body the
app left unread. The worker itself runs under `knocker serve` in test_hostile."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from knocker.worker import DeadlineInput, guard


class FakeResponse:
    """gunicorn's Response as far as the guard uses it."""

    def __init__(self) -> None:
        self.closed = False
        self.status = ""

    def force_close(self) -> None:
        self.closed = True

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> None:
        self.status = status


def reading(size: int, to_the_end: bool = False) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if size:
            while environ["wsgi.input"].read(size) and to_the_end:
                pass
        start_response("200 OK", [])
        return ()

    return app


def serve(app: Callable[..., Iterable[bytes]], body: bytes, **environ: str) -> FakeResponse:
    response = FakeResponse()
    guard(app, 10.0)({"wsgi.input": io.BytesIO(body), **environ}, response.start_response)
    assert response.status == "200 OK"
    return response


def test_a_request_without_a_body_keeps_its_connection() -> None:
    """No Content-Length and no chunked coding: nothing to read, nothing to close."""
    assert not serve(reading(0), b"").closed


def test_a_body_read_to_its_length_keeps_the_connection() -> None:
    """The app read all Content-Length bytes: the connection may be reused."""
    assert not serve(reading(5), b"hello", CONTENT_LENGTH="5").closed


def test_an_unread_body_closes_the_connection_instead_of_draining_it() -> None:
    """An early answer (a 401 before the body) marks the connection for closing."""
    assert serve(reading(0), b"hello", CONTENT_LENGTH="5").closed
    assert serve(reading(2), b"hello", CONTENT_LENGTH="5").closed


def test_a_chunked_body_counts_as_read_once_its_end_was_seen() -> None:
    """For a chunked body only a read that returned its end makes it finished."""
    chunked = {"HTTP_TRANSFER_ENCODING": "chunked"}
    assert serve(reading(4), b"abcd", **chunked).closed
    assert not serve(reading(4097, to_the_end=True), b"abcd", **chunked).closed


def test_reads_after_the_deadline_raise_timeout_error() -> None:
    """Once the body deadline has passed, a read fails with TimeoutError (an OSError, so
    the app answers 408) and the body stays unfinished."""
    now = [100.0]
    body = DeadlineInput(io.BytesIO(b"hello"), {"CONTENT_LENGTH": "5"}, 105.0, lambda: now[0])
    assert body.read(2) == b"he"
    now[0] = 105.5
    with pytest.raises(TimeoutError):
        body.read(3)
    assert not body.finished
