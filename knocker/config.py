"""knocker.yaml text -> one validated, immutable Config; the only module that knows the layout.

Owns: every rule about what the file may say (docs/configuration.md, the firewalld keys
in docs/firewalld.md#configuration), the defaults, and the YAML quirks we refuse. Pure
core: no file I/O, no clock, no environment. app.py finds and reads the file (config_path,
load_config_file) for both `knocker serve`/`check-config` and gunicorn's create_app();
checks that need the filesystem, like the whitelist directory, happen when the store opens.
Imports only stdlib, yaml and the pure knocker.errors/addresses/proxies.
Nothing under api_keys is ever echoed in a message: any of it could be a secret.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

import yaml
import yaml.constructor
import yaml.nodes
import yaml.reader

from knocker.addresses import IPNetwork, parse_network
from knocker.errors import ConfigError

# Pure core like us: the matcher's own normalizers decide which host keys and prefixes
# can ever match, so the config refuses exactly what Exclusions would refuse later.
from knocker.proxies import normalize_host_key, normalize_prefix

DEFAULT_CONFIG_NAME = "knocker.yaml"
ENV_CONFIG_PATH = "KNOCKER_CONFIG_PATH"

MAX_TTL = 315_360_000  # seconds, ten years, the upstream ceiling: the one definition
# Any budget upstream accepts; the shared table's size is capped by knocker.ratelimit,
# which counts budgets above its EXACT_MAX in batches.
MAX_RATE_LIMIT_REQUESTS = 2**62
ZONE_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,17}")  # firewalld refuses longer zone names
ZONE_TARGETS = ("default", "ACCEPT", "REJECT", "DROP")
DEFAULT_ACTIONS = ("drop", "reject")
PROTOCOLS = ("tcp", "udp")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PLACEHOLDER_MARKERS = ("CHANGE_ME", "REPLACE_WITH")


# ---------------------------------------------------------------------------------------
# The validated tree. Defaults live here only; parse_config passes just what the file says.


@dataclass(frozen=True)
class ServerConfig:
    trusted_proxies: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class MonitoredPort:
    port: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"  # how a key's `ports:` and the API spell it


@dataclass(frozen=True)
class ApiKey:
    name: str
    key: str = field(repr=False)  # a secret: kept out of repr, logs and error messages
    max_ttl: int
    allow_remote_whitelist: bool = False
    admin: bool = False  # may list and revoke every grant (docs/api.md#grants)
    # A host scope (docs/api.md#scoped-keys): empty = every host, as upstream.
    hosts: tuple[str, ...] = ()  # lower-case names; "*.example.com" = any subdomain
    # A port scope: empty = every monitored port; else a subset of monitored_ports.
    ports: tuple[MonitoredPort, ...] = ()

    @property
    def scoped(self) -> bool:
        """Its grants live in the grants sidecar only (docs/whitelist.md#grants)."""
        return bool(self.hosts or self.ports)


@dataclass(frozen=True)
class RateLimitConfig:
    window_seconds: int = 60
    successful_requests: int = 20  # 0 = unlimited
    failed_requests: int = 30  # 0 = unlimited


def _no_hosts() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({})


@dataclass(frozen=True)
class SecurityConfig:
    always_allowed_ips: tuple[IPNetwork, ...] = ()
    excluded_paths: tuple[str, ...] = ()
    # host (lower-case, "*" allowed) -> path prefixes; hash=False keeps the tree hashable.
    excluded_paths_by_host: Mapping[str, tuple[str, ...]] = field(
        default_factory=_no_hosts, hash=False
    )
    max_whitelist_entries: int = 10_000
    knock_rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)

    def __post_init__(self) -> None:
        # A plain dict handed in by a caller would stay mutable behind a frozen object.
        if not isinstance(self.excluded_paths_by_host, MappingProxyType):
            frozen = MappingProxyType(dict(self.excluded_paths_by_host))
            object.__setattr__(self, "excluded_paths_by_host", frozen)


@dataclass(frozen=True)
class WhitelistConfig:
    storage_path: str = "whitelist.json"  # relative to the working directory
    cleanup_interval_seconds: int = 60
    backend: str = "file"  # "file" | "redis" (docs/redis.md)


@dataclass(frozen=True)
class RedisConfig:
    """docs/redis.md#configuration. The password itself is read when the store opens
    (from password_file or the environment variable password_env), never kept here."""

    url: str = ""
    username: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    key_prefix: str = "knocker:"
    tls_ca_file: str | None = None  # rediss:// only; None: the system's CAs
    connect_timeout_ms: int = 2000
    command_timeout_ms: int = 2000
    max_staleness_seconds: int = 300


@dataclass(frozen=True)
class CorsConfig:
    allowed_origin: str = "*"


@dataclass(frozen=True)
class DocumentationConfig:
    enabled: bool = False
    openapi_output_path: str = "openapi.json"


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class FirewalldConfig:
    # While enabled is false the values are only type-checked, so they may be outside the
    # ranges below; nothing reads them then (docs/configuration.md#firewalld).
    enabled: bool = False
    zone_name: str = "knocker"
    zone_priority: int | None = -100  # None only when the file says `zone_priority: null`
    zone_target: str | None = None
    default_action: str = "drop"
    monitored_ports: tuple[MonitoredPort, ...] = ()
    monitored_ips: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = False


@dataclass(frozen=True)
class AuditConfig:
    path: str | None = None  # None: audit lines go to the log only


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    allow: tuple[IPNetwork, ...] = ()  # clients (after trusted proxies) that may scrape


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    api_keys: tuple[ApiKey, ...] = ()
    security: SecurityConfig = field(default_factory=SecurityConfig)
    whitelist: WhitelistConfig = field(default_factory=WhitelistConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    documentation: DocumentationConfig = field(default_factory=DocumentationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    firewalld: FirewalldConfig = field(default_factory=FirewalldConfig)
    web: WebConfig = field(default_factory=WebConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)


# ---------------------------------------------------------------------------------------
# YAML: SafeLoader minus the quirks that silently change what the user wrote.


class _SourceInt(int):
    """An integer read from YAML that remembers its text: `key: 0123` means "0123", not 83."""

    source: str

    def __new__(cls, value: int, source: str) -> _SourceInt:
        self = super().__new__(cls, value)
        self.source = source
        return self


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML keeps the last one without a word)."""

    def construct_document(self, node: yaml.nodes.Node) -> Any:
        _refuse_duplicate_keys(self, node, "", set())
        return super().construct_document(node)

    def construct_object(self, node: yaml.nodes.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, AttributeError, KeyError, TypeError, OverflowError):
            # PyYAML lets int("", 2) for `0b_` or date(2024, 2, 30) escape as ValueError,
            # `!!timestamp notatime` as AttributeError and `!!bool maybe` as KeyError;
            # give them a position like every other YAML error.
            raise yaml.constructor.ConstructorError(
                None, None, "a value that cannot be read", node.start_mark
            ) from None


def _construct_int(loader: yaml.SafeLoader, node: yaml.nodes.ScalarNode) -> int:
    return _SourceInt(loader.construct_yaml_int(node), str(node.value))


StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _refuse_duplicate_keys(
    loader: StrictLoader, node: yaml.nodes.Node, path: str, seen: set[int]
) -> None:
    if id(node) in seen:  # an alias: its node was checked where the anchor stands
        return
    seen.add(id(node))
    if isinstance(node, yaml.nodes.MappingNode):
        first_line: dict[object, int] = {}
        for key_node, value_node in node.value:
            child = path
            # `<<` merges are YAML's own override mechanism, not a duplicate.
            if isinstance(key_node, yaml.nodes.ScalarNode) and key_node.tag != _MERGE_TAG:
                # Compare constructed keys: `yes:` and `true:` are the same key to YAML.
                key = loader.construct_object(key_node)
                child = _join(path, key if isinstance(key, str) else repr(key))
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise ConfigError(
                        child,
                        f"appears twice (lines {first_line[key]} and {line}); "
                        "YAML would silently keep only the last one",
                    )
                first_line[key] = line
            _refuse_duplicate_keys(loader, value_node, child, seen)
    elif isinstance(node, yaml.nodes.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(loader, item, f"{path}[{index}]", seen)


# Quoted fragments in PyYAML messages can be file content (an alias or tag could be a
# secret written unquoted); keep only token names like '<block end>' and single characters.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_HARMLESS_QUOTED = re.compile(r"'<[a-z ]+>'|'.{1,2}'|\".{1,2}\"")


def _redact(problem: str) -> str:
    def keep_or_hide(match: re.Match[str]) -> str:
        text = match.group(0)
        return text if _HARMLESS_QUOTED.fullmatch(text) else "'...'"

    return _QUOTED.sub(keep_or_hide, problem)


def _yaml_error_message(error: yaml.YAMLError, text: str) -> str:
    # str(error) quotes the offending line; a secret may be on it, so build our own.
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = _redact(error.problem or error.context or "syntax error")
        if mark is None:
            return f"not valid YAML: {problem}"
        return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, max(error.position, 0)) + 1
        return f"not valid YAML at line {line}: a character YAML does not allow"
    return "not valid YAML"


def load_config_text(text: str) -> Config:
    """Parse and validate knocker.yaml's text; ConfigError names the key path or YAML line."""
    loader: StrictLoader | None = None
    try:
        loader = StrictLoader(text)  # already reads the text: refuses NUL and the like
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        # `from None`: a chained traceback would print PyYAML's own message and snippet.
        raise ConfigError("", _yaml_error_message(error, text)) from None
    except RecursionError:
        raise ConfigError("", "not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return parse_config(data)


# ---------------------------------------------------------------------------------------
# Validation helpers. Each raises ConfigError(path, message) at the first problem.

_BOOL_HINT = " (YAML reads unquoted true/false/yes/no/on/off as booleans)"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(value: object) -> str:
    """The kind of a value, never the value itself (it could be a secret)."""
    if isinstance(value, bool):
        return "a boolean" + _BOOL_HINT
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "empty (null)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"


def _show(value: str) -> str:
    """A non-secret value quoted for a message, cut short."""
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _fail(path: str, message: str) -> NoReturn:
    raise ConfigError(path, message)


def _section(
    raw: object,
    path: str,
    known: tuple[str, ...],
    *,
    legacy: tuple[str, ...] = (),
    ignore_unknown: bool = False,
    secret: bool = False,
) -> dict[str, object]:
    """The known settings of a mapping (null = empty); unknown names are errors with a hint.

    secret: an unknown name is shown only when it looks like a typo of a known one,
    since under api_keys a stray name could be a key pasted on the wrong side of a colon.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        _fail(path, f"must be a mapping of settings, not {_describe(raw)}")
    settings: dict[str, object] = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            _fail(path, f"setting names must be strings, found {_describe(name)}")
        if name in known:
            settings[name] = value
            continue
        if name in legacy or ignore_unknown:
            continue  # upstream settings with no meaning here; accepted for compatibility
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            _fail(_join(path, name), f"unknown setting; did you mean '{close[0]}'?")
        expected = ", ".join(known)
        if secret:
            _fail(
                path, f"unknown setting (name not shown, it may be a secret); expected {expected}"
            )
        _fail(_join(path, name), f"unknown setting; expected one of: {expected}")
    return settings


def _list(raw: object, path: str, what: str) -> list[object]:
    # A key whose items are all commented out reads as null: treat it as an empty list.
    if raw is None:
        return []
    if isinstance(raw, str | bytes) or not isinstance(raw, list | tuple):
        _fail(path, f"must be a list of {what}, not {_describe(raw)}")
    return list(raw)


def _int(raw: object, path: str, rule: str, low: int | None = None, high: int | None = None) -> int:
    """An integer (never a boolean: True is an int to Python) within [low, high] if given."""
    if isinstance(raw, bool) or not isinstance(raw, int):
        _fail(path, f"must be {rule}, not {_describe(raw)}")
    value = int(raw)  # drop _SourceInt
    if (low is not None and value < low) or (high is not None and value > high):
        _fail(path, f"must be {rule}; got {value}")
    return value


def _bool(raw: object, path: str) -> bool:
    if not isinstance(raw, bool):
        hint = " (write true or false without quotes)" if isinstance(raw, str) else ""
        _fail(path, f"must be true or false, not {_describe(raw)}{hint}")
    return raw


def _str(raw: object, path: str, rule: str = "a string") -> str:
    if not isinstance(raw, str):
        hint = "; put it in quotes" if isinstance(raw, int | float) else ""
        _fail(path, f"must be {rule}, not {_describe(raw)}{hint}")
    return raw


def _has_control(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def _networks(raw: object, path: str, *, require_mask: bool = False) -> tuple[IPNetwork, ...]:
    what = "CIDR networks with a mask" if require_mask else "IP addresses or CIDR networks"
    networks: list[IPNetwork] = []
    for index, item in enumerate(_list(raw, path, what)):
        item_path = f"{path}[{index}]"
        text = _str(item, item_path, "an IP address or CIDR network string")
        network = parse_network(text, require_mask=require_mask)
        if network is None:
            if require_mask and parse_network(text) is not None:
                _fail(
                    item_path,
                    f"needs an explicit mask such as '/32' or '/128', got {_show(text)}",
                )
            _fail(item_path, f"is not an IP address or CIDR network: {_show(text)}")
        networks.append(network)
    return tuple(networks)


def _path_prefixes(raw: object, path: str) -> tuple[str, ...]:
    prefixes: list[str] = []
    for index, item in enumerate(_list(raw, path, "path prefixes")):
        item_path = f"{path}[{index}]"
        prefix = _str(item, item_path, "a path prefix string")
        if not prefix.startswith("/"):
            _fail(item_path, f"must start with '/', got {_show(prefix)}")
        if normalize_prefix(prefix) is None:
            _fail(
                item_path,
                f"can never match a request path ('..', ';', a control character or a bad "
                f"%-escape), got {_show(prefix)}",
            )
        prefixes.append(prefix)
    return tuple(prefixes)


def _file_path(raw: object, path: str, suffix: str = "") -> str:
    text = _str(raw, path, "a file path string")
    if not text or "\x00" in text:
        _fail(path, "must be a file path")
    if suffix and not text.endswith(suffix):
        _fail(path, f"must be a file name ending in '{suffix}', got {_show(text)}")
    return text


# ---------------------------------------------------------------------------------------
# Sections, in file order.

_TOP = (
    "server",
    "api_keys",
    "security",
    "whitelist",
    "cors",
    "documentation",
    "logging",
    "firewalld",
    "web",
    "audit",
    "metrics",
    "redis",
)


# Accepted (upstream accepts them, and every upstream config must load), but said aloud.
WIDE_PROXY_PREFIX = {4: 16, 6: 64}  # trusting more than a /16 or a /64 is rarely meant
SHORT_KEY = 16  # characters; `knocker gen-key` makes 43


def config_warnings(config: Config) -> list[str]:
    """What a valid config allows but an operator rarely means (never a key's text)."""
    warnings = [
        f"server.trusted_proxies: {network} is wider than a /{WIDE_PROXY_PREFIX[network.version]}"
        ": every address in it may set X-Forwarded-For and whitelist any IP"
        for network in config.server.trusted_proxies
        if network.prefixlen < WIDE_PROXY_PREFIX[network.version]
    ]
    warnings += [
        f"api_keys[{index}] ({key.name}): shorter than {SHORT_KEY} characters, so easy to "
        "guess; `knocker gen-key` makes a 256-bit one"
        for index, key in enumerate(config.api_keys)
        if len(key.key) < SHORT_KEY
    ]
    return warnings


def parse_config(mapping: object) -> Config:
    """Validate the YAML document (a mapping) into a Config; ConfigError names the key path."""
    if mapping is None:
        _fail("api_keys", "is required, but the configuration is empty")
    if not isinstance(mapping, Mapping):
        _fail("", f"the configuration must be a mapping of sections, not {_describe(mapping)}")
    top = _section(mapping, "", _TOP)
    # A section left empty (`security:` with everything commented out) reads as null,
    # which each parser takes as "all defaults".
    config = Config(
        server=_server(top.get("server")),
        api_keys=_api_keys(top.get("api_keys")),
        security=_security(top.get("security")),
        whitelist=_whitelist(top.get("whitelist")),
        cors=_cors(top.get("cors")),
        documentation=_documentation(top.get("documentation")),
        logging=_logging(top.get("logging")),
        firewalld=_firewalld(top.get("firewalld")),
        web=_web(top.get("web")),
        audit=_audit(top.get("audit")),
        metrics=_metrics(top.get("metrics")),
        redis=_redis(top.get("redis"), whitelist_backend(top.get("whitelist"))),
    )
    _check_port_scopes(config.api_keys, config.firewalld.monitored_ports)
    return config


def _server(raw: object) -> ServerConfig:
    # host/port belong to the upstream uvicorn launcher; `knocker serve --bind` replaces them.
    settings = _section(raw, "server", ("trusted_proxies",), legacy=("host", "port"))
    if "trusted_proxies" not in settings:
        return ServerConfig()
    return ServerConfig(_networks(settings["trusted_proxies"], "server.trusted_proxies"))


def _api_keys(raw: object) -> tuple[ApiKey, ...]:
    entries = _list(raw, "api_keys", "keys")
    if not entries:
        _fail("api_keys", "is required: list at least one key (see knocker gen-key)")
    keys: list[ApiKey] = []
    first_index: dict[str, int] = {}
    for index, entry in enumerate(entries):
        api_key = _api_key(entry, index)
        if api_key.key in first_index:
            _fail(
                f"api_keys[{index}].key",
                f"is the same key as api_keys[{first_index[api_key.key]}].key; keys must be unique",
            )
        first_index[api_key.key] = index
        keys.append(api_key)
    return tuple(keys)


_API_KEY_FIELDS = ("name", "key", "max_ttl", "allow_remote_whitelist", "admin", "hosts", "ports")


def _api_key(raw: object, index: int) -> ApiKey:
    path = f"api_keys[{index}]"
    if not isinstance(raw, Mapping):
        _fail(path, f"must be a mapping with key and max_ttl, not {_describe(raw)}")
    settings = _section(raw, path, _API_KEY_FIELDS, secret=True)
    key = _secret(settings.get("key"), f"{path}.key")
    name = _key_name(settings.get("name"), f"{path}.name", index)
    if "max_ttl" not in settings:
        _fail(f"{path}.max_ttl", "is required: the longest grant in seconds")
    max_ttl = _int(
        settings["max_ttl"],
        f"{path}.max_ttl",
        f"a positive integer (at most {MAX_TTL})",
        1,
        MAX_TTL,
    )
    remote = _bool(settings.get("allow_remote_whitelist", False), f"{path}.allow_remote_whitelist")
    admin = _bool(settings.get("admin", False), f"{path}.admin")
    hosts = _scope_hosts(settings.get("hosts"), f"{path}.hosts")
    ports = _scope_ports(settings.get("ports"), f"{path}.ports")
    return ApiKey(
        name=name,
        key=key,
        max_ttl=max_ttl,
        allow_remote_whitelist=remote,
        admin=admin,
        hosts=hosts,
        ports=ports,
    )


_SCOPE_PORT = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?(?:/([a-z]+))?")


def _scope_ports(raw: object, path: str) -> tuple[MonitoredPort, ...]:
    """The monitored ports a key's grants open: `22`, `22/tcp`, `53/udp` or a
    {port, protocol} mapping as in monitored_ports (which must list each one; checked
    by _check_port_scopes once the firewalld section is read)."""
    ports: list[MonitoredPort] = []
    for index, item in enumerate(_list(raw, path, "ports")):
        item_path = f"{path}[{index}]"
        if isinstance(item, Mapping):
            settings = _section(item, item_path, ("port", "protocol"))
            item = f"{settings.get('port')}/{settings.get('protocol', 'tcp')}"
        if isinstance(item, bool) or not isinstance(item, int | str):
            _fail(item_path, f"must be a port like 22, 22/tcp or 53/udp, not {_describe(item)}")
        text = str(int(item)) if isinstance(item, int) else item
        match = _SCOPE_PORT.fullmatch(text.strip().lower())
        if match is None or (match.group(3) or "tcp") not in PROTOCOLS:
            _fail(item_path, f"must be a port like 22, 22/tcp or 53/udp, got {_show(text)}")
        first, last = match.group(1), match.group(2)
        if last is not None and last != first:
            # monitored_ports holds single ports, so a scope names them one by one.
            _fail(item_path, f"must be a single monitored port, not the range {_show(text)}")
        ports.append(MonitoredPort(int(first), match.group(3) or "tcp"))
    if raw is not None and not ports:
        _fail(path, "must list at least one port (leave it out for every monitored port)")
    return tuple(dict.fromkeys(ports))


def _check_port_scopes(keys: tuple[ApiKey, ...], monitored: tuple[MonitoredPort, ...]) -> None:
    """A key may open only ports Knocker manages: anything else would be a grant that
    silently opens nothing (or, after a config change, something unintended)."""
    for index, key in enumerate(keys):
        for place, port in enumerate(key.ports):
            if port not in monitored:
                listed = ", ".join(map(str, monitored)) or "none"
                _fail(
                    f"api_keys[{index}].ports[{place}]",
                    f"{port} is not one of firewalld.monitored_ports ({listed})",
                )


def _scope_hosts(raw: object, path: str) -> tuple[str, ...]:
    """Host names a key's grants pass /verify for: compared with the forwarded host as
    normalize_host gives it; a leading "*." matches any name below the rest."""
    hosts: list[str] = []
    for index, item in enumerate(_list(raw, path, "host names")):
        text = _str(item, f"{path}[{index}]", "a host name")
        wildcard = text.startswith("*.")
        name = normalize_host_key(text[2:] if wildcard else text)
        if name is None or name == "*" or "*" in name or (wildcard and ":" in name):
            _fail(
                f"{path}[{index}]",
                f"must be a host name (optionally starting with "
                f'"*."), without a port, got {_show(text)}',
            )
        hosts.append(f"*.{name}" if wildcard else name)
    if raw is not None and not hosts:
        _fail(path, "must list at least one host name (leave it out for every host)")
    return tuple(dict.fromkeys(hosts))


def _secret(raw: object, path: str) -> str:
    if raw is None:
        _fail(path, "is required")
    if isinstance(raw, _SourceInt):
        # An unquoted all-digit key: the digits as written, not YAML's integer (0123 is 83).
        key = raw.source
    elif isinstance(raw, str):
        key = raw
    else:
        _fail(path, f"must be a string, not {_describe(raw)}; put it in quotes")
    if not key:
        _fail(path, "must not be empty")
    # Clients send the key in an HTTP header, which can carry neither of these.
    if key != key.strip():
        _fail(path, "must not start or end with whitespace (an HTTP header cannot carry it)")
    if _has_control(key):
        _fail(path, "must not contain control characters (an HTTP header cannot carry them)")
    upper = key.upper()
    if any(marker in upper for marker in PLACEHOLDER_MARKERS):
        _fail(
            path,
            "is still a placeholder (contains CHANGE_ME or REPLACE_WITH); a placeholder must "
            "be replaced by a generated key, e.g. from `knocker gen-key`",
        )
    return key


def _key_name(raw: object, path: str, index: int) -> str:
    if raw is None or raw == "":
        # Logs need a label; derived from the position, never from the key.
        return f"key-{index + 1}"
    name = raw.source if isinstance(raw, _SourceInt) else _str(raw, path)
    if _has_control(name):
        _fail(path, "must not contain control characters (names are written to logs)")
    return name


_SECURITY_FIELDS = (
    "always_allowed_ips",
    "excluded_paths",
    "excluded_paths_by_host",
    "max_whitelist_entries",
    "knock_rate_limit",
)


def _security(raw: object) -> SecurityConfig:
    settings = _section(raw, "security", _SECURITY_FIELDS)
    values: dict[str, Any] = {}
    if "always_allowed_ips" in settings:
        values["always_allowed_ips"] = _networks(
            settings["always_allowed_ips"], "security.always_allowed_ips"
        )
    if "excluded_paths" in settings:
        values["excluded_paths"] = _path_prefixes(
            settings["excluded_paths"], "security.excluded_paths"
        )
    if "excluded_paths_by_host" in settings:
        values["excluded_paths_by_host"] = _hosts(settings["excluded_paths_by_host"])
    if "max_whitelist_entries" in settings:
        values["max_whitelist_entries"] = _int(
            settings["max_whitelist_entries"],
            "security.max_whitelist_entries",
            "a positive integer",
            1,
        )
    if "knock_rate_limit" in settings:
        values["knock_rate_limit"] = _rate_limit(settings["knock_rate_limit"])
    return SecurityConfig(**values)


def _hosts(raw: object) -> Mapping[str, tuple[str, ...]]:
    path = "security.excluded_paths_by_host"
    if raw is None:  # `excluded_paths_by_host:` with nothing under it
        return MappingProxyType({})
    if not isinstance(raw, Mapping):
        _fail(path, f"must be a mapping of host name to path prefixes, not {_describe(raw)}")
    hosts: dict[str, tuple[str, ...]] = {}
    for host, prefixes in raw.items():
        if not isinstance(host, str):
            _fail(path, f"host names must be strings, found {_describe(host)}")
        host_path = f"{path}[{host!r}]"
        if not host or "/" in host or any(c.isspace() for c in host) or _has_control(host):
            _fail(host_path, "must be a host name (or '*'), without '/' or whitespace")
        if normalize_host_key(host) is None:
            _fail(
                host_path,
                "must be an ASCII host name (letters, digits, '-', '.', '_'), an IP address "
                "or '*', without a port",
            )
        # Host headers are case-insensitive (RFC 9110 4.2.3); compare lower-case.
        lowered = host.lower()
        if lowered in hosts:
            _fail(host_path, "is listed twice (host names ignore case)")
        hosts[lowered] = _path_prefixes(prefixes, host_path)
    return MappingProxyType(hosts)


def _rate_limit(raw: object) -> RateLimitConfig:
    path = "security.knock_rate_limit"
    fields = tuple(f.name for f in dataclasses.fields(RateLimitConfig))
    settings = _section(raw, path, fields)
    budget = "an integer of at least 0 (0 means unlimited)"
    values: dict[str, int] = {}
    for name, value in settings.items():
        if name == "window_seconds":
            values[name] = _int(value, f"{path}.{name}", "a positive integer of seconds", 1)
        else:
            values[name] = _int(value, f"{path}.{name}", budget, 0, MAX_RATE_LIMIT_REQUESTS)
    return RateLimitConfig(**values)


def _whitelist(raw: object) -> WhitelistConfig:
    settings = _section(raw, "whitelist", ("storage_path", "cleanup_interval_seconds", "backend"))
    values: dict[str, Any] = {}
    if "backend" in settings:
        values["backend"] = whitelist_backend(raw)
    if "storage_path" in settings:
        # Whether the directory exists or can be created is checked at startup (I/O).
        values["storage_path"] = _file_path(
            settings["storage_path"], "whitelist.storage_path", ".json"
        )
    if "cleanup_interval_seconds" in settings:
        values["cleanup_interval_seconds"] = _int(
            settings["cleanup_interval_seconds"],
            "whitelist.cleanup_interval_seconds",
            "a positive integer of seconds",
            1,
        )
    return WhitelistConfig(**values)


WHITELIST_BACKENDS = ("file", "redis")


def whitelist_backend(raw: object) -> str:
    """whitelist.backend of the raw section (the redis section is required by it)."""
    if not isinstance(raw, Mapping) or "backend" not in raw:
        return "file"
    backend = _str(raw["backend"], "whitelist.backend", "'file' or 'redis'")
    if backend not in WHITELIST_BACKENDS:
        _fail("whitelist.backend", f"must be 'file' or 'redis', got {_show(backend)}")
    return backend


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _redis(raw: object, backend: str) -> RedisConfig:
    path = "redis"
    settings = _section(
        raw,
        path,
        (
            "url",
            "username",
            "password_file",
            "password_env",
            "key_prefix",
            "tls_ca_file",
            "connect_timeout_ms",
            "command_timeout_ms",
            "max_staleness_seconds",
        ),
    )
    if backend != "redis" and not settings:
        return RedisConfig()
    if "url" not in settings:
        _fail(
            f"{path}.url",
            "is required when whitelist.backend is 'redis'"
            if backend == "redis"
            else "is required in a redis section",
        )
    url = _str(settings["url"], f"{path}.url", "a redis://, rediss:// or unix:// URL")
    if not url.startswith(_REDIS_SCHEMES) or _has_control(url) or " " in url:
        _fail(f"{path}.url", f"must be a redis://, rediss:// or unix:// URL, got {_show(url)}")
    authority = url.split("://", 1)[1].split("/", 1)[0]
    if "@" in authority or "password=" in url:
        # A URL is logged and shown in /ready; the secret goes in a file or the environment.
        _fail(
            f"{path}.url",
            "must not carry credentials; use redis.username and "
            "redis.password_file or redis.password_env",
        )
    values: dict[str, Any] = {"url": url}
    if settings.get("username") is not None:
        values["username"] = _str(settings["username"], f"{path}.username")
    if settings.get("password_file") is not None:
        values["password_file"] = _file_path(settings["password_file"], f"{path}.password_file")
    if settings.get("password_env") is not None:
        name = _str(settings["password_env"], f"{path}.password_env")
        if not _ENV_NAME.fullmatch(name):
            _fail(
                f"{path}.password_env", f"must be an environment variable name, got {_show(name)}"
            )
        values["password_env"] = name
    if "password_file" in values and "password_env" in values:
        _fail(
            f"{path}.password_env",
            "give either redis.password_file or redis.password_env, not both",
        )
    if settings.get("tls_ca_file") is not None:
        if not url.startswith("rediss://"):
            _fail(f"{path}.tls_ca_file", "needs a rediss:// URL (TLS)")
        values["tls_ca_file"] = _file_path(settings["tls_ca_file"], f"{path}.tls_ca_file")
    if "key_prefix" in settings:
        prefix = _str(settings["key_prefix"], f"{path}.key_prefix")
        if _has_control(prefix) or len(prefix) > 100:
            _fail(f"{path}.key_prefix", "must be at most 100 printable characters")
        values["key_prefix"] = prefix
    for name, low, high in (
        ("connect_timeout_ms", 1, 600_000),
        ("command_timeout_ms", 1, 600_000),
        ("max_staleness_seconds", 0, 86_400),
    ):
        if name in settings:
            values[name] = _int(
                settings[name], f"{path}.{name}", f"an integer from {low} to {high}", low, high
            )
    return RedisConfig(**values)


def _cors(raw: object) -> CorsConfig:
    settings = _section(raw, "cors", ("allowed_origin",))
    if "allowed_origin" not in settings:
        return CorsConfig()
    origin = _str(settings["allowed_origin"], "cors.allowed_origin")
    if _has_control(origin):
        # It is sent as Access-Control-Allow-Origin; CR/LF would split the response headers.
        _fail("cors.allowed_origin", "must not contain line breaks or control characters")
    return CorsConfig(origin)


def _documentation(raw: object) -> DocumentationConfig:
    settings = _section(raw, "documentation", ("enabled", "openapi_output_path"))
    values: dict[str, Any] = {}
    if "enabled" in settings:
        values["enabled"] = _bool(settings["enabled"], "documentation.enabled")
    if "openapi_output_path" in settings:
        values["openapi_output_path"] = _file_path(
            settings["openapi_output_path"], "documentation.openapi_output_path"
        )
    return DocumentationConfig(**values)


def _logging(raw: object) -> LoggingConfig:
    # Upstream passed the whole section to its logging setup; only `level` means anything
    # here, the rest (format, handlers...) is accepted so existing files keep loading.
    settings = _section(raw, "logging", ("level",), ignore_unknown=True)
    if "level" not in settings:
        return LoggingConfig()
    rule = "one of " + ", ".join(LOG_LEVELS)
    written = _str(settings["level"], "logging.level", rule)
    level = written.upper()
    level = "WARNING" if level == "WARN" else level  # Python's logging accepts WARN too
    if level not in LOG_LEVELS:
        _fail("logging.level", f"must be {rule}, got {_show(written)}")
    return LoggingConfig(level)


_FIREWALLD_FIELDS = (
    "enabled",
    "zone_name",
    "zone_priority",
    "zone_target",
    "default_action",
    "monitored_ports",
    "monitored_ips",
)


def _firewalld(raw: object) -> FirewalldConfig:
    """Types are always checked; values only when enabled, so an upstream file with a
    disabled, half-filled firewalld section keeps loading (docs/configuration.md#firewalld)."""
    path = "firewalld"
    settings = _section(raw, path, _FIREWALLD_FIELDS)
    enabled = _bool(settings.get("enabled", False), f"{path}.enabled")
    values: dict[str, Any] = {"enabled": enabled}

    if "zone_name" in settings:
        zone = _str(settings["zone_name"], f"{path}.zone_name")
        if enabled and not ZONE_NAME_PATTERN.fullmatch(zone):
            _fail(
                f"{path}.zone_name",
                f"must be 1 to 17 letters, digits, '.', '_' or '-', got {_show(zone)}",
            )
        values["zone_name"] = zone

    if "zone_priority" in settings:
        priority = settings["zone_priority"]
        if priority is not None:  # explicit null: skip the priority (firewalld < 2.0)
            rule = "an integer from -32768 to 32767, or null"
            bounds = (-32768, 32767) if enabled else (None, None)
            priority = _int(priority, f"{path}.zone_priority", rule, *bounds)
        values["zone_priority"] = priority

    if "zone_target" in settings and settings["zone_target"] is not None:
        rule = "one of " + ", ".join(ZONE_TARGETS) + ", or null"
        target = _str(settings["zone_target"], f"{path}.zone_target", rule)
        if enabled and target not in ZONE_TARGETS:
            _fail(f"{path}.zone_target", f"must be {rule}, got {_show(target)}")
        values["zone_target"] = target

    if "default_action" in settings:
        rule = "drop or reject"
        action = _str(settings["default_action"], f"{path}.default_action", rule)
        if enabled and action not in DEFAULT_ACTIONS:
            _fail(f"{path}.default_action", f"must be {rule}, got {_show(action)}")
        values["default_action"] = action

    ports = _ports(settings.get("monitored_ports"), f"{path}.monitored_ports", enabled)
    ips = _networks(settings.get("monitored_ips"), f"{path}.monitored_ips", require_mask=enabled)
    if enabled and not ports:
        _fail(f"{path}.monitored_ports", "is required when firewalld.enabled is true")
    if enabled and not ips:
        _fail(f"{path}.monitored_ips", "is required when firewalld.enabled is true")
    # Listing a port or network twice would make firewalld answer ALREADY_ENABLED at startup.
    values["monitored_ports"] = tuple(dict.fromkeys(ports))
    values["monitored_ips"] = tuple(dict.fromkeys(ips))
    return FirewalldConfig(**values)


def _ports(raw: object, path: str, enabled: bool) -> tuple[MonitoredPort, ...]:
    ports: list[MonitoredPort] = []
    for index, entry in enumerate(_list(raw, path, "{port, protocol} mappings")):
        entry_path = f"{path}[{index}]"
        if not isinstance(entry, Mapping):
            _fail(entry_path, f"must be a mapping with port and protocol, not {_describe(entry)}")
        settings = _section(entry, entry_path, ("port", "protocol"))
        if "port" not in settings:
            _fail(f"{entry_path}.port", "is required")
        bounds = (1, 65535) if enabled else (None, None)
        port = _int(settings["port"], f"{entry_path}.port", "a port from 1 to 65535", *bounds)
        protocol = _str(settings.get("protocol", "tcp"), f"{entry_path}.protocol", "tcp or udp")
        if enabled and protocol not in PROTOCOLS:
            _fail(f"{entry_path}.protocol", f"must be tcp or udp, got {_show(protocol)}")
        ports.append(MonitoredPort(port, protocol))
    return tuple(ports)


def _web(raw: object) -> WebConfig:
    settings = _section(raw, "web", ("enabled",))
    if "enabled" not in settings:
        return WebConfig()
    return WebConfig(_bool(settings["enabled"], "web.enabled"))


def _audit(raw: object) -> AuditConfig:
    settings = _section(raw, "audit", ("path",))
    if settings.get("path") is None:
        return AuditConfig()
    return AuditConfig(_file_path(settings["path"], "audit.path"))


def _metrics(raw: object) -> MetricsConfig:
    settings = _section(raw, "metrics", ("enabled", "allow"))
    values: dict[str, Any] = {}
    if "enabled" in settings:
        values["enabled"] = _bool(settings["enabled"], "metrics.enabled")
    if settings.get("allow") is not None:
        values["allow"] = _networks(settings["allow"], "metrics.allow")
    return MetricsConfig(**values)
