"""Edge: the `knocker` command. `main(argv) -> int`; every effect can be swapped in tests.

Owns: `serve` (gunicorn embedded: the config is validated, the whitelist loaded and the
firewall prepared in the master before any worker forks), `check-config`, `gen-key`, and
the client commands registered by knocker.client.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from . import __version__
from .app import App, build_app, config_path, configure_logging, load_config_file
from .config import Config, config_warnings
from .errors import ConfigError, KnockerError
from .store import release_free_memory

log = logging.getLogger("knocker")

DEFAULT_BIND = "0.0.0.0:8000"
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 4
_METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_WORKER_CLASS = "gevent"
# gevent: one greenlet per connection, so a slow or idle client costs a connection, not a
# thread (knocker.worker adds the head and body deadlines). gthread: the former default.
WORKER_CLASSES = {"gevent": "knocker.worker.KnockerWorker", "gthread": "gthread"}


def gen_key() -> str:
    """256 random bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knocker",
        description=("Knock-knock gateway: whitelist a device's IP after an API-key knock."),
    )
    parser.add_argument("--version", action="version", version=f"knocker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the service under gunicorn")
    serve.add_argument(
        "--config",
        metavar="PATH",
        help="knocker.yaml (default: $KNOCKER_CONFIG_PATH, else ./knocker.yaml)",
    )
    serve.add_argument(
        "--bind",
        action="append",
        metavar="HOST:PORT",
        help=f"address to listen on, repeatable (default {DEFAULT_BIND}; IPv6 as [::1]:8000)",
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=DEFAULT_WORKERS,
        help=f"worker processes (default {DEFAULT_WORKERS})",
    )
    serve.add_argument(
        "--worker-class",
        choices=sorted(WORKER_CLASSES),
        default=DEFAULT_WORKER_CLASS,
        help=f"gunicorn worker model (default {DEFAULT_WORKER_CLASS}: each "
        "connection a greenlet, with head and body deadlines)",
    )
    serve.add_argument(
        "--threads",
        type=_positive,
        default=DEFAULT_THREADS,
        help=f"threads per gthread worker (default {DEFAULT_THREADS}; "
        "1 = sync workers; gevent ignores it)",
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit 0/1")
    check.add_argument(
        "path", nargs="?", metavar="PATH", help="default: $KNOCKER_CONFIG_PATH, else ./knocker.yaml"
    )
    check.set_defaults(func=_check_config)

    key = sub.add_parser("gen-key", help="print a new random API key (256 bits, URL-safe)")
    key.set_defaults(func=_gen_key)

    move = sub.add_parser(
        "migrate", help="copy the live whitelist to the other backend (docs/redis.md#migrating)"
    )
    move.add_argument(
        "--to",
        required=True,
        choices=("redis", "file"),
        help="the backend to copy into (from the other one)",
    )
    move.add_argument(
        "--force", action="store_true", help="merge into a target that already holds live entries"
    )
    move.add_argument(
        "--config",
        metavar="PATH",
        help="knocker.yaml (default: $KNOCKER_CONFIG_PATH, else ./knocker.yaml)",
    )
    move.set_defaults(func=_migrate)

    from . import client

    client.register(sub)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    args = build_parser().parse_args(argv)
    args.out, args.err = out or sys.stdout, err or sys.stderr
    handler: Callable[[argparse.Namespace], int] = args.func
    return handler(args)


def _gen_key(args: argparse.Namespace) -> int:
    print(gen_key(), file=args.out)
    return 0


def _migrate(args: argparse.Namespace, clock: Callable[[], float] = time.time) -> int:
    path = config_path(args.config)
    config = _load(path, args.err)
    if config is None:
        return 1
    if not config.redis.url:
        print(f"knocker: {path}: redis.url is required to migrate", file=args.err)
        return 1
    try:
        from .store.migrate import migrate  # needs the optional redis client

        copied, where = migrate(config, args.to, args.force, clock())
    except ImportError:
        print("knocker: the redis client is missing: pip install 'knocker[redis]'", file=args.err)
        return 1
    except KnockerError as error:
        print(f"knocker: migrate: {error.message}", file=args.err)
        return 1
    print(f"copied {copied} live entries to {where}", file=args.out)
    return 0


def _load(path: str, err: TextIO) -> Config | None:
    """The validated config, or None after printing why not (key path, never a secret)."""
    try:
        config = load_config_file(path)
    except ConfigError as error:
        print(f"knocker: {path}: invalid: {error}", file=err)
        return None
    for warning in config_warnings(config):
        print(f"knocker: {path}: warning: {warning}", file=err)
    return config


def _check_config(args: argparse.Namespace) -> int:
    path = config_path(args.path)
    config = _load(path, args.err)
    if config is None:
        return 1
    print(
        f"{path}: OK ({len(config.api_keys)} API key(s), firewalld "
        f"{'enabled' if config.firewalld.enabled else 'disabled'})",
        file=args.out,
    )
    return 0


def _patch_for_gevent() -> None:
    """gevent's monkey-patching, in the master before anything is built: the store's and
    the firewall's locks, events and threads must be gevent's from the start (a plain
    lock taken across a greenlet switch would stall the whole worker). gunicorn's worker
    patches again after the fork; that second call changes nothing."""
    from gevent import monkey

    monkey.patch_all()


def _serve(args: argparse.Namespace, run: Callable[[Any], None] | None = None) -> int:
    path = config_path(args.config)
    if args.worker_class == "gevent":
        _patch_for_gevent()
    config = _load(path, args.err)
    if config is None:
        return 1
    configure_logging(config.logging.level)
    log.info("config %s valid (%d API key(s))", path, len(config.api_keys))
    # prometheus_client's multiprocess mode: each worker writes its counts to files in
    # this directory, which a scrape sums. Fresh and private per run (old files would be
    # counted again); set before anything imports prometheus_client, which reads it once.
    # Always set, so a SIGHUP that turns metrics on finds it.
    metrics_dir = tempfile.mkdtemp(prefix="knocker-metrics-")
    previous = os.environ.get(_METRICS_DIR_ENV)
    os.environ[_METRICS_DIR_ENV] = metrics_dir
    master = os.getpid()
    try:
        return _serve_with(args, config, path, run)
    finally:
        # A gunicorn worker leaves through sys.exit(), unwinding this very frame it was
        # forked in: only the master may remove what the other workers still write to.
        if os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            if previous is None:
                del os.environ[_METRICS_DIR_ENV]
            else:
                os.environ[_METRICS_DIR_ENV] = previous


def _serve_with(
    args: argparse.Namespace, config: Config, path: str, run: Callable[[Any], None] | None
) -> int:
    try:
        app = build_app(config)
    except KnockerError as error:
        log.error("cannot start: %s", error.message)
        return 1
    # Loading parsed the whole whitelist (tens of MB of short-lived objects at 100,000
    # entries): give that back to the kernel before the workers fork, or each of them
    # keeps it in its resident set.
    gc.collect()
    release_free_memory()
    options = {
        "bind": args.bind or [DEFAULT_BIND],
        "workers": args.workers,
        # The master built the app (config, whitelist, firewall); workers inherit it.
        "preload_app": True,
        "proc_name": "knocker",
        "accesslog": None,
        "errorlog": "-",
        "loglevel": config.logging.level.lower(),
        # Knocker reads X-Forwarded-* itself, from configured proxies only; gunicorn's own
        # handling (SCRIPT_NAME, etc. from 127.0.0.1 by default) could only break routing.
        "forwarder_headers": "",
        "graceful_timeout": 15,
        "post_fork": _post_fork,
        "worker_exit": _worker_exit,
        "child_exit": _child_exit,
        # gunicorn >= 25.1 opens a control socket at one per-user path by default, so a
        # second `knocker serve` would take over the first one's; Knocker needs none.
        "control_socket_disable": True,
        **_worker_options(args.worker_class, args.threads),
    }
    server = _Gunicorn(app, options, path)
    (run or (lambda s: s.run()))(server)
    return 0


def _worker_options(worker_class: str, threads: int) -> dict[str, Any]:
    if worker_class == "gthread":
        return {
            "worker_class": "gthread" if threads > 1 else "sync",
            "threads": threads,
            "keepalive": 30,
        }  # reverse proxies reuse their connections to /verify
    from . import worker  # imports gevent: only when it serves

    return {
        "worker_class": WORKER_CLASSES[worker_class],
        # Each connection: a greenlet and its buffers (tens of KB, see README "What
        # Knocker withstands"); this bounds a worker's memory. Beyond it, new connections
        # wait in the listen backlog.
        "worker_connections": worker.WORKER_CONNECTIONS,
        # gunicorn's gevent worker reads each request head within `keepalive` seconds;
        # knocker.worker holds it to HEAD_TIMEOUT whatever this says.
        "keepalive": int(worker.HEAD_TIMEOUT),
    }


def _post_fork(server: Any, worker: Any) -> None:
    server.app.wsgi().start()


def _worker_exit(server: Any, worker: Any) -> None:
    server.app.wsgi().close()


def _child_exit(server: Any, worker: Any) -> None:
    """In the master, after any worker exit (a SIGKILL too): its live gauges go away;
    its counters stay in their files, so nothing counted is lost."""
    # Only a master that built a metered app (metrics on now, or before a reload) has
    # loaded prometheus_client; one that never counted must not load it here: each
    # reload would otherwise leave workers forked from a bigger master.
    multiprocess = sys.modules.get("prometheus_client.multiprocess")
    if multiprocess is not None and os.environ.get(_METRICS_DIR_ENV):
        multiprocess.mark_process_dead(worker.pid)


def _gunicorn_base() -> type:
    from gunicorn.app.base import BaseApplication

    return BaseApplication  # type: ignore[no-any-return]


class _Gunicorn(_gunicorn_base()):  # type: ignore[misc]
    """gunicorn with our options and our preloaded app. SIGHUP re-reads the config: a
    valid one replaces the app for the new workers, an invalid one is logged and the
    running service keeps the config it has."""

    def __init__(self, app: App, options: dict[str, Any], path: str) -> None:
        self._app = app
        self._options = options
        self._path = path
        super().__init__(prog="knocker")

    def load_config(self) -> None:
        for name, value in self._options.items():
            if name in self.cfg.settings:  # older gunicorn lacks some settings
                self.cfg.set(name, value)

    def load(self) -> App:
        return self._app

    def reload(self) -> None:
        try:
            config = load_config_file(self._path)
            configure_logging(config.logging.level)
            for warning in config_warnings(config):
                log.warning("%s", warning)
            app = build_app(config)
        except KnockerError as error:
            log.error("SIGHUP: keeping the running config: %s", error.message)
        except Exception as error:  # a reload must never take the running service down
            log.error("SIGHUP: keeping the running config: unexpected %s", type(error).__name__)
        else:
            log.info("SIGHUP: config %s reloaded", self._path)
            self._app.close()
            self._app = self.callable = app
        super().reload()


if __name__ == "__main__":
    sys.exit(main())
