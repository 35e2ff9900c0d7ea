"""asv's own page viewable offline (reports.asv_offline): a page that `asv publish` really wrote, from asv results
of this repository's commits, has its CDN scripts and stylesheet replaced by copies installed from the npm
registry; no remote load remains, and headless Chromium, served the page from localhost with no internet, loads
it with no failed load and no console error (the page as published fails there: the check catches the defect)."""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from reports.asv_offline import ASSETS, make_offline, remote_assets
from tests.test_history import write_results
from tests.test_report_browser import chromium  # noqa: F401  (the session's Chromium, or a skip)
from tests.browser import check_page

REPO = Path(__file__).resolve().parents[1]
METRIC = "bench_statistics.KL.track_rsd"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """`asv publish` of three commits of this repository's history (results written by asv's own Results)."""
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    commits = git("rev-list", "-n", "3", "HEAD").split()[::-1]
    if branch == "HEAD" or len(commits) < 3:
        pytest.skip("needs a checkout on a branch with three commits")
    site = tmp_path_factory.mktemp("asv")
    conf = site / "asv.conf.json"
    conf.write_text(json.dumps({"version": 1, "project": "estbench", "project_url": "", "repo": str(REPO),
                                "branches": [branch], "results_dir": "results", "html_dir": "html"}))
    write_results(site / "results", {METRIC: [1.0, 1.0, 2.0]}, commits=commits)
    benchmarks = {METRIC: {"name": METRIC, "type": "track", "unit": "ratio", "param_names": ["device"],
                           "params": [["'cpu'", "'cuda'"]], "version": "1", "timeout": 60, "code": ""}}
    (site / "results" / "benchmarks.json").write_text(json.dumps({**benchmarks, "version": 2}))
    done = subprocess.run([sys.executable, "-m", "asv", "publish", "--config", str(conf)], cwd=site,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return site / "html"


@pytest.fixture(scope="module")
def offline(published, tmp_path_factory) -> Path:
    if shutil.which("npm") is None:
        pytest.skip("npm not found (Debian: apt-get install npm)")
    html = shutil.copytree(published, tmp_path_factory.mktemp("offline") / "html")
    assert sorted(make_offline(html)) == sorted(ASSETS)  # every CDN asset asv's page loads, and no other
    return html


def test_the_published_page_loads_from_cdns(published):
    assert len(remote_assets((published / "index.html").read_text(encoding="utf-8"))) == 10


def test_no_remote_load_remains_and_every_copy_is_there(offline):
    page = (offline / "index.html").read_text(encoding="utf-8")
    assert remote_assets(page) == [] and "integrity=" not in page
    for src in (m for m in page.split('"') if m.startswith("vendor/")):
        assert (offline / src).is_file() and (offline / src).stat().st_size > 0, src
    assert make_offline(offline) == []  # a second run has nothing left to do


def test_an_unknown_remote_asset_is_an_error_that_names_it(tmp_path):
    (tmp_path / "index.html").write_text('<script src="https://cdn.example/x.js"></script>')
    with pytest.raises(ValueError, match="https://cdn.example/x.js"):
        make_offline(tmp_path)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def served(folder: Path):
    """A local HTTP server for ``folder`` (asv's page loads its data over HTTP), on a free loopback port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def browser_errors(chromium: str, html: Path, profile: Path) -> list[str]:
    """What headless Chromium reports loading ``html/index.html`` from a local server (a page that never reaches
    window.load, as asv's does when its scripts fail and it moves to its error page, is one error)."""
    server = served(html)
    try:
        return check_page(chromium, html / "index.html", profile,
                          url=f"http://127.0.0.1:{server.server_port}/index.html").errors
    except AssertionError as err:
        return [str(err).splitlines()[0]]
    finally:
        server.shutdown()


def test_chromium_shows_the_offline_page(offline, chromium, tmp_path):  # noqa: F811
    errors = browser_errors(chromium, shutil.copytree(offline, tmp_path / "html"), tmp_path / "profile")
    assert not errors, "asv's offline page logged errors:\n" + "\n".join(errors)


def test_chromium_catches_the_published_page_without_internet(published, chromium, tmp_path):  # noqa: F811
    assert browser_errors(chromium, shutil.copytree(published, tmp_path / "html"), tmp_path / "profile")
