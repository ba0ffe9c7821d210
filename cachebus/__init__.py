"""cachebus: clear every process's in-memory cache at once, and prove each one did.

What an application embeds is importable from here, with only the base install
(pyzmq and PyYAML)::

    from cachebus import Cache, LeasedMapping, Subscriber, ThreadedSubscriber, cached

The service and the reference worker (``cachebus.service``, ``cachebus.workers.worker``)
need the ``service`` extra: ``pip install 'cachebus[service]'``.
"""

from cachebus.workers.cache import Cache, Purgeable, cached
from cachebus.workers.lease import LeasedMapping
from cachebus.workers.subscriber import ForkedSubscriberError, Subscriber, ThreadedSubscriber

__all__ = ["Cache", "ForkedSubscriberError", "LeasedMapping", "Purgeable", "Subscriber", "ThreadedSubscriber",
           "cached"]
