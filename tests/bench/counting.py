"""What counting adds to one /verify, measured in-process (for `make bench`, target 15b).

    python -m tests.bench.counting    # prints {"off_us": ..., "on_us": ...} as JSON

Two apps on the same empty whitelist, metrics off and on (prometheus_client multiprocess
mode, as under `knocker serve`), are called directly as WSGI callables, interleaved; each
figure is the fastest of several rounds, which a busy neighbour can only slow down. The
difference is the counting's own cost, free of the HTTP and scheduling noise that
dominates the served comparison; run.py sets it against the CPU a served /verify costs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

CALLS, ROUNDS = 50_000, 7


def main() -> int:
    directory = tempfile.mkdtemp(prefix="knocker-counting-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(directory, "metrics")
    os.mkdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    try:
        from knocker.app import App, build_app
        from knocker.config import load_config_text

        def make(name: str, metrics: bool) -> App:
            os.mkdir(os.path.join(directory, name))
            return build_app(
                load_config_text(
                    "api_keys: [{key: counting-key-0123456789abcdef, max_ttl: 60}]\n"
                    f"whitelist: {{storage_path: {directory}/{name}/whitelist.json}}\n"
                    f"metrics: {{enabled: {'true' if metrics else 'false'}}}\n"
                )
            )

        apps = {"off": make("off", False), "on": make("on", True)}
        environ: dict[str, Any] = {
            "PATH_INFO": "/verify",
            "REQUEST_METHOD": "GET",
            "REMOTE_ADDR": "192.0.2.1",
        }

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            pass

        best = {name: float("inf") for name in apps}
        for _ in range(ROUNDS):
            for name, app in apps.items():
                started = time.perf_counter()
                for _ in range(CALLS):
                    app(environ, start_response)
                best[name] = min(best[name], (time.perf_counter() - started) / CALLS)
        for app in apps.values():
            app.close()
        print(json.dumps({f"{name}_us": round(value * 1e6, 3) for name, value in best.items()}))
        return 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
