"""Cache-holding workers: the cache, the embeddable bus subscriber, and the reference worker."""
