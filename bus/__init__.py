"""The cachebus wire protocol, shared by the service and every worker.

Nothing in here opens a socket: :mod:`bus.protocol` turns messages into ZeroMQ
frames and back, and :mod:`bus.endpoints` names the default addresses.
"""
