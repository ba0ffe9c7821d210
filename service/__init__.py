"""The cachebus HTTP service: Flextype's cache API, the publisher, and the record of acks."""
