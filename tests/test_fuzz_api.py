"""schemathesis against the OpenAPI document a real service serves: no 5xx, and every answer as documented.

Before issue 12 a schemathesis run found 3,364 answers of 500 (malformed multipart
bodies). This runs schemathesis' command line, as an operator would, against
``cachebus serve`` with one worker and its served ``/api/openapi.json``: every
operation, with the document's examples, coverage cases (boundaries, malformed
values), generated cases of valid and invalid (negative) data, and stateful
sequences, for a fixed time budget.

Credentials: most of the time a credential parameter (query or body) carries a real
token, so the authenticated answers (the proof of a ``wait=all`` clear, the record,
the event stream) are explored and checked; the rest of the time it is whatever
schemathesis makes up. The token is a throwaway with no call limit.

The checks are the ones about what the service answers: no server error, and a
documented status, content type, headers and body. schemathesis' checks about what a
request *should* get (``positive_data_acceptance``, ``negative_data_rejection``) are
left out: Flextype's rules answer some schema-valid requests with 400 or 405 (GET while
``api.cache.methods`` is ``[POST]``) and let a body value override an invalid query
value, on purpose.

schemathesis' pytest plugin is not used: its lazy loader (``from_fixture``), which a
service started by a fixture needs, reads ``request.node._nodeid``, which pytest 9.2
no longer has.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cachebus.testing import Cluster, http

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
#: The whole run's budget: fuzzing and stateful sequences repeat until it is spent.
BUDGET_SECONDS = 120
#: How often a credential parameter carries the real token rather than a made-up one.
VALID_CREDENTIALS = 0.8
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance"]


def config(cluster: Cluster) -> str:
    """schemathesis.toml: the real credentials as dictionaries bound to the credential parameters."""
    lines = [
        # The event stream never ends by itself: read its first event (a snapshot).
        "max-stream-events = 1",
        "request-timeout = 20",
        f"[dictionaries.token]\nvalues = [{json.dumps(cluster.token)}]",
        f"[dictionaries.access_token]\nvalues = [{json.dumps(cluster.access_token)}]",
        "[parameters]",
    ]
    for where in ("query", "body"):
        for name in ("token", "access_token"):
            lines.append(f'"{where}.{name}" = {{ dictionary = "{name}", probability = {VALID_CREDENTIALS} }}')
    return "\n".join(lines) + "\n"


# The budget, then the time the subprocess is given past it (below), and the service's start.
@pytest.mark.timeout(BUDGET_SECONDS + 180)
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(cluster: Cluster, tmp_path: Path):
    cluster.start_service()
    cluster.start_worker("w1")
    (tmp_path / "schemathesis.toml").write_text(config(cluster))
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(tmp_path / "schemathesis.toml"),
         "run", f"{cluster.url}/api/openapi.json", "--checks", ",".join(CHECKS), "--mode", "all",
         "--max-time", str(BUDGET_SECONDS), "--generation-database", "none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=BUDGET_SECONDS + 120)
    summary = run.stdout[-6000:]
    assert run.returncode == 0, f"schemathesis failed (seed and reproductions below):\n{summary}\n{run.stderr[-2000:]}"
    # Every operation schemathesis found in the document was tested.
    selected = re.search(r"^\s*Selected: (\d+)/(\d+)$", run.stdout, re.MULTILINE)
    tested = re.search(r"^\s*Tested: (\d+)$", run.stdout, re.MULTILINE)
    assert selected and tested and selected[1] == selected[2] == tested[1], summary
    # The real token was used: the service counted the clears it published.
    assert b"cachebus_clears_published_total 0.0" not in http("GET", cluster.url + "/metrics")[2]
