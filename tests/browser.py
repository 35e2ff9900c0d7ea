"""Headless Chromium, driven directly (no Python dependency): find or install it, check a page, screenshot it.

``check_page`` copies nothing itself: give it a copy of the page, since it injects a checker script into that
file. The script records, from the first line of <head> on, every console.error, uncaught exception, unhandled
rejection and failed resource load, and the state of every <img>; it writes them as JSON into
``<pre id="estbench-check">``, which ``chromium --dump-dom`` hands back. Chromium's own log (stderr) is read
too, for the console lines of the page only (never its dbus/GPU/sandbox noise). The script also records what a
reader could not see: content wider than the page or cut off by a box that hides its overflow, each table's width
against its box (and whether that box scrolls), every empty table header, and each image's natural and shown width.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_FALLBACK = Path("/usr/bin/chromium")
INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 60
VIRTUAL_TIME_BUDGET_MS = 10_000

#: Flags for a root, offline, throwaway headless Chromium (without the background-networking ones it keeps
#: trying a network that is closed here).
BASE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-default-browser-check", "--mute-audio")

CHECK_ID = "estbench-check"
#: A figure's width / height stays within these (Figure 6 was 6.5:1), and the page shows it at no less than
#: MIN_SHOWN_SCALE of its natural width (its 10-pt labels shrank to 6 px).
ASPECT_BOUNDS = (1 / 3, 3.0)
MIN_SHOWN_SCALE = 0.6
#: The width of the window the page is checked in, and of the body's content there (max-width 1400 px, 1em padding).
WINDOW_WIDTH, CONTENT_WIDTH = 1400, 1368

CHECKER_JS = """
(function () {
  var problems = [], loaded = false;
  function text(v) {
    try { return (v && v.stack) ? String(v.stack) : (typeof v === "object" ? JSON.stringify(v) : String(v)); }
    catch (e) { return String(v); }
  }
  function render() {
    if (!loaded || !document.body) return;
    var images = Array.prototype.map.call(document.images, function (img) {
      return {src: img.getAttribute("src"), url: img.currentSrc || img.src, complete: img.complete,
              naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight, shownWidth: img.clientWidth};
    });
    var pre = document.getElementById("%(id)s");
    if (!pre) { pre = document.createElement("pre"); pre.id = "%(id)s"; document.body.appendChild(pre); }
    pre.textContent = JSON.stringify({loaded: true, images: images, problems: problems, layout: layout()});
  }
  function name(el) {
    var classes = el.className ? "." + String(el.className).split(" ").join(".") : "";
    return el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + classes;
  }
  function scrolls(el) { var o = getComputedStyle(el).overflowX; return o === "auto" || o === "scroll"; }
  function layout() {
    /* what a reader cannot see: content wider than the page, or cut off by a box that hides its overflow */
    var doc = document.documentElement, cut = [], tables = [], headers = [];
    if (doc.scrollWidth > doc.clientWidth + 1)
      cut.push("the page: " + doc.scrollWidth + " px wide in a " + doc.clientWidth + " px window");
    Array.prototype.forEach.call(document.body.querySelectorAll("*"), function (el) {
      var o = getComputedStyle(el).overflowX;
      if ((o === "hidden" || o === "clip") && el.scrollWidth > el.clientWidth + 1)
        cut.push(name(el) + ": " + el.scrollWidth + " px of content in " + el.clientWidth + " px");
    });
    Array.prototype.forEach.call(document.querySelectorAll("table"), function (t) {
      var box = t.parentElement;
      tables.push({table: name(t), width: Math.ceil(t.getBoundingClientRect().width), box: box.clientWidth,
                   scrolls: scrolls(box)});
      Array.prototype.forEach.call(t.querySelectorAll("th"), function (th, i) {
        if (!th.textContent.trim()) headers.push(name(t) + " header " + (i + 1));
      });
    });
    return {cut: cut, tables: tables, emptyHeaders: headers};
  }
  function report(kind, message) { problems.push({kind: kind, message: message}); render(); }
  var consoleError = console.error;
  console.error = function () {
    report("console.error", Array.prototype.map.call(arguments, text).join(" "));
    return consoleError.apply(console, arguments);
  };
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window && t.tagName) {  /* a resource (img, script, link) failed to load */
      report("resource", "failed to load <" + t.tagName.toLowerCase() + "> " + (t.currentSrc || t.src || t.href));
    } else {
      report("uncaught", (e.message || "error") + " at " + (e.filename || "?") + ":" + (e.lineno || 0) +
             (e.error ? "\\n" + text(e.error) : ""));
    }
  }, true);
  window.addEventListener("unhandledrejection", function (e) { report("unhandledrejection", text(e.reason)); });
  document.addEventListener("DOMContentLoaded", function () {
    /* a lazy image below the fold would never load headless: load it, as a reader scrolling would */
    Array.prototype.forEach.call(document.images, function (img) { if (img.loading === "lazy") img.loading = "eager"; });
  });
  document.addEventListener("load", function (e) { if (e.target && e.target.tagName === "IMG") render(); }, true);
  window.addEventListener("load", function () { loaded = true; render(); });
})();
""" % {"id": CHECK_ID}

#: A console line of Chromium's log: "[pid:tid:date/time:INFO:CONSOLE:2] "msg", source: URL (2)" (newer) or
#: "[date/time:INFO:CONSOLE(2)] ..." (older). Only these lines are the page's; the rest is Chromium's own.
CONSOLE_LINE = re.compile(r"^\[[^\]]*?:(?P<level>[A-Z]+\d*):CONSOLE\b[^\]]*\]\s*(?P<message>.*)$")


class ChromiumUnavailable(Exception):
    """Chromium is missing and cannot be installed here; the message says why."""


@dataclass
class PageCheck:
    images: list[dict]
    problems: list[dict]            # from the injected script: console.error, uncaught, rejection, resource
    layout: dict                    # from the injected script: {"cut": [...], "tables": [...], "emptyHeaders": [...]}
    console_errors: list[str]       # from Chromium's log: console lines at ERROR level or "Uncaught ..."
    log: str = field(repr=False)    # Chromium's whole stderr, for messages

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not (i["complete"] and i["naturalWidth"] > 0)]

    @property
    def errors(self) -> list[str]:
        return [f"{p['kind']}: {p['message']}" for p in self.problems] + [f"log: {c}" for c in self.console_errors]


def find_chromium() -> str | None:
    if os.environ.get("ESTBENCH_CHROMIUM"):
        return os.environ["ESTBENCH_CHROMIUM"]
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return str(CHROMIUM_FALLBACK) if os.access(CHROMIUM_FALLBACK, os.X_OK) else None


def install_chromium(timeout_s: float = INSTALL_TIMEOUT_S) -> str:
    """apt-get install Chromium (Debian's package), or raise ChromiumUnavailable saying why not."""
    if not sys.platform.startswith("linux"):
        raise ChromiumUnavailable(f"chromium not found, and installing it is only automated on Linux "
                                  f"(this is {sys.platform})")
    if os.geteuid() != 0:
        raise ChromiumUnavailable("chromium not found, and not root: cannot apt-get install it "
                                  "(install Debian's 'chromium' package, or set ESTBENCH_CHROMIUM)")
    apt = shutil.which("apt-get")
    if apt is None:
        raise ChromiumUnavailable("chromium not found, and no apt-get to install it with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ("-o", "DPkg::Lock::Timeout=60")
    print(f"\ninstalling chromium with apt-get (one time, up to {timeout_s:.0f} s) ...", file=sys.stderr)
    deadline = time.monotonic() + timeout_s
    for cmd in ([apt, *lock, "update"],
                [apt, *lock, "install", "-y", "--no-install-recommends", "chromium"]):
        left = deadline - time.monotonic()
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(left, 1),
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ChromiumUnavailable(f"installing chromium timed out after {timeout_s:.0f} s "
                                      f"({' '.join(cmd[3:])})") from None
        except OSError as err:
            raise ChromiumUnavailable(f"cannot run apt-get: {err}") from None
        if done.returncode != 0:
            first = "\n".join((done.stderr or done.stdout).strip().splitlines()[:5]) or "(no output)"
            raise ChromiumUnavailable(f"installing chromium failed: `{' '.join(cmd[3:])}` exited "
                                      f"{done.returncode}: {first}")
    found = find_chromium()
    if found is None:
        raise ChromiumUnavailable("apt-get installed chromium, yet no chromium binary is on PATH")
    return found


def _run(cmd: list[str], timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run Chromium in its own process group, so that a hang ends with all of its children."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"chromium did not finish within {timeout_s} s: {' '.join(cmd)}\n{err[-3000:]}")
    finally:
        try:  # a helper process left behind by the browser (same group, started by us)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _flags(profile: Path) -> list[str]:
    profile.mkdir(parents=True, exist_ok=True)
    return [*BASE_FLAGS, f"--user-data-dir={profile}"]


def inject_checker(page: Path) -> None:
    """Put the checker script first in the page's <head> (in place: give it a copy)."""
    text = page.read_text(encoding="utf-8")
    tag = f"<script>{CHECKER_JS}</script>"
    head = re.search(r"<head\b[^>]*>", text, re.I)
    if head:
        text = text[:head.end()] + tag + text[head.end():]
    else:
        html_tag = re.search(r"<html\b[^>]*>", text, re.I)
        at = html_tag.end() if html_tag else 0
        text = text[:at] + tag + text[at:]
    page.write_text(text, encoding="utf-8")


def console_errors(log: str) -> list[str]:
    """The page's console lines in Chromium's log that are errors: ERROR level, or an uncaught exception."""
    found = []
    for line in log.splitlines():
        m = CONSOLE_LINE.match(line.strip())
        if m and (m["level"] in ("ERROR", "FATAL") or "Uncaught" in m["message"]):
            found.append(m["message"])
    return found


def check_page(chromium: str, page: Path, profile: Path, window: str = f"{WINDOW_WIDTH},3000",
               url: str | None = None) -> PageCheck:
    """Load ``page`` (which this edits: pass a copy) headless, from ``url`` where a server serves it; return what
    its checker and the log saw."""
    inject_checker(page)
    cmd = [chromium, *_flags(profile), "--enable-logging=stderr", "--v=0", f"--window-size={window}",
           f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}", "--dump-dom", url or page.resolve().as_uri()]
    done = _run(cmd)
    assert done.returncode == 0, f"chromium --dump-dom exited {done.returncode}:\n{done.stderr[-3000:]}"
    m = re.search(rf'<pre id="{CHECK_ID}">(.*?)</pre>', done.stdout, re.S)
    assert m, ("the page never reached window.load (no checker output in the dumped DOM); chromium said:\n"
               + done.stderr[-3000:])
    state = json.loads(html.unescape(m.group(1)))
    return PageCheck(images=state["images"], problems=state["problems"], layout=state["layout"],
                     console_errors=console_errors(done.stderr), log=done.stderr)


def screenshot(chromium: str, page: Path, png: Path, profile: Path, window: str = "1400,4200") -> Path:
    cmd = [chromium, *_flags(profile), "--hide-scrollbars", f"--window-size={window}",
           f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}", f"--screenshot={png}", page.resolve().as_uri()]
    done = _run(cmd)
    assert done.returncode == 0, f"chromium --screenshot exited {done.returncode}:\n{done.stderr[-3000:]}"
    return png
