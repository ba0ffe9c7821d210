"""Default bus endpoints, in one place so the service, workers and docs agree."""

#: The service binds a PUB socket here; workers subscribe to it for commands.
DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"

#: The service binds a ROUTER socket here; workers connect a DEALER to say
#: hello, heartbeat and acknowledge purges.
DEFAULT_ACKS = "tcp://127.0.0.1:5557"
