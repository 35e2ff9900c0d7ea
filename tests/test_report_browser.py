"""A real report (`estbench report --quick`) rendered by headless Chromium: it loads with no console error,
every <img> loads, nothing is cut off or wider than the page, every table fits or scrolls, every figure keeps a
readable shape and size, every table header says something, and a screenshot is kept as an artifact.

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
from tests.browser import (ASPECT_BOUNDS, MIN_SHOWN_SCALE, ChromiumUnavailable, check_page, find_chromium,
                           install_chromium, screenshot)

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


def test_nothing_is_cut_off_or_wider_than_the_page(page_check):
    assert not page_check.layout["cut"], f"content a reader cannot see: {page_check.layout['cut']}"


def test_every_table_fits_or_scrolls(page_check):
    tables = page_check.layout["tables"]
    assert tables
    overflowing = [t for t in tables if t["width"] > t["box"] + 1 and not t["scrolls"]]
    assert not overflowing, f"tables wider than their box, which does not scroll: {overflowing}"
    study = [t for t in tables if ".study." in t["table"] + "."]
    assert study and all(t["width"] <= t["box"] + 1 for t in study), f"the study table does not fit: {study}"


def test_every_image_keeps_a_readable_shape_and_size(page_check):
    low, high = ASPECT_BOUNDS
    for img in page_check.images:
        aspect = img["naturalWidth"] / img["naturalHeight"]
        assert low <= aspect <= high, f"{img['src']}: aspect {aspect:.2f} outside [{low:.2f}, {high}]"
        scale = img["shownWidth"] / img["naturalWidth"]
        assert scale >= MIN_SHOWN_SCALE, f"{img['src']}: shown at {scale:.0%} of its size, its labels unreadable"


def test_every_table_header_is_named(page_check):
    assert not page_check.layout["emptyHeaders"], f"empty table headers: {page_check.layout['emptyHeaders']}"


def test_screenshot(chromium, report, tmp_path):
    png = screenshot(chromium, report / "index.html", tmp_path / "report-screenshot.png",
                     profile=tmp_path / "profile")
    assert png.is_file() and png.stat().st_size > 0 and png.read_bytes()[:8] == PNG_MAGIC
    artifacts = Path(os.environ.get("ESTBENCH_ARTIFACTS") or REPO / ".artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    kept = Path(shutil.copyfile(png, artifacts / "report-screenshot.png"))
    assert kept.stat().st_size == png.stat().st_size
    first = screenshot(chromium, report / "index.html", artifacts / "report-first-screen.png",
                       profile=tmp_path / "profile", window="1400,900")
    assert first.read_bytes()[:8] == PNG_MAGIC
    print(f"\nreport screenshot: {kept}; its first screen: {first}")
