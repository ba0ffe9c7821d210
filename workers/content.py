"""Reading entries in Flextype's layout: ``<content_dir>/<id>/entry.yaml``.

Entry ids may be nested (``blog/first-post``) but never climb out of the
content directory.
"""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

ENTRY_ID_RE = re.compile(r"[a-zA-Z0-9_-]+(?:/[a-zA-Z0-9_-]+)*")


class EntryError(Exception):
    """An entry that cannot be served. ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def entry_path(content_dir: Path, entry_id: str) -> Path:
    if len(entry_id) > 512 or not ENTRY_ID_RE.fullmatch(entry_id):
        raise EntryError(404, "no such entry")
    return content_dir / entry_id / "entry.yaml"


def load_entry(content_dir: Path, entry_id: str) -> dict[str, Any]:
    """The entry's fields, read fresh from disk. Blocking: call off the event loop."""
    path = entry_path(content_dir, entry_id)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        raise EntryError(404, "no such entry") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EntryError(500, f"entry unreadable: {exc.__class__.__name__}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise EntryError(500, "entry.yaml is not valid YAML") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EntryError(500, "entry.yaml does not hold a mapping of fields")
    return data


def demo_content() -> Traversable:
    """The demo entries shipped in the package (``workers/demo_content`` in the source tree)."""
    return files("cachebus.workers") / "demo_content"


def copy_tree(source: Traversable, target: Path) -> None:
    """Copy a packaged directory to ``target``, which must not exist yet.

    Through :mod:`importlib.resources`, so it works from a wheel, an editable
    install or a zip alike, where :func:`shutil.copytree` needs a real path.
    """
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_dir():
            copy_tree(item, target / item.name)
        else:
            (target / item.name).write_bytes(item.read_bytes())
