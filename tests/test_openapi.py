"""knocker.openapi: the OpenAPI document describes the routes the app really has."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from webtest import TestApp

from knocker import __version__
from knocker.app import App, build_app
from knocker.config import load_config_text
from knocker.openapi import openapi_document
from knocker.policy import MAX_BODY, MAX_TTL

KEY = "openapi-test-key-2b7d9e4f1a6c"
CLIENT = "203.0.113.7"
METHODS = ("get", "head", "post", "put", "delete", "patch", "options")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    config = load_config_text(f"""
api_keys:
  - key: {KEY}
    max_ttl: 3600
whitelist:
  storage_path: {tmp_path / "whitelist.json"}
documentation:
  enabled: true
  openapi_output_path: {tmp_path / "openapi.json"}
metrics:
  enabled: true
  allow: ["{CLIENT}"]
""")
    built = build_app(config, clock=lambda: 1_700_000_000.0)
    yield built
    built.close()


@pytest.fixture
def web(app: App) -> TestApp:
    return TestApp(app, extra_environ={"REMOTE_ADDR": CLIENT})


@pytest.fixture
def document() -> dict[str, Any]:
    return openapi_document(__version__)


def operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    return [(path, method) for path, item in document["paths"].items()
            for method in item if method in METHODS]


def test_document_is_openapi_3_and_json(document: dict[str, Any]) -> None:
    """The document declares OpenAPI 3 and survives a JSON round trip."""
    assert document["openapi"].startswith("3.")
    assert document["info"]["version"] == __version__
    assert json.loads(json.dumps(document)) == document


def test_every_documented_operation_is_a_real_route(web: TestApp,
                                                    document: dict[str, Any]) -> None:
    """Each documented path answers its documented method with neither 404 nor 405."""
    assert operations(document)
    for path, method in operations(document):
        response = web.request(path, method=method.upper(), expect_errors=True)
        assert response.status_int not in (404, 405), (method, path, response.status)


def test_documented_knock_responses_are_the_ones_the_app_gives(
        document: dict[str, Any]) -> None:
    """/knock documents every status SPEC 1.1 lets it return."""
    documented = set(document["paths"]["/knock"]["post"]["responses"])
    assert {"200", "400", "401", "403", "413", "415", "429", "500", "503"} <= documented


def test_knock_200_schema_matches_a_real_response(web: TestApp,
                                                  document: dict[str, Any]) -> None:
    """The KnockResponse schema lists exactly the keys and types a real 200 carries."""
    schema = document["components"]["schemas"]["KnockResponse"]
    response = web.post("/knock", headers={"X-Api-Key": KEY}).json
    assert set(schema["properties"]) == set(response)
    assert set(schema["required"]) == set(response)
    python_type = {"string": str, "integer": int}
    for name, value in response.items():
        assert type(value) is python_type[schema["properties"][name]["type"]], name


def test_knock_error_schema_matches_a_real_error(web: TestApp,
                                                 document: dict[str, Any]) -> None:
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
    assert str(MAX_BODY) in document["paths"]["/knock"]["post"]["responses"]["413"][
        "description"]


def test_every_schema_reference_resolves(document: dict[str, Any]) -> None:
    """Every $ref points at a schema the document defines."""
    text = json.dumps(document)
    refs = {part.split('"')[0] for part in text.split('"$ref": "')[1:]}
    assert refs
    for ref in refs:
        name = ref.removeprefix("#/components/schemas/")
        assert name in document["components"]["schemas"], ref


def test_served_and_written_documents_are_the_document(web: TestApp, tmp_path: Path,
                                                       document: dict[str, Any]) -> None:
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
        app: App, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The file a docs-enabled start wrote is deleted by a docs-disabled start, logged."""
    written = tmp_path / "openapi.json"
    assert written.is_file()
    with caplog.at_level(logging.INFO, logger="knocker"):
        build_without_docs(tmp_path, written)
    assert not written.exists()
    assert any("removed" in r.getMessage() and str(written) in r.getMessage()
               for r in caplog.records)


def test_symlink_to_a_knocker_schema_is_not_followed(app: App, tmp_path: Path) -> None:
    """A symlink at the path is left alone, and so is the schema it points to."""
    target = tmp_path / "openapi.json"
    link = tmp_path / "link.json"
    link.symlink_to(target)
    build_without_docs(tmp_path, link)
    assert link.is_symlink() and target.is_file()


@pytest.mark.parametrize("content", [
    '{"openapi": "3.0.3", "info": {"title": "Someone else", "version": "1"}}',
    '{"info": {"title": "Knocker"}}',
    "not json at all",
    "",
])
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
