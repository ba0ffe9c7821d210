"""``python -m cachebus.service``: the same as ``cachebus serve``."""

import sys

from cachebus.cli import main

sys.exit(main(prog_command="serve"))
