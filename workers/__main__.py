"""``python -m cachebus.workers``: the same as ``cachebus worker``."""

import sys

from cachebus.cli import main

sys.exit(main(prog_command="worker"))
