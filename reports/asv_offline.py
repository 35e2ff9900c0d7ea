"""asv's published page, viewable without internet: ``python -m reports.asv_offline [HTML_DIR]`` installs the
JavaScript and CSS the page loads from public CDNs (jQuery, flot and its plugins, stupidtable, blueimp-md5,
bootstrap) from the npm registry, copies them into ``HTML_DIR/vendor/`` and rewrites the page's tags to those
copies. Then ``asv preview`` serves the page on localhost (it loads its data over HTTP, which browsers refuse
from file://). Run it after each ``asv publish``, which rewrites the page."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .history import asv_dir

#: Every CDN address asv 0.6's page loads -> (npm package@version, the same file in the package). flot 0.8.3 and
#: bootstrap 3.1.1 are the CDN's own versions (flot unminified: npm ships no .min); stupidtable 1.0.1 is not on
#: npm, and 1.1.3 is the same plugin with the same API.
ASSETS = {
    "https://code.jquery.com/jquery-3.3.1.min.js": ("jquery@3.3.1", "dist/jquery.min.js"),
    **{f"https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot{part}.min.js":
       ("flot@0.8.3", f"jquery.flot{part}.js") for part in ("", ".time", ".selection", ".categories")},
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js":
        ("flot-orderbars@1.0.0", "js/jquery.flot.orderBars.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js":
        ("stupid-table-plugin@1.1.3", "stupidtable.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": ("blueimp-md5@2.19.0", "js/md5.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js":
        ("bootstrap@3.1.1", "dist/js/bootstrap.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css":
        ("bootstrap@3.1.1", "dist/css/bootstrap.min.css"),
}
#: Files a vendored file refers to by a relative path (bootstrap's CSS loads its icon font from ../fonts/).
COMPANIONS = {"bootstrap@3.1.1": ["dist/fonts"]}
VENDOR = "vendor"
#: A <script src=...> or <link href=...> tag that loads from another host.
REMOTE_TAG = re.compile(r"<(?:script|link)\b[^>]*?\b(?:src|href)=\"(https?://[^\"]+)\"[^>]*>", re.I)
#: Attributes that only make sense for a cross-origin load (the local copies are not byte-identical to the CDN's
#: minified files, so their integrity hashes would not match).
CDN_ATTRIBUTES = re.compile(r"\s+(?:integrity|crossorigin|referrerpolicy)=\"[^\"]*\"", re.I)


def remote_assets(page: str) -> list[str]:
    """The addresses of the scripts and stylesheets that ``page`` loads from another host (links to other
    pages, <a href>, are not loads)."""
    return [m.group(1) for m in REMOTE_TAG.finditer(page)
            if m.group(0).lower().startswith("<script") or 'rel="stylesheet"' in m.group(0).lower()]


def npm_install(packages: list[str], prefix: Path) -> Path:
    """``npm install`` the ``packages`` (name@version) into ``prefix``; returns its node_modules."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found: install Node.js's npm (Debian: apt-get install npm) to vendor asv's "
                           "JavaScript")
    done = subprocess.run([npm, "install", "--no-save", "--no-audit", "--no-fund", "--ignore-scripts",
                           "--prefix", str(prefix), *packages], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"npm install {' '.join(packages)} failed:\n{done.stderr[-2000:]}")
    return prefix / "node_modules"


def local_path(package: str, path: str) -> str:
    """Where the vendored copy of ``path`` in ``package`` (name@version) lives, relative to the page."""
    return f"{VENDOR}/{package.rsplit('@', 1)[0]}/{path}"


def make_offline(html_dir: Path) -> list[str]:
    """Vendor every CDN asset of ``html_dir/index.html`` and rewrite its tags; returns the assets rewritten. A
    remote load this module does not know is an error that names it, before anything is installed."""
    index = html_dir / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"no {index}: run `asv publish` first")
    page = index.read_text(encoding="utf-8")
    urls = remote_assets(page)
    unknown = [u for u in urls if u not in ASSETS]
    if unknown:
        raise ValueError(f"{index} loads assets this helper does not know: {', '.join(unknown)}")
    packages = sorted({ASSETS[u][0] for u in urls})
    if packages:
        with tempfile.TemporaryDirectory() as tmp:
            modules = npm_install(packages, Path(tmp))
            for package in packages:
                name = package.rsplit("@", 1)[0]
                files = [path for p, path in ASSETS.values() if p == package] + COMPANIONS.get(package, [])
                for path in files:
                    source, target = modules / name / path, html_dir / local_path(package, path)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    (shutil.copytree(source, target, dirs_exist_ok=True) if source.is_dir()
                     else shutil.copyfile(source, target))

    def local(tag: re.Match) -> str:
        url = tag.group(1)
        if url not in ASSETS:
            return tag.group(0)
        return CDN_ATTRIBUTES.sub("", tag.group(0).replace(url, local_path(*ASSETS[url])))

    index.write_text(REMOTE_TAG.sub(local, page), encoding="utf-8")
    return urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.asv_offline", description=__doc__.split("\n\n")[0])
    parser.add_argument("html_dir", nargs="?", type=Path, default=None,
                        help="the folder `asv publish` wrote (default: html_dir of the project's asv.conf.json)")
    args = parser.parse_args(argv)
    html_dir = args.html_dir or asv_dir("html_dir", ".asv/html")
    if html_dir is None:
        parser.error("no HTML_DIR given and no asv.conf.json beside the packages")
    try:
        urls = make_offline(html_dir)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"asv_offline: error: {err}", file=sys.stderr)
        return 1
    print(f"{html_dir / 'index.html'}: {len(urls)} CDN assets now load from {html_dir / VENDOR}; "
          f"view it with `asv preview`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
