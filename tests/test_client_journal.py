"""`knocker watch` and the systemd journal: the native protocol encoder byte for byte,
JOURNAL_STREAM detection, the socket sender against a real AF_UNIX datagram socket this
test binds (small entries as datagrams, large ones as a sealed memfd), and the fallback
when the journal is missing or refuses."""

from __future__ import annotations

import argparse
import array
import fcntl
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from knocker.client import journal_format
from knocker.client.commands import run_watch, watch_writer
from knocker.client.events import Event, JournalWriter, LineWriter
from knocker.client.journal_format import encode_entry, parse_journal_stream
from knocker.client.journald import JournalSocket, journal_attached
from tests.clientsupport import JSON_HEADERS, Responder, Stub, grant_body, stubs
from tests.serverproc import KNOCKER, TEST_KEY
from tests.test_architecture import problems_in

__all__ = ["stubs"]  # fixture


def decode_entry(data: bytes) -> dict[str, str]:
    """The reverse of encode_entry (as journald parses it), for checking what was sent."""
    fields: dict[str, str] = {}
    while data:
        line, newline, rest = data.partition(b"\n")
        assert newline, data
        if b"=" in line:
            name, _, value = line.partition(b"=")
            data = rest
        else:
            name = line
            (size,) = struct.unpack("<Q", rest[:8])
            value = rest[8 : 8 + size]
            assert rest[8 + size : 9 + size] == b"\n"
            data = rest[9 + size :]
        fields[name.decode("ascii")] = value.decode("utf-8")
    return fields


# ---------------------------------------------------------------------------------------
# the encoder (pure)


def test_encoder_writes_key_equals_value_lines() -> None:
    """Plain values are `KEY=value\\n`, in the order given; an empty value is allowed."""
    entry = encode_entry([("MESSAGE", "Next knock at 2025-06-14T10:01:40Z"), ("PRIORITY", "6"),
                          ("KNOCKER_CONTEXT", "")])  # fmt: skip
    assert entry == b"MESSAGE=Next knock at 2025-06-14T10:01:40Z\nPRIORITY=6\nKNOCKER_CONTEXT=\n"


def test_encoder_uses_the_length_prefixed_form_for_a_value_with_a_newline() -> None:
    """A value holding a newline is `KEY\\n` + 64-bit little-endian length + value + `\\n`."""
    entry = encode_entry([("MESSAGE", "two\nlines"), ("KNOCKER_EVENT", "Error")])
    assert entry == (b"MESSAGE\n\x09\x00\x00\x00\x00\x00\x00\x00two\nlines\n"
                     b"KNOCKER_EVENT=Error\n")  # fmt: skip


def test_encoder_counts_utf8_bytes_not_characters() -> None:
    """The length prefix is the UTF-8 byte count (é is two bytes)."""
    entry = encode_entry([("MESSAGE", "é\n")])
    assert entry == b"MESSAGE\n\x03\x00\x00\x00\x00\x00\x00\x00\xc3\xa9\n\n"


@pytest.mark.parametrize("name", ["message", "_PID", "1ABC", "KNOCKER-EVENT", "", "A" * 65,
                                  "MESSAGE=", "A\nB"])  # fmt: skip
def test_encoder_refuses_names_journald_would_drop_or_misparse(name: str) -> None:
    """Lower case, a leading `_` (trusted fields) or digit, other characters, empty or over
    64 characters: refused before anything is sent."""
    with pytest.raises(ValueError):
        encode_entry([(name, "x")])


def test_journal_stream_is_parsed_as_device_and_inode() -> None:
    """JOURNAL_STREAM is "<dev>:<inode>" in decimal; anything else means "not attached"."""
    assert parse_journal_stream("8:12345") == (8, 12345)
    for value in (None, "", "8", "8:", ":1", "a:b", "8:1:2", "-1:2"):
        assert parse_journal_stream(value) is None


def test_encoder_module_is_pure() -> None:
    """journal_format joins the core's rules: no I/O, no clock, no edge imports."""
    source = Path(journal_format.__file__).read_text(encoding="utf-8")
    assert problems_in(source, "client.journal_format") == []


# ---------------------------------------------------------------------------------------
# detection


def test_journal_attached_compares_device_and_inode_of_the_streams(tmp_path: Path) -> None:
    """Attached only when JOURNAL_STREAM names the very file behind stderr/stdout."""
    with open(tmp_path / "stream", "wb") as mine, open(tmp_path / "other", "wb") as other:
        info = os.fstat(mine.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert journal_attached(env, fds=(other.fileno(), mine.fileno()))
        assert not journal_attached(env, fds=(other.fileno(),))
        assert not journal_attached({}, fds=(mine.fileno(),))
        assert not journal_attached({"JOURNAL_STREAM": "garbage"}, fds=(mine.fileno(),))
        assert not journal_attached(env, fds=(987654,))  # a closed descriptor is no match


# ---------------------------------------------------------------------------------------
# the sender, against a real datagram socket


@pytest.fixture
def receiver() -> Iterator[tuple[str, socket.socket]]:
    """A bound AF_UNIX datagram socket standing in for journald (short path: sun_path is
    108 bytes)."""
    directory = tempfile.mkdtemp(prefix="kj-", dir="/tmp")
    path = os.path.join(directory, "socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        yield path, sock
    finally:
        sock.close()
        shutil.rmtree(directory)


def receive(sock: socket.socket, via_memfd: bool = False) -> bytes:
    """One entry as journald would read it: the datagram, or (via_memfd) the memfd it
    carries."""
    data, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
    assert bool(ancillary) == via_memfd
    if not ancillary:
        return data
    assert data == b""  # the protocol allows a payload or a descriptor, not both
    ((level, kind, raw),) = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    (fd,) = array.array("i", raw)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def test_sender_delivers_an_entry_as_one_datagram(receiver: tuple[str, socket.socket]) -> None:
    """A small entry arrives as one datagram holding exactly the encoded bytes."""
    path, sock = receiver
    entry = encode_entry([("MESSAGE", "hello\nworld"), ("KNOCKER_EVENT", "ServiceState")])
    sender = JournalSocket(path)
    sender.send(entry)
    sender.close()
    assert receive(sock) == entry
    assert decode_entry(entry) == {"MESSAGE": "hello\nworld", "KNOCKER_EVENT": "ServiceState"}


def test_sender_passes_an_oversized_entry_as_a_sealed_memfd(
    receiver: tuple[str, socket.socket],
) -> None:
    """An entry larger than a datagram may be goes as an empty datagram carrying one sealed
    memfd with the entry (sd_journal_sendv(3)'s fallback)."""
    path, sock = receiver
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    entry = encode_entry([("MESSAGE", "x" * (4 << 20))])
    sender = JournalSocket(path)
    sender.send(entry)
    sender.close()
    assert receive(sock, via_memfd=True) == entry


def test_sender_raises_oserror_when_no_journal_listens(tmp_path: Path) -> None:
    """No socket at the path: an OSError (which the writer turns into a fallback line)."""
    sender = JournalSocket(str(tmp_path / "missing"))
    with pytest.raises(OSError):
        sender.send(b"MESSAGE=x\n")
    sender.close()


def test_journal_writer_falls_back_to_a_line_and_keeps_trying() -> None:
    """A refused entry is written as a line instead; the next event tries the journal again."""
    sent: list[bytes] = []
    refusals = iter([True, False])

    def send(entry: bytes) -> None:
        if next(refusals):
            raise ConnectionRefusedError
        sent.append(entry)

    lines = io.StringIO()
    writer = JournalWriter(send, LineWriter(lines, as_json=False))
    writer.write(Event("Error", "first", 3, 0.0, {"KNOCKER_ERROR_CODE": "knock_failed"}))
    writer.write(Event("Error", "second", 3, 0.0, {"KNOCKER_ERROR_CODE": "knock_failed"}))
    assert lines.getvalue().endswith(" first\n") and lines.getvalue().count("\n") == 1
    assert [decode_entry(e)["MESSAGE"] for e in sent] == ["second"]


# ---------------------------------------------------------------------------------------
# run_watch chooses the journal


def watch_in_thread(
    stub: Stub,
    environ: dict[str, str],
    journal: Callable[[], JournalSocket],
    as_json: bool,
    until: Callable[[], bool],
) -> tuple[int, str, str]:
    """run_watch in-process with a stop event set once `until()` holds (bounded: 15 s)."""
    args = argparse.Namespace(url=stub.url, key=TEST_KEY, key_file=None, ttl=None, ip=None,
                              config=None, json=as_json, check_interval=None, ip_check_url=None,
                              backoff_min=5.0, backoff_max=300.0, journal=False)  # fmt: skip
    stop = threading.Event()
    out, err = io.StringIO(), io.StringIO()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run_watch(
        args, environ=environ, home=Path("/nonexistent"), out=out, err=err, stop=stop,
        journal=journal)))  # fmt: skip
    thread.start()
    for _ in range(150):
        if until():
            break
        stop.wait(0.1)
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    return codes[0], out.getvalue(), err.getvalue()


def test_watch_under_systemd_writes_native_entries_with_the_go_cli_fields(
    stubs: Callable[[Responder], Stub], receiver: tuple[str, socket.socket]
) -> None:
    """With JOURNAL_STREAM naming this process's stderr, watch sends journal entries (and
    prints nothing): ServiceState started, WhitelistApplied, NextKnockUpdated and
    StatusSnapshot with every value a string, then stopping/stopped."""
    path, sock = receiver
    stub = stubs(lambda method, p, headers, body: (200, JSON_HEADERS, grant_body(ttl=600)))
    info = os.fstat(2)
    environ = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    entries: list[dict[str, str]] = []
    sock.settimeout(0.05)

    def drain() -> bool:
        while True:
            try:
                entries.append(decode_entry(receive(sock)))
            except TimeoutError:
                return any(e["KNOCKER_EVENT"] == "StatusSnapshot" and "KNOCKER_WHITELIST_IP" in e
                           for e in entries)  # fmt: skip

    code, out, err = watch_in_thread(stub, environ, lambda: JournalSocket(path), False, drain)
    sock.settimeout(2)
    while not entries or entries[-1].get("KNOCKER_SERVICE_STATE") != "stopped":
        entries.append(decode_entry(receive(sock)))
    assert code == 0 and out == "" and err == ""
    assert {e["SYSLOG_IDENTIFIER"] for e in entries} == {"knocker"}
    assert {e["KNOCKER_SCHEMA_VERSION"] for e in entries} == {"1"}
    by_name = {e["KNOCKER_EVENT"]: e for e in entries}
    assert entries[0]["KNOCKER_SERVICE_STATE"] == "started" and entries[0]["PRIORITY"] == "6"
    assert by_name["WhitelistApplied"]["KNOCKER_WHITELIST_IP"] == "127.0.0.1"
    assert by_name["WhitelistApplied"]["KNOCKER_TTL_SEC"] == "600"
    assert by_name["NextKnockUpdated"]["KNOCKER_NEXT_AT_UNIX"] == "0"  # the last: cleared
    stopping = [e for e in entries if e.get("KNOCKER_SERVICE_STATE") == "stopping"]
    assert [e["PRIORITY"] for e in stopping] == ["5"]
    assert TEST_KEY not in repr(entries)


def test_watch_with_a_missing_journal_keeps_running_and_logs_lines_to_stderr(
    stubs: Callable[[Responder], Stub], tmp_path: Path
) -> None:
    """Attached to the journal but its socket is gone: every event becomes a line on
    stderr, and watch knocks and stops as usual."""
    stub = stubs(lambda method, p, headers, body: (200, JSON_HEADERS, grant_body(ttl=600)))
    info = os.fstat(1)
    environ = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    code, out, err = watch_in_thread(
        stub, environ, lambda: JournalSocket(str(tmp_path / "no-journal")), True,
        lambda: len(stub.requests) >= 1,
    )  # fmt: skip
    assert code == 0 and out == ""
    assert '"KNOCKER_EVENT": "WhitelistApplied"' in err
    assert json.loads(err.splitlines()[-1])["KNOCKER_SERVICE_STATE"] == "stopped"


def test_watch_without_journal_stream_prints_lines(
    stubs: Callable[[Responder], Stub],
) -> None:
    """Outside systemd (no JOURNAL_STREAM) nothing is sent to any journal: lines on stdout."""
    stub = stubs(lambda method, p, headers, body: (200, JSON_HEADERS, grant_body(ttl=600)))

    def no_journal() -> JournalSocket:
        raise AssertionError("the journal must not be opened")

    code, out, err = watch_in_thread(stub, {}, no_journal, False, lambda: len(stub.requests) >= 1)
    assert code == 0
    assert "Whitelisted 127.0.0.1 for 600s" in out


# ---------------------------------------------------------------------------------------
# the real systemd-journald


JOURNALD = "/lib/systemd/systemd-journald"

# Runs inside a private mount namespace (unshare --mount): a tmpfs over /run and the
# journal directories, so this journald and its sockets are seen by nothing else. Like
# systemd for a unit, it connects the child's stdout/stderr to journald's stream socket
# and sets JOURNAL_STREAM; `knocker watch` must then send native entries by itself.
INSIDE = r"""
import json, os, signal, socket, subprocess, sys, time
url, key_file, knocker = sys.argv[1:4]
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
if os.path.isdir("/var/log/journal"):
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/var/log/journal"], check=True)
os.makedirs("/run/systemd/journal"); os.makedirs("/run/log/journal")
journald = subprocess.Popen([sys.argv[4]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def until(predicate, what, seconds=20):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for " + what)
        time.sleep(0.1)

def entries():
    out = subprocess.run(["journalctl", "-D", "/run/log/journal", "-o", "json", "--no-pager",
                          "SYSLOG_IDENTIFIER=knocker"], capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]

watch = None
try:
    until(lambda: os.path.exists("/run/systemd/journal/stdout"), "journald")
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.connect("/run/systemd/journal/stdout")
    # identifier, unit, priority, level prefix, forward to syslog, kmsg, console
    stream.sendall(b"knocker-stderr\n\n6\n0\n0\n0\n0\n")
    stream.shutdown(socket.SHUT_RD)
    info = os.fstat(stream.fileno())
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent",
           "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    watch = subprocess.Popen([knocker, "watch", "--url", url, "--key-file", key_file], env=env,
                             stdin=subprocess.DEVNULL, stdout=stream.fileno(),
                             stderr=stream.fileno())
    until(lambda: any(e.get("KNOCKER_EVENT") == "StatusSnapshot"
                      and "KNOCKER_WHITELIST_IP" in e for e in entries()), "a snapshot")
    watch.send_signal(signal.SIGTERM)
    watch.wait(20)
    until(lambda: any(e.get("KNOCKER_SERVICE_STATE") == "stopped" for e in entries()), "stop")
    print(json.dumps({"code": watch.returncode, "entries": entries()}))
finally:
    if watch is not None and watch.poll() is None:
        watch.kill()
        watch.wait(10)
    journald.terminate()
    journald.wait(10)
"""


def test_watch_entries_reach_a_real_journald(
    stubs: Callable[[Responder], Stub], tmp_path: Path
) -> None:
    """`knocker watch` with its stderr on journald's stream (as under systemd) writes native
    entries that the real systemd-journald stores with every field the GNOME extension reads
    (journalctl -o json shows them as strings, transport "journal", not the stderr stream)."""
    missing = [
        what
        for what, ok in [
            ("root", os.geteuid() == 0),
            ("unshare", shutil.which("unshare") is not None),
            ("journalctl", shutil.which("journalctl") is not None),
            (JOURNALD, os.path.exists(JOURNALD)),
        ]
        if not ok
    ]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"needed for the real journald test: {missing} (Debian package systemd)")
        pytest.skip(f"missing {missing}")
    stub = stubs(lambda method, p, headers, body: (200, JSON_HEADERS, grant_body(ttl=600)))
    script = tmp_path / "inside.py"
    script.write_text(INSIDE)
    key_file = tmp_path / "key"  # not --key: journald records each process's command line
    key_file.write_text(TEST_KEY)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, str(script),
         stub.url, str(key_file), KNOCKER, JOURNALD],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["code"] == 0
    entries = [e for e in report["entries"] if "KNOCKER_EVENT" in e]
    assert {e["_TRANSPORT"] for e in entries} == {"journal"}
    names = [e["KNOCKER_EVENT"] for e in entries]
    assert names[0] == "ServiceState" and entries[0]["KNOCKER_SERVICE_STATE"] == "started"
    assert {"WhitelistApplied", "StatusSnapshot", "NextKnockUpdated", "KnockTriggered"} <= set(
        names
    )
    for entry in entries:
        assert entry["SYSLOG_IDENTIFIER"] == "knocker"
        assert entry["KNOCKER_SCHEMA_VERSION"] == "1"
        assert all(isinstance(v, str) for k, v in entry.items() if k.startswith("KNOCKER_"))
    applied = next(e for e in entries if e["KNOCKER_EVENT"] == "WhitelistApplied")
    assert applied["PRIORITY"] == "6" and applied["KNOCKER_WHITELIST_IP"] == "127.0.0.1"
    assert applied["KNOCKER_TTL_SEC"] == "600" and applied["KNOCKER_EXPIRES_UNIX"].isdigit()
    snapshot = next(e for e in entries if e["KNOCKER_EVENT"] == "StatusSnapshot"
                    and "KNOCKER_WHITELIST_IP" in e)  # fmt: skip
    assert snapshot["KNOCKER_NEXT_AT_UNIX"].isdigit()
    assert snapshot["KNOCKER_CADENCE_SOURCE"] == "ttl_response"
    states = [(e["KNOCKER_SERVICE_STATE"], e["PRIORITY"]) for e in entries
              if e["KNOCKER_EVENT"] == "ServiceState"]  # fmt: skip
    assert states == [("started", "6"), ("stopping", "5"), ("stopped", "6")]
    assert TEST_KEY not in result.stdout


def test_explicit_journal_flag_sends_entries_without_journal_stream(
    receiver: tuple[str, socket.socket],
) -> None:
    """`--journal` chooses the journal even when JOURNAL_STREAM is absent."""
    path, sock = receiver
    args = argparse.Namespace(json=False, journal=True)
    writer = watch_writer(args, io.StringIO(), io.StringIO(), {}, lambda: JournalSocket(path))
    writer.write(Event("ServiceState", "Service state: started", 6, 0.0,
                       {"KNOCKER_SERVICE_STATE": "started"}))  # fmt: skip
    assert decode_entry(receive(sock))["KNOCKER_SERVICE_STATE"] == "started"
    lines = watch_writer(argparse.Namespace(json=False, journal=False), io.StringIO(),
                         io.StringIO(), {}, lambda: JournalSocket(path))  # fmt: skip
    assert isinstance(lines, LineWriter)
