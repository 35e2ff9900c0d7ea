"""The per-cell result cache of studies and reports: never stale, never fatal.

A cell is keyed by :func:`fingerprint` of everything that determines it (the estimator's code, the case's
definition, the config, and, for estbench's own code, the package's sources, version and commit), so a
change to any of them recomputes it. :class:`CellCache` keeps one JSON file per cell with a checksum,
writes it atomically under a unique temporary name, and treats any damaged file as missing: it warns
naming the file, removes it, and the cell is recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import types
import warnings
from contextlib import suppress
from pathlib import Path

import torch

__all__ = ["fingerprint", "source_digest", "CellCache"]

PACKAGES = ("estimators", "reference_models", "reports")


def _digest():
    return hashlib.blake2b(digest_size=32)


def source_digest(*roots: Path) -> str:
    """A digest of every file below ``roots`` (relative name and bytes), ``__pycache__``, ``*.pyc`` and
    hidden files aside: any edit, addition or removal changes it."""
    h = _digest()
    for root in map(Path, roots):
        files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and not p.name.startswith(".") and p.suffix != ".pyc")
        for path in files:
            h.update(f"{root.name}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(hashlib.blake2b(path.read_bytes(), digest_size=32).digest())
    return h.hexdigest()


@functools.cache
def _package_state() -> str:
    """estbench's sources (:data:`PACKAGES`), installed version, git commit and torch version; computed
    once per process."""
    from importlib.metadata import PackageNotFoundError, version

    import estimators

    home = Path(estimators.__file__).resolve().parent.parent
    try:
        release = version("estbench")
    except PackageNotFoundError:
        release = "unknown"
    try:
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=home, capture_output=True, text=True, timeout=5)
        commit = run.stdout.strip() if run.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return "|".join([source_digest(*(home / p for p in PACKAGES)), release, commit, torch.__version__])


@functools.lru_cache(maxsize=512)
def _file_digest(path: str, mtime_ns: int, size: int) -> bytes:
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=32).digest()


def _source_file(obj) -> bytes | None:
    """The digest of the source file defining ``obj``, or None where it has none."""
    with suppress(TypeError, OSError):
        path = inspect.getsourcefile(obj)
        if path:
            stat = os.stat(path)
            return _file_digest(path, stat.st_mtime_ns, stat.st_size)
    return None


def _code_digest(code: types.CodeType) -> bytes:
    """A code object's bytecode, names and constants (nested code included), independent of its file."""
    h = _digest()
    h.update(f"code\0{len(code.co_code)}\0".encode() + code.co_code + repr(code.co_names).encode() + b"\0")
    for const in code.co_consts:
        h.update(_code_digest(const) if isinstance(const, types.CodeType) else _node(const, set()))
    return h.digest()


def _identity(obj) -> bytes:
    """What a function or class *is*: its kind and qualified name; its module's source file, else its
    source; a function's code too (in case its file was edited after the import); estbench's package
    state for estbench's own code; a builtin's package version where it has no source."""
    h = _digest()
    module = getattr(obj, "__module__", None) or ""
    h.update(f"{type(obj).__name__}\0{module}\0{getattr(obj, '__qualname__', '')}\0".encode())
    if module.split(".")[0] in PACKAGES:
        h.update(_package_state().encode() + b"\0")
    source = _source_file(obj)
    if source is None:
        with suppress(TypeError, OSError):
            source = hashlib.blake2b(inspect.getsource(obj).encode(), digest_size=32).digest()
    if source is not None:
        h.update(b"source\0" + source)
    if isinstance(obj, types.FunctionType):
        h.update(_code_digest(obj.__code__))
    elif source is None:
        h.update(f"version\0{getattr(sys.modules.get(module.split('.')[0]), '__version__', '')}".encode())
    return h.digest()


def _node(obj, active: set) -> bytes:
    """The digest of ``obj``: a parent feeds its children as these fixed-length digests, so no two
    different structures feed the same bytes. ``active`` holds the ids on the path (a cycle is marked)."""
    h = _digest()
    if isinstance(obj, (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        h.update(f"{type(obj).__name__}\0{obj!r}".encode())
    elif isinstance(obj, torch.Tensor):
        h.update(f"tensor\0{obj.dtype}\0{tuple(obj.shape)}\0".encode())
        h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy on the CPU
    elif id(obj) in active:
        h.update(b"cycle")
    else:
        active.add(id(obj))
        try:
            h.update(f"{type(obj).__module__}.{type(obj).__qualname__}\0".encode())
            _feed_composite(h, obj, active)
        finally:
            active.discard(id(obj))
    return h.digest()


def _cell_contents(cell: types.CellType):
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return "<empty cell>"


def _feed_composite(h, obj, active: set) -> None:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(_identity(type(obj)))
        for f in dataclasses.fields(obj):
            h.update(f"{f.name}\0".encode() + _node(getattr(obj, f.name), active))
    elif isinstance(obj, (list, tuple)):
        h.update(f"{len(obj)}\0".encode() + b"".join(_node(item, active) for item in obj))
    elif isinstance(obj, (dict, set, frozenset)):  # in any order
        items = obj.items() if isinstance(obj, dict) else obj
        h.update(f"{len(obj)}\0".encode() + b"".join(sorted(_node(item, active) for item in items)))
    elif isinstance(obj, functools.partial):
        h.update(_node((obj.func, obj.args, obj.keywords), active))
    elif isinstance(obj, types.MethodType):
        h.update(_node((obj.__func__, obj.__self__), active))
    elif isinstance(obj, types.FunctionType):
        h.update(_identity(obj))
        closure = tuple(map(_cell_contents, obj.__closure__ or ()))
        h.update(_node((obj.__defaults__, obj.__kwdefaults__, closure), active))
    elif isinstance(obj, (type, types.BuiltinFunctionType)):
        h.update(_identity(obj))
    elif isinstance(obj, types.ModuleType):
        h.update(obj.__name__.encode())
    elif hasattr(obj, "__dict__"):
        h.update(_identity(type(obj)) + _node(vars(obj), active))
    else:
        raise TypeError(f"fingerprint cannot see inside a {type(obj).__qualname__}; pass what defines it")


def fingerprint(*parts) -> str:
    """A hex digest of ``parts``, equal across processes and machines for equal inputs and different
    wherever they differ in what determines a result.

    A function counts by its qualified name, its module's source file (so an edit to a helper in the
    same module counts; else its source, else its code), its code, defaults and closure, and, for a
    function of estbench's packages, a digest of all their files, the installed version and the git
    commit (:func:`_package_state`). A class counts likewise; a dataclass by its class and fields; any
    other object by its class and attributes (so a model by its parameters); a tensor by its dtype, shape
    and bytes; a primitive by its type and repr (floats exactly, NaN included); dicts (in any order),
    lists, tuples and sets recursively. An object with no attributes to read raises TypeError.

    Cost: every byte of every tensor is hashed (a case holding a transformer and its sequence tables takes
    ~0.7 s, a Gaussian case ~0 s), so fingerprint a case once per run and pass that digest as a part.
    Not seen: module globals set at run time rather than in the source, and code of other modules that a
    function calls (estbench's own code aside, which the package state covers).
    """
    return _node(parts, set()).hex()


def _canonical(row: dict) -> str:
    """The JSON text of ``row``: sorted keys, floats by repr (NaN and ±inf as NaN and ±Infinity), numpy
    and 0-d tensor scalars as Python numbers."""
    return json.dumps(row, sort_keys=True, allow_nan=True, separators=(",", ":"), default=_scalar)


def _scalar(obj):
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    raise TypeError(f"a cache row holds only JSON values and scalars, not {type(obj).__qualname__}")


def _checksum(canonical: str) -> str:
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def _read(data: bytes, key: str) -> tuple[dict | None, str]:
    """The row a cell file's bytes hold for ``key``, or (None, what is wrong with them)."""
    try:
        cell = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except (ValueError, RecursionError):
        return None, "not JSON (truncated?)" if data else "empty"
    if not (isinstance(cell, dict) and set(cell) == {"key", "checksum", "row"} and isinstance(cell["row"], dict)):
        return None, "not a cache cell"
    if cell["key"] != key:
        return None, "holds another key"
    if cell["checksum"] != _checksum(_canonical(cell["row"])):
        return None, "checksum mismatch"
    return cell["row"], ""


class CellCache:
    """One JSON file per cell in ``directory`` (created if missing): ``<label>__<key[:16]>.json`` holding
    ``{"key", "checksum", "row"}``. Safe for concurrent runs on one folder."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str, label: str) -> Path:
        """The file of cell ``key``; ``label`` (made file-name safe) is for people reading the folder."""
        if not re.fullmatch(r"[0-9a-f]{16,}", key):
            raise ValueError(f"key must be a hex digest from fingerprint(), got {key!r}")
        return self.directory / f"{re.sub(r'[^A-Za-z0-9_.=+-]', '_', label)[:100]}__{key[:16]}.json"

    def load(self, key: str, label: str) -> dict | None:
        """The row stored for ``key``, or None when there is none. A damaged cell (unreadable, not
        UTF-8, not JSON, wrong structure, checksum or key mismatch) is removed with a warning naming the
        file and the problem, and None returned: the caller recomputes it."""
        path = self.path(key, label)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            row, problem = None, f"unreadable ({err.strerror})"
        else:
            row, problem = _read(data, key)
        if row is None:
            warnings.warn(f"cache cell {path} is damaged ({problem}); removed, it will be recomputed",
                          RuntimeWarning, stacklevel=2)
            with suppress(OSError):
                path.unlink()
        return row

    def store(self, key: str, label: str, row: dict) -> None:
        """Write ``row`` (JSON values, numpy/0-d tensor scalars; floats kept exactly, NaN and ±inf
        included; tuples come back as lists) for ``key``: to a unique temporary file in the same folder,
        then renamed over the cell, so a reader or a concurrent writer never sees half a cell."""
        path = self.path(key, label)
        canonical = _canonical(row)
        text = f'{{"key":{json.dumps(key)},"checksum":"{_checksum(canonical)}","row":{canonical}}}'
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def clear(self) -> int:
        """Remove every cell file of the folder; returns how many."""
        cells = [p for p in self.directory.iterdir() if re.search(r"__[0-9a-f]{16}\.json$", p.name) and p.is_file()]
        for p in cells:
            with suppress(FileNotFoundError):
                p.unlink()
        return len(cells)
