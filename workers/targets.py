"""Purge targets: any cache object, adapted once to the one call the subscriber makes.

An application hands the subscriber the caches it already has. Each is looked
at once, when the subscriber is built, and adapted by what its methods accept
(:func:`inspect.signature`), so that a purge makes one known call per target:

* ``clear(*, clear_id, seq)``: a :class:`~cachebus.workers.cache.Purgeable`,
  such as :class:`~cachebus.workers.cache.Cache`, told which clear it applies;
* ``clear()`` with no arguments: ``dict``, ``cachetools`` caches, any
  :class:`~collections.abc.MutableMapping`, Django cache backends;
* ``cache_clear()``: functions wrapped with :func:`functools.lru_cache` or
  :func:`functools.cache`.

Either ``clear`` may be a coroutine function, for a target that does I/O. An
object with none of these is refused at once with a :class:`TypeError` naming
its type, rather than failing at the first clear, long after deployment.

A purge reports how many entries it dropped: what ``clear`` returned when that
is an int, else the target's size just before (``len()``, or an
``lru_cache``'s ``cache_info().currsize``), else 0.

**Scoped clears** (docs/scoped-clears.md) drop less than everything where a
target can: one with ``clear_scope(scope, *, clear_id, seq)`` (a
:class:`~cachebus.workers.cache.Cache`, a
:class:`~cachebus.workers.directory.DirectoryTarget`) drops what the scope
names, or returns ``None`` to decline it; a mutable mapping (``dict``,
``cachetools``) drops the named keys and the keys that start with a named
prefix. Any other target, a mapping asked for tags, and a target that
declines are purged entirely: that is always safe, and the ack says so
(``scope: all``).

A target whose clear raises does not stop the subscriber: the subscriber acks
the purge as failed with :func:`describe_error`, which names the exception
without any credential its message (a Redis URL, say) may hold.
"""

from __future__ import annotations

import enum
import inspect
import re
import traceback
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, Protocol, runtime_checkable

from cachebus.bus.scope import PurgeExtent, Scope

#: Longest error a failed ack carries: enough for a type and a sentence, never a whole dump.
MAX_ERROR = 300

_ACCEPTED = ("a purge target needs one of: clear(*, clear_id, seq) (a cachebus Purgeable, such as Cache); "
             "clear() with no arguments (dict, cachetools caches, any MutableMapping, Django cache backends); "
             "cache_clear() (functions wrapped with functools.lru_cache or functools.cache); "
             "either clear may be async")


@runtime_checkable
class Leased(Protocol):
    """A purge target that stops trusting its entries when its lease lapses."""

    def hold_lease(self, until: float) -> None: ...

    def revoke_lease(self) -> None: ...


class TargetKind(enum.StrEnum):
    """Which call purges a target."""

    #: ``clear(*, clear_id, seq)``: told which clear it applies.
    PURGEABLE = "clear(*, clear_id, seq)"
    #: ``clear()``: a mapping, a cachetools cache, a Django cache backend.
    CLEAR = "clear()"
    #: ``cache_clear()``: a functools.lru_cache or functools.cache wrapper.
    CACHE_CLEAR = "cache_clear()"


class Target:
    """One purge target and how to purge it, worked out once by :func:`adapt`.

    Compared by identity: the subscriber keeps the failing ones in a dict.
    """

    __slots__ = ("_clear", "_clear_scope", "_size", "kind", "label", "leased", "obj", "stats")

    def __init__(self, obj: Any, kind: TargetKind, label: str, clear: Callable[..., Any],
                 size: Callable[[], int] | None) -> None:
        self.obj = obj
        self.kind = kind
        #: How logs name it: its position and type, e.g. ``target 1 (TTLCache)``.
        self.label = label
        self._clear = clear
        self._size = size
        clear_scope = getattr(obj, "clear_scope", None)
        #: How the target drops part of what it holds: its own ``clear_scope``, or for a
        #: mapping :func:`_mapping_scope`; None when it can only drop everything.
        self._clear_scope: Callable[..., Any] | None = (
            clear_scope if callable(clear_scope) and kind is TargetKind.PURGEABLE
            else _mapping_scope(obj) if isinstance(obj, MutableMapping) else None)
        #: The object itself when it holds a lease (``hold_lease``/``revoke_lease``), else None.
        self.leased: Leased | None = obj if isinstance(obj, Leased) else None
        stats = getattr(obj, "stats", None)
        #: Its ``stats()`` method, whose counters the subscriber's heartbeat sums, if it has one.
        self.stats: Callable[[], dict[str, Any]] | None = stats if callable(stats) else None

    def __repr__(self) -> str:
        return f"<Target {self.label}: {self.kind}>"

    async def purge_scope(self, scope: Scope, clear_id: str | None, seq: int) -> tuple[int, PurgeExtent]:
        """Drop what ``scope`` names, or everything when the target cannot drop just that:
        how many entries, and which of the two it did. Raises what the target raised."""
        if not scope.everything and self._clear_scope is not None:
            result = self._clear_scope(scope, clear_id=clear_id, seq=seq)
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                return int(result), PurgeExtent.SCOPED
        return await self.purge(clear_id, seq), PurgeExtent.ALL

    async def purge(self, clear_id: str | None, seq: int) -> int:
        """Drop everything the target holds; how many entries that was. Raises what the target raised."""
        before = self._measure()
        if self.kind is TargetKind.PURGEABLE:
            result = self._clear(clear_id=clear_id, seq=seq)
        else:
            result = self._clear()
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, int) and not isinstance(result, bool):
            return result
        return before

    def _measure(self) -> int:
        """The target's size before a purge, for a ``clear`` that returns no count; 0 when unknown.

        A size that cannot be read is not a failed purge: only ``clear`` decides that.
        """
        if self._size is None:
            return 0
        try:
            return int(self._size())
        except Exception:
            return 0


def _mapping_scope(mapping: MutableMapping[Any, Any]) -> Callable[..., int | None]:
    """A mapping's scoped purge: the named keys, and the ``str`` keys with a named prefix.

    A prefix walks every key (a plain mapping has no order to search), which
    is still far cheaper for the application than refilling all of it; tags
    are declined, as a mapping cannot know them.
    """
    def clear_scope(scope: Scope, **_: Any) -> int | None:
        if scope.tags:
            return None
        dropped = 0
        for key in scope.keys:
            if mapping.pop(key, _GONE) is not _GONE:
                dropped += 1
        if scope.prefixes:
            for key in [k for k in list(mapping) if isinstance(k, str) and k.startswith(scope.prefixes)]:
                if mapping.pop(key, _GONE) is not _GONE:
                    dropped += 1
        return dropped
    return clear_scope


#: What ``pop`` returns for a key that is not there.
_GONE = object()


def adapt(targets: Iterable[Any]) -> list[Target]:
    """Each of ``targets`` as a :class:`Target`; a :class:`TypeError` for the first that cannot be purged."""
    return [_adapt(obj, index) for index, obj in enumerate(targets)]


def _adapt(obj: Any, index: int) -> Target:
    type_name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    clear = getattr(obj, "clear", None)
    why = "it has no clear() or cache_clear() method"
    if clear is not None:
        kind = _clear_kind(clear)
        if kind is not None:
            size = obj.__len__ if _has_len(obj) else None
            return Target(obj, kind, f"target {index} ({type(obj).__qualname__})", clear, size)
        why = (f"its clear{_signature_text(clear)} needs arguments" if callable(clear)
               else "its clear attribute is not callable")
    cache_clear = getattr(obj, "cache_clear", None)
    if callable(cache_clear) and _binds(cache_clear):
        name = getattr(obj, "__qualname__", type(obj).__qualname__)
        info = getattr(obj, "cache_info", None)
        size = (lambda: info().currsize) if callable(info) else None
        return Target(obj, TargetKind.CACHE_CLEAR, f"target {index} ({name}, a functools cache)", cache_clear, size)
    if isinstance(obj, type):
        what, why = f"the class {obj.__module__}.{obj.__qualname__}", "pass an instance, not the class"
    else:
        what = f"a {type_name}"
    raise TypeError(f"cannot use {what} as a purge target: {why}; {_ACCEPTED}")


def _clear_kind(clear: Any) -> TargetKind | None:
    """How ``clear`` is called, or None if it cannot be called as a purge."""
    if not callable(clear):
        return None
    try:
        signature = inspect.signature(clear)
    except (TypeError, ValueError):
        # A builtin without a signature (dict's, in Python 3.11): bound, a clear() with no arguments is
        # the norm; unbound (a class given instead of an instance), it needs the instance.
        return None if inspect.ismethoddescriptor(clear) else TargetKind.CLEAR
    named = {p.name for p in signature.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    # Only a clear that names both is told about the clear: a catch-all **kwargs may pass them
    # on to something that does not take them (a dict's clear, say).
    if {"clear_id", "seq"} <= named and _binds_signature(signature, clear_id=None, seq=0):
        return TargetKind.PURGEABLE
    if _binds_signature(signature):
        return TargetKind.CLEAR
    return None


def _binds(function: Callable[..., Any], **kwargs: Any) -> bool:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return True
    return _binds_signature(signature, **kwargs)


def _binds_signature(signature: inspect.Signature, **kwargs: Any) -> bool:
    try:
        signature.bind(**kwargs)
    except TypeError:
        return False
    return True


def _signature_text(function: Any) -> str:
    """``function``'s parameters as an error message shows them: names, without annotations."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return "(...)"
    bare = [p.replace(annotation=p.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=signature.empty))


def _has_len(obj: Any) -> bool:
    # Looked up on the type, as len() does: an instance attribute called __len__ is not a size.
    return callable(getattr(type(obj), "__len__", None))


# --- errors as a failed ack and a log line show them ------------------------------

#: ``scheme://user:password@`` in a URL: everything between ``//`` and the last ``@`` before the host.
#: Every pattern here starts only where a run of its characters starts, and cannot backtrack past the
#: run's end: scrubbing stays linear in the text, however long an exception's message is.
_USERINFO = re.compile(r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*(?:@[^/\s@]*)*@")
#: ``key=value``, ``key: value``, ``"key": "value"``, ``key: Bearer value``, where the key names a
#: password, secret, token, API key or anything auth (the lookahead stays inside the key's run).
_SECRET_PAIR = re.compile(
    r"""(?<![\w.-])(?P<key>(?=[\w.-]*?(?:passw(?:or)?d|pwd|secret|token|api[_-]?key|auth))[\w.-]+)"""
    r"""(?P<sep>["']?\s*[=:]\s*)"""
    r"""(?P<value>(?:bearer|basic|token)\s+[^\s,;&'"]+|"[^"]*"|'[^']*'|[^\s,;&)}\]]+)""",
    re.IGNORECASE,
)
#: Most characters scrubbed: an error longer than this is cut first (its start kept, for a message;
#: its end, for a traceback), then cut again to its final length once scrubbed.
_MAX_SCRUBBED = 20_000


def scrub(text: str) -> str:
    """``text`` without the credentials an error message may hold: URL userinfo and secret-looking pairs.

    ``redis://user:pass@host`` becomes ``redis://***@host``; the value of any
    ``key=value`` or ``key: value`` whose key names a password, secret, token,
    API key or auth becomes ``***``. It errs on the side of hiding too much.
    """
    return _SECRET_PAIR.sub(r"\g<key>\g<sep>***", _USERINFO.sub(r"\g<scheme>***@", text))


def describe_error(exc: BaseException) -> str:
    """``"<Type>: <message>"`` for a failed ack: scrubbed, at most :data:`MAX_ERROR` characters."""
    try:
        message = str(exc)
    except Exception:
        message = "<message not printable>"
    text = scrub((f"{type(exc).__name__}: {message}" if message else type(exc).__name__)[:_MAX_SCRUBBED])
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR - 1] + "…"


def describe_traceback(exc: BaseException) -> str:
    """``exc``'s traceback for a log line, scrubbed as :func:`scrub` does (source lines may hold credentials too).

    A very long one keeps its end, from a line start: a line cut in the middle could hide a URL's scheme
    from :func:`scrub` and show its password.
    """
    text = "".join(traceback.format_exception(exc)).rstrip()
    if len(text) > _MAX_SCRUBBED:
        tail = text[-_MAX_SCRUBBED:]
        text = "…\n" + tail[tail.find("\n") + 1:]
    return scrub(text)
