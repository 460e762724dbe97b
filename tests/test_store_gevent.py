"""FileStore under gevent: its slow work leaves a worker's event loop free.

Unit tests inject `offload` and `sleep` and check that a snapshot goes through the one and
a wait for another process's writer lock through the other; the integration test runs a
real `knocker serve` (gevent worker) at 100,000 entries under gevent's blocking monitor
while knocks make every worker write snapshots.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from knocker.config import Config, load_config_text
from knocker.firewall import NullFirewall
from knocker.store import FileStore
from knocker.store.filestore import SNAPSHOT_DELAY
from knocker.store.journal import FIRST_WAIT, LONGEST_WAIT
from knocker.whitelist import parse_entry
from tests.bench import data
from tests.serverproc import ADMIN_KEY, KnockerProcess, base_config
from tests.support.clock import NOW, FakeClock


def store_config(directory: Path) -> Config:
    return load_config_text(f"""
api_keys:
  - key: store-test-key-0a1b2c3d4e5f
    max_ttl: 3600
whitelist:
  storage_path: {directory / "whitelist.json"}
""")


class Offload:
    """Runs the work it is given in place, noting that it ran and whether whitelist.json
    changed during it (the work is the snapshot's render and write)."""

    def __init__(self, snapshot: Path) -> None:
        self.snapshot = snapshot
        self.calls: list[bool] = []

    def __call__(self, work: Callable[[], None]) -> None:
        before = self.snapshot.stat().st_ino if self.snapshot.exists() else None
        work()
        self.calls.append(self.snapshot.stat().st_ino != before)


def open_store(
    directory: Path,
    clock: FakeClock,
    offload: Offload | None,
    sleep: Callable[[float], None] | None = None,
) -> FileStore:
    return FileStore(
        store_config(directory),
        NullFirewall(),
        clock=clock,
        monotonic=clock.monotonic,
        sleep=sleep or clock.sleep,
        offload=offload,
    )


def test_a_snapshot_is_rendered_and_written_through_the_offload(tmp_path: Path) -> None:
    clock = FakeClock()
    offload = Offload(tmp_path / "whitelist.json")
    store = open_store(tmp_path, clock, offload)
    try:
        key = parse_entry("192.0.2.7")
        assert key is not None
        store.knock(key, 600, clock.now)
        assert offload.calls == []  # a knock is journalled in place
        clock.advance(SNAPSHOT_DELAY)
        store.tick(clock.now)
        assert offload.calls[:1] == [True]  # whitelist.json replaced inside the offload
        assert "192.0.2.7" in (tmp_path / "whitelist.json").read_text()
        assert os.path.getsize(f"{tmp_path / 'whitelist.json'}.journal") == 0
    finally:
        store.close()
    assert len(offload.calls) == 1  # nothing left for the final snapshot, done in place


def test_without_an_offload_the_snapshot_runs_in_place(tmp_path: Path) -> None:
    clock = FakeClock()
    store = open_store(tmp_path, clock, None)
    try:
        key = parse_entry("192.0.2.8")
        assert key is not None
        store.knock(key, 600, clock.now)
        clock.advance(SNAPSHOT_DELAY)
        store.tick(clock.now)
        assert "192.0.2.8" in (tmp_path / "whitelist.json").read_text()
    finally:
        store.close()


def test_a_busy_writer_lock_is_waited_for_through_sleep_with_backoff(tmp_path: Path) -> None:
    """Another process holds the journal's flock: the knock does not block in flock but
    sleeps FIRST_WAIT, twice that, ... up to LONGEST_WAIT between tries, and goes through
    once it is free."""
    clock = FakeClock()
    slept: list[float] = []
    holding = True

    def sleep(seconds: float) -> None:
        nonlocal holding
        slept.append(seconds)
        if len(slept) == 8 and holding:  # the other process lets go
            fcntl.flock(other, fcntl.LOCK_UN)
            holding = False
        assert len(slept) < 50, "never got the lock"

    store = open_store(tmp_path, clock, Offload(tmp_path / "whitelist.json"), sleep)
    other = open(tmp_path / "whitelist.json.journal", "rb")  # noqa: SIM115 - closed below
    try:
        fcntl.flock(other, fcntl.LOCK_EX)  # another description: as another process
        key = parse_entry("192.0.2.9")
        assert key is not None
        result = store.knock(key, 600, clock.now)
        assert result.expires_at == int(NOW) + 600
        assert slept == [min(FIRST_WAIT * 2**n, LONGEST_WAIT) for n in range(8)]
        assert slept[0] < slept[1] and slept[-1] == LONGEST_WAIT
        # The lock was really taken: another description cannot have it now... until
        # the knock has returned, which released it.
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
    finally:
        other.close()
        store.close()


def test_without_an_offload_a_busy_writer_lock_blocks_in_flock(tmp_path: Path) -> None:
    """Threads (gthread): the kernel's queue, no polling; the injected sleep is not used."""
    clock = FakeClock()
    store = open_store(tmp_path, clock, None)
    journal = tmp_path / "whitelist.json.journal"
    done = threading.Event()
    try:
        with open(journal, "rb") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            key = parse_entry("192.0.2.10")
            assert key is not None
            knock = threading.Thread(target=lambda: (store.knock(key, 600, clock.now), done.set()))
            knock.start()
            assert not done.wait(0.3)  # blocked in flock
            fcntl.flock(other, fcntl.LOCK_UN)
            knock.join(10)
        assert done.is_set()
        assert clock.sleeps == []
    finally:
        store.close()


# ---------------------------------------------------------------------- a real server
ENTRIES = 100_000
BLOCKED = "appears to be blocked"


@pytest.mark.server
def test_snapshots_of_100000_entries_never_block_a_gevent_worker(tmp_path: Path) -> None:
    """`knocker serve` (gevent worker, 2 workers) at 100,000 entries, gevent's monitor
    reporting any greenlet that holds a worker's loop for 0.1 s: a knock every 0.5 s makes
    the workers write whitelist.json snapshots (100-300 ms each) and wait for each other's
    writer lock, while a prober asks /verify in a loop. No report, every probe answered
    within 2 s, and whitelist.json really was rewritten meanwhile."""
    directory = tmp_path / "server"
    directory.mkdir()
    expiry = int(time.time()) + 3600
    data.write_whitelist(directory / "whitelist.json", data.make_entries(ENTRIES, expiry))
    config = base_config(
        directory,
        security={
            "max_whitelist_entries": 2 * ENTRIES,
            "knock_rate_limit": {"successful_requests": 0, "failed_requests": 0},
        },
    )
    monitor = {"GEVENT_MONITOR_THREAD_ENABLE": "true", "GEVENT_MAX_BLOCKING_TIME": "0.1"}
    snapshot = directory / "whitelist.json"
    with KnockerProcess(directory, config, workers=2, env=monitor) as server:
        assert server.knock(ADMIN_KEY, {"ip_address": "127.0.0.1"})[0] == 200
        started_log = len(server.log())
        inodes = {snapshot.stat().st_ino}
        probes: list[int | str] = []
        stop = threading.Event()

        def probe() -> None:
            for _ in range(20_000):  # bounded; stopped long before
                if stop.is_set():
                    return
                try:
                    probes.append(server.request("GET", "/verify", timeout=2.0)[0])
                except OSError as error:
                    probes.append(repr(error))
                time.sleep(0.01)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            # Snapshots are spaced 20 times their cost (4-10 s here): knock for 12 s, and
            # on until two were written, 20 s at most.
            for number in range(40):
                status, _ = server.knock(ADMIN_KEY, {"ip_address": f"10.77.{number}.1"})
                assert status == 200
                time.sleep(0.5)
                inodes.add(snapshot.stat().st_ino)
                if number >= 24 and len(inodes) >= 3:
                    break
        finally:
            stop.set()
            prober.join(10)
        log = server.log()[started_log:]
    assert len(inodes) >= 2, "no snapshot was written while probing"
    assert probes and set(probes) == {200}, [p for p in probes if p != 200][:5]
    assert BLOCKED not in log, log[log.find(BLOCKED) - 200 :][:4000]
