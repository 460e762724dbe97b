"""knocker.config: knocker.yaml text -> validated frozen Config (docs/configuration.md)."""

from __future__ import annotations

import ast
import dataclasses
import secrets
import typing
from pathlib import Path
from typing import Any

import pytest

from knocker.config import (
    ApiKey,
    Config,
    FirewalldConfig,
    MonitoredPort,
    SecurityConfig,
    load_config_text,
    parse_config,
)
from knocker.errors import ConfigError
from tests.support.net import net

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "knocker.yaml.example"

KEY = "test-key-9f8e7d6c5b4a"
MINIMAL = f"api_keys:\n  - key: {KEY}\n    max_ttl: 3600\n"


def config_with(**sections: Any) -> dict[str, Any]:
    """A valid mapping with one key, plus the given top-level sections."""
    return {"api_keys": [{"key": KEY, "max_ttl": 3600}], **sections}


def error_of(source: str | dict[str, Any] | None) -> ConfigError:
    """The ConfigError raised for YAML text or a mapping."""
    with pytest.raises(ConfigError) as caught:
        if isinstance(source, str):
            load_config_text(source)
        else:
            parse_config(source)
    return caught.value


def firewalld(**settings: Any) -> dict[str, Any]:
    return config_with(firewalld=settings)


ENABLED_FIREWALLD: dict[str, Any] = {
    "enabled": True,
    "monitored_ports": [{"port": 22, "protocol": "tcp"}],
    "monitored_ips": ["203.0.113.0/24"],
}


# --- defaults and shape ------------------------------------------------------------------


def test_minimal_config_gets_every_documented_default() -> None:
    """A file with only api_keys gets the documented defaults for every other setting."""
    config = load_config_text(MINIMAL)
    assert config.api_keys == (ApiKey("key-1", KEY, 3600, False),)
    assert config.server.trusted_proxies == ()
    security = config.security
    assert security.always_allowed_ips == ()
    assert security.excluded_paths == ()
    assert dict(security.excluded_paths_by_host) == {}
    assert security.max_whitelist_entries == 10000
    rate = security.knock_rate_limit
    assert (rate.window_seconds, rate.successful_requests, rate.failed_requests) == (60, 20, 30)
    assert config.whitelist.storage_path == "whitelist.json"
    assert config.whitelist.cleanup_interval_seconds == 60
    assert config.cors.allowed_origin == "*"
    assert config.documentation.enabled is False
    assert config.documentation.openapi_output_path == "openapi.json"
    assert config.logging.level == "INFO"
    assert config.web.enabled is False
    assert config.firewalld == FirewalldConfig(
        enabled=False,
        zone_name="knocker",
        zone_priority=-100,
        zone_target=None,
        default_action="drop",
        monitored_ports=(),
        monitored_ips=(),
    )


def test_every_setting_is_read_into_the_tree() -> None:
    """Values given in the file end up in the matching dataclass fields."""
    config = parse_config(
        {
            "server": {"trusted_proxies": ["127.0.0.1", "10.0.0.0/8", "::1"]},
            "api_keys": [
                {"name": "admin", "key": KEY, "max_ttl": 600, "allow_remote_whitelist": True}
            ],
            "security": {
                "always_allowed_ips": ["192.168.1.0/24"],
                "excluded_paths": ["/health"],
                "excluded_paths_by_host": {"files.example.com": ["/share/"]},
                "max_whitelist_entries": 5,
                "knock_rate_limit": {
                    "window_seconds": 10,
                    "successful_requests": 0,
                    "failed_requests": 100000,
                },
            },
            "whitelist": {"storage_path": "/data/whitelist.json", "cleanup_interval_seconds": 5},
            "cors": {"allowed_origin": "https://knock.example.com"},
            "documentation": {"enabled": True, "openapi_output_path": "docs/openapi.json"},
            "logging": {"level": "debug"},
            "firewalld": dict(ENABLED_FIREWALLD, zone_target="DROP", default_action="reject"),
            "web": {"enabled": True},
        }
    )
    assert config.server.trusted_proxies == (
        net("127.0.0.1/32"),
        net("10.0.0.0/8"),
        net("::1/128"),
    )
    assert config.api_keys == (ApiKey("admin", KEY, 600, True),)
    assert config.security.always_allowed_ips == (net("192.168.1.0/24"),)
    assert config.security.excluded_paths == ("/health",)
    assert dict(config.security.excluded_paths_by_host) == {"files.example.com": ("/share/",)}
    assert config.security.max_whitelist_entries == 5
    assert config.security.knock_rate_limit.successful_requests == 0
    assert config.security.knock_rate_limit.failed_requests == 100000
    assert config.whitelist.storage_path == "/data/whitelist.json"
    assert config.cors.allowed_origin == "https://knock.example.com"
    assert config.documentation.openapi_output_path == "docs/openapi.json"
    assert config.logging.level == "DEBUG"
    assert config.firewalld.enabled is True
    assert config.firewalld.zone_target == "DROP"
    assert config.firewalld.default_action == "reject"
    assert config.firewalld.monitored_ports == (MonitoredPort(22, "tcp"),)
    assert config.web.enabled is True


def test_empty_file_says_api_keys_are_required() -> None:
    """An empty file is refused with a message naming api_keys."""
    error = error_of("")
    assert error.path == "api_keys"
    assert "required" in error.message


def test_top_level_must_be_a_mapping() -> None:
    """A YAML list or scalar at the top is refused."""
    assert "mapping" in error_of("- api_keys\n").message
    assert "mapping" in error_of("just text\n").message


def test_empty_sections_and_lists_mean_defaults() -> None:
    """`security:` or `trusted_proxies:` left empty (null) reads as the defaults."""
    config = load_config_text(
        MINIMAL + "server:\n  trusted_proxies:\nsecurity:\nfirewalld:\nlogging:\n"
    )
    assert config.server.trusted_proxies == ()
    assert config.security == SecurityConfig()
    assert config.firewalld == FirewalldConfig()


def test_api_keys_must_have_at_least_one_entry() -> None:
    """An empty api_keys list is refused."""
    assert error_of({"api_keys": []}).path == "api_keys"
    assert error_of({"api_keys": None}).path == "api_keys"


# --- types and ranges ----------------------------------------------------------------------

KEY_ENTRY = {"key": KEY, "max_ttl": 3600}

TYPE_ERRORS = [
    ({"server": {"trusted_proxies": "127.0.0.1"}}, "server.trusted_proxies", "list"),
    ({"server": {"trusted_proxies": ["127.0.0.999"]}}, "server.trusted_proxies[0]", "CIDR"),
    ({"server": {"trusted_proxies": [127]}}, "server.trusted_proxies[0]", "string"),
    ({"api_keys": "abc"}, "api_keys", "list"),
    ({"api_keys": ["abc"]}, "api_keys[0]", "mapping"),
    ({"api_keys": [{"key": KEY}]}, "api_keys[0].max_ttl", "required"),
    ({"api_keys": [{"max_ttl": 5}]}, "api_keys[0].key", "required"),
    ({"api_keys": [{**KEY_ENTRY, "max_ttl": "3600"}]}, "api_keys[0].max_ttl", "positive integer"),
    ({"api_keys": [{**KEY_ENTRY, "max_ttl": 1.5}]}, "api_keys[0].max_ttl", "positive integer"),
    ({"api_keys": [{**KEY_ENTRY, "max_ttl": 0}]}, "api_keys[0].max_ttl", "positive integer"),
    ({"api_keys": [{**KEY_ENTRY, "max_ttl": -5}]}, "api_keys[0].max_ttl", "positive integer"),
    ({"api_keys": [{**KEY_ENTRY, "max_ttl": 315360001}]}, "api_keys[0].max_ttl", "315360000"),
    (
        {"api_keys": [{**KEY_ENTRY, "allow_remote_whitelist": "true"}]},
        "api_keys[0].allow_remote_whitelist",
        "true or false",
    ),
    ({"api_keys": [{**KEY_ENTRY, "name": 1.5}]}, "api_keys[0].name", "string"),
    ({"api_keys": [{**KEY_ENTRY, "key": 1.5}]}, "api_keys[0].key", "string"),
    ({"api_keys": [{**KEY_ENTRY, "key": ["a"]}]}, "api_keys[0].key", "string"),
    ({"api_keys": [{**KEY_ENTRY, "key": 12345}]}, "api_keys[0].key", "string"),
    ({"security": []}, "security", "mapping"),
    ({"security": {"always_allowed_ips": ["nope"]}}, "security.always_allowed_ips[0]", "CIDR"),
    ({"security": {"excluded_paths": "/x"}}, "security.excluded_paths", "list"),
    ({"security": {"excluded_paths": ["health"]}}, "security.excluded_paths[0]", "'/'"),
    ({"security": {"excluded_paths": [""]}}, "security.excluded_paths[0]", "'/'"),
    ({"security": {"excluded_paths": [7]}}, "security.excluded_paths[0]", "string"),
    ({"security": {"excluded_paths": ["/a;b"]}}, "security.excluded_paths[0]", "never match"),
    ({"security": {"excluded_paths": ["/%zz"]}}, "security.excluded_paths[0]", "never match"),
    ({"security": {"max_whitelist_entries": 0}}, "security.max_whitelist_entries", "positive"),
    ({"security": {"max_whitelist_entries": "10"}}, "security.max_whitelist_entries", "positive"),
    (
        {"security": {"knock_rate_limit": {"window_seconds": 0}}},
        "security.knock_rate_limit.window_seconds",
        "positive",
    ),
    (
        {"security": {"knock_rate_limit": {"window_seconds": 60.0}}},
        "security.knock_rate_limit.window_seconds",
        "not a number with a fraction",
    ),
    (
        {"security": {"knock_rate_limit": {"successful_requests": -1}}},
        "security.knock_rate_limit.successful_requests",
        "0 means unlimited",
    ),
    (
        {"security": {"knock_rate_limit": {"failed_requests": -5}}},
        "security.knock_rate_limit.failed_requests",
        "0 means unlimited",
    ),
    ({"whitelist": {"storage_path": "wl.txt"}}, "whitelist.storage_path", ".json"),
    ({"whitelist": {"storage_path": ""}}, "whitelist.storage_path", "path"),
    ({"whitelist": {"storage_path": 5}}, "whitelist.storage_path", "string"),
    (
        {"whitelist": {"cleanup_interval_seconds": 0}},
        "whitelist.cleanup_interval_seconds",
        "positive",
    ),
    ({"cors": {"allowed_origin": 5}}, "cors.allowed_origin", "string"),
    ({"cors": {"allowed_origin": "*\r\nSet-Cookie: a=b"}}, "cors.allowed_origin", "line breaks"),
    ({"documentation": {"enabled": "yes"}}, "documentation.enabled", "true or false"),
    (
        {"documentation": {"openapi_output_path": 3}},
        "documentation.openapi_output_path",
        "string",
    ),
    ({"logging": {"level": "verbose"}}, "logging.level", "DEBUG"),
    ({"logging": {"level": 10}}, "logging.level", "DEBUG"),
    ({"web": {"enabled": 1}}, "web.enabled", "true or false"),
    ({"web": True}, "web", "mapping"),
]


@pytest.mark.parametrize(("sections", "path", "fragment"), TYPE_ERRORS)
def test_wrong_type_or_range_names_the_key_path(
    sections: dict[str, Any], path: str, fragment: str
) -> None:
    """Every wrong value is refused with its exact key path and a reason."""
    error = error_of(config_with(**sections))
    assert error.path == path
    assert fragment in error.message
    assert str(error).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("yaml_text", "path"),
    [
        ("api_keys:\n  - key: {key}\n    max_ttl: true\n", "api_keys[0].max_ttl"),
        (
            "security:\n  knock_rate_limit:\n    window_seconds: yes\n",
            "security.knock_rate_limit.window_seconds",
        ),
        ("security:\n  max_whitelist_entries: on\n", "security.max_whitelist_entries"),
        (
            "firewalld:\n  monitored_ports:\n    - port: on\n",
            "firewalld.monitored_ports[0].port",
        ),
        ("firewalld:\n  zone_priority: false\n", "firewalld.zone_priority"),
    ],
)
def test_booleans_are_not_integers(yaml_text: str, path: str) -> None:
    """true/yes/on are booleans to YAML and are refused where an integer is expected."""
    text = yaml_text.format(key=KEY)
    if not text.startswith("api_keys"):
        text = MINIMAL + text
    error = error_of(text)
    assert error.path == path
    assert "boolean" in error.message


@pytest.mark.parametrize(
    ("yaml_text", "path"),
    [
        ("cors:\n  allowed_origin: yes\n", "cors.allowed_origin"),
        ("logging:\n  level: on\n", "logging.level"),
        ("whitelist:\n  storage_path: no\n", "whitelist.storage_path"),
        ("firewalld:\n  zone_name: off\n", "firewalld.zone_name"),
    ],
)
def test_yes_no_on_off_are_not_strings(yaml_text: str, path: str) -> None:
    """An unquoted yes/no/on/off is a boolean to YAML and is refused where text is expected."""
    error = error_of(MINIMAL + yaml_text)
    assert error.path == path
    assert "boolean" in error.message


def test_unquoted_yes_as_api_key_or_name_is_refused() -> None:
    """`key: yes` would be the boolean True, so it is refused rather than turned into text."""
    error = error_of("api_keys:\n  - key: yes\n    max_ttl: 60\n")
    assert (error.path, "boolean" in error.message) == ("api_keys[0].key", True)
    error = error_of(MINIMAL + "    name: off\n")
    assert (error.path, "boolean" in error.message) == ("api_keys[0].name", True)


def test_yaml_booleans_are_accepted_for_boolean_settings() -> None:
    """yes/on are booleans, which is exactly what enabled-style settings want."""
    config = load_config_text(MINIMAL + "    allow_remote_whitelist: yes\nweb:\n  enabled: on\n")
    assert config.api_keys[0].allow_remote_whitelist is True
    assert config.web.enabled is True


# --- api keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("0123", "0123"),  # YAML 1.1 would read 83 (octal)
        ("00000000000000000000", "00000000000000000000"),
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("1_000", "1_000"),  # YAML 1.1 would read 1000
        ("'0123'", "0123"),
    ],
)
def test_unquoted_digit_key_is_kept_as_written(written: str, expected: str) -> None:
    """An all-digit key without quotes is the digits as written, leading zeros included."""
    config = load_config_text(f"api_keys:\n  - key: {written}\n    max_ttl: 60\n")
    assert config.api_keys[0].key == expected


def test_unquoted_digit_name_is_kept_as_written() -> None:
    """A numeric name without quotes is also taken as written."""
    config = load_config_text(MINIMAL + "    name: 007\n")
    assert config.api_keys[0].name == "007"


def test_default_names_come_from_position_not_key() -> None:
    """Keys without a name are labelled key-1, key-2... and the label never holds the key."""
    config = parse_config(
        {
            "api_keys": [
                {"key": "first-secret-value", "max_ttl": 60},
                {"key": "second-secret-value", "max_ttl": 60, "name": None},
                {"key": "third-secret-value", "max_ttl": 60, "name": ""},
            ]
        }
    )
    assert [k.name for k in config.api_keys] == ["key-1", "key-2", "key-3"]


@pytest.mark.parametrize(
    "key",
    [
        "CHANGE_ME_SUPER_SECRET_ADMIN_KEY",
        "my-change_me-key",
        "REPLACE_WITH_A_GENERATED_KEY",
        "prefix-Replace_With-suffix",
    ],
)
def test_placeholder_keys_are_refused_without_echoing_them(key: str) -> None:
    """Keys containing CHANGE_ME or REPLACE_WITH in any case must be replaced first."""
    error = error_of(config_with(api_keys=[{"key": key, "max_ttl": 60}]))
    assert error.path == "api_keys[0].key"
    assert "placeholder must be replaced" in error.message
    assert key not in str(error)


def test_duplicate_api_keys_are_refused_without_echoing_them() -> None:
    """The same key twice is refused; the message names both positions, never the key."""
    secret = "shared-secret-" + secrets.token_hex(8)
    error = error_of(
        {
            "api_keys": [
                {"key": "other-key-1234567890", "max_ttl": 60},
                {"key": secret, "max_ttl": 60},
                {"key": secret, "max_ttl": 120, "name": "copy"},
            ]
        }
    )
    assert error.path == "api_keys[2].key"
    assert "api_keys[1]" in error.message
    assert secret not in str(error)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("", "empty"),
        (" leading-space-key", "whitespace"),
        ("trailing-space-key ", "whitespace"),
        ("trailing-newline-key\n", "whitespace"),
        ("tab\tinside-key", "control"),
        ("nul\x00inside-key", "control"),
        ("del\x7finside-key", "control"),
    ],
)
def test_keys_an_http_header_cannot_carry_are_refused(key: str, fragment: str) -> None:
    """Empty keys, keys with outer whitespace or with control characters are refused."""
    error = error_of(config_with(api_keys=[{"key": key, "max_ttl": 60}]))
    assert error.path == "api_keys[0].key"
    assert fragment in error.message
    if key:
        assert key.strip() not in str(error)


def test_short_keys_are_still_accepted() -> None:
    """No minimum length: existing configs with short keys keep working."""
    assert load_config_text("api_keys:\n  - {key: abc, max_ttl: 60}\n").api_keys[0].key == "abc"


@pytest.mark.parametrize(
    "entry_yaml",
    [
        "  - key: {secret}\n    max_ttl: yes\n",
        "  - key: {secret}\n    max_ttl: 60\n    allow_remote_whitelist: 1\n",
        "  - key: {secret}\n    max_ttl: 60\n    {secret}: 1\n",
        "  - key: CHANGE_ME{secret}\n    max_ttl: 60\n",
        "  - key: {secret}\n    max_ttl: 60\n  - key: {secret}\n    max_ttl: 60\n",
        '  - key: {secret}\n    max_ttl: 60\n    name: "{secret}\\x01"\n',
    ],
)
def test_no_api_key_error_contains_the_secret(entry_yaml: str) -> None:
    """Whatever is wrong under api_keys, the message never contains the key text."""
    secret = "S3cr3t" + secrets.token_hex(12)
    error = error_of("api_keys:\n" + entry_yaml.format(secret=secret))
    assert error.path.startswith("api_keys[")
    assert secret not in str(error)


def test_typo_in_api_key_field_gets_a_hint() -> None:
    """A misspelt api key field is named with a did-you-mean hint."""
    error = error_of(config_with(api_keys=[{"key": KEY, "max_ttl": 60, "allow_remote": True}]))
    assert error.path == "api_keys[0].allow_remote"
    assert "did you mean 'allow_remote_whitelist'?" in error.message


# --- YAML quirks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "path", "lines"),
    [
        (MINIMAL + "api_keys: []\n", "api_keys", "lines 1 and 4"),
        (
            MINIMAL + "security:\n  max_whitelist_entries: 5\n  max_whitelist_entries: 6\n",
            "security.max_whitelist_entries",
            "lines 5 and 6",
        ),
        (
            MINIMAL + "  - key: abc\n    max_ttl: 1\n    max_ttl: 2\n",
            "api_keys[1].max_ttl",
            "5 and 6",
        ),
    ],
)
def test_duplicate_yaml_keys_are_refused_with_their_path(
    yaml_text: str, path: str, lines: str
) -> None:
    """A key written twice in one mapping is refused instead of keeping the last silently."""
    error = error_of(yaml_text)
    assert error.path == path
    assert lines in error.message


def test_duplicate_key_inside_api_key_is_refused_without_echoing_values() -> None:
    """Two `key:` lines in one entry are refused; neither value is printed."""
    first, second = "first-" + secrets.token_hex(8), "second-" + secrets.token_hex(8)
    error = error_of(f"api_keys:\n  - key: {first}\n    key: {second}\n    max_ttl: 60\n")
    assert error.path == "api_keys[0].key"
    assert first not in str(error)
    assert second not in str(error)


def test_yaml_merge_keys_are_not_duplicates() -> None:
    """`<<: *anchor` overriding is YAML's own mechanism and is accepted."""
    text = "api_keys:\n  - &d {key: one-key-1234, max_ttl: 60}\n  - <<: *d\n    key: two-key-1234\n"
    config = load_config_text(text)
    assert [k.key for k in config.api_keys] == ["one-key-1234", "two-key-1234"]
    assert config.api_keys[1].max_ttl == 60


def test_yaml_syntax_error_gives_position_but_not_content() -> None:
    """A broken line is reported by line and column without quoting it (it may hold a key)."""
    secret = "Zq" + secrets.token_hex(10)
    error = error_of(f"api_keys:\n  - key: {secret}: {secret}\n    max_ttl: 60\n")
    assert "line 2" in error.message
    assert "column" in error.message
    assert secret not in str(error)


def test_unknown_alias_or_tag_is_not_echoed() -> None:
    """An unquoted key starting with * or ! is a YAML alias/tag; the error hides its text."""
    secret = "Zq" + secrets.token_hex(10)
    for marker in ("*", "!"):
        error = error_of(f"api_keys:\n  - key: {marker}{secret}\n    max_ttl: 60\n")
        assert "line 2" in error.message
        assert secret not in str(error)
        assert error.__cause__ is None and error.__suppress_context__


@pytest.mark.parametrize("value", ["0b_", "0x_", "2024-02-30"])
def test_values_pyyaml_cannot_build_are_config_errors(value: str) -> None:
    """Scalars PyYAML resolves but cannot construct become a ConfigError with a line."""
    error = error_of(MINIMAL + f"web:\n  enabled: {value}\n")
    assert "line 5" in error.message


@pytest.mark.parametrize("char", ["\x00", "\x07"])
def test_characters_yaml_forbids_are_config_errors_without_content(char: str) -> None:
    """A NUL or bell character in the file is refused by line, without quoting the line."""
    secret = "Zq" + secrets.token_hex(10)
    error = error_of(MINIMAL + f"  - key: {secret}{char}\n    max_ttl: 60\n")
    assert "line 4" in error.message
    assert secret not in str(error)


def test_deeply_nested_yaml_is_a_config_error() -> None:
    """Pathological nesting is refused as a ConfigError, not a RecursionError."""
    assert "nested" in error_of("[" * 1000).message


def test_several_yaml_documents_are_refused() -> None:
    """A second `---` document is refused instead of being ignored."""
    assert "YAML" in error_of(MINIMAL + "---\n" + MINIMAL).message


# --- unknown and legacy keys ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "path", "hint"),
    [
        ({"securty": {}}, "securty", "security"),
        ({"security": {"excluded_path": []}}, "security.excluded_path", "excluded_paths"),
        (
            {"security": {"knock_rate_limit": {"window_second": 5}}},
            "security.knock_rate_limit.window_second",
            "window_seconds",
        ),
        ({"firewalld": {"zone_nmae": "x"}}, "firewalld.zone_nmae", "zone_name"),
        (
            {"firewalld": {"monitored_ports": [{"port": 22, "proto": "tcp"}]}},
            "firewalld.monitored_ports[0].proto",
            "protocol",
        ),
        ({"web": {"enable": True}}, "web.enable", "enabled"),
    ],
)
def test_unknown_key_is_refused_with_did_you_mean(
    sections: dict[str, Any], path: str, hint: str
) -> None:
    """A misspelt setting is refused, named, and the nearest real name suggested."""
    error = error_of(config_with(**sections))
    assert error.path == path
    assert f"did you mean '{hint}'?" in error.message


def test_unknown_key_without_close_match_lists_the_valid_names() -> None:
    """With no similar name, the message lists what the section accepts."""
    error = error_of(config_with(cors={"zzzz": 1}))
    assert error.path == "cors.zzzz"
    assert "allowed_origin" in error.message


def test_upstream_legacy_keys_are_accepted() -> None:
    """server.host, server.port and any logging.* setting from upstream still load."""
    config = load_config_text(
        MINIMAL
        + "server:\n  host: 0.0.0.0\n  port: 8000\n  trusted_proxies: ['172.29.238.0/24']\n"
        + "logging:\n  level: warning\n  format: '%(message)s'\n  handlers: {console: {}}\n"
    )
    assert config.logging.level == "WARNING"
    assert config.server.trusted_proxies == (net("172.29.238.0/24"),)


def test_legacy_allowance_does_not_extend_to_other_server_keys() -> None:
    """Only host and port are legacy under server; anything else unknown is refused."""
    assert error_of(config_with(server={"workers": 4})).path == "server.workers"


@pytest.mark.parametrize(("written", "stored"), [("debug", "DEBUG"), ("Error", "ERROR")])
def test_log_level_is_case_insensitive_and_stored_upper_case(written: str, stored: str) -> None:
    """logging.level accepts any case and is normalized to upper case."""
    assert parse_config(config_with(logging={"level": written})).logging.level == stored


# --- security.excluded_paths_by_host --------------------------------------------------------


def test_host_exclusions_null_means_empty() -> None:
    """`excluded_paths_by_host:` with nothing under it is an empty mapping."""
    config = load_config_text(MINIMAL + "security:\n  excluded_paths_by_host:\n")
    assert dict(config.security.excluded_paths_by_host) == {}


def test_host_exclusions_lower_case_hosts_and_allow_star() -> None:
    """Host names are lower-cased; "*" is a valid host key."""
    config = parse_config(
        config_with(
            security={
                "excluded_paths_by_host": {
                    "Files.Example.COM": ["/share"],
                    "*": ["/ok"],
                    "[2001:DB8::1]": ["/"],
                    "192.0.2.1": ["/caf\u00e9", "/.well-known/acme-challenge/"],
                }
            }
        )
    )
    assert dict(config.security.excluded_paths_by_host) == {
        "files.example.com": ("/share",),
        "*": ("/ok",),
        "[2001:db8::1]": ("/",),
        "192.0.2.1": ("/caf\u00e9", "/.well-known/acme-challenge/"),
    }


@pytest.mark.parametrize(
    ("hosts", "fragment"),
    [
        ({"": ["/x"]}, "host name"),
        ({"example.com/x": ["/x"]}, "host name"),
        ({"exa mple.com": ["/x"]}, "host name"),
        ({"a.example.com": ["x"]}, "'/'"),
        ({"example.com:8443": ["/x"]}, "without a port"),
        ({"caf\u00e9.example": ["/x"]}, "ASCII"),
        ({"a.example.com": ["/a/../admin"]}, "never match"),
        ({"a.example.com": "/x"}, "list"),
        ({"A.example.com": ["/x"], "a.example.com": ["/y"]}, "twice"),
        ({5: ["/x"]}, "strings"),
        (["a.example.com"], "mapping"),
    ],
)
def test_bad_host_exclusions_are_refused(hosts: object, fragment: str) -> None:
    """Hosts must be plain host names and values lists of '/'-prefixes."""
    error = error_of(config_with(security={"excluded_paths_by_host": hosts}))
    assert error.path.startswith("security.excluded_paths_by_host")
    assert fragment in error.message


# --- firewalld ------------------------------------------------------------------------------


def test_disabled_firewalld_section_is_only_type_checked() -> None:
    """With enabled false, out-of-range values load (upstream files keep working)."""
    config = parse_config(
        firewalld(
            enabled=False,
            zone_name="a:zone-name-longer-than-17",
            zone_priority=99999,
            zone_target="accept",
            default_action="allow",
            monitored_ports=[{"port": 70000, "protocol": "sctp"}],
            monitored_ips=["203.0.113.7"],
        )
    )
    assert config.firewalld.enabled is False
    assert config.firewalld.monitored_ports == (MonitoredPort(70000, "sctp"),)


@pytest.mark.parametrize(
    ("settings", "path"),
    [
        ({"enabled": "true"}, "firewalld.enabled"),
        ({"zone_name": 5}, "firewalld.zone_name"),
        ({"zone_priority": "-100"}, "firewalld.zone_priority"),
        ({"zone_target": True}, "firewalld.zone_target"),
        ({"default_action": ["drop"]}, "firewalld.default_action"),
        ({"monitored_ports": {"port": 22}}, "firewalld.monitored_ports"),
        ({"monitored_ports": [22]}, "firewalld.monitored_ports[0]"),
        ({"monitored_ports": [{"port": "22"}]}, "firewalld.monitored_ports[0].port"),
        ({"monitored_ports": [{"protocol": "tcp"}]}, "firewalld.monitored_ports[0].port"),
        (
            {"monitored_ports": [{"port": 22, "protocol": 6}]},
            "firewalld.monitored_ports[0].protocol",
        ),
        ({"monitored_ips": "203.0.113.0/24"}, "firewalld.monitored_ips"),
        ({"monitored_ips": ["not-an-ip"]}, "firewalld.monitored_ips[0]"),
    ],
)
def test_disabled_firewalld_section_is_still_type_checked(
    settings: dict[str, Any], path: str
) -> None:
    """With enabled false, a value of the wrong type is still refused with its path."""
    error = error_of(firewalld(**{"enabled": False, **settings}))
    assert error.path == path


@pytest.mark.parametrize(
    ("settings", "path"),
    [
        ({"zone_name": "a-zone-name-of-18c"}, "firewalld.zone_name"),
        ({"zone_name": "bad:name"}, "firewalld.zone_name"),
        ({"zone_name": ""}, "firewalld.zone_name"),
        ({"zone_priority": 32768}, "firewalld.zone_priority"),
        ({"zone_priority": -32769}, "firewalld.zone_priority"),
        ({"zone_target": "accept"}, "firewalld.zone_target"),
        ({"zone_target": "%%REJECT%%"}, "firewalld.zone_target"),
        ({"default_action": "allow"}, "firewalld.default_action"),
        ({"monitored_ports": [{"port": 0}]}, "firewalld.monitored_ports[0].port"),
        ({"monitored_ports": [{"port": 65536}]}, "firewalld.monitored_ports[0].port"),
        (
            {"monitored_ports": [{"port": 22, "protocol": "TCP"}]},
            "firewalld.monitored_ports[0].protocol",
        ),
        ({"monitored_ports": []}, "firewalld.monitored_ports"),
        ({"monitored_ips": []}, "firewalld.monitored_ips"),
        ({"monitored_ips": None}, "firewalld.monitored_ips"),
    ],
)
def test_enabled_firewalld_section_is_fully_validated(settings: dict[str, Any], path: str) -> None:
    """With enabled true, ranges, choices and the required lists are enforced."""
    error = error_of(firewalld(**{**ENABLED_FIREWALLD, **settings}))
    assert error.path == path


def test_enabled_firewalld_accepts_every_documented_value() -> None:
    """All zone targets, both actions, both protocols and a 17-character zone name load."""
    for target in ("default", "ACCEPT", "REJECT", "DROP"):
        for action in ("drop", "reject"):
            config = parse_config(
                firewalld(
                    **ENABLED_FIREWALLD,
                    zone_name="A.b_c-0123456789z",
                    zone_target=target,
                    default_action=action,
                    zone_priority=-32768,
                )
            )
            assert (config.firewalld.zone_target, config.firewalld.default_action) == (
                target,
                action,
            )
    config = parse_config(
        firewalld(**{**ENABLED_FIREWALLD, "monitored_ports": [{"port": 27015, "protocol": "udp"}]})
    )
    assert config.firewalld.monitored_ports == (MonitoredPort(27015, "udp"),)


def test_monitored_port_protocol_defaults_to_tcp() -> None:
    """A monitored port without protocol is tcp."""
    config = parse_config(firewalld(**{**ENABLED_FIREWALLD, "monitored_ports": [{"port": 22}]}))
    assert config.firewalld.monitored_ports == (MonitoredPort(22, "tcp"),)


def test_zone_priority_null_differs_from_absent() -> None:
    """Absent zone_priority is -100; an explicit null is None (skip priority on old firewalld)."""
    absent = load_config_text(MINIMAL + "firewalld:\n  enabled: false\n")
    explicit_null = load_config_text(MINIMAL + "firewalld:\n  zone_priority: null\n")
    tilde = load_config_text(MINIMAL + "firewalld:\n  zone_priority: ~\n")
    given = load_config_text(MINIMAL + "firewalld:\n  zone_priority: 5\n")
    assert absent.firewalld.zone_priority == -100
    assert explicit_null.firewalld.zone_priority is None
    assert tilde.firewalld.zone_priority is None
    assert given.firewalld.zone_priority == 5


def test_monitored_ips_need_an_explicit_mask_when_enabled() -> None:
    """A bare address in monitored_ips is refused with a hint; with /32 or /128 it loads."""
    error = error_of(firewalld(**{**ENABLED_FIREWALLD, "monitored_ips": ["203.0.113.7"]}))
    assert error.path == "firewalld.monitored_ips[0]"
    assert "mask" in error.message
    error = error_of(firewalld(**{**ENABLED_FIREWALLD, "monitored_ips": ["2001:db8::1"]}))
    assert "mask" in error.message
    config = parse_config(
        firewalld(**{**ENABLED_FIREWALLD, "monitored_ips": ["203.0.113.7/32", "2001:db8::1/128"]})
    )
    assert config.firewalld.monitored_ips == (
        net("203.0.113.7/32"),
        net("2001:db8::1/128"),
    )


def test_repeated_monitored_ports_and_networks_are_listed_once() -> None:
    """The same port or network twice is kept once (firewalld would refuse the second)."""
    config = parse_config(
        firewalld(
            enabled=True,
            monitored_ports=[{"port": 22}, {"port": 22, "protocol": "tcp"}],
            monitored_ips=["10.0.0.0/8", "10.1.2.3/8"],
        )
    )
    assert config.firewalld.monitored_ports == (MonitoredPort(22, "tcp"),)
    assert config.firewalld.monitored_ips == (net("10.0.0.0/8"),)


# --- immutability and secrecy ---------------------------------------------------------------


def test_config_tree_is_frozen() -> None:
    """Assigning to any level of the Config raises; the host mapping is read-only."""
    config = parse_config(config_with(security={"excluded_paths_by_host": {"a": ["/x"]}}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.web = config.web  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.api_keys[0].max_ttl = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.security.knock_rate_limit.window_seconds = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.security.excluded_paths_by_host["b"] = ("/y",)  # type: ignore[index]
    assert isinstance(config.api_keys, tuple)
    assert isinstance(config.security.excluded_paths, tuple)


def test_security_config_built_by_hand_freezes_its_host_mapping() -> None:
    """A dict handed to SecurityConfig is wrapped read-only, and the Config stays hashable."""
    hosts = {"a": ("/x",)}
    security = SecurityConfig(excluded_paths_by_host=hosts)
    hosts["b"] = ("/y",)
    assert dict(security.excluded_paths_by_host) == {"a": ("/x",)}
    assert hash(Config(security=security)) == hash(Config(security=SecurityConfig()))


def test_repr_never_contains_the_key() -> None:
    """repr/str of ApiKey and of the whole Config leave the key text out."""
    secret = "Rr" + secrets.token_hex(16)
    config = parse_config({"api_keys": [{"name": "phone", "key": secret, "max_ttl": 60}]})
    assert secret not in repr(config.api_keys[0])
    assert secret not in repr(config)
    assert secret not in str(config)
    assert "phone" in repr(config.api_keys[0])


# --- the example file -----------------------------------------------------------------------


def test_example_file_is_refused_until_its_placeholders_are_replaced() -> None:
    """knocker.yaml.example as shipped stops with a placeholder message naming api_keys[0]."""
    error = error_of(EXAMPLE.read_text(encoding="utf-8"))
    assert error.path == "api_keys[0].key"
    assert "placeholder" in error.message


def test_example_file_loads_once_a_generated_key_is_substituted() -> None:
    """Replacing the placeholder text with a random key gives a valid config."""
    key = secrets.token_urlsafe(32)
    text = EXAMPLE.read_text(encoding="utf-8").replace("REPLACE_WITH_A_GENERATED_KEY", key)
    config = load_config_text(text)
    assert len(config.api_keys) == 2
    admin, normal = config.api_keys
    assert admin.allow_remote_whitelist is True and normal.allow_remote_whitelist is False
    assert admin.key.startswith(key) and normal.key.startswith(key)
    assert admin.key != normal.key
    # nothing trusted: `make run` prints a curl line that knocks from this very machine
    assert config.server.trusted_proxies == ()
    assert config.whitelist.storage_path == "whitelist.json"
    # Its firewalld values must also survive full validation once enabled.
    enabled = text.replace("  enabled: false  # Default: false.", "  enabled: true")
    assert load_config_text(enabled).firewalld.enabled is True


def test_example_file_documents_every_setting() -> None:
    """Every dataclass field, and the legacy host/port, appears in the example as `name:`."""
    text = EXAMPLE.read_text(encoding="utf-8")
    names = {"host", "port"}
    pending: list[Any] = [Config, ApiKey, MonitoredPort]
    while pending:
        cls = pending.pop()
        for name, hint in typing.get_type_hints(cls).items():
            names.add(name)
            if dataclasses.is_dataclass(hint):
                pending.append(hint)
    assert len(names) > 30
    assert sorted(name for name in names if f"{name}:" not in text) == []


# --- module rules ---------------------------------------------------------------------------


def test_config_module_imports_only_stdlib_yaml_and_core() -> None:
    """knocker.config stays pure: only core knocker modules, no os/time/io imports."""
    tree = ast.parse((REPO / "knocker" / "config.py").read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    forbidden = {"os", "sys", "time", "io", "pathlib", "socket", "subprocess", "logging"}
    assert not imported & forbidden
    knocker_modules = {name for name in imported if name.startswith("knocker")}
    assert knocker_modules <= {"knocker.errors", "knocker.addresses", "knocker.proxies"}


# --- whitelist.backend and redis (docs/redis.md#configuration) ------------------------------


def test_backend_defaults_to_file_and_redis_section_is_optional() -> None:
    """Without a backend setting the whitelist stays in files; no redis section needed."""
    config = parse_config(config_with())
    assert config.whitelist.backend == "file"
    assert config.redis.url == ""


def test_redis_backend_requires_the_redis_url() -> None:
    """backend: redis without redis.url names the missing key."""
    error = error_of(config_with(whitelist={"backend": "redis"}))
    assert error.path == "redis.url"


def test_unknown_backend_is_refused_by_name() -> None:
    """backend: memcached is refused at whitelist.backend."""
    error = error_of(config_with(whitelist={"backend": "memcached"}))
    assert error.path == "whitelist.backend"


def test_redis_url_with_credentials_is_refused_without_echoing_them() -> None:
    """A password in the URL would be logged: refused, and not repeated in the message."""
    error = error_of(
        config_with(
            whitelist={"backend": "redis"}, redis={"url": "redis://knocker:s3cret-pw@db:6379/0"}
        )
    )
    assert error.path == "redis.url"
    assert "s3cret-pw" not in str(error)


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://db.example:6380/1", "unix:///run/redis/redis.sock"],
)
def test_redis_url_schemes_tcp_tls_and_unix_are_accepted(url: str) -> None:
    """redis://, rediss:// and unix:// URLs load with the documented defaults."""
    config = parse_config(config_with(whitelist={"backend": "redis"}, redis={"url": url}))
    assert config.redis.url == url
    assert config.redis.key_prefix == "knocker:"
    assert config.redis.max_staleness_seconds == 300


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("url", "http://db:6379"),
        ("command_timeout_ms", 0),
        ("connect_timeout_ms", True),
        ("max_staleness_seconds", -1),
        ("password_env", "not a name"),
        ("key_prefix", "a\nb"),
        ("tls_ca_file", "/etc/ssl/private-ca.crt"),
    ],
)
def test_bad_redis_settings_name_their_key(setting: str, value: object) -> None:
    """Each invalid redis setting is refused at redis.<setting>."""
    section = {"url": "redis://127.0.0.1:6379/0", setting: value}
    error = error_of(config_with(whitelist={"backend": "redis"}, redis=section))
    assert error.path == f"redis.{setting}"


def test_redis_password_from_file_and_environment_are_exclusive() -> None:
    """password_file and password_env together are refused (which one would win?)."""
    error = error_of(
        config_with(
            whitelist={"backend": "redis"},
            redis={"url": "redis://db", "password_file": "/run/secrets/pw", "password_env": "PW"},
        )
    )
    assert error.path == "redis.password_env"


def test_upstream_config_with_a_huge_rate_limit_budget_loads() -> None:
    """successful_requests: 1000000000 is valid upstream, so it loads here too (the shared
    table's size is capped by the rate limiter, not by the budget)."""
    config = load_config_text("""
api_keys:
  - key: test-key-9f8e7d6c5b4a
    max_ttl: 3600
security:
  knock_rate_limit:
    successful_requests: 1000000000
    failed_requests: 1000000000
""")
    assert config.security.knock_rate_limit.successful_requests == 1_000_000_000


# --- port-scoped keys (docs/api.md#scoped-keys) ----------------------------------------

PORT_SCOPED_FIREWALLD = {
    "enabled": True,
    "monitored_ips": ["192.0.2.0/24"],
    "monitored_ports": [{"port": 22}, {"port": 53, "protocol": "udp"}],
}


def with_key_ports(ports: object) -> dict[str, Any]:
    return {
        "api_keys": [
            {"key": KEY, "max_ttl": 60},
            {"name": "ssh", "key": KEY[::-1], "max_ttl": 60, "ports": ports},
        ],
        "firewalld": PORT_SCOPED_FIREWALLD,
    }


def test_key_ports_accept_the_spellings_of_monitored_ports() -> None:
    """22, "22", "22/tcp", "53/udp" and a {port, protocol} mapping name monitored ports;
    repeats collapse; a key with ports: is scoped."""
    config = parse_config(with_key_ports([22, "22/tcp", "53/udp", {"port": 22}, "53-53/udp"]))
    key = config.api_keys[1]
    assert key.ports == (MonitoredPort(22, "tcp"), MonitoredPort(53, "udp"))
    assert key.scoped and not key.hosts and not config.api_keys[0].scoped
    assert [str(port) for port in key.ports] == ["22/tcp", "53/udp"]


@pytest.mark.parametrize(
    ("ports", "path", "fragment"),
    [
        (["2222"], "api_keys[1].ports[0]", "2222/tcp is not one of firewalld.monitored_ports"),
        (["22", "22/udp"], "api_keys[1].ports[1]", "22/udp is not one of"),
        (["60000-60100/udp"], "api_keys[1].ports[0]", "single monitored port"),
        (["ssh"], "api_keys[1].ports[0]", "must be a port like 22"),
        (["22/sctp"], "api_keys[1].ports[0]", "must be a port like 22"),
        ([True], "api_keys[1].ports[0]", "must be a port like 22"),
        ([], "api_keys[1].ports", "at least one port"),
        ("22", "api_keys[1].ports", "must be a list"),
    ],
)
def test_key_ports_outside_monitored_ports_are_config_errors_naming_the_key(
    ports: object, path: str, fragment: str
) -> None:
    error = error_of(with_key_ports(ports))
    assert error.path == path
    assert fragment in str(error)


def test_key_ports_need_firewalld_monitored_ports() -> None:
    """Without monitored ports (no firewalld section) a port scope opens nothing: refused."""
    mapping = with_key_ports(["22"])
    del mapping["firewalld"]
    assert "is not one of firewalld.monitored_ports (none)" in str(error_of(mapping))


def test_port_scoped_key_is_accepted_with_the_redis_backend() -> None:
    """The redis backend keeps port scopes like the file backend (docs/redis.md#keys):
    the key loads with its ports; an unmonitored port is still refused, naming it."""
    text = """
api_keys:
  - name: ssh-only
    key: port-scoped-key-0123456789abcdef
    max_ttl: 600
    ports: [PORTS]
whitelist:
  backend: redis
redis:
  url: redis://127.0.0.1:6379/0
firewalld:
  enabled: true
  monitored_ports: [{port: 22, protocol: tcp}]
  monitored_ips: ["0.0.0.0/0"]
"""
    config = load_config_text(text.replace("PORTS", '"22/tcp"'))
    assert config.whitelist.backend == "redis"
    assert [str(port) for port in config.api_keys[0].ports] == ["22/tcp"]
    with pytest.raises(ConfigError) as raised:
        load_config_text(text.replace("PORTS", '"2222/tcp"'))
    assert "api_keys[0].ports[0]" in str(raised.value)
