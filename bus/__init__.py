"""The cachebus wire protocol, shared by the service and every worker.

Nothing in here opens a socket: :mod:`cachebus.bus.protocol` turns messages into ZeroMQ
frames and back, and :mod:`cachebus.bus.endpoints` names the default addresses.
"""
