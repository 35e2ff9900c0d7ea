"""reports.cache: fingerprints that see code changes, and a cell cache that is never stale nor fatal."""

import importlib
import json
import math
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import reports.cache as cache
from estimators.kl import k1
from reports.cache import CellCache, fingerprint, source_digest

ROOT = Path(__file__).resolve().parent.parent
ROW = {"case": "gauss-shift-1", "n": 10, "mean": 0.1 + 0.2, "bias": -1e-300, "var": math.inf, "rsd": -math.inf,
       "khat": math.nan, "breaks": "", "big": 2 ** 70, "ok": True, "note": None, "ns": [1, 2.5]}


def same_row(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-aware, exact floats


@pytest.fixture
def cells(tmp_path):
    return CellCache(tmp_path / "cells")


KEY = fingerprint("a cell")


def test_round_trip_is_exact(cells):
    assert cells.load(KEY, "cell") is None
    cells.store(KEY, "cell", ROW)
    got = cells.load(KEY, "cell")
    assert same_row(got, ROW) and got["mean"] == 0.1 + 0.2 and math.isnan(got["khat"]) and got["big"] == 2 ** 70
    assert cells.path(KEY, "cell").name == f"cell__{KEY[:16]}.json"
    assert cells.load(fingerprint("another cell"), "cell") is None
    cells.store(KEY, "cell", {"x": torch.tensor(1.5), "y": torch.tensor(2).numpy()})  # scalars become numbers
    assert cells.load(KEY, "cell") == {"x": 1.5, "y": 2}


def damage_truncate(path):
    path.write_bytes(path.read_bytes()[:40])


def damage_garbage(path):
    path.write_bytes(b"\xff\xfe\x00garbage")


def damage_numbers(path):
    path.write_text(path.read_text().replace('"n":10', '"n":11'))


def damage_key(path):
    cell = json.loads(path.read_text())
    cell["key"] = fingerprint("someone else")
    path.write_text(json.dumps(cell))


def damage_structure(path):
    path.write_text("[1, 2, 3]")


@pytest.mark.parametrize("damage, problem", [(damage_truncate, "not JSON"), (damage_garbage, "not UTF-8"),
                                             (damage_numbers, "checksum mismatch"), (damage_key, "another key"),
                                             (damage_structure, "not a cache cell")])
def test_a_damaged_cell_warns_names_the_file_and_is_removed(cells, damage, problem):
    cells.store(KEY, "cell", ROW)
    path = cells.path(KEY, "cell")
    damage(path)
    with pytest.warns(RuntimeWarning, match=f"{path.name}.*{problem}"):
        assert cells.load(KEY, "cell") is None
    assert not path.exists()
    cells.store(KEY, "cell", ROW)  # recomputed and stored again
    assert same_row(cells.load(KEY, "cell"), ROW)


def test_concurrent_threads_storing_one_key(cells):
    errors = []

    def writer(i):
        try:
            for j in range(50):
                cells.store(KEY, "cell", {**ROW, "writer": i, "j": j})
        except Exception as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cells.load(KEY, "cell")["j"] == 49
    assert [p.name for p in cells.directory.iterdir()] == [cells.path(KEY, "cell").name]  # no temporary left


def test_concurrent_processes_storing_one_key(cells):
    script = ("import sys; from reports.cache import CellCache\n"
              "c = CellCache(sys.argv[1])\n"
              "for j in range(200): c.store(sys.argv[2], 'cell', {'j': j, 'x': 0.5})\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cells.directory), KEY], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert cells.load(KEY, "cell") == {"j": 199, "x": 0.5}


def test_clear_removes_every_cell(cells):
    for i in range(3):
        cells.store(fingerprint(i), f"cell{i}", ROW)
    (cells.directory / "notes.txt").write_text("kept")
    assert cells.clear() == 3
    assert [p.name for p in cells.directory.iterdir()] == ["notes.txt"]


def test_keys_must_be_digests_and_labels_become_file_names(cells):
    with pytest.raises(ValueError, match="hex digest"):
        cells.path("../../etc", "cell")
    assert cells.path(KEY, "a/b c").name == f"a_b_c__{KEY[:16]}.json"


@dataclass(frozen=True)
class Config:
    n: int
    scale: float
    shape: tuple


def scaled(factor):
    return lambda log_p, log_q: factor * (log_p - log_q)


def test_fingerprint_sees_values_types_and_closures():
    t = torch.arange(4.0)
    assert fingerprint(Config(1, 0.5, (2,))) != fingerprint(Config(1, 0.5000001, (2,)))
    assert fingerprint(1) != fingerprint(1.0) != fingerprint("1") and fingerprint(True) != fingerprint(1)
    assert fingerprint(t) != fingerprint(t.double()) != fingerprint(t.reshape(2, 2))
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1}) != fingerprint({"a": 2, "b": 1})
    assert fingerprint(scaled(1.0)) != fingerprint(scaled(2.0))
    assert fingerprint(float("nan")) == fingerprint(float("nan"))
    assert fingerprint([[1], 2]) != fingerprint([[1, 2]]) != fingerprint([(1, 2)])
    model = torch.nn.Linear(2, 2)
    before = fingerprint(model)
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert fingerprint(model) != before
    with pytest.raises(TypeError, match="cannot see inside"):
        fingerprint(threading.Lock())


def test_fingerprint_changes_with_the_module_source(tmp_path, monkeypatch):
    module = tmp_path / "guard_user_estimator.py"
    module.write_text("def helper(x):\n    return x\n\ndef est(log_p, log_q):\n    return helper(log_p - log_q)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("guard_user_estimator")
    before = fingerprint(mod.est)
    assert fingerprint(mod.est) == before
    module.write_text(module.read_text().replace("return x", "return 2 * x"))  # only the helper changes
    importlib.reload(mod)
    assert fingerprint(mod.est) != before
    sys.modules.pop("guard_user_estimator")


def test_fingerprint_is_stable_across_processes():
    parts = "(k1, Config(3, 0.1, (1, 2)), torch.linspace(-1, 1, 7), {'x': float('nan'), 'y': [1, 'a']})"
    script = ("import torch\nfrom estimators.kl import k1\nfrom reports.cache import fingerprint\n"
              f"from tests.test_cache import Config\nprint(fingerprint(*{parts}))\n")
    other = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == fingerprint(*eval(parts))


def test_fingerprint_of_package_code_follows_the_package_state(monkeypatch):
    before = fingerprint(k1)
    monkeypatch.setattr(cache, "_package_state", lambda: "another state of the sources")
    assert fingerprint(k1) != before
    assert fingerprint(scaled) == fingerprint(scaled)  # code outside the packages: no package state read


def test_source_digest_sees_any_edit(tmp_path):
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    digest = source_digest(tmp_path / "pkg")
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"cache")
    assert source_digest(tmp_path / "pkg") == digest
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path / "pkg") != digest
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("")
    assert source_digest(tmp_path / "pkg") != digest
