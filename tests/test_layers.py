"""Importing one part of cachebus loads only what that part needs (cachebus/__init__.py exports lazily).

The import-linter contract in pyproject.toml checks which way imports run in the
source; these check what an import loads at run time, which a lazy export or a
function-level import decides and no static check sees.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

#: Each test imports in a fresh interpreter, the only way to see what an import loads.
pytestmark = pytest.mark.processes


def loaded(statement: str) -> set[str]:
    """The cachebus modules, and the third-party ones that matter here, a fresh interpreter has after ``statement``."""
    probe = (f"{statement}\nimport sys\n"
             "print('\\n'.join(m for m in sys.modules if m.startswith('cachebus') or m in ('tornado', 'bcrypt')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(result.stdout.split())


def test_the_relay_loads_neither_the_worker_library_nor_the_service():
    modules = loaded("import cachebus.relay.relay")
    assert not {m for m in modules if m.startswith(("cachebus.workers", "cachebus.service"))}
    assert "bcrypt" not in modules


@pytest.mark.parametrize("module", ["cachebus", "cachebus.bus.protocol", "cachebus.settings"])
def test_the_ground_floor_loads_no_room_above_it(module: str):
    modules = loaded(f"import {module}")
    assert not {m for m in modules if m.startswith(("cachebus.workers", "cachebus.service", "cachebus.relay"))}
    assert "tornado" not in modules


def test_the_cache_loads_no_subscriber():
    assert "cachebus.workers.subscriber" not in loaded("from cachebus import Cache")


def test_every_export_resolves_to_the_module_that_defines_it():
    import cachebus

    for name in cachebus.__all__:
        value = getattr(cachebus, name)
        assert value.__module__ == cachebus._HOMES[name], name
    assert set(cachebus.__all__) == set(cachebus._HOMES) <= set(dir(cachebus))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        cachebus.Nope  # noqa: B018
