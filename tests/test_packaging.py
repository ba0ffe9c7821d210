"""What a user installs: one import root, every packaged file, and a base install without the service.

The wheel is built from a copy of the source tree, as ``pip`` would build it for
a user, and installed with its base requirements only into a fresh virtual
environment: an application that embeds the subscriber gets ``cachebus`` and
nothing else on its import path, and no Tornado.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Source folders installed under ``cachebus.``; importing them by their folder name
#: would load a second copy of each module (or fail outside the source tree).
SUBPACKAGES = ("service", "workers", "bus", "relay")
#: Folders of the repository holding Python code.
CODE = ("cachebus", *SUBPACKAGES, "tests", "bench")


def bare_imports(path: Path) -> list[str]:
    """``import service`` / ``from workers.cache import …`` in ``path``: each as ``file:line``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        if any(name.split(".")[0] in SUBPACKAGES for name in names):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_module_is_imported_by_its_folder_name():
    files = [path for folder in CODE for path in (ROOT / folder).rglob("*.py")]
    assert len(files) > 40
    offenders = [where for path in files for where in bare_imports(path)]
    assert not offenders, f"import these through cachebus. instead: {offenders}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "cachebus"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "*.egg-info", "test-artifacts", "__pycache__", ".*_cache"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                    "-w", str(out), str(source)], check=True, timeout=300)
    (built,) = out.glob("cachebus-*.whl")
    return built


@pytest.mark.processes
def test_the_wheel_installs_one_top_level_name_and_every_packaged_file(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["cachebus"]
    roots = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert roots == {"cachebus"}
    shipped = set(names)
    for entry in (ROOT / "workers" / "demo_content").rglob("entry.yaml"):
        assert f"cachebus/workers/{entry.relative_to(ROOT / 'workers')}" in shipped
    assert "cachebus/workers/demo_content/blog/first-post/entry.yaml" in shipped
    for asset in ("dashboard/index.html", "dashboard/app.js", "dashboard/app.css", "openapi.yaml", "__main__.py"):
        assert f"cachebus/service/{asset}" in shipped
    assert "cachebus/workers/__main__.py" in shipped
    # Every module of every subpackage, however deep: a folder without its __init__.py would be left out.
    for folder in SUBPACKAGES:
        for module in (ROOT / folder).rglob("*.py"):
            assert f"cachebus/{folder}/{module.relative_to(ROOT / folder).as_posix()}" in shipped, module
    assert {"cachebus/service/auth/__init__.py", "cachebus/service/auth/store.py"} <= shipped
    assert {"cachebus/relay/__main__.py", "cachebus/relay/relay.py"} <= shipped


@pytest.mark.processes
def test_the_base_install_embeds_the_subscriber_without_the_service(wheel: Path, tmp_path: Path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
                   check=True, timeout=600)
    probe = """
import importlib.util, sys
from cachebus import Cache, ForkedSubscriberError, LeasedMapping, Subscriber, ThreadedSubscriber, cached
cache = Cache(max_entries=2)
cache.set("k", 1)
assert cache.get("k") == 1
assert cache.get_or_set("j", lambda: 2) == 2 and LeasedMapping({}).get("k") is None
Subscriber.from_settings([cache], environ={"CACHEBUS_INSECURE": "1"})  # embedders' settings: the base install
missing = [m for m in ("tornado", "bcrypt", "prometheus_client", "service", "workers", "bus")
           if importlib.util.find_spec(m) is not None]
print("missing-ok" if not missing else f"present: {missing}")
"""
    # From an empty folder, so the source tree is not on the path.
    result = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "missing-ok"

    serve = subprocess.run([str(env_dir / "bin" / "cachebus"), "serve"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert serve.returncode == 2
    assert serve.stderr.count("\n") == 1 and "pip install 'cachebus[service]'" in serve.stderr, serve.stderr
