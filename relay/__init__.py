"""``cachebus relay``: one per host, between the service and the workers on that host (docs/scale-out.md)."""
