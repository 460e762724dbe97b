"""knocker.openapi: the OpenAPI document describes the routes the app really has.

The routes come from the app, not from a list in this file: every path knocker/app.py
compares the request path with is asked with every method, and what the app serves must
be documented; every documented operation must be served."""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from webtest import TestApp

import knocker.app
from knocker import __version__
from knocker.app import App, build_app
from knocker.config import MAX_TTL, Config, load_config_text
from knocker.errors import FirewallError, FirewallUnavailable
from knocker.firewall import NullFirewall
from knocker.openapi import openapi_document
from knocker.policy import MAX_BODY
from tests.support.config import ADMIN_KEY, TEST_KEY, make_config

KEY = TEST_KEY
CLIENT = "203.0.113.7"
METHODS = ("get", "head", "post", "put", "delete", "patch", "options")
APP_SOURCE = Path(knocker.app.__file__)


def docs_config(directory: Path, **sections: Any) -> Config:
    return make_config(
        directory,
        documentation={"enabled": True, "openapi_output_path": str(directory / "openapi.json")},
        **sections,
    )


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    built = build_app(
        docs_config(tmp_path, metrics={"enabled": True, "allow": [CLIENT]}),
        clock=lambda: 1_700_000_000.0,
    )
    yield built
    built.close()


@pytest.fixture
def web(app: App) -> TestApp:
    return TestApp(app, extra_environ={"REMOTE_ADDR": CLIENT})


@pytest.fixture
def document() -> dict[str, Any]:
    return openapi_document(__version__)


def operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    ]


def paths_the_app_routes() -> set[str]:
    """Every literal app.py compares the request path with (`path == "/x"`,
    `path in ("/x", ...)`): the routes as the code spells them."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(APP_SOURCE.read_text())):
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Name)
            and node.left.id == "path"
        ):
            for right in node.comparators:
                items = right.elts if isinstance(right, ast.Tuple | ast.Set | ast.List) else [right]
                found.update(
                    item.value
                    for item in items
                    if isinstance(item, ast.Constant)
                    and isinstance(item.value, str)
                    and item.value.startswith("/")
                )
    return found


def test_document_is_openapi_3_and_json(document: dict[str, Any]) -> None:
    """The document declares OpenAPI 3 and survives a JSON round trip."""
    assert document["openapi"].startswith("3.")
    assert document["info"]["version"] == __version__
    assert json.loads(json.dumps(document)) == document


def test_every_documented_operation_is_a_real_route(web: TestApp, document: dict[str, Any]) -> None:
    """Each documented path answers its documented method with neither 404 nor 405."""
    assert operations(document)
    for path, method in operations(document):
        response = web.request(path, method=method.upper(), expect_errors=True)
        assert response.status_int not in (404, 405), (method, path, response.status)


def test_every_route_the_app_serves_is_documented(web: TestApp, document: dict[str, Any]) -> None:
    """Each path app.py routes, asked with each method, is documented wherever the app
    answers it (HEAD counts as documented with GET; /openapi.json describes the others)."""
    paths = paths_the_app_routes()
    assert {"/knock", "/verify", "/health", "/ready", "/openapi.json"} <= paths
    documented = set(operations(document))
    for path in paths - {"/openapi.json"}:
        for method in METHODS:
            response = web.request(path, method=method.upper(), expect_errors=True)
            if response.status_int in (404, 405):
                continue
            implied = method == "head" and (path, "get") in documented
            assert (path, method) in documented or implied, (method, path, response.status)


class FailingFirewall(NullFirewall):
    def __init__(self) -> None:
        self.error: FirewallError | None = None

    def grant(self, entry: str, ttl: int) -> None:
        if self.error is not None:
            raise self.error


def test_documented_knock_responses_are_the_ones_the_app_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, document: dict[str, Any]
) -> None:
    """Every status POST /knock really returns is documented, and every documented one is
    produced here by a request that earns it."""
    firewall = FailingFirewall()
    monkeypatch.setattr(knocker.app, "create_firewall", lambda config, state: firewall)
    limits = {"knock_rate_limit": {"window_seconds": 60, "failed_requests": 5}}
    app = build_app(docs_config(tmp_path, security=limits), clock=lambda: 1_700_000_000.0)
    try:

        def knock(client: str, key: str = KEY, **kwargs: Any) -> int:
            web = TestApp(app, extra_environ={"REMOTE_ADDR": client})
            headers = {"X-Api-Key": key, **kwargs.pop("headers", {})}
            response = web.post("/knock", headers=headers, expect_errors=True, **kwargs)
            return response.status_int

        seen = {
            knock(CLIENT),
            knock(CLIENT, params=b'{"ttl": 0}', content_type="application/json"),
            knock(CLIENT, key="wrong"),
            knock(CLIENT, params=b'{"ip_address": "192.0.2.1"}', content_type="application/json"),
            knock(CLIENT, params=b"{" + b" " * MAX_BODY + b"}", content_type="application/json"),
            knock(CLIENT, params=b"ttl=60", content_type="text/plain"),
            knock(CLIENT, key=ADMIN_KEY),  # five failures above: over the budget
        }
        firewall.error = FirewallError("refused")
        seen.add(knock("198.51.100.1"))
        firewall.error = FirewallUnavailable("gone")
        seen.add(knock("198.51.100.2"))
    finally:
        app.close()
    assert {str(status) for status in seen} == set(document["paths"]["/knock"]["post"]["responses"])
    assert HTTPStatus.TOO_MANY_REQUESTS in seen


def test_knock_200_schema_matches_a_real_response(web: TestApp, document: dict[str, Any]) -> None:
    """The KnockResponse schema lists exactly the keys and types a real 200 carries."""
    schema = document["components"]["schemas"]["KnockResponse"]
    response = web.post("/knock", headers={"X-Api-Key": KEY}).json
    assert set(schema["properties"]) == set(response)
    assert set(schema["required"]) == set(response)
    python_type = {"string": str, "integer": int}
    for name, value in response.items():
        assert type(value) is python_type[schema["properties"][name]["type"]], name


def test_knock_error_schema_matches_a_real_error(web: TestApp, document: dict[str, Any]) -> None:
    """The Error schema is the {"error": "..."} body a refused knock carries."""
    schema = document["components"]["schemas"]["Error"]
    body = web.post("/knock", headers={"X-Api-Key": "wrong"}, expect_errors=True).json
    assert set(schema["required"]) == set(body) == set(schema["properties"])


def test_knock_request_schema_matches_the_accepted_body(document: dict[str, Any]) -> None:
    """The KnockRequest schema allows exactly ip_address and ttl, with the real bounds."""
    schema = document["components"]["schemas"]["KnockRequest"]
    assert set(schema["properties"]) == {"ip_address", "ttl"}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["ttl"]["minimum"] == 1
    assert schema["properties"]["ttl"]["maximum"] == MAX_TTL
    assert schema["properties"]["ip_address"]["maxLength"] == 100
    assert str(MAX_BODY) in document["paths"]["/knock"]["post"]["responses"]["413"]["description"]


def test_every_schema_reference_resolves(document: dict[str, Any]) -> None:
    """Every $ref points at a schema the document defines."""
    text = json.dumps(document)
    refs = {part.split('"')[0] for part in text.split('"$ref": "')[1:]}
    assert refs
    for ref in refs:
        name = ref.removeprefix("#/components/schemas/")
        assert name in document["components"]["schemas"], ref


def test_served_and_written_documents_are_the_document(
    web: TestApp, tmp_path: Path, document: dict[str, Any]
) -> None:
    """/openapi.json and the file at openapi_output_path hold the same document."""
    assert web.get("/openapi.json").json == document
    assert json.loads((tmp_path / "openapi.json").read_text()) == document


# --- a stale schema file, documentation disabled ------------------------------------------


def build_without_docs(tmp_path: Path, output: Path) -> None:
    config = load_config_text(f"""
api_keys:
  - key: {KEY}
    max_ttl: 3600
whitelist:
  storage_path: {tmp_path / "whitelist.json"}
documentation:
  enabled: false
  openapi_output_path: {output}
""")
    build_app(config).close()


def test_schema_file_knocker_wrote_is_removed_when_docs_are_disabled(
    app: App, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file a docs-enabled start wrote is deleted by a docs-disabled start, logged."""
    written = tmp_path / "openapi.json"
    assert written.is_file()
    with caplog.at_level(logging.INFO, logger="knocker"):
        build_without_docs(tmp_path, written)
    assert not written.exists()
    assert any(
        "removed" in r.getMessage() and str(written) in r.getMessage() for r in caplog.records
    )


def test_symlink_to_a_knocker_schema_is_not_followed(app: App, tmp_path: Path) -> None:
    """A symlink at the path is left alone, and so is the schema it points to."""
    target = tmp_path / "openapi.json"
    link = tmp_path / "link.json"
    link.symlink_to(target)
    build_without_docs(tmp_path, link)
    assert link.is_symlink() and target.is_file()


@pytest.mark.parametrize(
    "content",
    [
        '{"openapi": "3.0.3", "info": {"title": "Someone else", "version": "1"}}',
        '{"info": {"title": "Knocker"}}',
        "not json at all",
        "",
    ],
)
def test_files_knocker_did_not_write_are_kept(tmp_path: Path, content: str) -> None:
    """Another API's schema, a non-OpenAPI document, garbage or an empty file: kept."""
    path = tmp_path / "openapi.json"
    path.write_text(content)
    build_without_docs(tmp_path, path)
    assert path.read_text() == content


def test_a_directory_at_the_path_is_kept(tmp_path: Path) -> None:
    """Only regular files are candidates."""
    path = tmp_path / "openapi.json"
    path.mkdir()
    build_without_docs(tmp_path, path)
    assert path.is_dir()
