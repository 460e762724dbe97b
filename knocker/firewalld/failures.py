"""Pure: what a failed exchange with firewalld means, and the KnockerError it becomes.

Owns: DBusError (an error reply, with firewalld's own code read from its text), which
failures mean "firewalld or the bus is not there right now" (503, try again) and which mean
"firewalld said no" (500), and the message that points a non-root Knocker at polkit.
"""

from __future__ import annotations

from ..errors import FirewallError, FirewallUnavailable

# Errors that mean "firewalld is not there right now" (503), not "firewalld said no" (500).
UNAVAILABLE_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Timeout",
        "org.freedesktop.DBus.Error.TimedOut",
        "org.freedesktop.DBus.Error.Disconnected",
        "org.freedesktop.DBus.Error.NoServer",
        "org.freedesktop.DBus.Error.LimitsExceeded",
    }
)
UNAVAILABLE_CODES = frozenset({"NOT_RUNNING", "RUNNING_BUT_FAILED"})
NOT_AUTHORIZED_ERRORS = frozenset(
    {
        "org.fedoraproject.FirewallD1.NotAuthorizedException",
        "org.freedesktop.DBus.Error.AccessDenied",
    }
)
FIREWALLD_EXCEPTION = "org.fedoraproject.FirewallD1.Exception"


class DBusError(Exception):
    """An error reply. `name` is the D-Bus error name; firewalld's own errors
    (org.fedoraproject.FirewallD1.Exception) carry a text starting with a code."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}" if text else name)
        self.name = name
        self.text = text

    @property
    def code(self) -> str:
        if self.name != FIREWALLD_EXCEPTION:
            return ""
        return self.text.split(":", 1)[0].strip()


# Everything a D-Bus exchange can raise: an error reply, or the transport failing.
DBUS_FAILURES = (DBusError, OSError, TimeoutError, EOFError)


def is_unavailable(exc: BaseException) -> bool:
    """True when the failure means firewalld or the bus is not reachable right now."""
    if isinstance(exc, DBusError):
        return exc.name in UNAVAILABLE_ERRORS or exc.code in UNAVAILABLE_CODES
    return isinstance(exc, (OSError, TimeoutError, EOFError))


def classify(exc: BaseException, doing: str) -> FirewallError:
    """The KnockerError a failed D-Bus exchange becomes: 503 when firewalld or the bus is
    unreachable (try again later), 500 when firewalld answered no."""
    if is_unavailable(exc):
        if isinstance(exc, DBusError):
            reason = exc.name.rsplit(".", 1)[-1] if exc.name in UNAVAILABLE_ERRORS else exc.text
        else:
            reason = str(exc) or type(exc).__name__
        return FirewallUnavailable(f"firewalld unavailable while {doing}: {reason}")
    if isinstance(exc, DBusError) and exc.name in NOT_AUTHORIZED_ERRORS:
        return FirewallError(
            f"firewalld refused {doing}: not authorized (run Knocker as root, or install "
            "deploy/polkit/50-knocker-firewalld.rules for its user; see docs/firewalld.md)"
        )
    return FirewallError(f"firewalld failed {doing}: {exc}")
