"""Knocker's command-line client, a second product inside the package: `knocker knock`,
`knocker watch` and `knocker service`, compatible with the Go knocker-cli's settings and
journal fields. Nothing in the server imports it; cli.py only calls `register`.

    settings.py        flags > KNOCKER_* > ~/.knocker.yaml, redaction helpers
    knock.py           one POST /knock -> KnockResult | KnockFailed (exit status)
    grants.py          sign-out (DELETE /knock) and the admin grants API; the grants table
    loop.py            KnockLoop: the watch schedule, on injected clocks
    events.py          events with the Go client's journal fields; line/journal writers
    journal_format.py  pure: the journal's native protocol as bytes
    journald.py        edge: the journal socket, JOURNAL_STREAM detection
    service.py         `knocker service ...`: the user unit knocker.service via systemctl --user
    commands.py        argparse wiring, run_knock, run_watch, run_grants
"""

from __future__ import annotations

from .commands import register

__all__ = ["register"]
