"""The grants API through WebTest: GET /grants, DELETE /grants/{entry} and DELETE /knock
(docs/api.md#grants), with the store's grants log (knocker/store/grant_format.py,
grantlog.py) underneath. The real server with several workers is in test_server.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from webtest import TestApp, TestResponse

import knocker.app
from knocker.app import App, build_app
from knocker.config import load_config_text
from knocker.errors import ConfigError
from knocker.scopes import HostScopes
from knocker.store.grant_format import (
    Grant,
    encode_grants,
    firewall_plan,
    fold_grants,
    revoke_line,
)
from tests.test_app import (
    ADMIN_KEY,
    CLIENT,
    NOW,
    OPS_KEY,
    ORIGIN,
    USER_KEY,
    Clock,
    ScriptedFirewall,
    Service,
    error_body,
)

__all__ = ["make", "service"]  # fixtures, used by name
from tests.test_app import make, service  # noqa: E402,F401


def listing(service: Service, key: str = OPS_KEY) -> TestResponse:
    return service.web.get("/grants", headers={"X-Api-Key": key}, expect_errors=True)


def revoke(service: Service, entry: str, key: str = OPS_KEY) -> TestResponse:
    return service.web.delete(f"/grants/{entry}", headers={"X-Api-Key": key}, expect_errors=True)


def sign_out(
    service: Service, key: str = USER_KEY, payload: object = None, peer: str = CLIENT
) -> TestResponse:
    params = json.dumps(payload).encode() if payload is not None else b""
    headers = {"X-Api-Key": key}
    if payload is not None:
        headers["Content-Type"] = "application/json"
    return service.web.delete(
        "/knock",
        params=params,
        headers=headers,
        extra_environ={"REMOTE_ADDR": peer},
        expect_errors=True,
    )


def test_admin_lists_every_live_grant_with_its_key_name_never_the_key(service: Service) -> None:
    """GET /grants: entry, expiry, seconds left, key name, granted_at and how."""
    service.knock(payload={"ttl": 100})
    service.knock(ADMIN_KEY, {"ip_address": "10.1.2.0/24", "ttl": 50})
    service.clock.now = NOW + 10
    response = listing(service)
    assert response.status_int == 200
    assert response.json == {
        "grants": [
            {
                "entry": "10.1.2.0/24",
                "key_name": "admin",
                "expires_at": int(NOW) + 50,
                "expires_in_seconds": 40,
                "granted_at": int(NOW),
                "how": "remote",
                "scope": None,
            },
            {
                "entry": CLIENT,
                "key_name": "phone",
                "expires_at": int(NOW) + 100,
                "expires_in_seconds": 90,
                "granted_at": int(NOW),
                "how": "knock",
                "scope": None,
            },
        ]
    }
    assert USER_KEY not in response.text and ADMIN_KEY not in response.text


def test_expired_grants_are_not_listed(service: Service) -> None:
    service.knock(payload={"ttl": 5})
    service.clock.now = NOW + 6
    assert listing(service).json == {"grants": []}


def test_non_admin_key_gets_403_and_bad_key_401(service: Service) -> None:
    """Only keys with admin: true may list or revoke; a wrong key is 401."""
    service.knock()
    for key in (USER_KEY, ADMIN_KEY):
        assert listing(service, key).status_int == 403
        assert revoke(service, CLIENT, key).status_int == 403
    assert listing(service, "nope").status_int == 401
    assert revoke(service, CLIENT, "nope").status_int == 401
    assert service.verify().status_int == 200


def test_admin_revoke_ends_the_grant_in_memory_disk_and_firewall(service: Service) -> None:
    """DELETE /grants/{entry}: /verify refuses, whitelist.json and the firewall lose it."""
    service.knock()
    service.knock(ADMIN_KEY, {"ip_address": CLIENT, "ttl": 60})
    response = revoke(service, CLIENT)
    assert response.status_int == 200
    assert {g["key_name"] for g in response.json["removed"]} == {"phone", "admin"}
    assert service.verify().status_int == 401
    assert service.firewall.revoked == [CLIENT]
    service.app.store.close()
    assert CLIENT not in service.file()


def test_admin_revokes_a_url_encoded_network(service: Service) -> None:
    service.knock(ADMIN_KEY, {"ip_address": "10.1.2.0/24"})
    assert revoke(service, "10.1.2.7%2F24").status_int == 200
    assert service.verify(peer="10.1.2.9").status_int == 401


def test_revoking_what_is_not_granted_is_404_and_bad_entry_400(service: Service) -> None:
    assert revoke(service, "192.0.2.99").status_int == 404
    assert error_body(revoke(service, "not-an-address"))
    assert revoke(service, "not-an-address").status_int == 400


def test_grants_methods(service: Service) -> None:
    """GET /grants and DELETE /grants/{entry} only; 405 names the allowed ones."""
    response = service.web.post("/grants", headers={"X-Api-Key": OPS_KEY}, expect_errors=True)
    assert response.status_int == 405 and response.headers["Allow"] == "GET, HEAD"
    response = service.web.get(f"/grants/{CLIENT}", expect_errors=True)
    assert response.status_int == 405 and response.headers["Allow"] == "DELETE"


def test_sign_out_ends_only_this_keys_grant(service: Service) -> None:
    """DELETE /knock removes the caller's grant by this key; another key's grant of the
    same address stays, and the entry runs until that grant's expiry."""
    service.knock(payload={"ttl": 3000})
    service.knock(ADMIN_KEY, {"ip_address": CLIENT, "ttl": 60})
    response = sign_out(service)
    assert response.status_int == 200
    assert [(g["entry"], g["key_name"]) for g in response.json["removed"]] == [(CLIENT, "phone")]
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert [g["key_name"] for g in listing(service).json["grants"]] == ["admin"]
    assert service.verify().status_int == 200
    service.clock.now = NOW + 61
    assert service.verify().status_int == 401


def test_sign_out_without_a_grant_is_404(service: Service) -> None:
    service.knock(ADMIN_KEY, {"ip_address": CLIENT})
    assert sign_out(service).status_int == 404
    assert service.verify().status_int == 200


def test_sign_out_of_a_named_address_needs_remote_whitelisting(service: Service) -> None:
    """ip_address names another address for keys that may whitelist others; else 403."""
    service.knock(ADMIN_KEY, {"ip_address": "10.1.2.3"})
    assert sign_out(service, USER_KEY, {"ip_address": "10.1.2.3"}).status_int == 403
    response = sign_out(service, ADMIN_KEY, {"ip_address": "10.1.2.3"})
    assert response.status_int == 200
    assert service.verify(peer="10.1.2.3").status_int == 401


def test_sign_out_with_a_bad_key_is_401(service: Service) -> None:
    service.knock()
    assert sign_out(service, "wrong").status_int == 401
    assert service.verify().status_int == 200


def test_preflight_allows_delete(service: Service) -> None:
    response = service.web.options("/knock")
    assert "DELETE" in response.headers["Access-Control-Allow-Methods"].split(", ")


def test_grant_requests_count_against_the_failure_budget(make: object) -> None:
    """A client probing with a wrong key is stopped by the failure budget (429)."""
    service = make(failures=3)  # type: ignore[operator]
    statuses = [listing(service, "wrong").status_int for _ in range(3)]
    statuses.append(listing(service).status_int)
    assert statuses == [401, 401, 401, 429]


def test_an_upstream_entry_is_listed_as_restored_and_revocable(service: Service) -> None:
    """An entry found on disk without a grant record is a `restored` grant (no key)."""
    service.app.close()
    (service.directory / "whitelist.json").write_text(json.dumps({"10.9.8.7": int(NOW) + 99}))
    service.app = build_app(service.config, clock=service.clock)
    service.web = TestApp(service.app, extra_environ={"REMOTE_ADDR": CLIENT})
    grants = listing(service).json["grants"]
    assert grants == [
        {
            "entry": "10.9.8.7",
            "key_name": None,
            "expires_at": int(NOW) + 99,
            "expires_in_seconds": 99,
            "granted_at": None,
            "how": "restored",
            "scope": None,
        }
    ]
    assert revoke(service, "10.9.8.7").status_int == 200


def test_grants_log_folds_to_the_latest_grant_per_key_and_entry() -> None:
    """A revoke line ends the named key's grant (or all); a torn line costs itself."""
    a1 = Grant("1.2.3.4", "a", 100, 1, "knock")
    a2 = Grant("1.2.3.4", "a", 200, 2, "knock")
    b = Grant("1.2.3.4", "b", 150, 2, "remote")
    c = Grant("5.6.7.8", "c", 150, 2, "remote")
    data = encode_grants([a1, b, c, a2]) + revoke_line("1.2.3.4", "b") + b'{"op":"gr'
    assert fold_grants(data, 0) == {a2.ident: a2, c.ident: c}
    assert fold_grants(data + b"\n" + revoke_line("1.2.3.4", None), 0) == {c.ident: c}
    assert fold_grants(data, 160) == {a2.ident: a2}


# --- host-scoped keys ------------------------------------------------------------------

SCOPED_KEY = "scoped-key-7e3b9d1f5a2c8064"
PROXY = "10.9.9.9"


def scoped_app(tmp_path: Path, clock: Clock, capacity: int = 10_000) -> App:
    config = load_config_text(f"""
api_keys:
  - name: phone
    key: {USER_KEY}
    max_ttl: 3600
  - name: app-phone
    key: {SCOPED_KEY}
    max_ttl: 3600
    hosts: ["app.example.com", "*.apps.example.com"]
  - name: ops
    key: {OPS_KEY}
    max_ttl: 600
    admin: true
server:
  trusted_proxies: ["{PROXY}"]
security:
  knock_rate_limit: {{successful_requests: 0, failed_requests: 0}}
  max_whitelist_entries: {capacity}
whitelist:
  storage_path: {tmp_path / "whitelist.json"}
""")
    return build_app(config, clock=clock)


class Scoped:
    def __init__(self, tmp_path: Path, capacity: int = 10_000) -> None:
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.app = scoped_app(tmp_path, self.clock, capacity)
        self.web = TestApp(self.app)

    def reopen(self) -> None:
        self.app.close()
        self.app = scoped_app(self.tmp_path, self.clock)
        self.web = TestApp(self.app)

    def knock(self, key: str, client: str = CLIENT, **body: object) -> TestResponse:
        return self.web.post(
            "/knock",
            params=json.dumps(body).encode(),
            headers={
                "X-Api-Key": key,
                "Content-Type": "application/json",
                "X-Forwarded-For": client,
            },
            extra_environ={"REMOTE_ADDR": PROXY},
            expect_errors=True,
        )

    def verify(self, host: str | None, client: str = CLIENT, peer: str = PROXY) -> int:
        headers = {"X-Forwarded-For": client}
        if host is not None:
            headers["X-Forwarded-Host"] = host
        return int(
            self.web.get(
                "/verify", headers=headers, extra_environ={"REMOTE_ADDR": peer}, expect_errors=True
            ).status_int
        )


@pytest.fixture
def scoped(tmp_path: Path) -> Iterator[Scoped]:
    made = Scoped(tmp_path)
    yield made
    made.app.close()


def test_scoped_grant_passes_only_for_its_hosts(scoped: Scoped) -> None:
    """A key with hosts: passes at app.example.com and *.apps.example.com, nowhere else;
    without a host (or from an untrusted peer) it does not pass."""
    assert scoped.knock(SCOPED_KEY).status_int == 200
    assert scoped.verify("app.example.com") == 200
    assert scoped.verify("APP.example.com:443") == 200
    assert scoped.verify("x.apps.example.com") == 200
    assert scoped.verify("a.b.apps.example.com") == 200
    for refused in (
        "other.example.com",
        "apps.example.com",
        "example.com",
        "app.example.com.evil.test",
        None,
    ):
        assert scoped.verify(refused) == 401, refused
    assert scoped.verify("app.example.com", peer=CLIENT) == 401  # host not trusted


def test_unscoped_and_scoped_grants_of_one_address_coexist(scoped: Scoped) -> None:
    """Any live grant covering the address that allows the host lets it pass; signing
    out one key leaves the other's grant."""
    assert scoped.knock(SCOPED_KEY, ttl=3000).status_int == 200
    assert scoped.knock(USER_KEY, ttl=60).status_int == 200
    assert scoped.verify("other.example.com") == 200
    scoped.clock.now = NOW + 61
    assert scoped.verify("other.example.com") == 401
    assert scoped.verify("app.example.com") == 200
    signed_out = scoped.web.delete(
        "/knock",
        headers={"X-Api-Key": SCOPED_KEY, "X-Forwarded-For": CLIENT},
        extra_environ={"REMOTE_ADDR": PROXY},
        expect_errors=True,
    )
    assert signed_out.status_int == 200
    assert signed_out.json["removed"][0]["scope"] == {
        "hosts": ["app.example.com", "*.apps.example.com"],
        "ports": None,
    }
    assert scoped.verify("app.example.com") == 401


def test_scoped_grants_stay_out_of_whitelist_json_and_survive_a_restart(scoped: Scoped) -> None:
    """whitelist.json (the upstream format) never holds a scoped grant; the sidecar
    does, and a restart restores it, still scoped."""
    scoped.knock(SCOPED_KEY, client="198.51.100.5")
    scoped.knock(USER_KEY, client="198.51.100.6")
    scoped.reopen()
    upstream = json.loads((scoped.tmp_path / "whitelist.json").read_text())
    assert upstream == {"198.51.100.6": int(NOW) + 3600}
    assert b"198.51.100.5" in (scoped.tmp_path / "whitelist.json.grants").read_bytes()
    assert scoped.verify("app.example.com", client="198.51.100.5") == 200
    assert scoped.verify("other.example.com", client="198.51.100.5") == 401
    listed = scoped.web.get("/grants", headers={"X-Api-Key": OPS_KEY}).json["grants"]
    assert [(g["entry"], g["key_name"], g["scope"]) for g in listed] == [
        (
            "198.51.100.5",
            "app-phone",
            {"hosts": ["app.example.com", "*.apps.example.com"], "ports": None},
        ),
        ("198.51.100.6", "phone", None),
    ]


def test_admin_revoke_ends_scoped_and_unscoped_grants(scoped: Scoped) -> None:
    scoped.knock(SCOPED_KEY)
    scoped.knock(USER_KEY)
    response = scoped.web.delete(f"/grants/{CLIENT}", headers={"X-Api-Key": OPS_KEY})
    assert {g["key_name"] for g in response.json["removed"]} == {"phone", "app-phone"}
    assert scoped.verify("app.example.com") == 401
    assert scoped.verify("other.example.com") == 401


def test_downgrade_round_trip_through_the_upstream_format(scoped: Scoped) -> None:
    """Start from an upstream whitelist.json, grant scoped and unscoped, stop: the file is
    still what upstream reads ({entry: int}), holding only what upstream can honour;
    upstream rewriting it (and never knowing the sidecar's scoped grants) widens nothing,
    and coming back keeps the scoped grant scoped."""
    scoped.app.close()
    path = scoped.tmp_path / "whitelist.json"
    path.write_text(json.dumps({"192.0.2.10": int(NOW) + 500, "192.0.2.11": 1.5}))
    scoped.reopen()
    scoped.knock(SCOPED_KEY, client="192.0.2.20")
    scoped.knock(USER_KEY, client="192.0.2.21")
    scoped.app.close()
    upstream = json.loads(path.read_text())
    assert all(type(v) is int for v in upstream.values())
    assert upstream == {"192.0.2.10": int(NOW) + 500, "192.0.2.21": int(NOW) + 3600}
    # Upstream rewrites the file its own way (indent=2) and adds a knock of its own.
    upstream["192.0.2.30"] = int(NOW) + 100
    path.write_text(json.dumps(upstream, indent=2))
    scoped.reopen()
    assert scoped.verify("other.example.com", client="192.0.2.20") == 401
    assert scoped.verify("app.example.com", client="192.0.2.20") == 200
    assert scoped.verify("other.example.com", client="192.0.2.30") == 200
    hows = {
        g["entry"]: g["how"]
        for g in scoped.web.get("/grants", headers={"X-Api-Key": OPS_KEY}).json["grants"]
    }
    assert hows == {
        "192.0.2.10": "restored",
        "192.0.2.20": "knock",
        "192.0.2.21": "knock",
        "192.0.2.30": "restored",
    }


def test_host_scopes_match_names_and_wildcards_by_lookup() -> None:
    keys = load_config_text(f"""
api_keys:
  - {{name: a, key: k1-{USER_KEY}, max_ttl: 60, hosts: ["App.Example.com"]}}
  - {{name: b, key: k2-{USER_KEY}, max_ttl: 60, hosts: ["*.example.com", "app.example.com"]}}
  - {{name: c, key: k3-{USER_KEY}, max_ttl: 60}}
""").api_keys
    scopes = HostScopes(keys)
    assert scopes.keys_for("app.example.com") == ("a", "b")
    assert scopes.keys_for("x.y.example.com") == ("b",)
    assert scopes.keys_for("example.com") == ()
    assert scopes.keys_for(None) == ()
    assert not HostScopes(keys[2:]).active


@pytest.mark.parametrize(
    "hosts", ['["app.example.com:443"]', '["*"]', '["a.*.com"]', "[]", '["*."]', "[1]"]
)
def test_bad_host_scopes_are_config_errors_naming_the_key(hosts: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config_text(f"api_keys: [{{name: a, key: {USER_KEY}, max_ttl: 60, hosts: {hosts}}}]")
    assert "api_keys[0].hosts" in str(raised.value)


def test_firewall_keeps_an_entry_open_for_its_longest_grant_scoped_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scoped grant opens the firewall like any other; a shorter unscoped knock of the
    same address does not cut it; ending one grant re-grants the rest; ending the last
    one closes the entry. entries() (restore, re-apply) includes scoped grants."""
    firewall = ScriptedFirewall()
    monkeypatch.setattr(knocker.app, "create_firewall", lambda config, state: firewall)
    made = Scoped(tmp_path)
    try:
        assert made.knock(SCOPED_KEY, ttl=3000).status_int == 200
        assert firewall.granted == [(CLIENT, 3000)]
        assert made.knock(USER_KEY, ttl=60).status_int == 200
        assert firewall.granted[-1] == (CLIENT, 3000)
        assert made.app.store.entries() == {CLIENT: int(NOW) + 3000}
        made.web.delete(
            "/knock",
            headers={"X-Api-Key": SCOPED_KEY, "X-Forwarded-For": CLIENT},
            extra_environ={"REMOTE_ADDR": PROXY},
        )
        assert firewall.granted[-1] == (CLIENT, 60) and firewall.revoked == []
        made.web.delete(
            "/knock",
            headers={"X-Api-Key": USER_KEY, "X-Forwarded-For": CLIENT},
            extra_environ={"REMOTE_ADDR": PROXY},
        )
        assert firewall.revoked == [CLIENT]
        assert made.app.store.entries() == {}
    finally:
        made.app.close()


def test_scoped_grants_are_capped_like_the_whitelist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At max_whitelist_entries scoped grants, a new one evicts the soonest-expiring
    scoped grant (and closes its firewall entry); expired ones make room first."""
    firewall = ScriptedFirewall()
    monkeypatch.setattr(knocker.app, "create_firewall", lambda config, state: firewall)
    made = Scoped(tmp_path, capacity=2)
    try:
        made.knock(SCOPED_KEY, client="192.0.2.1", ttl=100)
        made.knock(SCOPED_KEY, client="192.0.2.2", ttl=200)
        made.knock(SCOPED_KEY, client="192.0.2.3", ttl=300)
        assert firewall.revoked == ["192.0.2.1"]
        assert [made.verify("app.example.com", client=f"192.0.2.{n}") for n in (1, 2, 3)] == [
            401,
            200,
            200,
        ]
        made.clock.now = NOW + 250  # 192.0.2.2 expires: room without evicting 192.0.2.3
        made.knock(SCOPED_KEY, client="192.0.2.4", ttl=300)
        assert made.verify("app.example.com", client="192.0.2.3") == 200
        assert made.verify("app.example.com", client="192.0.2.4") == 200
    finally:
        made.app.close()


def test_grants_log_index_follows_appends_and_another_processs_compaction(tmp_path: Path) -> None:
    """Two GrantLog views of one file (two workers): appends are seen incrementally, a
    compaction (atomic rename) by one is read afresh by the other, and a torn append is
    kept whole by the next append."""
    from knocker.store.grantlog import GrantLog

    path = str(tmp_path / "whitelist.json.grants")
    one, two = GrantLog(path), GrantLog(path)
    a = Grant("192.0.2.1", "a", 200, 1, "knock", scoped=True)
    b = Grant("192.0.2.2", "b", 300, 1, "remote")
    one.sync(one.append(encode_grants([a, b])))
    assert two.stale() and two.refresh() is None  # first read: afresh
    assert two.of("192.0.2.1") == {"a": a}
    one.sync(one.append(revoke_line("192.0.2.2", "b")))
    assert two.refresh() == [("192.0.2.2", "b")]
    assert two.of("192.0.2.2") == {} and not two.stale()
    one.rewrite(encode_grants([a]))  # another worker compacts
    assert two.stale() and two.refresh() is None
    assert two.all() == {"192.0.2.1": {"a": a}}
    with open(path, "ab") as handle:
        handle.write(b'{"op":"grant","entry":"192.0')  # a crash mid-append
    two.refresh()
    c = Grant("192.0.2.3", "c", 400, 2, "knock")
    one.sync(one.append(encode_grants([c])))
    two.refresh()
    assert set(two.all()) == {"192.0.2.1", "192.0.2.3"}


# --- port-scoped keys ------------------------------------------------------------------

SSH_KEY = "ssh-key-4f8a2d6c0b1e9357"
APP_SSH_KEY = "app-ssh-key-9c1e5b7d3a2f4068"


def ports_app(tmp_path: Path, clock: Clock) -> App:
    config = load_config_text(f"""
api_keys:
  - {{name: phone, key: {USER_KEY}, max_ttl: 3600}}
  - {{name: ssh, key: {SSH_KEY}, max_ttl: 3600, ports: ["22/tcp"]}}
  - {{name: app-ssh, key: {APP_SSH_KEY}, max_ttl: 3600, ports: [22],
      hosts: ["app.example.com"]}}
  - {{name: ops, key: {OPS_KEY}, max_ttl: 600, admin: true}}
server:
  trusted_proxies: ["{PROXY}"]
security:
  knock_rate_limit: {{successful_requests: 0, failed_requests: 0}}
whitelist:
  storage_path: {tmp_path / "whitelist.json"}
firewalld:
  enabled: false
  monitored_ports: [{{port: 22}}, {{port: 8080}}]
""")
    return build_app(config, clock=clock)


@pytest.fixture
def ported(tmp_path: Path) -> Iterator[Scoped]:
    made = Scoped(tmp_path)
    made.app.close()
    made.app = ports_app(tmp_path, made.clock)
    made.web = TestApp(made.app)
    yield made
    made.app.close()


def test_port_only_key_passes_verify_for_every_host(ported: Scoped) -> None:
    """Ports are a firewall matter: a key scoped to ports alone passes /verify like an
    unscoped key, with any host or none; one also scoped to hosts keeps its hosts."""
    ported.knock(SSH_KEY, client="192.0.2.5")
    ported.knock(APP_SSH_KEY, client="192.0.2.6")
    assert [
        ported.verify(host, client="192.0.2.5")
        for host in ("app.example.com", "other.example.com", None)
    ] == [200, 200, 200]
    assert [
        ported.verify(host, client="192.0.2.6")
        for host in ("app.example.com", "other.example.com", None)
    ] == [200, 401, 401]
    assert ported.verify(None, client="192.0.2.7") == 401


def test_grants_show_a_port_scope_and_keep_it_out_of_whitelist_json(ported: Scoped) -> None:
    """GET /grants shows scope {hosts, ports} (null: every one); port-scoped grants live
    in the sidecar only, in a record a reader from before port scopes cannot take for
    a grant of every port; a restart keeps the scope."""
    ported.knock(SSH_KEY, client="192.0.2.5")
    ported.knock(APP_SSH_KEY, client="192.0.2.6")
    ported.knock(USER_KEY, client="192.0.2.7")
    ported.app.close()
    ported.app = ports_app(ported.tmp_path, ported.clock)
    ported.web = TestApp(ported.app)
    listed = ported.web.get("/grants", headers={"X-Api-Key": OPS_KEY}).json["grants"]
    assert [(g["entry"], g["key_name"], g["scope"]) for g in listed] == [
        ("192.0.2.5", "ssh", {"hosts": None, "ports": ["22/tcp"]}),
        ("192.0.2.6", "app-ssh", {"hosts": ["app.example.com"], "ports": ["22/tcp"]}),
        ("192.0.2.7", "phone", None),
    ]
    upstream = json.loads((ported.tmp_path / "whitelist.json").read_text())
    assert list(upstream) == ["192.0.2.7"]
    records = [
        json.loads(line)
        for line in (ported.tmp_path / "whitelist.json.grants").read_bytes().splitlines()
    ]
    assert {r["entry"]: r.get("scoped") for r in records} == {
        "192.0.2.5": {"ports": ["22/tcp"]},
        "192.0.2.6": {"ports": ["22/tcp"]},
        "192.0.2.7": None,
    }


def test_host_scopes_add_port_only_keys_to_every_lookup() -> None:
    keys = load_config_text(f"""
api_keys:
  - {{name: a, key: k1-{USER_KEY}, max_ttl: 60, hosts: ["app.example.com"]}}
  - {{name: p, key: k2-{USER_KEY}, max_ttl: 60, ports: [22]}}
firewalld: {{monitored_ports: [{{port: 22}}]}}
""").api_keys
    scopes = HostScopes(keys)
    assert scopes.keys_for("app.example.com") == ("p", "a")
    assert scopes.keys_for("other.example.com") == ("p",)
    assert scopes.keys_for(None) == ("p",)
    assert HostScopes(keys[1:]).active


def test_an_address_open_port_by_port_counts_once_as_a_live_entry(ported: Scoped) -> None:
    """entries() names an address once per port while a port-scoped grant outlasts its
    unscoped one; the active-grants gauge still counts the address once."""
    ported.knock(SSH_KEY, client="192.0.2.5", ttl=3600)
    ported.knock(USER_KEY, client="192.0.2.5", ttl=60)
    assert ported.app.store.entries() == {
        "192.0.2.5 22/tcp": int(NOW) + 3600,
        "192.0.2.5 8080/tcp": int(NOW) + 60,
    }
    assert knocker.app._live_entries(ported.app.store) == 1


def test_firewall_plan_opens_each_port_for_its_longest_grant() -> None:
    """One target for every port until the longest grant without a port scope (host
    scopes included); port by port only where a port-scoped grant runs longer; a
    port-scoped grant alone opens its ports only; nothing live closes everything."""
    ports = ("22/tcp", "53/udp")

    def grant(expires_at: int, ports: tuple[str, ...] = (), key: str = "k") -> Grant:
        return Grant("192.0.2.1", key, expires_at, 0, "knock", scoped=True, ports=ports)

    assert firewall_plan(500, [], ports, 100) == {"": 500}
    assert firewall_plan(500, [grant(900)], ports, 100) == {"": 900}
    assert firewall_plan(500, [grant(400, ("22/tcp",))], ports, 100) == {"": 500}
    assert firewall_plan(500, [grant(900, ("22/tcp",))], ports, 100) == {
        "22/tcp": 900,
        "53/udp": 500,
    }
    assert firewall_plan(
        None, [grant(900, ("22/tcp",)), grant(700, ("22/tcp",), "j")], ports, 100
    ) == {"22/tcp": 900}
    assert firewall_plan(None, [grant(90, ("22/tcp",))], ports, 100) == {}
    assert firewall_plan(90, [], ports, 100) == {}
