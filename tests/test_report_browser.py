"""A real report (`estbench report --quick`) rendered by headless Chromium: it loads with no console error,
every <img> loads, and a screenshot is kept as an artifact.

Chromium is found on PATH (or /usr/bin/chromium, or $ESTBENCH_CHROMIUM); when missing, it is apt-get installed
if this runs as root on Linux, and the tests are skipped (never failed) when that cannot be done. The
screenshot is copied to $ESTBENCH_ARTIFACTS (default: <repo>/.artifacts)/report-screenshot.png.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reports.cli import main
from tests.browser import ChromiumUnavailable, check_page, find_chromium, install_chromium, screenshot

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        try:
            found = install_chromium()
        except ChromiumUnavailable as err:
            pytest.skip(str(err))
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", "--quick", "--cases", "gauss-shift-1", "uniform-support", "--out", str(out)]) == 0
    assert (out / "index.html").is_file()
    return out


@pytest.fixture(scope="module")
def page_check(chromium, report, tmp_path_factory):
    work = tmp_path_factory.mktemp("browser")
    copy = shutil.copytree(report, work / "report")  # the checker is injected into the copy only
    return check_page(chromium, copy / "index.html", profile=work / "profile")


def test_page_loads_without_console_errors(page_check):
    assert not page_check.errors, "the report logged errors in the browser:\n" + "\n".join(page_check.errors)


def test_every_image_loads(page_check):
    assert page_check.images, "the report shows no <img> at all"
    assert not page_check.broken_images, f"images that did not load: {page_check.broken_images}"


def test_screenshot(chromium, report, tmp_path):
    png = screenshot(chromium, report / "index.html", tmp_path / "report-screenshot.png",
                     profile=tmp_path / "profile")
    assert png.is_file() and png.stat().st_size > 0 and png.read_bytes()[:8] == PNG_MAGIC
    artifacts = Path(os.environ.get("ESTBENCH_ARTIFACTS") or REPO / ".artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    kept = Path(shutil.copyfile(png, artifacts / "report-screenshot.png"))
    assert kept.stat().st_size == png.stat().st_size
    print(f"\nreport screenshot: {kept}")
