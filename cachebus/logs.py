"""Log set-up for every cachebus process: plain text, or one JSON object per line.

Structured lines carry their fields in ``extra={"fields": {...}}``; the text
format shows only the message, the JSON format adds the fields as keys. A
field whose name mentions a token is dropped, whatever the caller passed.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from typing import Any

from cachebus.settings import LogFormat, Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update((k, v) for k, v in fields.items() if "token" not in k.lower() and k not in line)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class Budget:
    """At most ``per_window`` events of each key every ``window`` seconds; the rest are counted.

    The core of every rate-limited log line: whoever floods, a key writes a
    bounded number of lines, and the next line it writes can say how many were
    held back. Keys must come from a closed set (reasons, message templates),
    never from what a client sends, so this stays small.
    """

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        #: key -> [window start, events let through in it]
        self._windows: dict[str, list[float]] = {}
        self._held: dict[str, int] = {}

    def take(self, key: str, per_window: int) -> int | None:
        """None: hold this event back. Else let it through: how many were held back before it."""
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window:
            window = self._windows[key] = [now, 0]
        if window[1] >= per_window:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        window[1] += 1
        return self._held.pop(key, 0)


class RateLimit(logging.Filter):
    """Lets through at most ``per_window`` records of each message template per window.

    For loggers whose lines a client controls: Tornado's ``tornado.general``
    writes one line per malformed request line, header or chunk, which a
    client can send in a loop. The next line let through says how many like it
    were not.
    """

    def __init__(self, per_window: int = 5, window: float = 10.0) -> None:
        super().__init__()
        self.per_window = per_window
        self._budget = Budget(window)

    def filter(self, record: logging.LogRecord) -> bool:
        held = self._budget.take(str(record.msg), self.per_window)
        if held is None:
            return False
        if held:
            record.msg, record.args = f"{record.getMessage()} ({held} more like this not logged)", None
        return True


#: Loggers of libraries that write a line per malformed request, and so need :class:`RateLimit`.
CLIENT_DRIVEN_LOGGERS = ("tornado.general",)


def setup(settings: Settings) -> None:
    """Send every log line to stderr in the format ``log.format`` names."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log.format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log.level.upper())
    for name in CLIENT_DRIVEN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(RateLimit())
