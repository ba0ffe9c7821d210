"""cachebus: clear every process's in-memory cache at once, and prove each one did.

What an application embeds is importable from here, with only the base install
(pyzmq, PyYAML and sortedcontainers)::

    from cachebus import Cache, DirectoryTarget, LeasedMapping, Scope, Subscriber, ThreadedSubscriber, cached

The service and the reference worker (``cachebus.service``, ``cachebus.workers.worker``)
need the ``service`` extra: ``pip install 'cachebus[service]'``.

The names are exported lazily (PEP 562, as ``tornado/__init__.py`` does): each is
imported on first use, so ``import cachebus.relay.relay`` or
``import cachebus.bus.protocol`` loads only what that module needs. When this file
imported the worker library eagerly, ``import cachebus.bus.protocol`` loaded the
subscriber, the cache and its index: 231 modules where it needs 102 (tests/test_layers.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ below imports on use
    from cachebus.bus.scope import Scope
    from cachebus.workers.cache import Cache, Purgeable, cached
    from cachebus.workers.directory import DirectoryTarget
    from cachebus.workers.lease import LeasedMapping
    from cachebus.workers.subscriber import ForkedSubscriberError, Subscriber, ThreadedSubscriber

#: Each exported name and the module that defines it.
_HOMES = {
    "Cache": "cachebus.workers.cache",
    "DirectoryTarget": "cachebus.workers.directory",
    "ForkedSubscriberError": "cachebus.workers.subscriber",
    "LeasedMapping": "cachebus.workers.lease",
    "Purgeable": "cachebus.workers.cache",
    "Scope": "cachebus.bus.scope",
    "Subscriber": "cachebus.workers.subscriber",
    "ThreadedSubscriber": "cachebus.workers.subscriber",
    "cached": "cachebus.workers.cache",
}

__all__ = ["Cache", "DirectoryTarget", "ForkedSubscriberError", "LeasedMapping", "Purgeable", "Scope", "Subscriber",
           "ThreadedSubscriber", "cached"]


def _export(name: str) -> object:
    """The exported ``name``, imported from its module now and kept here, so the next use is a plain lookup."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


if not TYPE_CHECKING:
    # Hidden from type checkers: a module __getattr__ makes every unknown name valid to them,
    # so a misspelt `from cachebus import Cahce` would type-check. They see the imports above.
    __getattr__ = _export


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
