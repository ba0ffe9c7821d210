"""What a clear drops, and which processes it is for (docs/scoped-clears.md).

A clear called as Flextype calls it drops everything in every process. Four
optional lists narrow it: ``keys`` (exact keys), ``prefixes`` (key prefixes)
and ``tags`` (entries stored with those tags) say *what* a process drops, a
:class:`Scope`; ``group`` (worker names or labels) says *which* processes
drop it (:func:`in_group`). The service, the workers and the targets share
these definitions, so the service expects exactly the processes that apply
a clear, and a target never guesses what a scope means.

The limits hold everywhere: the service refuses a request past them (400),
and a worker refuses a clear past them like any malformed message (it then
sees a gap in the sequence and purges everything, which is always safe).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Most entries one clear may name, across keys, prefixes, tags and group together.
MAX_SCOPE_ITEMS = 100
#: Longest key, prefix, tag or group name, in UTF-8 bytes. With the count above, a clear's body
#: stays far below the bus's 64 KiB message limit even when every character needs escaping.
MAX_SCOPE_ITEM_BYTES = 200

#: The lists a clear may carry, in the order the API documents them.
SCOPE_FIELDS = ("keys", "prefixes", "tags", "group")


class PurgeExtent(enum.StrEnum):
    """What a worker's purge dropped, as its ack says (the ``scope`` field)."""

    #: Everything its targets held: an unscoped clear, a gap or a new epoch, or a target
    #: that cannot drop less (it falls back to everything, which is always safe).
    ALL = "all"
    #: Only what the clears' scopes named, in every target.
    SCOPED = "scoped"


def check_item(field: str, value: object) -> str:
    """``value`` if it may be one entry of ``field``; else :class:`ValueError` saying why, in one line."""
    if not isinstance(value, str):
        raise ValueError(f"{field}: every entry must be a string")
    if not value:
        raise ValueError(f"{field}: an entry is empty")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise ValueError(f"{field}: an entry is not valid UTF-8 text") from None
    if size > MAX_SCOPE_ITEM_BYTES:
        raise ValueError(f"{field}: an entry is longer than {MAX_SCOPE_ITEM_BYTES} bytes")
    if not value.isprintable():
        raise ValueError(f"{field}: an entry holds a control character")
    return value


def check_lists(lists: Mapping[str, Iterable[object]]) -> dict[str, tuple[str, ...]]:
    """Each of :data:`SCOPE_FIELDS` as a tuple of checked, de-duplicated strings (first seen
    first); :class:`ValueError` for a bad entry or more than :data:`MAX_SCOPE_ITEMS` in all."""
    checked: dict[str, tuple[str, ...]] = {}
    total = 0
    for field in SCOPE_FIELDS:
        values = tuple(dict.fromkeys(check_item(field, value) for value in lists.get(field, ())))
        total += len(values)
        if total > MAX_SCOPE_ITEMS:
            raise ValueError(f"a clear names at most {MAX_SCOPE_ITEMS} keys, prefixes, tags and groups in all")
        checked[field] = values
    return checked


@dataclass(frozen=True, slots=True)
class Scope:
    """The entries a purge drops: those with one of ``keys``, a key starting with one of
    ``prefixes``, or one of ``tags``. Empty: everything (:data:`EVERYTHING`)."""

    keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def everything(self) -> bool:
        return not (self.keys or self.prefixes or self.tags)

    def union(self, other: Scope) -> Scope:
        """What purging both drops: everything if either is everything."""
        if self.everything or other.everything:
            return EVERYTHING
        return Scope(_merged(self.keys, other.keys), _merged(self.prefixes, other.prefixes),
                     _merged(self.tags, other.tags))

    def __str__(self) -> str:
        """One line for logs, made only when a line is written: ``everything``, or ``keys a, b; tags t``."""
        if self.everything:
            return "everything"
        parts = [f"{name} {', '.join(values)}" for name, values in
                 (("keys", self.keys), ("prefixes", self.prefixes), ("tags", self.tags)) if values]
        return "; ".join(parts)


#: The scope of a clear called as Flextype calls it.
EVERYTHING = Scope()


def _merged(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(first + second))


def in_group(group: Iterable[str], name: str, labels: Iterable[str] = ()) -> bool:
    """Whether a process named ``name`` with ``labels`` applies a clear for ``group``
    (empty: every process). The service decides whom it expects by the same rule."""
    wanted = set(group)
    return not wanted or name in wanted or not wanted.isdisjoint(labels)


@dataclass(frozen=True, slots=True)
class ClearScope:
    """A clear's reach as one value, from the request to the purge: what it drops
    (:attr:`what`), in which processes (:attr:`group`; empty: all of them)."""

    what: Scope = EVERYTHING
    group: tuple[str, ...] = ()

    @classmethod
    def of(cls, lists: Mapping[str, Iterable[object]]) -> ClearScope:
        """The four lists of :data:`SCOPE_FIELDS`, checked (:func:`check_lists`; :class:`ValueError`)."""
        checked = check_lists(lists)
        return cls(Scope(checked["keys"], checked["prefixes"], checked["tags"]), checked["group"])

    def applies_to(self, name: str, labels: Iterable[str] = ()) -> bool:
        """Whether a process named ``name`` with ``labels`` applies the clear (:func:`in_group`)."""
        return in_group(self.group, name, labels)

    def to_json(self) -> dict[str, list[str]]:
        """As the record, the events and the dashboard show it: four lists, all empty for a clear
        of everything in every process."""
        what = self.what
        return {"keys": list(what.keys), "prefixes": list(what.prefixes), "tags": list(what.tags),
                "group": list(self.group)}

    def __str__(self) -> str:
        return f"{self.what}" + (f" in {', '.join(self.group)}" if self.group else "")


#: A clear called as Flextype calls it: everything, in every process.
EVERYWHERE = ClearScope()
