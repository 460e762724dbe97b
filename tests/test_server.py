"""Black-box tests against a real `knocker serve` (gunicorn) process over HTTP."""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.serverproc import KNOCKER, KnockerProcess
from tests.support.config import ADMIN_KEY, TEST_KEY, base_config
from tests.support.polling import wait_until

pytestmark = pytest.mark.server

UNLIMITED = {"knock_rate_limit": {"successful_requests": 0, "failed_requests": 0}}


def _server(tmp_path: Path, workers: int, **config: Any) -> KnockerProcess:
    return KnockerProcess(tmp_path, base_config(tmp_path, **config), workers=workers)


def _file_when(
    server: KnockerProcess, wanted: Callable[[dict[str, int]], bool], timeout: float = 5.0
) -> dict[str, int]:
    """whitelist.json once `wanted` holds (it follows the journal about a second behind),
    or as it is at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = json.loads(server.storage_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            data = {}
        if wanted(data) or time.monotonic() > deadline:
            return data
        time.sleep(0.1)


@pytest.mark.parametrize("workers", [1, 3])
def test_knock_is_honoured_by_every_worker_on_the_next_request(
    tmp_path: Path, workers: int
) -> None:
    """A knock answered by any worker lets the client through on every later connection."""
    with _server(tmp_path, workers) as server:
        assert server.verify(source="127.0.0.31") == 401
        status, body = server.knock(source="127.0.0.31")
        assert status == 200
        assert body["whitelisted_entry"] == "127.0.0.31"
        # Fresh connections are spread over the workers by the kernel.
        assert [server.verify(source="127.0.0.31") for _ in range(40)] == [200] * 40
        assert server.verify(source="127.0.0.32") == 401


def test_api_key_header_name_is_case_insensitive_on_the_wire(tmp_path: Path) -> None:
    """X-Api-Key sent as x-api-key or X-API-KEY (the bytes on the wire) is still the key:
    WebTest hands the app an environ that is already folded, so only a real server shows it."""
    with _server(tmp_path, 1) as server:
        for n, name in enumerate(("x-api-key", "X-API-KEY", "X-Api-Key")):
            status, _, body = server.request(
                "POST", "/knock", {name: TEST_KEY}, source=f"127.0.0.5{n}"
            )
            assert status == 200, (name, body)
        assert (
            server.request("POST", "/knock", {"x-api-key": "wrong"}, source="127.0.0.59")[0] == 401
        )


@pytest.mark.parametrize("workers", [1, 3])
def test_grants_survive_a_restart(tmp_path: Path, workers: int) -> None:
    """Entries granted before a graceful restart are honoured after it."""
    server = _server(tmp_path, workers)
    with server:
        assert server.knock(source="127.0.0.41")[0] == 200
        assert server.knock(ADMIN_KEY, {"ip_address": "10.9.0.0/24"})[0] == 200
        assert server.stop() == 0
        assert set(server.whitelist_file()) == {"127.0.0.41", "10.9.0.0/24"}
        server.start()
        assert server.verify(source="127.0.0.41") == 200


def _prefill(server: KnockerProcess, count: int) -> None:
    """Write an upstream-format whitelist.json with `count` unexpired entries."""
    expiry = int(time.time()) + 3600
    entries = {f"172.16.{n // 256}.{n % 256}": expiry for n in range(count)}
    server.storage_path.write_text(json.dumps(entries))


# The journal carries durability at every size; whitelist.json follows in the background.
@pytest.mark.parametrize("prefill", [10, 5000])
@pytest.mark.parametrize("workers", [1, 3])
def test_kill_9_under_concurrent_knocks_loses_no_acknowledged_knock(
    tmp_path: Path, workers: int, prefill: int
) -> None:
    """SIGKILL of the whole process tree while 8 clients knock: every 200 survives."""
    server = _server(tmp_path, workers, security={**UNLIMITED, "max_whitelist_entries": 100000})
    _prefill(server, prefill)
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(number: int) -> None:
        for sequence in range(10_000):
            if stop.is_set():
                return
            entry = f"10.{number}.{sequence // 256}.{sequence % 256}"
            try:
                status, body = server.knock(ADMIN_KEY, {"ip_address": entry, "ttl": 3600})
            except (OSError, ValueError, http.client.HTTPException):
                return  # the server is gone (mid-response, even)
            if status == 200:
                with lock:
                    acknowledged.append(body["whitelisted_entry"])

    with server:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        server.kill9()
        stop.set()
        for thread in threads:
            thread.join(10)
        assert len(acknowledged) > 50, "the load never got going"
        server.start()
        survivors = server.whitelist_file()
        lost = [entry for entry in acknowledged if entry not in survivors]
        assert lost == []
        assert len(survivors) >= prefill + len(acknowledged)
        assert server.verify(source="127.0.0.30") == 401  # sanity: not everything passes


@pytest.mark.parametrize("workers", [1, 3])
def test_500_concurrent_knocks_from_distinct_addresses_all_reach_the_file(
    tmp_path: Path, workers: int
) -> None:
    """500 clients knocking at once from their own loopback addresses are all persisted."""
    sources = [f"127.1.{n // 250}.{n % 250 + 1}" for n in range(500)]
    with _server(tmp_path, workers) as server:
        with ThreadPoolExecutor(max_workers=64) as pool:
            results = list(pool.map(lambda s: server.knock(source=s), sources))
        assert [status for status, _ in results] == [200] * 500
        assert set(_file_when(server, lambda f: set(f) >= set(sources))) >= set(sources)
        # and every worker honours them
        assert all(server.verify(source=s) == 200 for s in sources[::25])


def test_rate_limit_is_global_across_workers(tmp_path: Path) -> None:
    """The failure budget holds however the kernel spreads connections over 3 workers."""
    config = {
        "knock_rate_limit": {"window_seconds": 60, "failed_requests": 5, "successful_requests": 0}
    }
    with _server(tmp_path, 3, security=config) as server:
        statuses = [server.knock("wrong-key", source="127.0.0.51")[0] for _ in range(12)]
        assert statuses == [401] * 5 + [429] * 7
        status, _ = server.knock(TEST_KEY, source="127.0.0.51")
        assert status == 429
        assert server.verify(source="127.0.0.51") == 401
        assert server.knock(TEST_KEY, source="127.0.0.52")[0] == 200


def test_eviction_is_seen_by_every_worker(tmp_path: Path) -> None:
    """At capacity the soonest-expiring entry goes, for every worker at once."""
    with _server(tmp_path, 3, security={"max_whitelist_entries": 2}) as server:
        assert server.knock(TEST_KEY, {"ttl": 100}, source="127.0.0.61")[0] == 200
        assert server.knock(TEST_KEY, {"ttl": 200}, source="127.0.0.62")[0] == 200
        assert server.knock(TEST_KEY, {"ttl": 300}, source="127.0.0.63")[0] == 200
        assert [server.verify(source="127.0.0.61") for _ in range(20)] == [401] * 20
        assert [server.verify(source="127.0.0.63") for _ in range(20)] == [200] * 20
        wanted = {"127.0.0.62", "127.0.0.63"}
        assert set(_file_when(server, lambda f: set(f) == wanted)) == wanted


def test_expired_entries_are_purged_from_memory_and_file(tmp_path: Path) -> None:
    """A grant ends at its TTL on every worker and leaves whitelist.json at the next purge."""
    config = base_config(
        tmp_path,
        whitelist={"storage_path": str(tmp_path / "whitelist.json"), "cleanup_interval_seconds": 1},
    )
    with KnockerProcess(tmp_path, config, workers=3) as server:
        # 3 s: long enough to be in whitelist.json first (it trails the journal by ~1 s)
        assert server.knock(TEST_KEY, {"ttl": 3}, source="127.0.0.71")[0] == 200
        assert server.knock(TEST_KEY, {"ttl": 3600}, source="127.0.0.72")[0] == 200
        assert "127.0.0.71" in _file_when(server, lambda f: "127.0.0.71" in f)
        wait_until(
            lambda: "127.0.0.71" not in server.whitelist_file(),
            8,
            interval=0.2,
            what="the purge of the expired entry",
        )
        assert set(server.whitelist_file()) == {"127.0.0.72"}
        assert [server.verify(source="127.0.0.71") for _ in range(10)] == [401] * 10


def test_serves_on_ipv6_loopback(tmp_path: Path) -> None:
    """`--bind [::1]:PORT` works, and an IPv6 client is whitelisted as itself."""
    server = KnockerProcess(tmp_path, host="::1")
    with server:
        assert server.verify() == 401
        status, body = server.knock()
        assert (status, body["whitelisted_entry"]) == (200, "::1")
        assert server.verify() == 200


@pytest.mark.parametrize("workers", [1, 3])
def test_invalid_config_exits_non_zero_before_serving(tmp_path: Path, workers: int) -> None:
    """A bad knocker.yaml stops `knocker serve` with the key path, before any worker."""
    server = KnockerProcess(tmp_path, workers=workers)
    config = base_config(tmp_path)
    config["api_keys"][0]["max_ttl"] = True
    server.write_config(config)
    server.start(wait=False)
    assert server.wait_exit(20) != 0
    assert "api_keys[0].max_ttl" in server.log()
    assert "Booting worker" not in server.log()
    assert TEST_KEY not in server.log() and ADMIN_KEY not in server.log()


def test_placeholder_key_refuses_to_start(tmp_path: Path) -> None:
    """A key still holding CHANGE_ME is refused; the service does not start."""
    config = base_config(tmp_path)
    config["api_keys"][0]["key"] = "CHANGE_ME-please"
    server = KnockerProcess(tmp_path, config)
    server.start(wait=False)
    assert server.wait_exit(20) != 0
    assert "api_keys[0].key" in server.log()
    assert "CHANGE_ME-please" not in server.log()


def test_sigterm_stops_cleanly_with_exit_status_0(tmp_path: Path) -> None:
    """SIGTERM: in-flight work finishes, the whitelist is persisted, exit status 0."""
    with _server(tmp_path, 3) as server:
        assert server.knock(source="127.0.0.81")[0] == 200
        assert server.stop() == 0
    assert "127.0.0.81" in json.loads((tmp_path / "whitelist.json").read_text())


def test_two_instances_on_one_machine_do_not_interfere(tmp_path: Path) -> None:
    """Two services with their own configs run side by side and stop independently."""
    first = _server(tmp_path / "a", 2)
    second = _server(tmp_path / "b", 2)
    with first, second:
        assert first.knock(source="127.0.0.91")[0] == 200
        assert first.verify(source="127.0.0.91") == 200
        assert second.verify(source="127.0.0.91") == 401
        assert first.stop() == 0
        assert second.verify(source="127.0.0.91") == 401
        assert second.request("GET", "/health")[0] == 200


def test_logs_one_line_per_knock_and_never_the_key(tmp_path: Path) -> None:
    """Each knock outcome is one INFO line with key name, client, entry, ttl, result."""
    with _server(tmp_path, 1) as server:
        server.knock(source="127.0.0.101")
        server.knock("not-a-key", source="127.0.0.101")
        for _ in range(5):
            server.verify(source="127.0.0.101")
        server.stop()
    lines = [line for line in server.log().splitlines() if "knocker.audit: event=" in line]
    assert len(lines) == 2
    assert (
        "event=grant client=127.0.0.101 key=phone entry=127.0.0.101 ttl=3600 result=200" in lines[0]
    )
    assert "event=knock_failed client=127.0.0.101" in lines[1] and "result=401" in lines[1]
    assert TEST_KEY not in server.log() and "not-a-key" not in server.log()
    assert "verify" not in server.log().lower()


@pytest.mark.parametrize(
    "worker",
    [[], ["--worker-class", "knocker.worker.KnockerWorker"]],
    ids=["sync", "knocker-worker"],
)
def test_plain_gunicorn_serves_the_factory(tmp_path: Path, worker: list[str]) -> None:
    """`gunicorn 'knocker.app:create_app()'` works with KNOCKER_CONFIG_PATH, with
    gunicorn's default worker and with Knocker's gevent worker (README, Plain gunicorn)."""
    server = KnockerProcess(tmp_path)
    gunicorn = str(Path(KNOCKER).with_name("gunicorn"))
    env = {**os.environ, "KNOCKER_CONFIG_PATH": str(server.config_path)}
    process = subprocess.Popen(
        [
            gunicorn,
            "--bind",
            f"127.0.0.1:{server.port}",
            "--workers",
            "2",
            *worker,
            "--no-control-socket",
            "knocker.app:create_app()",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "gunicorn.log").open("wb"),
    )
    server.process = process
    try:
        server.wait_healthy()
        assert server.knock(source="127.0.0.111")[0] == 200
        assert [server.verify(source="127.0.0.111") for _ in range(10)] == [200] * 10
        # gunicorn's gevent workers miss a SIGTERM that arrives while they still load the
        # app (they then wait out the graceful timeout, 30 s): stop after both loaded.
        deadline = time.monotonic() + 20
        while (tmp_path / "gunicorn.log").read_text().count("loaded:") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(20)


def test_example_config_as_make_run_writes_it_lets_this_machine_knock(tmp_path: Path) -> None:
    """knocker.yaml.example with generated keys (as `make run` does) serves, and a knock
    from this very machine, as the printed curl line does it, is whitelisted."""
    example = (Path(__file__).parent.parent / "knocker.yaml.example").read_text()
    keys: list[str] = []

    def generated(match: re.Match[str]) -> str:
        keys.append(secrets.token_urlsafe(32))
        return f'{match[1]}{keys[-1]}"'

    # the Makefile's substitution, verbatim
    text = re.sub(r'(?m)^(\s*key: ")REPLACE_WITH_A_GENERATED_KEY\w*"', generated, example)
    config = yaml.safe_load(text)
    config["whitelist"]["storage_path"] = str(tmp_path / "whitelist.json")
    with KnockerProcess(tmp_path, config) as server:
        assert len(keys) == 2
        status, body = server.knock(keys[0])
        assert (status, body["whitelisted_entry"]) == (200, "127.0.0.1")
        assert server.verify() == 200


# The request shapes of the published clients, as they reach the wire when their base URL
# ends in a slash (base + "/knock"): the Go CLI (net/http) and the Android app (OkHttp).
_GO_CLIENT = {
    "User-Agent": "Go-http-client/1.1",
    "Content-Type": "application/json",
    "Accept-Encoding": "gzip",
}
_ANDROID_CLIENT = {
    "User-Agent": "okhttp/4.12.0",
    "Content-Type": "application/json; charset=utf-8",
    "Accept-Encoding": "gzip",
    "Connection": "Keep-Alive",
}


@pytest.mark.parametrize("client", [_GO_CLIENT, _ANDROID_CLIENT], ids=["go", "android"])
def test_published_clients_knock_through_a_trailing_slash_base_url(
    tmp_path: Path, client: dict[str, str]
) -> None:
    """`POST //knock` as the Go and Android clients send it is a knock; a re-knock that
    keeps the longer grant reports the seconds actually left."""
    with _server(tmp_path, 1) as server:
        headers = {**client, "X-Api-Key": TEST_KEY}
        status, _, raw = server.request("POST", "//knock", headers, b'{"ttl":3000}')
        first = json.loads(raw)
        assert status == 200 and first["expires_in_seconds"] == 3000
        assert server.verify() == 200
        time.sleep(1.1)
        status, _, raw = server.request("POST", "//knock", headers, b'{"ttl":60}')
        second = json.loads(raw)
        assert status == 200 and second["expires_at"] == first["expires_at"]
        assert 2990 <= second["expires_in_seconds"] <= 2999


OPS_KEY = "ops-key-0123456789abcdefghijklmnopqrstuvwxyz"


def _with_ops_key(tmp_path: Path) -> dict[str, Any]:
    """base_config plus an `ops` key with admin: true (the grants API)."""
    config = base_config(tmp_path, security={"knock_rate_limit": UNLIMITED["knock_rate_limit"]})
    config["api_keys"].append({"name": "ops", "key": OPS_KEY, "max_ttl": 600, "admin": True})
    return config


@pytest.mark.parametrize("workers", [1, 3])
def test_admin_lists_and_revokes_grants_on_every_worker(tmp_path: Path, workers: int) -> None:
    """GET /grants shows each key's grant (by name); DELETE /grants/{entry} ends it for
    every worker before the answer, and whitelist.json loses it."""
    with KnockerProcess(tmp_path, _with_ops_key(tmp_path), workers=workers) as server:
        assert server.knock(TEST_KEY, source="127.0.0.81")[0] == 200
        assert server.knock(ADMIN_KEY, {"ip_address": "127.0.1.0/24"})[0] == 200
        ops = {"X-Api-Key": OPS_KEY}
        status, _, raw = server.request("GET", "/grants", ops)
        assert status == 200
        listed = {(g["entry"], g["key_name"], g["how"]) for g in json.loads(raw)["grants"]}
        assert listed == {("127.0.0.81", "phone", "knock"), ("127.0.1.0/24", "admin", "remote")}
        assert TEST_KEY.encode() not in raw and ADMIN_KEY.encode() not in raw
        assert server.request("GET", "/grants", {"X-Api-Key": TEST_KEY})[0] == 403
        status, _, raw = server.request("DELETE", "/grants/127.0.1.0%2F24", ops)
        assert status == 200 and json.loads(raw)["removed"][0]["entry"] == "127.0.1.0/24"
        # Every worker refuses at once (fresh connections spread over the workers).
        assert [server.verify(source="127.0.1.9") for _ in range(12)] == [401] * 12
        assert server.request("DELETE", "/grants/127.0.1.0%2F24", ops)[0] == 404
        assert "127.0.1.0/24" not in _file_when(server, lambda f: "127.0.1.0/24" not in f)
        assert [server.verify(source="127.0.0.81") for _ in range(6)] == [200] * 6


@pytest.mark.parametrize("workers", [1, 3])
def test_sign_out_ends_this_keys_grant_on_every_worker(tmp_path: Path, workers: int) -> None:
    """DELETE /knock ends the caller's grant by that key; a restart keeps it ended and
    keeps who granted the rest."""
    with KnockerProcess(tmp_path, _with_ops_key(tmp_path), workers=workers) as server:
        assert server.knock(TEST_KEY, source="127.0.0.82")[0] == 200
        assert server.knock(TEST_KEY, source="127.0.0.83")[0] == 200
        headers = {"X-Api-Key": TEST_KEY}
        status, cors, raw = server.request("DELETE", "/knock", headers, source="127.0.0.82")
        assert status == 200 and "Access-Control-Allow-Origin" in cors
        assert [g["key_name"] for g in json.loads(raw)["removed"]] == ["phone"]
        assert [server.verify(source="127.0.0.82") for _ in range(12)] == [401] * 12
        assert server.request("DELETE", "/knock", headers, source="127.0.0.82")[0] == 404
    with KnockerProcess(tmp_path, _with_ops_key(tmp_path), workers=workers) as server:
        assert server.verify(source="127.0.0.82") == 401
        status, _, raw = server.request("GET", "/grants", {"X-Api-Key": OPS_KEY})
        assert [(g["entry"], g["key_name"]) for g in json.loads(raw)["grants"]] == [
            ("127.0.0.83", "phone")
        ]


SCOPED_KEY = "scoped-key-0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.mark.parametrize("workers", [1, 3])
def test_host_scoped_grant_passes_only_for_its_host_on_every_worker(
    tmp_path: Path, workers: int
) -> None:
    """A knock with a key scoped to app.example.com: every worker lets the address
    through for that host at once, for no other; sign-out withdraws it everywhere."""
    config = _with_ops_key(tmp_path)
    config["api_keys"].append(
        {"name": "app-phone", "key": SCOPED_KEY, "max_ttl": 600, "hosts": ["app.example.com"]}
    )
    config["server"] = {"trusted_proxies": ["127.0.0.1"]}

    def verify(host: str) -> int:
        return server.verify(headers={"X-Forwarded-For": "192.0.2.44", "X-Forwarded-Host": host})

    with KnockerProcess(tmp_path, config, workers=workers) as server:
        knocked = server.request(
            "POST", "/knock", {"X-Api-Key": SCOPED_KEY, "X-Forwarded-For": "192.0.2.44"}
        )
        assert knocked[0] == 200
        assert [verify("app.example.com") for _ in range(12)] == [200] * 12
        assert [verify("other.example.com") for _ in range(12)] == [401] * 12
        assert not server.storage_path.exists() or "192.0.2.44" not in server.whitelist_file()
        signed_out = server.request(
            "DELETE", "/knock", {"X-Api-Key": SCOPED_KEY, "X-Forwarded-For": "192.0.2.44"}
        )
        assert signed_out[0] == 200
        assert [verify("app.example.com") for _ in range(12)] == [401] * 12
