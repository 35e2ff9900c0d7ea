"""The registered cases with their exact truths, stored in ``cases.json`` beside this module, so that
``estbench cases`` lists them without importing torch or building a case (the sequence cases enumerate up
to 10⁶ sequences each). ``tests/test_cli.py`` checks the stored table against :func:`build`, the exact
computation; after adding or changing a case, rewrite it with ``python -m reports.case_table``.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TABLE", "QUANTITY", "build", "load", "names"]

TABLE = Path(__file__).with_name("cases.json")
#: What a case's truth is, by kind.
QUANTITY = {"kl": "KL", "sequence": "KL", "marginal": "log p(x)", "gradient": "‖∇KL(p‖q)‖"}


def build() -> dict[str, dict]:
    """name -> kind, tags, description, exact truth, how it was obtained and the assumptions the case breaks,
    for every registered case, built from the registry (slow: every case is built)."""
    from reference_models import case_names, get_case

    table = {}
    for name in case_names():
        case = get_case(name)
        table[name] = dict(kind=case.kind, tags=list(case.tags), description=case.description,
                           truth=case.truth.value, how=case.truth.describe(),
                           breaks=dict(getattr(case, "breaks", None) or {}))
    return table


def load() -> dict[str, dict]:
    """The stored table (JSON writes an infinite truth as Infinity and reads it back as inf)."""
    return json.loads(TABLE.read_text(encoding="utf-8"))


def names(kind: str | tuple[str, ...], tag: str | None = None) -> list[str]:
    """The stored names of a kind (or of any of several), with ``tag`` if given, in registration order."""
    kinds = (kind,) if isinstance(kind, str) else kind
    return [n for n, c in load().items() if c["kind"] in kinds and (tag is None or tag in c["tags"])]


if __name__ == "__main__":
    TABLE.write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {TABLE}")
