"""cachebus: clear every process's in-memory cache at once, and prove each one did.

What an application embeds is importable from here, with only the base install
(pyzmq, PyYAML and sortedcontainers)::

    from cachebus import Cache, DirectoryTarget, LeasedMapping, Scope, Subscriber, ThreadedSubscriber, cached

The service and the reference worker (``cachebus.service``, ``cachebus.workers.worker``)
need the ``service`` extra: ``pip install 'cachebus[service]'``.
"""

from cachebus.bus.scope import Scope
from cachebus.workers.cache import Cache, Purgeable, cached
from cachebus.workers.directory import DirectoryTarget
from cachebus.workers.lease import LeasedMapping
from cachebus.workers.subscriber import ForkedSubscriberError, Subscriber, ThreadedSubscriber

__all__ = ["Cache", "DirectoryTarget", "ForkedSubscriberError", "LeasedMapping", "Purgeable", "Scope", "Subscriber",
           "ThreadedSubscriber", "cached"]
