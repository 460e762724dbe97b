"""knocker.store.FileStore: whitelist.json + journal on disk, and one whitelist shared by workers.

Two FileStore objects on one path in one process stand in for two gunicorn workers: they share
the files and the mmap exactly as forked workers do. The clock is injected; nothing sleeps.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from knocker.config import Config, load_config_text
from knocker.errors import FirewallError, FirewallUnavailable, StorageError
from knocker.firewall import NullFirewall
from knocker.ratelimit import Outcome
from knocker.store import FileStore
from knocker.store.filestore import SNAPSHOT_DELAY
from knocker.whitelist import Key, parse_entry
from tests.support.clock import NOW, FakeClock


class RecordingFirewall(NullFirewall):
    """Records grants and revokes; can be told to fail grants."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, object]] = []
        self.revocations: list[str] = []
        self.fail_with: FirewallError | None = None
        self.on_grant: Callable[[str, int], None] | None = None

    def grant(self, entry: str, ttl: int) -> None:
        self.calls.append(("grant", entry, ttl))
        if self.on_grant is not None:
            self.on_grant(entry, ttl)
        if self.fail_with is not None:
            raise self.fail_with

    def revoke(self, entries: Iterable[str]) -> None:
        revoked = tuple(entries)
        self.calls.append(("revoke", revoked, None))
        self.revocations.extend(revoked)


def key(text: str) -> Key:
    parsed = parse_entry(text)
    assert parsed is not None, text
    return parsed


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def store_config(
    directory: Path, capacity: int = 10_000, cleanup: int = 60, failures: int = 3
) -> Config:
    return load_config_text(f"""
api_keys:
  - key: store-test-key-0a1b2c3d4e5f
    max_ttl: 3600
security:
  max_whitelist_entries: {capacity}
  knock_rate_limit:
    window_seconds: 60
    successful_requests: 5
    failed_requests: {failures}
whitelist:
  storage_path: {directory / "whitelist.json"}
  cleanup_interval_seconds: {cleanup}
""")


class Opener:
    """Opens stores on one directory and closes every one of them at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.clock = FakeClock()
        self.firewall = RecordingFirewall()
        self.opened: list[FileStore] = []
        self.tuning: dict[str, float] = {}

    @property
    def path(self) -> Path:
        return self.directory / "whitelist.json"

    @property
    def journal(self) -> Path:
        return self.directory / "whitelist.json.journal"

    def __call__(
        self,
        directory: Path | None = None,
        clock: FakeClock | None = None,
        firewall: RecordingFirewall | None = None,
        **settings: int,
    ) -> FileStore:
        config = store_config(directory or self.directory, **settings)
        clock = clock or self.clock
        store = FileStore(
            config,
            firewall or self.firewall,
            clock=clock,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
            **self.tuning,
        )  # type: ignore[arg-type]
        self.opened.append(store)
        return store

    def settle(self) -> None:
        """What the maintenance threads do within a second: every open store ticks one
        snapshot delay later (whitelist.json follows the journal that far behind)."""
        self.clock.advance(SNAPSHOT_DELAY)
        for store in self.opened:
            if store.ready() != "whitelist storage is closed":
                store.tick(self.clock.now)

    def file(self, path: Path | None = None, settle: bool = True) -> dict[str, int]:
        """whitelist.json as a reader finds it once the snapshot has caught up."""
        if settle and path is None:
            self.settle()
        data = json.loads((path or self.path).read_text(encoding="utf-8"))
        assert isinstance(data, dict)
        assert all(isinstance(k, str) and type(v) is int for k, v in data.items())
        return data

    def crash_copy(self, name: str = "after-crash") -> Path:
        """whitelist.json and its journal as a crash would leave them, in a new directory
        (no close(), no shared memory: what a restart after a power cut finds)."""
        target = self.directory / name
        target.mkdir()
        for source in (self.path, self.journal):
            if source.exists():
                shutil.copy2(source, target / source.name)
        return target


@pytest.fixture
def opener(tmp_path: Path) -> Iterator[Opener]:
    opened = Opener(tmp_path / "state")
    yield opened
    for store in opened.opened:
        store.close()


def journal_line(body: str) -> bytes:
    return f"{body} {zlib.crc32(body.encode()):08x}\n".encode()


def write_whitelist(opener: Opener, data: object) -> None:
    opener.directory.mkdir(parents=True, exist_ok=True)
    opener.path.write_text(json.dumps(data), encoding="utf-8")


def failing(error_number: int = errno.EIO) -> Callable[..., None]:
    def fail(*args: object) -> None:
        raise OSError(error_number, os.strerror(error_number))

    return fail


# --- durability -------------------------------------------------------------------------


def test_open_creates_a_missing_storage_directory(opener: Opener) -> None:
    """The storage directory is created when it does not exist yet."""
    store = opener()
    assert opener.directory.is_dir()
    assert len(store.replica) == 0


def test_knock_is_durable_when_it_returns_at_any_size(opener: Opener) -> None:
    """A knock, on a whitelist of one entry as on a big one, is in the fsynced journal
    when knock() returns: a crash right after it keeps it."""
    store = opener()
    result = store.knock(key("203.0.113.7"), 60, NOW)
    assert b"203.0.113.7" in opener.journal.read_bytes()
    assert opener(opener.crash_copy()).entries() == {"203.0.113.7": int(NOW) + 60}
    assert result.entry == "203.0.113.7"
    assert result.expires_at == int(NOW) + 60
    assert result.evicted == ()


def test_knock_expiry_is_rounded_up_never_cut_short(opener: Opener) -> None:
    """A knock at a fractional second expires at the next whole second after now + ttl."""
    store = opener()
    result = store.knock(key("203.0.113.7"), 60, NOW + 0.25)
    assert result.expires_at == int(NOW) + 61
    assert store.allows(ip("203.0.113.7"), NOW + 60.25)


def test_knock_is_allowed_immediately(opener: Opener) -> None:
    """The knocking store's own /verify sees the entry at once."""
    store = opener()
    store.knock(key("10.1.2.0/24"), 60, NOW)
    assert store.allows(ip("10.1.2.99"), NOW)
    assert not store.allows(ip("10.1.3.1"), NOW)


def test_whitelist_json_follows_the_journal_within_the_snapshot_delay(opener: Opener) -> None:
    """whitelist.json is rewritten in the background once the journal has held changes
    for SNAPSHOT_DELAY, not on the knock's path; the snapshot empties the journal."""
    store = opener()
    for n in range(1, 4):
        store.knock(key(f"198.51.100.{n}"), 60, NOW)
    assert not opener.path.exists()
    opener.clock.now = NOW + SNAPSHOT_DELAY / 2
    store.tick(opener.clock.now)
    assert not opener.path.exists()
    opener.clock.now = NOW + SNAPSHOT_DELAY
    store.tick(opener.clock.now)
    assert opener.file(settle=False) == {f"198.51.100.{n}": int(NOW) + 60 for n in (1, 2, 3)}
    assert opener.journal.read_bytes() == b""


def test_reopen_restores_every_entry(opener: Opener) -> None:
    """Closing and reopening the store restores the whole whitelist."""
    store = opener()
    store.knock(key("203.0.113.7"), 60, NOW)
    store.knock(key("2001:db8::/64"), 120, NOW)
    store.close()
    again = opener()
    assert again.entries() == {"203.0.113.7": int(NOW) + 60, "2001:db8::/64": int(NOW) + 120}


def test_crash_after_journaled_knocks_loses_nothing(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crash, replaying the journal over whitelist.json restores every knock."""
    store = opener()
    expected = {}
    for n in range(1, 6):
        store.knock(key(f"198.51.100.{n}"), 60 + n, NOW)
        expected[f"198.51.100.{n}"] = int(NOW) + 60 + n
    store.knock(key("198.51.100.1"), 500, NOW)  # an extension, journaled as well
    expected["198.51.100.1"] = int(NOW) + 500
    restarted = opener(opener.crash_copy())
    assert restarted.entries() == expected
    for text in expected:
        assert restarted.allows(ip(text), NOW)


def test_reopen_folds_the_journal_into_whitelist_json(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart that replayed a journal leaves one complete whitelist.json behind."""
    store = opener()
    store.knock(key("198.51.100.1"), 60, NOW)
    store.knock(key("198.51.100.2"), 60, NOW)
    directory = opener.crash_copy()
    opener(directory)
    assert opener.file(directory / "whitelist.json") == {
        "198.51.100.1": int(NOW) + 60,
        "198.51.100.2": int(NOW) + 60,
    }
    assert (directory / "whitelist.json.journal").read_bytes() == b""


def test_torn_last_journal_line_is_ignored(
    opener: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    """A last journal line without its newline (crash mid-append) is ignored quietly."""
    opener.directory.mkdir(parents=True)
    expiry = int(NOW) + 100
    opener.journal.write_bytes(
        journal_line(f"+ 198.51.100.1 {expiry}") + journal_line(f"+ 198.51.100.2 {expiry}")[:-5]
    )
    with caplog.at_level(logging.WARNING, logger="knocker"):
        store = opener()
    assert store.entries() == {"198.51.100.1": expiry}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_damaged_middle_journal_line_skips_only_that_record_and_is_kept_aside(
    opener: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    """A line whose checksum fails costs that record only (the later ones carry their
    own checksums); the damaged journal is copied to .corrupt-<time> before the repair."""
    opener.directory.mkdir(parents=True)
    expiry = int(NOW) + 100
    damaged = journal_line(f"+ 198.51.100.2 {expiry}").replace(b"198.51", b"198.52")
    original = (
        journal_line(f"+ 198.51.100.1 {expiry}")
        + damaged
        + journal_line(f"+ 198.51.100.3 {expiry}")
    )
    opener.journal.write_bytes(original)
    with caplog.at_level(logging.WARNING, logger="knocker"):
        store = opener()
    assert store.entries() == {"198.51.100.1": expiry, "198.51.100.3": expiry}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "line(s) 2" in errors[0]
    aside = opener.directory / f"whitelist.json.journal.corrupt-{int(NOW)}"
    assert aside.read_bytes() == original
    assert opener.journal.read_bytes() == b""  # folded into whitelist.json
    assert opener.file() == {"198.51.100.1": expiry, "198.51.100.3": expiry}


def test_journal_removal_record_is_replayed(opener: Opener) -> None:
    """A `-` journal line removes the entry the snapshot still holds (an eviction)."""
    write_whitelist(opener, {"198.51.100.1": int(NOW) + 100, "198.51.100.2": int(NOW) + 100})
    opener.journal.write_bytes(journal_line("- 198.51.100.1"))
    store = opener()
    assert store.entries() == {"198.51.100.2": int(NOW) + 100}


# --- loading whitelist.json -------------------------------------------------------------


def test_upstream_whitelist_json_loads_as_is(opener: Opener) -> None:
    """An upstream whitelist.json ({"entry": unix_int}) is read unchanged."""
    write_whitelist(
        opener,
        {"1.2.3.4": int(NOW) + 100, "10.0.0.0/24": int(NOW) + 200, "2001:db8::1": int(NOW) + 300},
    )
    store = opener()
    assert store.allows(ip("1.2.3.4"), NOW)
    assert store.allows(ip("10.0.0.77"), NOW)
    assert store.allows(ip("2001:db8::1"), NOW)
    assert not store.allows(ip("1.2.3.5"), NOW)


def test_whitelist_json_is_written_back_in_the_upstream_shape(opener: Opener) -> None:
    """After a knock, whitelist.json is still one object of entry -> integer expiry."""
    write_whitelist(opener, {"1.2.3.4": int(NOW) + 100, "10.0.0.0/24": int(NOW) + 200})
    store = opener()
    store.knock(key("203.0.113.7"), 60, NOW)
    assert opener.file() == {
        "1.2.3.4": int(NOW) + 100,
        "10.0.0.0/24": int(NOW) + 200,
        "203.0.113.7": int(NOW) + 60,
    }


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe\x00", b'{"1.2.3.4": 17'],
    ids=["syntax", "array", "string", "binary", "truncated"],
)
def test_corrupt_whitelist_json_is_moved_aside_and_service_starts_empty(
    opener: Opener, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    """A file that is not a JSON object is renamed <name>.corrupt-<unix>, logged at ERROR,
    and the service starts with an empty whitelist."""
    opener.directory.mkdir(parents=True)
    opener.path.write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="knocker"):
        store = opener()
    aside = opener.directory / f"whitelist.json.corrupt-{int(NOW)}"
    assert aside.read_bytes() == raw
    assert len(store.replica) == 0
    assert any(r.levelno == logging.ERROR and "corrupt" in r.getMessage() for r in caplog.records)
    store.knock(key("203.0.113.7"), 60, NOW)
    assert opener.file() == {"203.0.113.7": int(NOW) + 60}


def test_invalid_entries_are_skipped_with_a_warning(
    opener: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    """Invalid entries are skipped (WARNING naming them), valid ones still load."""
    write_whitelist(
        opener, {"not-an-ip": int(NOW) + 100, "1.2.3.4": "tomorrow", "5.6.7.8": int(NOW) + 100}
    )
    with caplog.at_level(logging.WARNING, logger="knocker"):
        store = opener()
    assert store.entries() == {"5.6.7.8": int(NOW) + 100}
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "not-an-ip" in warnings
    assert "1.2.3.4" in warnings


def test_expired_entries_are_dropped_at_load(opener: Opener) -> None:
    """Entries already expired when the service starts are not loaded."""
    write_whitelist(opener, {"1.2.3.4": int(NOW) - 1, "5.6.7.8": int(NOW) + 100})
    store = opener()
    assert store.entries() == {"5.6.7.8": int(NOW) + 100}
    assert not store.allows(ip("1.2.3.4"), NOW)


# --- purge ------------------------------------------------------------------------------


def test_tick_purges_expired_entries_from_memory_and_file_on_schedule(opener: Opener) -> None:
    """Every cleanup_interval_seconds, expired entries leave memory and whitelist.json;
    before the interval nothing is rewritten."""
    store = opener(cleanup=60)
    store.knock(key("198.51.100.1"), 10, NOW)
    store.knock(key("198.51.100.2"), 1000, NOW)
    assert set(opener.file()) == {"198.51.100.1", "198.51.100.2"}
    opener.clock.now = NOW + 30
    store.tick(NOW + 30)  # expired, but the interval has not passed
    assert "198.51.100.1" in opener.file(settle=False)
    assert not store.allows(ip("198.51.100.1"), NOW + 30)
    opener.clock.now = NOW + 61
    store.tick(NOW + 61)
    assert opener.file(settle=False) == {"198.51.100.2": int(NOW) + 1000}
    assert len(store.replica) == 1


def test_tick_purges_entries_that_expire_after_loading(opener: Opener) -> None:
    """Entries loaded from whitelist.json at startup are purged from the file once they
    expire, even if nobody knocks."""
    write_whitelist(opener, {"198.51.100.1": int(NOW) + 10, "198.51.100.2": int(NOW) + 1000})
    store = opener(cleanup=60)
    opener.clock.now = NOW + 61
    store.tick(NOW + 61)
    assert opener.file() == {"198.51.100.2": int(NOW) + 1000}


def test_purge_of_journaled_entries_reaches_the_file(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the journal path too, expired entries are gone from whitelist.json after a purge."""
    store = opener(cleanup=60)
    store.knock(key("198.51.100.1"), 10, NOW)
    store.knock(key("198.51.100.2"), 1000, NOW)
    opener.clock.now = NOW + 61
    store.tick(NOW + 61)
    assert opener.file() == {"198.51.100.2": int(NOW) + 1000}


# --- capacity ---------------------------------------------------------------------------


def test_full_whitelist_evicts_the_soonest_expiring_entry(opener: Opener) -> None:
    """At max_whitelist_entries, a new entry evicts the one that expires soonest, from
    memory, whitelist.json and the firewall."""
    store = opener(capacity=2)
    store.knock(key("198.51.100.1"), 300, NOW)
    store.knock(key("198.51.100.2"), 100, NOW)
    result = store.knock(key("198.51.100.3"), 200, NOW)
    assert result.evicted == ("198.51.100.2",)
    assert not store.allows(ip("198.51.100.2"), NOW)
    assert set(opener.file()) == {"198.51.100.1", "198.51.100.3"}
    assert opener.firewall.revocations == ["198.51.100.2"]


def test_eviction_never_evicts_the_entry_being_granted(opener: Opener) -> None:
    """The new entry is kept even when it expires sooner than every other entry."""
    store = opener(capacity=2)
    store.knock(key("198.51.100.1"), 3000, NOW)
    store.knock(key("198.51.100.2"), 2000, NOW)
    result = store.knock(key("198.51.100.3"), 5, NOW)
    assert result.evicted == ("198.51.100.2",)
    assert store.allows(ip("198.51.100.3"), NOW)


def test_re_knock_at_capacity_evicts_nothing(opener: Opener) -> None:
    """Extending an existing entry in a full whitelist evicts nobody."""
    store = opener(capacity=2)
    store.knock(key("198.51.100.1"), 300, NOW)
    store.knock(key("198.51.100.2"), 100, NOW)
    assert store.knock(key("198.51.100.2"), 400, NOW).evicted == ()
    assert len(store.replica) == 2


# --- re-knocks --------------------------------------------------------------------------


def test_re_knock_never_shortens_a_grant(opener: Opener) -> None:
    """A shorter re-knock keeps the later expiry, in memory, on disk and in the firewall."""
    store = opener()
    store.knock(key("203.0.113.7"), 1000, NOW)
    result = store.knock(key("203.0.113.7"), 10, NOW + 100)
    assert result.expires_at == int(NOW) + 1000
    assert opener.file() == {"203.0.113.7": int(NOW) + 1000}
    assert store.allows(ip("203.0.113.7"), NOW + 999)
    assert opener.firewall.calls[-1] == ("grant", "203.0.113.7", 900)


def test_re_knock_extends_a_grant(opener: Opener) -> None:
    """A longer re-knock moves the expiry later."""
    store = opener()
    store.knock(key("203.0.113.7"), 100, NOW)
    assert store.knock(key("203.0.113.7"), 1000, NOW + 50).expires_at == int(NOW) + 1050


def test_knock_on_an_expired_unpurged_entry_starts_afresh(opener: Opener) -> None:
    """An expired entry that was not purged yet does not influence the new grant."""
    store = opener()
    store.knock(key("203.0.113.7"), 10, NOW)
    result = store.knock(key("203.0.113.7"), 20, NOW + 100)
    assert result.expires_at == int(NOW) + 120
    assert opener.firewall.calls[-1] == ("grant", "203.0.113.7", 20)


# --- failures leave nothing granted -----------------------------------------------------


def test_firewall_is_granted_before_the_whitelist_changes(opener: Opener) -> None:
    """The firewall grant happens before the entry is on disk or visible to /verify."""
    store = opener()
    seen: list[tuple[bool, bool]] = []

    def check(entry: str, ttl: int) -> None:
        on_disk = opener.path.exists() and entry in opener.file()
        seen.append((on_disk, store.replica.allows(ip(entry), NOW)))

    opener.firewall.on_grant = check
    store.knock(key("203.0.113.7"), 60, NOW)
    assert seen == [(False, False)]
    assert opener.firewall.calls == [("grant", "203.0.113.7", 60)]


@pytest.mark.parametrize(
    "error", [FirewallUnavailable("firewalld is gone"), FirewallError("rule refused")]
)
def test_firewall_failure_grants_nothing(opener: Opener, error: FirewallError) -> None:
    """When the firewall grant fails, nothing is persisted or visible, to any worker."""
    store = opener()
    other = opener()
    store.knock(key("198.51.100.1"), 60, NOW)
    opener.firewall.fail_with = error
    with pytest.raises(FirewallError) as caught:
        store.knock(key("203.0.113.7"), 60, NOW)
    assert caught.value.status == error.status
    assert opener.file() == {"198.51.100.1": int(NOW) + 60}
    assert not store.allows(ip("203.0.113.7"), NOW)
    assert not other.allows(ip("203.0.113.7"), NOW)


def test_persistence_failure_revokes_a_new_firewall_grant(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the journal cannot be made durable, the new grant is revoked from the firewall,
    StorageError is raised and the entry is nowhere."""
    store = opener()
    store.knock(key("198.51.100.1"), 60, NOW)
    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", failing())
        with pytest.raises(StorageError):
            store.knock(key("203.0.113.7"), 60, NOW)
    assert opener.firewall.calls[-2:] == [
        ("grant", "203.0.113.7", 60),
        ("revoke", ("203.0.113.7",), None),
    ]
    assert not store.allows(ip("203.0.113.7"), NOW)
    assert opener.file() == {"198.51.100.1": int(NOW) + 60}
    assert "203.0.113.7" not in opener(opener.crash_copy()).entries()


def test_persistence_failure_restores_an_extended_grant(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If an extension cannot be persisted, the firewall gets the old remaining ttl back and
    the old expiry stays."""
    store = opener()
    store.knock(key("203.0.113.7"), 100, NOW)
    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", failing())
        with pytest.raises(StorageError):
            store.knock(key("203.0.113.7"), 1000, NOW + 10)
    assert opener.firewall.calls[-2:] == [
        ("grant", "203.0.113.7", 1000),
        ("grant", "203.0.113.7", 90),
    ]
    assert store.replica.expiry(key("203.0.113.7")) == int(NOW) + 100
    assert opener.file() == {"203.0.113.7": int(NOW) + 100}


def test_journal_sync_failure_leaves_nothing_on_disk(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journaled knock whose fdatasync fails is revoked and is not granted after a
    restart either: the journal must not keep it."""
    store = opener()
    store.knock(key("198.51.100.1"), 60, NOW)
    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", failing())
        with pytest.raises(StorageError):
            store.knock(key("203.0.113.7"), 60, NOW)
    assert opener.firewall.calls[-1] == ("revoke", ("203.0.113.7",), None)
    assert not store.allows(ip("203.0.113.7"), NOW)
    restarted = opener(opener.crash_copy())
    assert restarted.entries() == {"198.51.100.1": int(NOW) + 60}


def test_snapshot_whose_rename_is_not_durable_keeps_the_journal(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot whose rename cannot be made durable (directory fsync fails) fails
    without emptying the journal: a crash then still restores every knock."""
    store = opener()
    store.knock(key("198.51.100.1"), 60, NOW)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        opener.clock.now = NOW + SNAPSHOT_DELAY
        with pytest.raises(OSError):
            store.tick(opener.clock.now)
    assert b"198.51.100.1" in opener.journal.read_bytes()
    assert opener(opener.crash_copy()).entries() == {"198.51.100.1": int(NOW) + 60}


def test_store_recovers_after_a_persistence_failure(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the disk works again, the next knock succeeds and the file is valid."""
    store = opener()
    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", failing(errno.ENOSPC))
        with pytest.raises(StorageError):
            store.knock(key("203.0.113.7"), 60, NOW)
    store.knock(key("203.0.113.7"), 60, NOW)
    assert opener.file() == {"203.0.113.7": int(NOW) + 60}


def test_unusable_storage_location_is_a_storage_error(tmp_path: Path) -> None:
    """A storage path whose directory cannot be created refuses to open."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError):
        FileStore(store_config(blocker / "sub"), NullFirewall(), clock=FakeClock())


# --- several workers --------------------------------------------------------------------


def test_knock_through_one_worker_is_seen_by_another_at_once(opener: Opener) -> None:
    """A knock acknowledged by one process is honoured by every other on its next request."""
    first, second = opener(), opener()
    assert not second.allows(ip("203.0.113.7"), NOW)
    first.knock(key("203.0.113.7"), 60, NOW)
    assert second.allows(ip("203.0.113.7"), NOW)
    second.knock(key("2001:db8::/64"), 60, NOW)
    assert first.allows(ip("2001:db8::42"), NOW)


def test_eviction_through_one_worker_is_seen_by_another(opener: Opener) -> None:
    """An entry evicted by one process stops passing in every process."""
    first, second = opener(capacity=1), opener(capacity=1)
    first.knock(key("198.51.100.1"), 60, NOW)
    assert second.allows(ip("198.51.100.1"), NOW)
    second.knock(key("198.51.100.2"), 120, NOW)
    assert not first.allows(ip("198.51.100.1"), NOW)
    assert first.allows(ip("198.51.100.2"), NOW)


def test_knocks_through_different_workers_are_all_persisted(opener: Opener) -> None:
    """Alternating writers never lose each other's entries in whitelist.json."""
    first, second = opener(), opener()
    for n in range(1, 11):
        (first if n % 2 else second).knock(key(f"198.51.100.{n}"), 60 + n, NOW)
    assert opener.file() == {f"198.51.100.{n}": int(NOW) + 60 + n for n in range(1, 11)}


def test_re_knock_through_another_worker_never_shortens(opener: Opener) -> None:
    """Another worker's shorter re-knock keeps the longer grant it did not make."""
    first, second = opener(), opener()
    first.knock(key("203.0.113.7"), 1000, NOW)
    assert second.knock(key("203.0.113.7"), 10, NOW).expires_at == int(NOW) + 1000


def test_rate_limits_are_shared_between_workers(opener: Opener) -> None:
    """Failures counted by one process block the client in every process."""
    first, second = opener(failures=3), opener(failures=3)
    client = ipaddress.IPv6Address("::ffff:203.0.113.7").packed
    for store in (first, first, second):
        assert store.rate_reserve(client, NOW)
        store.rate_settle(client, Outcome.FAILURE, NOW)
    assert not first.rate_reserve(client, NOW)
    assert not second.rate_reserve(client, NOW)
    assert second.rate_reserve(client, NOW + 61)


def test_reservations_are_shared_between_workers(opener: Opener) -> None:
    """Places held by knocks in flight in one process count in every other: with a
    failure budget of 3, three unsettled reservations leave none for a fourth."""
    first, second = opener(failures=3), opener(failures=3)
    client = ipaddress.IPv6Address("::ffff:203.0.113.8").packed
    assert [
        first.rate_reserve(client, NOW),
        second.rate_reserve(client, NOW),
        first.rate_reserve(client, NOW),
    ] == [True] * 3
    assert not second.rate_reserve(client, NOW)
    first.rate_settle(client, Outcome.UNCOUNTED, NOW)  # e.g. a 500: nothing counted
    assert second.rate_reserve(client, NOW)


@pytest.mark.parametrize("snapshotted", [True, False], ids=["snapshot", "journal"])
def test_lagging_worker_reloads_from_disk_after_a_ring_overrun(
    opener: Opener, caplog: pytest.LogCaptureFixture, snapshotted: bool
) -> None:
    """A process that fell more than a ring behind rebuilds its replica from disk (the
    snapshot, or the journal it has not yet been folded into) and answers correctly."""
    opener.tuning["ring_capacity"] = 4
    first, second = opener(capacity=5), opener(capacity=5)
    second.knock(key("192.0.2.1"), 5000, NOW)
    for n in range(1, 11):  # 10 grants and 5 evictions: far more than 4 ring records
        first.knock(key(f"198.51.100.{n}"), 100 + n, NOW)
    if snapshotted:
        opener.clock.now = NOW + SNAPSHOT_DELAY
        first.tick(opener.clock.now)
        assert opener.journal.read_bytes() == b""
    with caplog.at_level(logging.WARNING, logger="knocker"):
        answers = {n: second.allows(ip(f"198.51.100.{n}"), NOW) for n in range(1, 11)}
    assert answers == {n: n > 6 for n in range(1, 11)}
    assert second.allows(ip("192.0.2.1"), NOW)
    assert any("behind" in r.getMessage() for r in caplog.records)


# --- file integrity ---------------------------------------------------------------------


def test_whitelist_json_is_valid_after_every_operation(opener: Opener) -> None:
    """Knock, extension, eviction, purge and close each leave a valid whitelist.json."""
    store = opener(capacity=2, cleanup=60)
    steps: list[tuple[float, Callable[[], object]]] = [
        (NOW, lambda: store.knock(key("198.51.100.1"), 10, NOW)),
        (NOW, lambda: store.knock(key("198.51.100.2"), 1000, NOW)),
        (NOW, lambda: store.knock(key("198.51.100.2"), 2000, NOW)),
        (NOW, lambda: store.knock(key("2001:db8::/64"), 500, NOW)),  # evicts .1
        (NOW + 600, lambda: store.tick(NOW + 600)),  # purges the /64
        (NOW + 600, store.close),
    ]
    for now, step in steps:
        opener.clock.now = now
        step()
        opener.file()  # parses, and is an object of entry -> int
    assert opener.file() == {"198.51.100.2": int(NOW) + 2000}
    assert not list(opener.directory.glob("*.tmp"))


def test_entries_lists_only_live_entries(opener: Opener) -> None:
    """entries() (what the firewall re-applies) leaves out expired entries."""
    store = opener()
    store.knock(key("198.51.100.1"), 10, NOW)
    store.knock(key("198.51.100.2"), 100, NOW)
    opener.clock.now = NOW + 50
    assert store.entries() == {"198.51.100.2": int(NOW) + 100}


def test_ready_reports_a_vanished_directory_and_a_closed_store(opener: Opener) -> None:
    """ready() is None while usable and explains why not otherwise."""
    store = opener()
    assert store.ready() is None
    shutil.rmtree(opener.directory)
    assert store.ready()
    store.close()
    assert store.ready()


def test_a_worker_that_waited_for_the_lock_does_not_snapshot_again(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers decide a snapshot is due; the first writes it, a knock lands, and the
    second, once it holds the lock, finds the new journal too young to snapshot."""
    first, second = opener(), opener()
    for n in range(1, 5):
        first.knock(key(f"198.51.100.{n}"), 600, NOW)
    writes: list[int] = []
    for store in (first, second):
        original = store._write_snapshot
        monkeypatch.setattr(
            store,
            "_write_snapshot",
            lambda *a, _w=original, **k: (writes.append(1), _w(*a, **k))[1],
        )
    opener.clock.now = NOW + 30  # long past the snapshot spacing of a tiny whitelist
    first.tick(opener.clock.now)
    assert len(writes) == 1 and opener.journal.stat().st_size == 0
    first.knock(key("198.51.100.9"), 600, opener.clock.now)  # journal dirty again, now
    # `second` had decided before the first snapshot; it only now gets the lock
    assert second._snapshot_now(purge=False) is False
    assert len(writes) == 1
    assert opener.journal.stat().st_size > 0
    assert set(opener.file(settle=False)) == {f"198.51.100.{n}" for n in range(1, 5)}


# --- a real service: reloads release what they replace ----------------------------------


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(word) for word in path.read_text().split()}


def _footprint(pid: int) -> tuple[int, int]:
    """(memory maps, open file descriptors) of one process."""
    maps = len(Path(f"/proc/{pid}/maps").read_text().splitlines())
    return maps, len(os.listdir(f"/proc/{pid}/fd"))


def _settled_footprints(master: int, workers: int, old: set[int]) -> dict[str, tuple[int, int]]:
    """Once `workers` new workers replaced `old` and stopped changing: the footprint of
    the master and of each worker (sorted, as worker pids change at each reload)."""
    deadline = time.monotonic() + 30
    previous: dict[str, tuple[int, int]] = {}
    while time.monotonic() < deadline:
        try:
            children = _children(master)
            if len(children) == workers and not children & old:
                current = {"master": _footprint(master)}
                for n, footprint in enumerate(sorted(_footprint(c) for c in children)):
                    current[f"worker{n}"] = footprint
                if current == previous:
                    return current
                previous = current
        except (FileNotFoundError, ProcessLookupError):
            pass  # a worker exited while we looked
        time.sleep(0.5)
    raise AssertionError(f"workers did not settle after SIGHUP: {previous}")


@pytest.mark.server
def test_sighup_reloads_leak_no_maps_and_no_file_descriptors(tmp_path: Path) -> None:
    """After 20 SIGHUP reloads the master and its workers hold as many memory maps and
    file descriptors as after the first: each reload releases the old store's files
    and its shared-memory map."""
    from tests.serverproc import KnockerProcess

    workers = 2
    # sync workers (threads=1): no request threads, so the count of thread stacks in
    # the maps is the same in every worker at every reload
    with KnockerProcess(tmp_path, workers=workers, threads=1) as server:
        assert server.process is not None
        master = server.process.pid

        def reload() -> dict[str, tuple[int, int]]:
            old = _children(master)
            os.kill(master, signal.SIGHUP)
            footprints = _settled_footprints(master, workers, old)
            assert server.knock(source="127.0.0.81")[0] == 200
            return footprints

        first = reload()
        for _ in range(19):
            last = reload()
        assert last == first
        assert server.verify(source="127.0.0.81") == 200


def test_maintenance_thread_runs_on_the_injected_clock_and_sleep(opener: Opener) -> None:
    """start()'s thread sleeps through the injected sleep and reads the injected clock:
    with fake time, the snapshot one delay after a knock appears without real waiting."""
    clock = opener.clock

    def sleep(seconds: float) -> None:  # 8 fake ticks (2 s), then idle without advancing
        if len(clock.sleeps) < 8:
            clock.sleep(seconds)
        else:
            time.sleep(0.005)

    store = FileStore(
        store_config(opener.directory),
        opener.firewall,
        clock=clock,
        monotonic=clock.monotonic,
        sleep=sleep,
        tick=0.25,
    )
    opener.opened.append(store)
    store.knock(key("198.51.100.1"), 600, NOW)
    store.start()
    for _ in range(500):  # bounded: 5 s of real time at most
        if opener.path.exists():
            break
        time.sleep(0.01)
    store.close()
    assert opener.file(settle=False) == {"198.51.100.1": int(NOW) + 600}
    assert set(clock.sleeps) == {0.25}
    assert len(clock.sleeps) >= SNAPSHOT_DELAY / 0.25  # the snapshot waited its delay


# --- storage that cannot be turned against its owner (issue 11 items 4 and 8) ----------

STORAGE_FILES = ["whitelist.json", "whitelist.json.journal", "whitelist.json.shm"]


@pytest.mark.parametrize("name", STORAGE_FILES)
def test_symlink_at_a_storage_path_is_refused_and_its_target_untouched(
    opener: Opener, tmp_path: Path, name: str
) -> None:
    """A symlink planted at any storage path is refused, naming the file; the file it
    points to is neither truncated nor written."""
    opener.directory.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (opener.directory / name).symlink_to(victim)
    with pytest.raises(StorageError, match=f"{name}.*symlink"):
        opener()
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("name", STORAGE_FILES)
def test_fifo_at_a_storage_path_is_refused_at_startup(opener: Opener, name: str) -> None:
    """A FIFO (or any non-regular file) at a storage path is a clear refusal, not a hang."""
    opener.directory.mkdir(parents=True)
    os.mkfifo(opener.directory / name)
    with pytest.raises(StorageError, match=f"{name}.*not a regular file"):
        opener()


@pytest.mark.parametrize("name", STORAGE_FILES)
def test_storage_file_writable_by_others_is_refused(opener: Opener, name: str) -> None:
    """A storage file that group or others may write (and so rewrite) is refused."""
    opener().knock(key("198.51.100.1"), 60, NOW)
    opener.opened.pop().close()  # leaves whitelist.json, the journal and the .shm
    (opener.directory / name).chmod(0o666)
    with pytest.raises(StorageError, match=f"{name}.*writable by group or others"):
        opener()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root (CI is root)")
@pytest.mark.parametrize("name", STORAGE_FILES)
def test_storage_file_owned_by_another_user_is_refused(opener: Opener, name: str) -> None:
    """An .shm (or journal, or whitelist.json) planted by another user is refused."""
    opener().knock(key("198.51.100.1"), 60, NOW)
    opener.opened.pop().close()
    os.chown(opener.directory / name, 65534, 65534)
    with pytest.raises(StorageError, match=f"{name}.*owned by uid 65534"):
        opener()


def test_storage_directory_writable_by_everyone_is_refused_unless_sticky(opener: Opener) -> None:
    """A world-writable storage directory lets anyone replace the files: refused, unless
    it is sticky (then only the owner may rename or remove them)."""
    opener.directory.mkdir(parents=True)
    opener.directory.chmod(0o777)
    with pytest.raises(StorageError, match="writable by every user and not sticky"):
        opener()
    opener.directory.chmod(0o1777)
    assert len(opener()) == 0


def test_temp_file_names_are_unpredictable_and_never_followed(opener: Opener) -> None:
    """The pid-based temp name of old is just a file now: a symlink planted there is
    left alone, and snapshots still land."""
    opener.directory.mkdir(parents=True)
    target = opener.directory.parent / "victim"
    target.write_bytes(b"precious")
    (opener.directory / f".whitelist.json.{os.getpid()}.tmp").symlink_to(target)
    store = opener()
    store.knock(key("198.51.100.1"), 60, NOW)
    assert opener.file() == {"198.51.100.1": int(NOW) + 60}
    assert target.read_bytes() == b"precious"


# --- odd expiries (issue 11 item 7) -----------------------------------------------------


def test_nan_infinite_and_huge_expiries_are_skipped_one_by_one(
    opener: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    """NaN, Infinity and expiries past 2^63 cost their entry only, with a warning; the
    file is not moved aside and knocks on those entries work."""
    opener.directory.mkdir(parents=True)
    opener.path.write_text(
        '{"1.2.3.4": NaN, "1.2.3.5": Infinity, "1.2.3.6": -Infinity, '
        f'"1.2.3.7": {2**63}, "1.2.3.8": 1e300, "5.6.7.8": {int(NOW) + 100}}}'
    )
    with caplog.at_level(logging.WARNING, logger="knocker"):
        store = opener()
    assert store.entries() == {"5.6.7.8": int(NOW) + 100}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("1.2.3." in w for w in warnings) == 5
    assert not list(opener.directory.glob("*.corrupt-*"))
    assert store.knock(key("1.2.3.7"), 60, NOW).expires_at == int(NOW) + 60


# --- a full disk (issue 11 item 2) -------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs of this test's own (CI runs as root; elsewhere the tests skip)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory: Path) -> Path:
    """Take every free block of the filesystem of `directory` (bounded: 2,000 x 1 KiB)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(2000):
            try:
                os.write(fd, bytes(1024))
            except OSError as error:
                assert error.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return filler


def test_shm_is_allocated_at_creation_and_a_full_filesystem_refuses_to_start(
    small_fs: Path,
) -> None:
    """The .shm gets its blocks at creation (posix_fallocate): on a filesystem without
    room for it the store refuses to open, naming the file, instead of dying of SIGBUS
    on a later write to the map."""
    config = store_config(small_fs / "state")
    with pytest.raises(StorageError, match=r"not enough space for .*whitelist.json.shm"):
        FileStore(config, NullFirewall(), clock=FakeClock())
    store = FileStore(config, NullFirewall(), clock=FakeClock(), ring_capacity=64)
    try:
        shm = small_fs / "state" / "whitelist.json.shm"
        assert shm.stat().st_blocks * 512 >= shm.stat().st_size  # allocated, not sparse
    finally:
        store.close()


def test_full_filesystem_makes_ready_fail_and_knocks_grant_nothing_until_space_returns(
    small_fs: Path,
) -> None:
    """With the storage filesystem full, ready() says why, a knock fails with nothing
    granted, and both recover once space is freed."""
    firewall = RecordingFirewall()
    store = FileStore(
        store_config(small_fs / "state"), firewall, clock=FakeClock(), ring_capacity=64
    )
    try:
        assert store.ready() is None
        filler = fill(small_fs)
        assert "full" in (store.ready() or "")
        with pytest.raises(StorageError):
            store.knock(key("203.0.113.7"), 60, NOW)
        assert not store.allows(ip("203.0.113.7"), NOW)
        assert firewall.calls[-1] == ("revoke", ("203.0.113.7",), None)
        filler.unlink()
        assert store.ready() is None
        assert store.knock(key("203.0.113.7"), 60, NOW).expires_at == int(NOW) + 60
    finally:
        store.close()


@pytest.mark.server
def test_full_disk_under_a_real_service_fails_knocks_and_ready_but_kills_no_worker(
    tmp_path: Path,
) -> None:
    """knocker serve with its storage on a small tmpfs that the test fills: /ready is
    503, knocks from new addresses are 500 with nothing granted, no worker dies (same
    pids), /verify keeps answering; freeing space brings both back."""
    from tests.serverproc import KnockerProcess, base_config

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)], check=True
    )
    try:
        config = base_config(
            mount, security={"knock_rate_limit": {"successful_requests": 0, "failed_requests": 0}}
        )
        with KnockerProcess(tmp_path / "run", config, workers=2) as server:
            assert server.process is not None
            for _ in range(100):  # both workers forked (bounded: 10 s)
                workers = _children(server.process.pid)
                if len(workers) == 2:
                    break
                time.sleep(0.1)
            assert server.request("GET", "/ready")[0] == 200
            assert server.knock(source="127.0.0.91")[0] == 200
            filler = fill(mount)
            assert server.request("GET", "/ready")[0] == 503
            # The journal's last allocated page still takes a few dozen knocks; beyond it
            # every knock needs a block the filesystem no longer has.
            sources = [f"127.0.{n // 250 + 1}.{n % 250 + 1}" for n in range(300)]
            statuses = {source: server.knock(source=source)[0] for source in sources}
            assert set(statuses.values()) <= {200, 500, 503}
            failed = [source for source, status in statuses.items() if status != 200]
            assert len(failed) > 100, statuses
            assert [server.verify(source=source) for source in failed] == [401] * len(failed)
            granted = [source for source, status in statuses.items() if status == 200]
            assert all(server.verify(source=source) == 200 for source in granted)
            assert server.verify(source="127.0.0.91") == 200
            assert _children(server.process.pid) == workers
            filler.unlink()
            assert server.request("GET", "/ready")[0] == 200
            assert server.knock(source=failed[0])[0] == 200
            assert server.verify(source=failed[0]) == 200
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.server
def test_concurrent_knocks_of_one_client_never_exceed_its_budgets_across_workers(
    tmp_path: Path,
) -> None:
    """64 simultaneous valid knocks from one client over 3 workers get at most the
    success budget of 200s; 32 simultaneous wrong-key knocks at most the failure budget
    of 401s; the rest are 429."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.serverproc import KnockerProcess, base_config

    config = base_config(
        tmp_path,
        security={
            "knock_rate_limit": {
                "window_seconds": 600,
                "successful_requests": 3,
                "failed_requests": 5,
            }
        },
    )
    server = KnockerProcess(tmp_path, config, workers=3, threads=8)
    with server, ThreadPoolExecutor(max_workers=64) as pool:
        valid = list(pool.map(lambda _: server.knock(source="127.0.0.95")[0], range(64)))
        wrong = list(
            pool.map(lambda _: server.knock("wrong-key", source="127.0.0.96")[0], range(32))
        )
    assert set(valid) <= {200, 429} and 1 <= valid.count(200) <= 3, valid
    assert set(wrong) <= {401, 429} and 1 <= wrong.count(401) <= 5, wrong
