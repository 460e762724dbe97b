"""knocker.apidocs: /docs is Swagger UI from swagger-ui-py's package data under the knock
page's Content-Security-Policy, and renders /openapi.json in headless Chromium with no
console error and no request to anything but Knocker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import webtest

from knocker.apidocs import inline_images_to_files, routes, swagger_ui_static
from knocker.app import build_app
from knocker.config import load_config_text
from knocker.webpage import CONTENT_SECURITY_POLICY
from tests.serverproc import KnockerProcess, base_config
from tests.test_webpage import Browser, browser, chromedriver, csp_violations

__all__ = ["browser", "chromedriver"]  # the fixtures, shared with test_webpage


def docs_app(tmp_path: Path, enabled: bool) -> webtest.TestApp:
    config = load_config_text(f"""
api_keys:
  - {{key: apidocs-test-key-1a2b3c4d5e, max_ttl: 60}}
whitelist:
  storage_path: {tmp_path / "whitelist.json"}
documentation:
  enabled: {"true" if enabled else "false"}
  openapi_output_path: {tmp_path / "openapi.json"}
""")
    return webtest.TestApp(build_app(config))


def test_swagger_ui_assets_come_from_the_installed_package() -> None:
    """swagger-ui-py (the docs extra, in the test extra too) ships the bundle Knocker serves."""
    static = swagger_ui_static()
    assert static is not None
    table = routes()
    with open(Path(static) / "swagger-ui-bundle.js", "rb") as handle:
        assert table["/docs/swagger-ui-bundle.js"][1] == handle.read()


def test_docs_pages_carry_the_knock_page_security_headers(tmp_path: Path) -> None:
    """Every /docs file is served with the same strict CSP as the knock page."""
    web = docs_app(tmp_path, enabled=True)
    for path in routes():
        response = web.get(path)
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = web.get("/docs").text
    assert "<script>" not in page and "style=" not in page  # nothing inline
    assert "/openapi.json" in web.get("/docs/init.js").text


def test_data_url_images_become_files_the_css_points_to() -> None:
    """Quoted (CSS-escaped, %-encoded) and base64 data: images move to /docs/img/ files;
    other url()s stay."""
    css = (
        b'a{background:url("data:image/svg+xml;charset=utf-8,<svg x=\\"1\\">%23</svg>")}'
        b"b{background:url(data:image/png;base64,iVBORw0K)}"
        b'c{background:url("/x.png")}'
    )
    rewritten, files = inline_images_to_files(css)
    assert b"data:" not in rewritten and b'url("/x.png")' in rewritten
    bodies = {media: body for media, body in files.values()}
    assert bodies["image/svg+xml"] == b'<svg x="1">#</svg>'
    assert bodies["image/png"] == b"\x89PNG\r\n"
    assert all(path.encode() in rewritten for path in files)
    assert b"data:" not in routes()["/docs/swagger-ui.css"][1]


def test_docs_are_absent_when_documentation_is_disabled(tmp_path: Path) -> None:
    """No /docs and no /docs assets without documentation.enabled."""
    web = docs_app(tmp_path, enabled=False)
    for path in ("/docs", "/docs/swagger-ui-bundle.js", "/openapi.json"):
        assert web.get(path, expect_errors=True).status_int == 404


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnockerProcess]:
    directory = tmp_path_factory.mktemp("docs-server")
    config = base_config(
        directory,
        documentation={"enabled": True, "openapi_output_path": str(directory / "openapi.json")},
    )
    with KnockerProcess(directory, config) as process:
        yield process


@pytest.mark.browser
@pytest.mark.server
def test_docs_render_every_operation_with_no_console_error_and_no_outside_request(
    docs_server: KnockerProcess, browser: Browser
) -> None:
    """Swagger UI lists Knocker's operations; the console holds no error, no CSP violation,
    and every resource the page loaded came from Knocker."""
    browser.get(docs_server.url + "/docs")
    browser.wait_until(
        lambda: browser.js("return document.querySelectorAll('.opblock').length;") >= 5,
        timeout=30,
        what="Swagger UI operations",
    )
    paths = browser.js(
        "return Array.from(document.querySelectorAll("
        "'.opblock-summary-path')).map(e => e.textContent);"
    )
    assert {"/knock", "/verify", "/metrics"} <= {p.replace("\u200b", "") for p in paths}
    assert csp_violations(browser) == []
    errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
    assert errors == []
    loaded = browser.js(
        "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href]);"
    )
    assert any(url.endswith("/openapi.json") for url in loaded)
    assert [url for url in loaded if not url.startswith(docs_server.url + "/")] == []
