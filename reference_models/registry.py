"""The one registry of named cases, of every kind.

A case is registered once, under a name that never changes meaning, with its kind, tags and description;
it is built lazily by its builder the first time :func:`get_case` asks for it, then cached. The modules
that define cases register them when they are imported, and ``reference_models`` imports them all, so
:func:`case_names` is complete after ``import reference_models``.

Every case, whatever its kind, has ``name``, ``kind``, ``description``, ``tags``, ``truth`` (a
:class:`~reference_models.truth.Truth`), ``event_numel`` (elements per sample, what a chunk budget counts)
and ``draw(size, generator, dtype=None)``, the sample an estimator sees (KL and sequence cases also have
``device``, where that generator lives). Kinds:

- ``"kl"``: a pair of distributions, the exact KL(p‖q) and ratio moments (``reference_models.cases``);
- ``"sequence"``: a pair of autoregressive models, every sequence enumerated (``reference_models.sequence_cases``);
- ``"marginal"``: log importance weights with the exact log p(x) (``reference_models.marginal_cases``);
- ``"gradient"``: a policy, a reference and a behaviour policy with the exact ∇θ KL in both directions
  (``reference_models.gradient_cases``).

Tags select subsets: ``"gate"``, the cases a gate runs on by default; ``"report"``, those the report studies.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable

__all__ = ["KINDS", "register_case", "case_names", "get_case"]

KINDS = ("kl", "sequence", "marginal", "gradient")


@dataclass(frozen=True)
class _Registration:
    builder: Callable[[], object]
    kind: str
    tags: tuple[str, ...]
    description: str


_CASES: dict[str, _Registration] = {}


def register_case(name: str, builder: Callable[[], object] | None = None, *, kind: str, tags: Iterable[str] = (),
                  description: str):
    """Register ``builder()``, which returns the case called ``name`` of this kind, tags and description.

    Used as ``register_case(name, builder, kind=..., description=...)`` or as a decorator of the builder,
    ``@register_case(name, kind=..., description=...)``. A ValueError says so for a name already taken
    (a case name never changes meaning), an unknown kind or a builder that is not callable."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    tags = tuple(tags)
    if any(not isinstance(t, str) or not t for t in tags):
        raise ValueError(f"tags must be non-empty strings, got {tags!r}")
    if not isinstance(description, str) or not description:
        raise ValueError(f"description must be a non-empty string, got {description!r}")

    def add(build: Callable[[], object]):
        if name in _CASES:
            raise ValueError(f"name {name!r} is already registered; a case name never changes meaning")
        if not callable(build):
            raise ValueError(f"builder must be callable, got {type(build).__name__}")
        _CASES[name] = _Registration(build, kind, tags, description)
        return build

    return add if builder is None else add(builder)


def _kinds(kind: str | tuple[str, ...] | None) -> tuple[str, ...]:
    kinds = KINDS if kind is None else (kind,) if isinstance(kind, str) else tuple(kind)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kind {', '.join(map(repr, unknown))}; known: {', '.join(KINDS)}")
    return kinds


def case_names(kind: str | tuple[str, ...] | None = None, tag: str | None = None) -> list[str]:
    """The registered names in registration order: all, or those of one kind (or of any of a tuple of
    kinds), and with ``tag`` if given."""
    kinds = _kinds(kind)
    return [n for n, r in _CASES.items() if r.kind in kinds and (tag is None or tag in r.tags)]


def get_case(name: str, kind: str | tuple[str, ...] | None = None):
    """The named case, built on first use and then cached; a ValueError for a name not registered, or
    registered with another kind than ``kind`` (one kind or a tuple of kinds)."""
    kinds = _kinds(kind)
    if name not in _CASES or _CASES[name].kind not in kinds:
        of = "" if kind is None else f" of kind {' or '.join(kinds)}"
        raise ValueError(f"unknown case {name!r}{of}; known: {', '.join(case_names(kinds))}")
    return _build(name)


@lru_cache(maxsize=None)
def _build(name: str):
    r = _CASES[name]
    case = r.builder()
    if (getattr(case, "name", None), getattr(case, "kind", None), getattr(case, "tags", None),
            getattr(case, "description", None)) != (name, r.kind, r.tags, r.description):
        raise ValueError(f"the builder of {name!r} must return a {r.kind} case named {name!r} with the tags "
                         f"{r.tags} and the description it was registered with")
    return case
