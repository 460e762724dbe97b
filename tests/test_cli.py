"""knocker.cli: `knocker gen-key | check-config | serve | --help` through main(argv)."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

import knocker.cli
from knocker.cli import main

SECRET = "cli-test-secret-4c8e1a9f7b3d"
URL_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{43,}")


# serve configures logging: give the next test the logging it had (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("keep_logging")


@pytest.fixture
def no_gunicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test instead of starting a server."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("gunicorn was started")

    monkeypatch.setattr(knocker.cli, "_Gunicorn", refuse)
    # and keep gevent's monkey-patching out of the test process
    monkeypatch.setattr(knocker.cli, "_patch_for_gevent", lambda: None)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "knocker.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def valid_config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path,
        f"""
api_keys:
  - name: laptop
    key: {SECRET}
    max_ttl: 3600
whitelist:
  storage_path: {tmp_path / "state" / "whitelist.json"}
""",
    )


# --- gen-key ----------------------------------------------------------------------------


def test_gen_key_prints_a_url_safe_key_of_256_bits() -> None:
    """gen-key prints one URL-safe key of at least 43 characters (>= 256 bits)."""
    code, out, _ = run("gen-key")
    assert code == 0
    key = out.strip()
    assert out == key + "\n"
    assert URL_SAFE_KEY.fullmatch(key)
    assert len(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))) >= 32


def test_gen_key_differs_every_time() -> None:
    """Two gen-key runs never print the same key."""
    keys = {run("gen-key")[1] for _ in range(5)}
    assert len(keys) == 5


def test_generated_key_is_accepted_by_check_config(tmp_path: Path) -> None:
    """A key from gen-key is a valid api_keys[].key."""
    key = run("gen-key")[1].strip()
    path = write_config(tmp_path, f"api_keys:\n  - key: {key}\n    max_ttl: 60\n")
    assert run("check-config", str(path))[0] == 0


# --- check-config -----------------------------------------------------------------------


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    """A valid config exits 0 and says so, without printing the key."""
    code, out, err = run("check-config", str(valid_config(tmp_path)))
    assert code == 0
    assert "OK" in out
    assert SECRET not in out + err


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        (f"api_keys:\n  - key: {SECRET}\n    max_ttl: -5\n", "api_keys[0].max_ttl"),
        (
            f"api_keys:\n  - key: {SECRET}\n    max_ttl: 60\n  - key: {SECRET}\n    max_ttl: 60\n",
            "api_keys[1].key",
        ),
        (f"api_keys:\n  - key: CHANGE_ME-{SECRET}\n    max_ttl: 60\n", "api_keys[0].key"),
        (
            f"api_keys:\n  - key: {SECRET}\n    max_ttl: 60\n    allow_remote_whitelist: 1\n",
            "api_keys[0].allow_remote_whitelist",
        ),
        (
            f"api_keys:\n  - key: {SECRET}\n    max_ttl: 60\n"
            "security:\n  max_whitelist_entries: 0\n",
            "security.max_whitelist_entries",
        ),
    ],
    ids=["max-ttl", "duplicate-key", "placeholder", "bool", "capacity"],
)
def test_check_config_rejects_with_the_key_path_and_never_the_secret(
    tmp_path: Path, text: str, key_path: str
) -> None:
    """An invalid config exits 1 with a message naming the key path and never the secret."""
    code, out, err = run("check-config", str(write_config(tmp_path, text)))
    assert code == 1
    assert key_path in err
    assert SECRET not in out + err


@pytest.mark.parametrize(
    "extra",
    [
        "security: {excluded_paths: [!!timestamp notatime]}",
        "security: {excluded_paths: [!unknown /x]}",
        "cors: {allowed_origin: !!bool maybe}",
        "documentation: {enabled: true, openapi_output_path: MISSING/openapi.json}",
        "documentation: {enabled: true, openapi_output_path: A_FILE/openapi.json}",
    ],
)
def test_check_config_refuses_what_serve_would_refuse_without_a_traceback(
    tmp_path: Path, extra: str
) -> None:
    """Odd YAML tags and an openapi_output_path whose directory is missing (or a file)
    exit 1 with one line naming the problem, never a traceback."""
    (tmp_path / "a-file").write_text("")
    extra = extra.replace("MISSING", str(tmp_path / "missing")).replace(
        "A_FILE", str(tmp_path / "a-file")
    )
    path = write_config(tmp_path, valid_config(tmp_path).read_text() + extra + "\n")
    code, out, err = run("check-config", str(path))
    assert code == 1
    assert "invalid" in err and "Traceback" not in err
    assert SECRET not in out + err


def test_check_config_warns_of_wide_proxies_and_short_keys_but_accepts_them(tmp_path: Path) -> None:
    """A /8 of trusted proxies and an 8-character key: OK (upstream accepts them), with a
    warning each on stderr that never shows the key."""
    path = write_config(
        tmp_path,
        """
server: {trusted_proxies: [10.0.0.0/8]}
api_keys:
  - {name: short, key: s3cr3t99, max_ttl: 60}
""",
    )
    code, out, err = run("check-config", str(path))
    assert code == 0 and "OK" in out
    assert "10.0.0.0/8 is wider than a /16" in err
    assert "api_keys[0] (short): shorter than 16 characters" in err
    assert "s3cr3t99" not in out + err


def test_serve_options_use_the_gevent_worker_and_no_forwarder_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default serve hands gunicorn Knocker's gevent worker with its connection cap and
    head deadline, and no forwarder headers; --worker-class gthread keeps threads."""
    monkeypatch.setattr(knocker.cli, "_patch_for_gevent", lambda: None)
    seen: list[dict[str, object]] = []

    def capture(server: object) -> None:
        seen.append(dict(server._options))  # type: ignore[attr-defined]
        server._app.close()  # type: ignore[attr-defined]

    config = valid_config(tmp_path)
    args = knocker.cli.build_parser().parse_args(["serve", "--config", str(config)])
    args.out, args.err = io.StringIO(), io.StringIO()
    assert knocker.cli._serve(args, run=capture) == 0
    args = knocker.cli.build_parser().parse_args(
        ["serve", "--config", str(config), "--worker-class", "gthread", "--threads", "3"]
    )
    args.out, args.err = io.StringIO(), io.StringIO()
    assert knocker.cli._serve(args, run=capture) == 0
    gevent, gthread = seen
    assert gevent["worker_class"] == "knocker.worker.KnockerWorker"
    assert gevent["worker_connections"] == 1000 and gevent["keepalive"] == 10
    assert gevent["forwarder_headers"] == "" == gthread["forwarder_headers"]
    assert gthread["worker_class"] == "gthread" and gthread["threads"] == 3


def test_check_config_of_a_missing_file_fails(tmp_path: Path) -> None:
    """A config file that does not exist exits 1 naming the file."""
    missing = tmp_path / "nowhere.yaml"
    code, _, err = run("check-config", str(missing))
    assert code == 1
    assert str(missing) in err


def test_check_config_uses_knocker_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a PATH argument, KNOCKER_CONFIG_PATH names the file."""
    path = write_config(tmp_path, f"api_keys:\n  - key: {SECRET}\n    max_ttl: 0\n")
    monkeypatch.setenv("KNOCKER_CONFIG_PATH", str(path))
    code, _, err = run("check-config")
    assert code == 1
    assert str(path) in err


def test_check_config_defaults_to_knocker_yaml_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a PATH and without the variable, ./knocker.yaml is checked."""
    valid_config(tmp_path)
    monkeypatch.delenv("KNOCKER_CONFIG_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run("check-config")
    assert code == 0
    assert "knocker.yaml" in out


# --- serve ------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_gunicorn")
def test_serve_with_an_invalid_config_exits_non_zero_before_starting(tmp_path: Path) -> None:
    """serve validates the config first: an invalid one exits 1, names the key path and
    starts nothing."""
    path = write_config(tmp_path, f"api_keys:\n  - key: {SECRET}\n    max_ttl: yes\n")
    code, out, err = run("serve", "--config", str(path), "--bind", "127.0.0.1:0")
    assert code != 0
    assert "api_keys[0].max_ttl" in err
    assert SECRET not in out + err
    assert not (tmp_path / "whitelist.json").exists()


@pytest.mark.usefixtures("no_gunicorn")
def test_serve_with_a_missing_config_exits_non_zero(tmp_path: Path) -> None:
    """serve with a config path that does not exist exits non-zero, starting nothing."""
    code, _, err = run("serve", "--config", str(tmp_path / "missing.yaml"))
    assert code != 0
    assert "missing.yaml" in err


@pytest.mark.usefixtures("no_gunicorn")
def test_serve_with_unusable_storage_exits_non_zero(tmp_path: Path) -> None:
    """A valid config whose whitelist directory cannot be created never starts a server."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = write_config(
        tmp_path,
        f"""
api_keys:
  - key: {SECRET}
    max_ttl: 60
whitelist:
  storage_path: {blocker / "whitelist.json"}
""",
    )
    code, _, _ = run("serve", "--config", str(path))
    assert code != 0


@pytest.mark.parametrize("option", ["--workers", "--threads"])
def test_serve_refuses_a_worker_count_below_one(
    tmp_path: Path, option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--workers 0 or --threads 0 is a usage error."""
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--config", str(valid_config(tmp_path)), option, "0"])
    assert caught.value.code != 0


# --- help -------------------------------------------------------------------------------


def test_help_lists_the_service_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """`knocker --help` lists serve, check-config and gen-key, and exits 0."""
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "check-config", "gen-key"):
        assert command in out


def test_console_script_is_installed_and_runs() -> None:
    """The `knocker` console script next to this Python answers --help."""
    script = Path(sys.executable).parent / "knocker"
    assert script.exists(), f"no console script at {script}: pip install -e . first"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "gen-key" in result.stdout


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`knocker` without a command exits non-zero with usage."""
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code != 0
    assert "usage" in capsys.readouterr().err
