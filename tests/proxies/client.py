"""A tiny HTTP client that can pose as different machines on loopback.

Different clients are different source addresses: the whole of 127.0.0.0/8 is local
on Linux, so binding the client socket to 127.0.0.23 or 127.0.0.24 makes the proxy see
two distinct peers without any network setup; ::1 is the IPv6 client.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
from collections.abc import Iterable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclasses.dataclass(frozen=True)
class Client:
    """Sends requests to a proxy from one fixed source address."""

    source: str  # e.g. "127.0.0.23" or "::1"
    port: int  # the proxy's port

    @property
    def target(self) -> str:
        # IPv6 clients talk to the proxy's [::1] listener, IPv4 ones to 127.0.0.1.
        return "::1" if ":" in self.source else "127.0.0.1"

    def request(
        self,
        method: str,
        host: str,
        path: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> Response:
        """One request on a fresh connection; `path` is sent exactly as given."""
        conn = http.client.HTTPConnection(
            self.target, self.port, source_address=(self.source, 0), timeout=15
        )
        try:
            # skip_host: the Host header names the site (app/knock), not 127.0.0.1.
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", f"{host}:{self.port}")
            conn.putheader("Connection", "close")
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None or method in ("POST", "PUT"):
                conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders(body)
            raw = conn.getresponse()
            data = raw.read()
            return Response(raw.status, raw.getheaders(), data)
        finally:
            conn.close()

    def get(self, host: str, path: str, **kw: Any) -> Response:
        return self.request("GET", host, path, **kw)

    def head(self, host: str, path: str, **kw: Any) -> Response:
        return self.request("HEAD", host, path, **kw)

    def knock(
        self,
        host: str,
        api_key: str,
        *,
        payload: dict[str, Any] | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Response:
        extra = [("X-Api-Key", api_key), *headers]
        body = None
        if payload is not None:
            body = json.dumps(payload).encode()
            extra.append(("Content-Type", "application/json"))
        return self.request("POST", host, "/knock", headers=extra, body=body)
