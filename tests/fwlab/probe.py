"""The two traffic endpoints of the firewalld lab; stdlib only (runs on any python3).

probe.py serve PORT [PORT...]
    In the protected namespace: a dual-stack TCP listener per port ([::]:PORT with
    IPV6_V6ONLY off, so IPv4 arrives too). Each connection gets b"open PORT\\n" and is
    closed. Prints "LISTENING" once every port is bound.

probe.py agent
    In the client namespace: one JSON request per stdin line, one JSON answer per line.
      {"op": "connect", "host": H, "port": P, "timeout": T, "source": S?}
          -> {"result": "connected"|"timeout"|"refused"|"unreachable"|<errno>, "elapsed": s}
      {"op": "http", "method": M, "host": H, "port": P, "path": "/x", "headers": {...},
       "body": "text"|null, "timeout": T, "source": S?}
          -> {"status": int, "headers": {...}, "body": "text"} or {"error": "..."}
    A long-lived agent saves the ~50 ms of `ip netns exec` + interpreter start per probe,
    which keeps the expiry measurements (whole seconds) meaningful.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import sys
import threading
import time


def serve(ports: list[int]) -> None:
    listeners = []
    for port in ports:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(64)
        listeners.append((sock, port))
    for sock, port in listeners:
        threading.Thread(target=accept_loop, args=(sock, port), daemon=True).start()
    print("LISTENING", flush=True)
    threading.Event().wait()


def accept_loop(sock: socket.socket, port: int) -> None:
    while True:
        conn, _ = sock.accept()
        try:
            conn.sendall(b"open %d\n" % port)
        except OSError:
            pass
        finally:
            conn.close()


def connect(request: dict) -> dict:
    host = request["host"]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(float(request.get("timeout", 1.0)))
    started = time.monotonic()
    try:
        if request.get("source"):
            sock.bind((request["source"], 0))
        sock.connect((host, int(request["port"])))
        banner = sock.recv(64)  # the listener really answered, not just the kernel
        result = "connected" if banner.startswith(b"open ") else f"banner {banner!r}"
    except TimeoutError:
        result = "timeout"
    except ConnectionRefusedError:
        result = "refused"
    except OSError as exc:
        # firewalld's reject: ICMP admin-prohibited (EHOSTUNREACH for IPv4, EACCES for IPv6)
        if exc.errno in (errno.EHOSTUNREACH, errno.EACCES, errno.ENETUNREACH):
            result = "unreachable"
        else:
            result = errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        sock.close()
    return {"result": result, "elapsed": round(time.monotonic() - started, 3)}


def http_request(request: dict) -> dict:
    source = request.get("source")
    conn = http.client.HTTPConnection(
        request["host"],
        int(request["port"]),
        timeout=float(request.get("timeout", 10.0)),
        source_address=(source, 0) if source else None,
    )
    body = request.get("body")
    try:
        conn.request(
            request.get("method", "GET"),
            request.get("path", "/"),
            body=body.encode() if body is not None else None,
            headers=request.get("headers") or {},
        )
        response = conn.getresponse()
        return {
            "status": response.status,
            "headers": dict(response.getheaders()),
            "body": response.read().decode("utf-8", "replace"),
        }
    except (OSError, http.client.HTTPException) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def agent() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "connect":
            answer = connect(request)
        elif request.get("op") == "http":
            answer = http_request(request)
        elif request.get("op") == "quit":
            break
        else:
            answer = {"error": f"unknown op {request.get('op')!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve([int(port) for port in sys.argv[2:]])
    elif len(sys.argv) == 2 and sys.argv[1] == "agent":
        agent()
    else:
        sys.exit(__doc__)
