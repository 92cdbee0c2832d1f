"""The status page in a real headless Chromium while clients hold seats: the numbers it shows are the ledger's.

Set LMGRD_STATUS_SCREENSHOT=PATH to keep the screenshot (docs/status-page.png is made this way).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
from harness import Daemon, RawClient

from protocol import Checkout, ErrorReply, Granted, Welcome


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is required when CI is set; run .ci/install-deps.sh")
    pytest.skip("chromium is not installed (Debian: .ci/install-deps.sh)")


def run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120)


class PageFacts(HTMLParser):
    """Collects, per product section, the numbers in its legend and the holders' users; and the denials."""

    def __init__(self) -> None:
        super().__init__()
        self.products: dict[str, dict[str, str]] = {}
        self.holders: dict[str, list[str]] = {}
        self.denial_reasons: list[str] = []
        self.health = ""
        self._product = ""
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "section" and "product" in cls:
            self._product = a.get("data-product") or ""
            self.products[self._product] = {}
            self.holders[self._product] = []
        elif tag == "b" and cls and self._product:
            self._field = "n:" + cls[0]
        elif tag == "td" and "user" in cls:
            self._field = "user"
        elif tag == "td" and "reason" in cls:
            self._field = "reason"
        elif a.get("id") == "health":
            self._field = "health"

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._product = ""
        if tag in ("b", "td", "span"):
            self._field = None

    def handle_data(self, data: str) -> None:
        f = self._field
        if f is None:
            return
        if f.startswith("n:"):
            self.products[self._product][f[2:]] = data.strip()
        elif f == "user":
            self.holders[self._product].append(data.strip())
        elif f == "reason":
            self.denial_reasons.append(data.strip())
        elif f == "health":
            self.health += data


def client(d: Daemon, user: str) -> RawClient:
    c = d.connect()
    assert isinstance(c.hello(user=user), Welcome)
    return c


def test_status_page_in_chromium_shows_the_seats(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    browser = chromium()
    # These raw clients never heartbeat: a lease long enough that no seat lapses while chromium starts on a busy
    # machine (with the harness's 3 s the page could show the seats already freed).
    d = daemon_factory((("CADPRO", "2.1", 3), ("VIEWER", "1.0", 10), ("SIMX", "4.0", 1)),
                       extra=["--metrics-port", "auto"], lease_timeout=300.0)
    url = d.metrics_url()
    ann, ben, cat = client(d, "ann"), client(d, "ben"), client(d, "cat")
    for c, product, version in ((ann, "CADPRO", "2.1"), (ben, "CADPRO", "2.1"), (ben, "VIEWER", "1.0"),
                                (cat, "SIMX", "4.0")):
        assert isinstance(c.request(Checkout(c.id(), product, version, 0)), Granted)
    assert isinstance(ann.request(Checkout(ann.id(), "SIMX", "4.0", 0)), ErrorReply)  # NO_SEATS
    assert isinstance(ann.request(Checkout(ann.id(), "CADPRO", "9.0", 0)), ErrorReply)  # VERSION_NOT_PERMITTED
    dan = client(d, "dan")
    dan.send(Checkout(dan.id(), "SIMX", "4.0", 120))  # waits in the queue
    d.wait_for_log(r"QUEUED SIMX 4\.0 for dan@")

    dom = run_chromium(browser, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    facts = PageFacts()
    facts.feed(dom.stdout)
    assert facts.health == "serving"
    assert facts.products["CADPRO"] == {"in-use": "2", "reserved": "0", "free": "1", "issued": "3", "queued": "0"}
    assert facts.products["VIEWER"] == {"in-use": "1", "reserved": "0", "free": "9", "issued": "10", "queued": "0"}
    assert facts.products["SIMX"] == {"in-use": "1", "reserved": "0", "free": "0", "issued": "1", "queued": "1"}
    assert sorted(facts.holders["CADPRO"]) == ["ann", "ben"]
    assert facts.holders["VIEWER"] == ["ben"] and facts.holders["SIMX"] == ["cat"]
    assert facts.denial_reasons == ["VERSION_NOT_PERMITTED", "NO_SEATS"]  # newest first

    shot = tmp_path / "status.png"
    r = run_chromium(browser, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,900",
                     "--hide-scrollbars", url)
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    keep = os.environ.get("LMGRD_STATUS_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
    assert d.stop() == 0
