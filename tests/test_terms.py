"""The domain terms have one spelling: the dashboard's literals are the Python enums' values.

JavaScript cannot import the enums, so ``service/dashboard/app.js`` keeps its
own copy in one constants block; this reads that block as text and compares.
"""

from __future__ import annotations

import enum
import re

import pytest

from cachebus.bus.protocol import PurgeCause, PurgeOutcome
from cachebus.bus.scope import PurgeExtent
from cachebus.service.events import EventKind
from cachebus.service.pages import DASHBOARD
from cachebus.service.record import WorkerState

APP_JS = (DASHBOARD / "app.js").read_text(encoding="utf-8")

#: The JS constant that mirrors each enum.
MIRRORS: dict[str, type[enum.StrEnum]] = {"EVENT": EventKind, "STATE": WorkerState, "CAUSE": PurgeCause,
                                          "OUTCOME": PurgeOutcome, "EXTENT": PurgeExtent}


def js_constants(source: str) -> dict[str, dict[str, str]]:
    """Every ``const NAME = Object.freeze({ KEY: "value", ... });`` in ``source``."""
    blocks = re.findall(r"const (\w+) = Object\.freeze\(\{(.*?)\}\);", source, re.S)
    return {name: dict(re.findall(r'^\s*(\w+): "([^"]*)",?\s*$', body, re.M)) for name, body in blocks}


@pytest.mark.parametrize("js_name", MIRRORS)
def test_dashboard_constants_equal_the_python_enums(js_name: str):
    members = {member.name: member.value for member in MIRRORS[js_name]}
    assert js_constants(APP_JS).get(js_name) == members


def test_the_dashboard_spells_event_kinds_states_and_outcomes_only_in_its_constants():
    last_block = max(APP_JS.index(f"const {name} = ") for name in MIRRORS)
    rest = APP_JS[APP_JS.index("});", last_block):]
    # "live" is also the connection status the page shows, "clear" a CSS class and "ok"
    # the kind of a notice: those words cannot be checked this way.
    terms = [*EventKind, *(state for state in WorkerState if state != WorkerState.LIVE), PurgeOutcome.FAILED]
    assert [term.value for term in terms if f'"{term}"' in rest] == []


def test_enum_values_are_the_strings_on_the_wire():
    # JSON on the bus, over HTTP and on the event stream carries these exact strings.
    assert [cause.value for cause in PurgeCause] == ["clear", "reconnect", "gap", "epoch"]
    assert [state.value for state in WorkerState] == ["live", "suspect", "lost", "left", "forgotten"]
    assert [outcome.value for outcome in PurgeOutcome] == ["ok", "failed"]
    assert [extent.value for extent in PurgeExtent] == ["all", "scoped"]
    assert [kind.value for kind in EventKind] == ["clear.published", "clear.acked", "clear.completed",
                                                  "worker.joined", "worker.state", "worker.purged",
                                                  "worker.stats", "snapshot", "overflow"]
