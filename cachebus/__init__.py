"""The ``cachebus`` command line and the settings every process shares."""
