"""Edge: sends journal entries to systemd-journald over its native socket, and tells
whether this process's output is connected to the journal.

Only the sending lives here; the bytes come from journal_format. An entry too large for
one datagram goes through a sealed memfd passed with SCM_RIGHTS, as sd_journal_sendv(3)
does. Every failure is an OSError for the caller to handle: the journal is never a reason
for `knocker watch` to stop.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
from collections.abc import Mapping

from .journal_format import parse_journal_stream

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SEND_TIMEOUT_SECONDS = 1.0


def journal_attached(environ: Mapping[str, str], fds: tuple[int, ...] = (2, 1)) -> bool:
    """True when systemd connected stderr or stdout to the journal: $JOURNAL_STREAM names
    the device and inode of that stream (systemd.exec(5) says to compare both, since the
    variable is inherited by children whose output may go elsewhere)."""
    expected = parse_journal_stream(environ.get("JOURNAL_STREAM"))
    if expected is None:
        return False
    for fd in fds:
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == expected:
            return True
    return False


class JournalSocket:
    """A datagram socket to journald; `send(entry)` raises OSError when it cannot deliver."""

    def __init__(self, path: str = JOURNAL_SOCKET, timeout: float = SEND_TIMEOUT_SECONDS) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # A stalled journald must not stall the watch loop: a send gives up after this.
        self._sock.settimeout(timeout)

    def send(self, entry: bytes) -> None:
        try:
            self._sock.sendto(entry, self.path)
        except OSError as error:
            # EMSGSIZE: larger than a datagram may be; ENOBUFS: larger than the send
            # buffer. sd_journal_sendv(3) falls back to a memfd for both.
            if error.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_via_memfd(entry)

    def _send_via_memfd(self, entry: bytes) -> None:
        fd = os.memfd_create("knocker-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            # journald maps the file; sealing promises it will not change under it.
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = array.array("i", [fd]).tobytes()
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()
