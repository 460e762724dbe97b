"""The knock page: its routes and headers (webpage.routes, WebTest against the app), and
the page itself in real headless Chromium (Debian's chromium + chromium-driver) against a
real `knocker serve` with web.enabled. Chromium is driven through chromedriver's W3C
WebDriver HTTP API with urllib, so no driver download and no extra Python dependency."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import webtest

from knocker import webpage
from knocker.app import build_app
from knocker.config import MAX_TTL, Config
from tests.serverproc import KnockerProcess
from tests.support.config import ADMIN_KEY, TEST_KEY, base_config, make_config
from tests.support.net import free_port
from tests.support.polling import wait_until
from tests.support.resources import require

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
EXPECTED_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; manifest-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)


def page_config(directory: Path, web: bool) -> Config:
    return make_config(directory, web={"enabled": web})


# ---------------------------------------------------------------------------------------
# routes


def test_routes_are_empty_when_the_page_is_disabled(tmp_path: Path) -> None:
    """web.enabled false (the default): no page paths at all."""
    assert webpage.routes(page_config(tmp_path, web=False)) == {}


def test_routes_serve_page_manifest_and_icons_with_strict_headers(tmp_path: Path) -> None:
    """Every page path has a media type, a body and the security headers."""
    table = webpage.routes(page_config(tmp_path, web=True))
    assert {"/", "/app.js", "/app.css", "/manifest.webmanifest", "/icon.svg"} <= set(table)
    assert table["/"][0] == "text/html; charset=utf-8"
    assert table["/manifest.webmanifest"][0] == "application/manifest+json"
    assert table["/icon.svg"][0] == "image/svg+xml"
    for path, (content_type, body, headers) in table.items():
        names = dict(headers)
        assert body, path
        assert names["Content-Security-Policy"] == EXPECTED_CSP
        assert names["X-Content-Type-Options"] == "nosniff"
        assert names["Referrer-Policy"] == "no-referrer"
        assert "Cache-Control" in names
        if content_type.startswith("image/png"):
            assert body.startswith(b"\x89PNG\r\n\x1a\n")


def test_page_references_only_its_own_served_files(tmp_path: Path) -> None:
    """The HTML and manifest point only at served same-origin paths; no inline script or
    style, so the strict CSP needs no exceptions."""
    table = webpage.routes(page_config(tmp_path, web=True))
    html = table["/"][1].decode()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs, html
    for ref in refs:
        assert "//" not in ref and ":" not in ref, ref
        assert "/" + ref.lstrip("./") in table, ref
    assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", html)  # no inline script
    assert "<style" not in html and " style=" not in html and "onclick" not in html
    manifest = json.loads(table["/manifest.webmanifest"][1])
    assert manifest["display"] == "standalone" and manifest["start_url"]
    sizes = set()
    for icon in manifest["icons"]:
        assert "/" + icon["src"] in table
        sizes.add(icon["sizes"])
    assert {"192x192", "512x512"} <= sizes  # what browsers need to offer "install"


def test_app_serves_the_page_only_when_enabled(tmp_path: Path) -> None:
    """Through the WSGI app: GET / is the page with its CSP when enabled, 404 otherwise."""
    for web, expected in ((True, 200), (False, 404)):
        directory = tmp_path / str(web)
        directory.mkdir()
        app = build_app(page_config(directory, web))
        try:
            response = webtest.TestApp(app).get("/", status=expected)
            if web:
                assert response.headers["Content-Type"] == "text/html; charset=utf-8"
                assert response.headers["Content-Security-Policy"] == EXPECTED_CSP
                assert b'<script src="app.js" defer>' in response.body
                manifest = webtest.TestApp(app).get("/manifest.webmanifest")
                assert manifest.json["name"] == "Knocker"
        finally:
            app.close()


def test_page_is_given_the_servers_max_ttl(tmp_path: Path) -> None:
    """The page's TTL limit is config.MAX_TTL, filled in by the server: app.js holds no
    copy of the number."""
    table = webpage.routes(page_config(tmp_path, web=True))
    assert f'<html lang="en" data-max-ttl="{MAX_TTL}">'.encode() in table["/"][1]
    assert str(MAX_TTL).encode() not in table["/app.js"][1]
    assert b"dataset.maxTtl" in table["/app.js"][1]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ('"abc"', True),
        ('W/"abc"', True),  # weak comparison (RFC 9110 8.8.3.2)
        ('"x", "abc"', True),
        ('"x","y"', False),
        ('"abcd"', False),
        ("*", True),
    ],
)
def test_not_modified_compares_if_none_match_weakly(header: str | None, expected: bool) -> None:
    """If-None-Match matches when any listed tag names the ETag (W/ ignored) or is "*"."""
    assert webpage.not_modified(header, '"abc"') is expected


def test_revalidation_with_the_current_etag_gets_304_without_a_body(tmp_path: Path) -> None:
    """A browser revalidating with the page's ETag gets 304 (ETag and Cache-Control, no
    body, no Content-Length); a stale ETag gets the file again."""
    app = build_app(page_config(tmp_path, web=True))
    try:
        web = webtest.TestApp(app)
        for path in ("/", "/app.js", "/icon-192.png"):
            first = web.get(path)
            etag = first.headers["ETag"]
            for method in (web.get, web.head):
                again = method(path, headers={"If-None-Match": etag}, status=304)
                assert again.body == b""
                assert again.headers["ETag"] == etag
                assert again.headers["Cache-Control"] == "no-cache"
                assert "Content-Length" not in again.headers
                assert "Content-Type" not in again.headers
            stale = web.get(path, headers={"If-None-Match": '"stale"'}, status=200)
            assert stale.body == first.body
    finally:
        app.close()


# ---------------------------------------------------------------------------------------
# a minimal W3C WebDriver client (chromedriver speaks HTTP + JSON)


class WebDriverError(Exception):
    pass


class Browser:
    def __init__(self, driver_url: str, profile: Path) -> None:
        self.base = driver_url
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": shutil.which("chromium") or "/usr/bin/chromium",
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--disable-features=Translate,MediaRouter,OptimizationHints",
                    "--window-size=430,900",
                    f"--user-data-dir={profile}",
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }
        value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = f"/session/{value['sessionId']}"

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as error:
            raise WebDriverError(error.read().decode(errors="replace")[:2000]) from None

    def cmd(self, method: str, path: str, payload: Any = None) -> Any:
        return self._call(method, self.session + path, payload)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def refresh(self) -> None:
        self.cmd("POST", "/refresh", {})

    def find(self, css: str) -> str:
        # The W3C reply is {"element-6066-...": id}: one member, whatever its exact name.
        reference = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        return str(next(iter(reference.values())))

    def type(self, css: str, text: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def text(self, css: str) -> str:
        return str(self.cmd("GET", f"/element/{self.find(css)}/text"))

    def visible(self, css: str) -> bool:
        return bool(self.cmd("GET", f"/element/{self.find(css)}/displayed"))

    def js(self, script: str, *args: Any) -> Any:
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def cdp(self, command: str, params: dict[str, Any]) -> Any:
        return self.cmd("POST", "/goog/cdp/execute", {"cmd": command, "params": params})

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))

    def console(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.cmd("POST", "/se/log", {"type": "browser"})
        return entries

    def wait_until(self, condition: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
        """wait_until, a WebDriver error (element not there yet) counting as "not yet"."""

        def attempt() -> Any:
            try:
                return condition()
            except WebDriverError:
                return None

        return wait_until(attempt, timeout, what=what or str(condition))

    def quit(self) -> None:
        try:
            self._call("DELETE", self.session)
        except (WebDriverError, OSError):
            pass


@pytest.fixture(scope="module")
def chromedriver() -> Iterator[str]:
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    require(chromium and driver, "Debian's chromium and chromium-driver")
    assert driver is not None
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="chromedriver-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [driver, f"--port={port}", "--log-level=WARNING"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError("chromedriver exited: " + Path(log.name).read_text())
            try:
                with urllib.request.urlopen(url + "/status", timeout=2) as response:
                    return bool(json.loads(response.read())["value"]["ready"])
            except (OSError, ValueError):
                return False

        try:
            wait_until(ready, 20, what="chromedriver")
        except AssertionError as error:
            raise RuntimeError(f"{error}: {Path(log.name).read_text()}") from None
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnockerProcess]:
    directory = tmp_path_factory.mktemp("page-server")
    config = base_config(
        directory,
        web={"enabled": True},
        # Every browser knock comes from 127.0.0.1; the default budget is not the subject.
        security={"knock_rate_limit": {"successful_requests": 0, "failed_requests": 0}},
    )
    with KnockerProcess(directory, config) as process:
        yield process


@pytest.fixture
def browser(chromedriver: str, tmp_path: Path) -> Iterator[Browser]:
    session = Browser(chromedriver, tmp_path / "profile")  # fresh profile: empty storage
    # Installed before any page script runs; CSP does not apply to it.
    session.cdp(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": "window.__csp = [];"
            "document.addEventListener('securitypolicyviolation', e =>"
            " window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
        },
    )
    try:
        yield session
    finally:
        session.quit()


def countdown_seconds(text: str) -> int:
    parts = [int(p) for p in text.split(":")]
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds


def knock_with_key(browser: Browser, server: KnockerProcess, key: str = TEST_KEY) -> None:
    browser.get(server.url + "/")
    browser.wait_until(lambda: "Enter your API key" in browser.text("#status"), what="page")
    browser.type("#key", key)
    browser.click("#knock")


def csp_violations(browser: Browser) -> list[str]:
    found: list[str] = list(browser.js("return window.__csp || [];"))
    for entry in browser.console():
        message = str(entry.get("message", ""))
        if "Content Security Policy" in message or "Refused to" in message:
            found.append(message)
    return found


# ---------------------------------------------------------------------------------------
# the page in Chromium


@pytest.mark.browser
@pytest.mark.server
def test_entering_a_key_knocks_and_shows_entry_and_a_running_countdown(
    browser: Browser, page_server: KnockerProcess
) -> None:
    """Type the key, press Knock: the page shows 127.0.0.1 and a countdown that goes down;
    the key is remembered; the server now lets 127.0.0.1 through. Screenshots: light, dark."""
    knock_with_key(browser, page_server)
    browser.wait_until(lambda: browser.text("#entry") == "127.0.0.1", what="entry")
    assert "Access granted" in browser.text("#status")
    first = countdown_seconds(browser.text("#countdown"))
    assert 3590 <= first <= 3600  # the phone key's max_ttl
    browser.wait_until(
        lambda: countdown_seconds(browser.text("#countdown")) <= first - 2,
        timeout=6,
        what="countdown to decrease",
    )
    assert browser.js("return localStorage.getItem('knocker.apiKey')") == TEST_KEY
    assert not browser.visible("#key-entry") and browser.visible("#forget")
    assert not browser.visible("#error")
    assert page_server.verify() == 200
    assert csp_violations(browser) == []

    browser.screenshot(ARTIFACTS / "knock-page-light.png")
    light = browser.js("return getComputedStyle(document.body).backgroundColor")
    browser.cdp(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    dark = browser.js("return getComputedStyle(document.body).backgroundColor")
    assert light == "rgb(244, 246, 250)" and dark == "rgb(20, 23, 28)"
    browser.screenshot(ARTIFACTS / "knock-page-dark.png")


@pytest.mark.browser
@pytest.mark.server
def test_reloading_knocks_automatically_unless_turned_off(
    browser: Browser, page_server: KnockerProcess
) -> None:
    """With a saved key, opening the page knocks by itself (the server's expiry moves);
    with the auto-knock box unticked, it waits for the button."""
    knock_with_key(browser, page_server)
    browser.wait_until(lambda: browser.text("#entry") == "127.0.0.1", what="first knock")
    before = page_server.whitelist_file()["127.0.0.1"]
    time.sleep(1.2)  # expiries are whole seconds: let the next knock land on a later one

    browser.refresh()
    browser.wait_until(lambda: browser.text("#entry") == "127.0.0.1", what="auto-knock")
    assert "Access granted" in browser.text("#status")
    assert page_server.whitelist_file()["127.0.0.1"] > before

    browser.click("#auto")  # untick
    assert browser.js("return localStorage.getItem('knocker.autoKnock')") == "0"
    browser.refresh()
    browser.wait_until(lambda: "Ready to knock" in browser.text("#status"), what="no knock")
    time.sleep(0.5)
    assert not browser.visible("#grant")
    assert browser.js("return document.getElementById('auto').checked") is False
    assert csp_violations(browser) == []


@pytest.mark.browser
@pytest.mark.server
def test_wrong_key_is_explained_in_words_and_not_saved(
    browser: Browser, page_server: KnockerProcess
) -> None:
    """A 401 shows 'Wrong key' in the alert region; the key is not remembered."""
    knock_with_key(browser, page_server, key="not-the-right-key-123")
    browser.wait_until(lambda: browser.visible("#error"), what="error")
    assert "Wrong key" in browser.text("#error")
    assert browser.js("return localStorage.getItem('knocker.apiKey')") is None
    assert browser.visible("#key-entry")
    assert browser.js("return document.getElementById('error').getAttribute('role')") == "alert"
    browser.screenshot(ARTIFACTS / "knock-page-wrong-key.png")


@pytest.mark.browser
@pytest.mark.server
def test_forget_clears_the_saved_key(browser: Browser, page_server: KnockerProcess) -> None:
    """'Forget key' removes the key from localStorage and asks for it again."""
    knock_with_key(browser, page_server)
    browser.wait_until(lambda: browser.visible("#forget"), what="saved key")
    browser.click("#forget")
    assert browser.js("return localStorage.getItem('knocker.apiKey')") is None
    assert browser.visible("#key-entry") and not browser.visible("#key-saved")
    assert "Key forgotten" in browser.text("#status")
    browser.refresh()
    browser.wait_until(lambda: "Enter your API key" in browser.text("#status"), what="ask")


@pytest.mark.browser
@pytest.mark.server
def test_capped_ttl_and_forbidden_remote_address_are_explained(
    browser: Browser, page_server: KnockerProcess
) -> None:
    """Asking for more than the key's max_ttl shows the cap warning; a normal key naming
    another address gets the 403 explanation; an admin key may whitelist a network."""
    browser.get(page_server.url + "/")
    browser.wait_until(lambda: "Enter your API key" in browser.text("#status"), what="page")
    browser.click("#options summary")
    browser.type("#ttl", "7200")
    browser.type("#key", TEST_KEY)
    browser.click("#knock")
    browser.wait_until(lambda: browser.visible("#cap-warning"), what="cap warning")
    assert "1 hour instead of the requested 2 hours" in browser.text("#cap-warning")

    browser.type("#ip", "198.51.100.7")
    browser.click("#knock")
    browser.wait_until(lambda: browser.visible("#error"), what="403")
    assert "may not whitelist other addresses" in browser.text("#error")

    browser.click("#forget")
    browser.type("#key", ADMIN_KEY)
    browser.js("document.getElementById('ip').value = '203.0.113.0/24'")
    browser.click("#knock")
    browser.wait_until(lambda: browser.text("#entry") == "203.0.113.0/24", what="admin grant")
    assert "203.0.113.0/24" in page_server.whitelist_file()
    assert csp_violations(browser) == []


@pytest.mark.browser
@pytest.mark.server
def test_page_is_served_with_csp_and_blocks_foreign_code(
    browser: Browser, page_server: KnockerProcess
) -> None:
    """The response carries the CSP; the page loads without violations, and an injected
    inline script is refused (the policy is really in force)."""
    status, headers, _ = page_server.request("GET", "/")
    assert status == 200
    assert headers["Content-Security-Policy"] == EXPECTED_CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    browser.get(page_server.url + "/")
    browser.wait_until(lambda: "Enter your API key" in browser.text("#status"), what="page")
    assert csp_violations(browser) == []
    browser.js(
        "const s = document.createElement('script');"
        "s.textContent = 'window.__injected = true';"
        "document.head.appendChild(s);"
    )
    browser.wait_until(lambda: csp_violations(browser), what="the violation to be reported")
    assert browser.js("return window.__injected === true") is False


@pytest.mark.browser
@pytest.mark.server
def test_open_page_knocks_again_before_the_entry_expires(
    browser: Browser, page_server: KnockerProcess
) -> None:
    """With a 3 s time to live the open page knocks again after about 2.7 s by itself: the
    server's expiry for the entry moves forward and the countdown starts over."""
    entry = "192.0.2.77"  # an admin key's remote entry: no other test touches it
    browser.get(page_server.url + "/")
    browser.wait_until(lambda: "Enter your API key" in browser.text("#status"), what="page")
    browser.click("#options summary")
    browser.type("#ttl", "3")
    browser.type("#ip", entry)
    browser.type("#key", ADMIN_KEY)
    browser.click("#knock")
    browser.wait_until(lambda: browser.text("#entry") == entry, what="first grant")
    first = page_server.whitelist_file()[entry]
    browser.wait_until(
        lambda: page_server.whitelist_file().get(entry, 0) > first,
        timeout=8,
        what="the automatic re-knock to extend the entry",
    )
    assert countdown_seconds(browser.text("#countdown")) >= 1
    assert "Access granted" in browser.text("#status")
    assert csp_violations(browser) == []


@pytest.mark.browser
@pytest.mark.server
def test_sign_out_button_ends_this_devices_grant(
    browser: Browser, page_server: KnockerProcess
) -> None:
    """ "Sign out this device" sends DELETE ./knock: the grant ends at the server, the page
    says so and schedules no knock that would undo it; a second press finds nothing."""
    knock_with_key(browser, page_server)
    browser.wait_until(lambda: "Access granted" in browser.text("#status"), what="knock")
    assert page_server.verify() == 200
    browser.click("#sign-out")
    browser.wait_until(lambda: "Signed out" in browser.text("#status"), what="sign-out")
    assert page_server.verify() == 401
    assert not browser.visible("#grant") and not browser.visible("#error")
    browser.click("#sign-out")
    browser.wait_until(lambda: "Nothing to sign out" in browser.text("#status"), what="404")
    assert page_server.verify() == 401
    assert csp_violations(browser) == []
