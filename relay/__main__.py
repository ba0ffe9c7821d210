"""``python -m cachebus.relay``: the same as ``cachebus relay``."""

import sys

from cachebus.cli import main

sys.exit(main(prog_command="relay"))
