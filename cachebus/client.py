"""The HTTP side of ``cachebus clear`` and ``cachebus workers``, on the stdlib alone.

:class:`Api` makes the Flextype clear call and reads the record. Every failure
(the service cannot be reached, an HTTP error, an answer that is not what the
record sends) is a :class:`ClientError` with a one-line message; no message ever
holds the access token. The rest renders what the commands print.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from typing import IO, Any, TextIO

#: Seconds to wait for one HTTP answer.
REQUEST_TIMEOUT = 10.0


class ClientError(Exception):
    """The service could not be reached, or answered with an error: exit status 1."""


class Api:
    """One service, one pair of credentials, one kept-alive connection."""

    def __init__(self, url: str, token: str, access_token: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected a URL like http://127.0.0.1:8080, got {url!r}")
        try:
            _ = parts.port  # raises for a port that is not a number in range
        except ValueError:
            raise ValueError(f"bad port in {url!r}") from None
        self._parts = parts
        #: For messages: never the credentials, never a query string.
        self.where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self._prefix = parts.path.rstrip("/")
        self._credentials = {"token": token, "access_token": access_token}
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- the calls ------------------------------------------------------------

    def clear(self) -> str | None:
        """The Flextype clear call; the clear's id from ``Cache-Clear-Id`` (None from a plain Flextype)."""
        body = urllib.parse.urlencode(self._credentials)
        _, headers, _ = self._request("POST", "/api/v1/cache/clear", body,
                                      {"Content-Type": "application/x-www-form-urlencoded"}, retry=False)
        return headers.get("Cache-Clear-Id") or None

    def clear_record(self, clear_id: str, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        return self._json(f"/api/v1/cache/clears/{urllib.parse.quote(clear_id, safe='')}", timeout)

    def workers_body(self, timeout: float = REQUEST_TIMEOUT) -> str:
        """``/api/v1/cache/workers`` as the service sent it."""
        return self._get("/api/v1/cache/workers", timeout)

    def workers(self, timeout: float = REQUEST_TIMEOUT) -> list[dict[str, Any]]:
        return list(_parse(self.workers_body(timeout), "workers")["workers"])

    def events(self, timeout: float = REQUEST_TIMEOUT) -> EventStream:
        """Open ``/api/v1/cache/events`` on a connection of its own; reads time out after ``timeout``."""
        kind = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(self._parts.hostname or "", self._parts.port, timeout=timeout)
        query = urllib.parse.urlencode(self._credentials)
        try:
            conn.request("GET", f"{self._prefix}/api/v1/cache/events?{query}")
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ClientError(f"cannot reach {self.where}: {_reason(exc)}") from None
        if response.status != 200:
            data = response.read()
            conn.close()
            raise ClientError(_http_error(response.status, response.reason, data))
        return EventStream(conn, response)

    # --- plumbing -------------------------------------------------------------

    def _json(self, path: str, timeout: float) -> dict[str, Any]:
        return _parse(self._get(path, timeout))

    def _get(self, path: str, timeout: float) -> str:
        query = urllib.parse.urlencode(self._credentials)
        _, _, body = self._request("GET", f"{path}?{query}", None, {}, timeout=timeout)
        return body.decode("utf-8", "replace")

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            kind = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            self._conn = kind(self._parts.hostname or "", self._parts.port, timeout=timeout)
        else:
            self._conn.timeout = timeout
            if self._conn.sock is not None:
                self._conn.sock.settimeout(timeout)
        return self._conn

    def _request(self, method: str, path: str, body: str | None, headers: dict[str, str], *,
                 timeout: float = REQUEST_TIMEOUT, retry: bool = True) -> tuple[int, Any, bytes]:
        """Send one request; on a kept-alive connection the server closed, reads are sent again once."""
        for attempt in range(2):
            reused = self._conn is not None and self._conn.sock is not None
            conn = self._connection(timeout)
            try:
                conn.request(method, self._prefix + path, body, headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if reused and retry and attempt == 0:
                    continue
                raise ClientError(f"cannot reach {self.where}: {_reason(exc)}") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise ClientError(f"cannot reach {self.where}: {_reason(exc)}") from None
        if response.will_close:
            self.close()
        if not 200 <= response.status < 300:
            raise ClientError(_http_error(response.status, response.reason, data))
        return response.status, response.headers, data


class EventStream:
    """An open Server-Sent Events stream: :meth:`events` yields ``(id, kind, data)``."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._response = response

    def events(self) -> Iterator[tuple[str | None, str, Any]]:
        """Each event until the server ends the stream; a read past the timeout raises :class:`TimeoutError`."""
        return read_events(self._response)

    def settimeout(self, seconds: float) -> None:
        if self._conn.sock is not None:
            self._conn.sock.settimeout(seconds)

    def close(self) -> None:
        self._conn.close()


def read_events(stream: IO[bytes]) -> Iterator[tuple[str | None, str, Any]]:
    """Parse Server-Sent Events from ``stream``: ``(id or None, kind, decoded JSON data)`` per event.

    Comment lines (the service's keep-alives) are skipped; an event's ``id`` is
    what a client sends back as ``Last-Event-ID``.
    """
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in iter(stream.readline, b""):
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text == "":
            if data or "event" in fields:
                yield fields.get("id"), fields.get("event", "message"), json.loads("\n".join(data))
            fields, data = {}, []
        elif not text.startswith(":"):
            name, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _http_error(status: int, reason: str, data: bytes) -> str:
    """``HTTP 401 Unauthorized: Token is wrong``, from Flextype's error body when there is one."""
    message = ""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if isinstance(body, dict):
        title, message = body.get("title") or reason, str(body.get("message") or "")
    else:
        title = reason
    line = f"HTTP {status} {title}".rstrip()
    return f"{line}: {message}" if message else line


def _parse(text: str, key: str | None = None) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict) or (key is not None and not isinstance(data.get(key), list)):
        raise ClientError("the service's answer is not the record's JSON")
    return data


# --- what the commands print ---------------------------------------------------


def progress_bar(acked: int, expected: int, width: int = 30) -> str:
    """``[###############---------------] 1/2 acked``."""
    filled = width if expected == 0 else width * min(acked, expected) // expected
    return f"[{'#' * filled}{'-' * (width - filled)}] {acked}/{expected} acked"


def ack_line(ack: dict[str, Any]) -> str:
    """One ack, for output that is not a terminal."""
    return f"{ack.get('worker')} acked in {float(ack.get('latency_ms') or 0):.1f} ms (cause: {ack.get('cause') or '-'})"


def seconds_ago(when: Any, now: float | None = None) -> str:
    if not isinstance(when, (int, float)):
        return "-"
    ago = max(0.0, (time.time() if now is None else now) - when)
    return f"{ago:.1f}s ago"


def missing_lines(missing: list[str], workers: list[dict[str, Any]] | None,
                  now: float | None = None) -> list[str]:
    """Each missing worker with its state and when it was last heard from (``workers``: None if unknown)."""
    known = {w.get("name"): w for w in workers or []}
    width = max(len(name) for name in missing) if missing else 0
    lines = []
    for name in missing:
        worker = known.get(name)
        if workers is None:
            lines.append(f"  {name:{width}}  state unknown (the worker list could not be read)")
        elif worker is None:
            lines.append(f"  {name:{width}}  forgotten")
        else:
            lines.append(f"  {name:{width}}  {worker.get('state', '-')}, last seen "
                         f"{seconds_ago(worker.get('last_seen'), now)}")
    return lines


WORKER_COLUMNS = ("NAME", "STATE", "HOST", "PID", "LAST SEEN", "LAST ACKED SEQ", "ENTRIES", "HIT RATIO",
                  "LAST PURGE")


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def worker_row(worker: dict[str, Any], now: float | None = None) -> tuple[str, ...]:
    stats = worker.get("stats")
    if not isinstance(stats, dict):
        stats = {}
    ratio = stats.get("hit_ratio")
    return (
        _cell(worker.get("name")),
        _cell(worker.get("state")),
        _cell(worker.get("host")),
        _cell(worker.get("pid")),
        seconds_ago(worker.get("last_seen"), now),
        _cell(worker.get("last_acked_seq")),
        _cell(stats.get("entries")),
        f"{ratio:.1%}" if isinstance(ratio, (int, float)) else "-",
        _cell(worker.get("last_purge_cause")),
    )


def worker_table(workers: list[dict[str, Any]], now: float | None = None) -> str:
    """The worker table, columns aligned; numbers right-aligned."""
    rows = [WORKER_COLUMNS, *(worker_row(w, now) for w in workers)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(WORKER_COLUMNS))]
    right = {3, 5, 6, 7}
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def follow_clear(api: Api, stream: EventStream, clear_id: str, deadline: float, out: TextIO, tty: bool) -> int:
    """Follow the clear on the event ``stream`` until every expected worker acked (0) or ``deadline`` passes (2).

    ``stream`` must have been opened before the clear was published, so that
    no event about it is missed. On a terminal one progress bar line is
    redrawn in place; otherwise each ack gets its own line, so logs and pipes
    read well.
    """
    started = time.monotonic()
    expected: list[str] = []
    acked: list[str] = []
    drawn = 0  # length of the progress bar on the terminal; 0 while none is open

    def end_bar() -> None:
        nonlocal drawn
        if drawn:
            out.write("\n")
            out.flush()
            drawn = 0

    def draw(line: str) -> int:
        out.write("\r" + line.ljust(drawn))
        out.flush()
        return len(line)

    def count(n: int) -> str:
        return f"{n} worker{'s' * (n != 1)}"

    try:
        stream.settimeout(max(0.001, deadline - time.monotonic()))
        for _, kind, data in stream.events():
            if not isinstance(data, dict) or data.get("clear_id") != clear_id:
                continue
            if kind == "clear.published":
                expected = [str(name) for name in data.get("expected") or []]
                if expected:
                    print(f"clear {clear_id} accepted: waiting for {count(len(expected))}", file=out, flush=True)
                    if tty:
                        drawn = draw(progress_bar(0, len(expected)))
            elif kind == "clear.acked":
                acked.append(str(data.get("worker")))
                if tty:
                    drawn = draw(progress_bar(len(acked), len(expected)))
                else:
                    print(ack_line(data), file=out, flush=True)
            elif kind == "clear.completed":
                end_bar()
                if not expected:
                    print(f"clear {clear_id}: no workers were live, so none had to ack", file=out)
                    return 0
                if data.get("complete"):
                    took = data.get("duration_ms")
                    took = f"{took:.1f} ms" if isinstance(took, (int, float)) else \
                        f"{time.monotonic() - started:.1f} s"
                    print(f"clear {clear_id}: all {count(len(expected))} acked in {took}", file=out)
                    return 0
                break  # the service itself stopped waiting (record.complete_within)
            stream.settimeout(max(0.001, deadline - time.monotonic()))
        else:
            raise ClientError("the service ended its event stream before the clear completed")
    except TimeoutError:
        pass
    except (OSError, http.client.HTTPException) as exc:
        raise ClientError(f"lost the event stream from {api.where}: {_reason(exc)}") from None
    finally:
        end_bar()
    missing = [name for name in expected if name not in acked]
    print(f"clear {clear_id}: timed out after {time.monotonic() - started:.1f} s, "
          f"{len(expected) - len(missing)} of {count(len(expected))} acked; missing:", file=out)
    try:
        known: list[dict[str, Any]] | None = api.workers()
    except ClientError:
        known = None
    print("\n".join(missing_lines(missing, known)), file=out)
    return 2
