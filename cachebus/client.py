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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple, TextIO

from cachebus.bus.protocol import PurgeOutcome

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

    def clear(self, scope: Mapping[str, Sequence[str]] | None = None) -> str | None:
        """The Flextype clear call; the clear's id from ``Cache-Clear-Id`` (None from a plain Flextype).

        ``scope`` narrows it (docs/scoped-clears.md): ``{"keys": [...], "prefixes": [...], "tags": [...],
        "group": [...]}``, each sent as a repeated field.
        """
        fields = [*self._credentials.items(), *((name, value) for name, values in (scope or {}).items()
                                                 for value in values)]
        body = urllib.parse.urlencode(fields)
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


class ServerSentEvent(NamedTuple):
    """One event of the stream: what a client sends back as ``Last-Event-ID`` (None for the
    unnumbered ``snapshot`` and ``overflow``), its ``event:`` name, and its decoded ``data:``."""

    id: str | None
    kind: str
    data: Any


class EventStream:
    """An open Server-Sent Events stream: :meth:`events` yields each :class:`ServerSentEvent`."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._response = response

    def events(self) -> Iterator[ServerSentEvent]:
        """Each event until the server ends the stream; a read past the timeout raises :class:`TimeoutError`."""
        return read_events(self._response)

    def settimeout(self, seconds: float) -> None:
        if self._conn.sock is not None:
            self._conn.sock.settimeout(seconds)

    def close(self) -> None:
        self._conn.close()


def read_events(stream: IO[bytes]) -> Iterator[ServerSentEvent]:
    """Parse Server-Sent Events from ``stream``: one :class:`ServerSentEvent` per event.

    Comment lines (the service's keep-alives) are skipped; an event's ``id`` is
    what a client sends back as ``Last-Event-ID``. The stream ends when the
    server ends it, cleanly or by closing the connection inside a chunk (as it
    drops a client that fell behind); an event cut short is dropped, as the SSE
    specification has it.
    """
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in _lines(stream):
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text == "":
            if data or "event" in fields:
                yield ServerSentEvent(fields.get("id"), fields.get("event", "message"), json.loads("\n".join(data)))
            fields, data = {}, []
        elif not text.startswith(":"):
            name, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value


def _lines(stream: IO[bytes]) -> Iterator[bytes]:
    try:
        yield from iter(stream.readline, b"")
    except http.client.IncompleteRead:
        return


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


def one_line(text: Any, limit: int = 300) -> str:
    """``text`` from the service as one printable line: a worker's error message may hold anything."""
    flat = "".join(c if c.isprintable() else " " for c in str(text))
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def worker_id(worker: dict[str, Any]) -> str:
    """The id a worker is known by in clears and events: its ``id`` (one per process).

    A service from before per-process identities keyed workers by ``name``.
    """
    return str(worker.get("id") or worker.get("name") or "")


def label(worker: str, name: Any) -> str:
    """``web myhost:4242:a1b2c3``: a process by its name and id (one of them when they are the same)."""
    name = one_line(name or "")
    return one_line(worker) if not name or name == worker else f"{name} {one_line(worker)}"


def progress_bar(acked: int, expected: int, width: int = 30, failed: int = 0) -> str:
    """``[###############---------------] 1/2 acked``, and ``, 1 failed`` when a purge failed."""
    filled = width if expected == 0 else width * min(acked, expected) // expected
    bar = f"[{'#' * filled}{'-' * (width - filled)}] {acked}/{expected} acked"
    return f"{bar}, {failed} failed" if failed else bar


def ms_text(value: Any) -> str:
    return f"{float(value):.1f} ms" if isinstance(value, (int, float)) else "- ms"


def ack_line(ack: dict[str, Any]) -> str:
    """One ack, for output that is not a terminal."""
    who = label(str(ack.get("worker")), ack.get("name"))
    cause = one_line(ack.get("cause") or "-")
    if ack.get("outcome") == PurgeOutcome.FAILED:
        return (f"{who} purge FAILED after {ms_text(ack.get('latency_ms'))} (cause: {cause}): "
                f"{one_line(ack.get('error') or 'no error message')}")
    return f"{who} acked in {ms_text(ack.get('latency_ms'))} (cause: {cause})"


def seconds_ago(when: Any, now: float | None = None) -> str:
    if not isinstance(when, (int, float)):
        return "-"
    ago = max(0.0, (time.time() if now is None else now) - when)
    return f"{ago:.1f}s ago"


def plural(n: int) -> str:
    return f"{n} worker{'s' * (n != 1)}"


@dataclass
class ClearProgress:
    """What the event stream has told about one clear: who was expected, who acked ok, whose purge failed."""

    clear_id: str
    #: Worker id -> name, from the stream's snapshot and every event that names a worker.
    names: dict[str, str] = field(default_factory=dict)
    #: The ids expected to ack; None until ``clear.published`` arrived.
    expected: list[str] | None = None
    #: Id -> its first successful ack.
    ok: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Id -> its latest failed ack, for as long as no successful one came.
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The ``clear.completed`` event, once the service stopped waiting.
    completed: dict[str, Any] | None = None

    def seen(self, data: dict[str, Any]) -> None:
        """An event naming a worker: remember its name (``worker.joined`` has the Worker shape)."""
        wid = str(data.get("worker") or worker_id(data))
        if wid and data.get("name"):
            self.names[wid] = str(data["name"])

    def published(self, data: dict[str, Any]) -> None:
        self.expected = [str(wid) for wid in data.get("expected") or []]

    def acked(self, data: dict[str, Any]) -> None:
        self.seen(data)
        wid = str(data.get("worker"))
        if data.get("outcome", PurgeOutcome.OK) == PurgeOutcome.OK:
            self.ok.setdefault(wid, data)
            self.failed.pop(wid, None)
        elif wid not in self.ok:
            self.failed[wid] = data

    def complete(self, data: dict[str, Any]) -> None:
        self.completed = data
        for wid in data.get("failed") or []:
            if str(wid) not in self.ok:
                self.failed.setdefault(str(wid), {"worker": str(wid)})

    @property
    def proven(self) -> bool:
        """Every expected process acked a successful purge (never with nobody expected)."""
        if not self.expected:
            return False
        if self.completed is not None and self.completed.get("complete") is True:
            return True  # the service's word: every expected process acked ok
        return all(wid in self.ok for wid in self.expected)

    @property
    def missing(self) -> list[str]:
        """Expected ids with no ack at all."""
        return [wid for wid in self.expected or [] if wid not in self.ok and wid not in self.failed]

    def acked_ok(self) -> int:
        return sum(wid in self.ok for wid in self.expected or [])

    def groups(self, with_acks: bool) -> str:
        """`` (api: 1/1, web: 2/3)`` (``with_acks``) or `` (api: 1, web: 3)``; empty while no name
        has more than one process, where a count per name says nothing the total does not."""
        expected = self.expected or []
        by_name: dict[str, list[str]] = {}
        for wid in expected:
            by_name.setdefault(self.names.get(wid) or wid, []).append(wid)
        if all(len(ids) == 1 for ids in by_name.values()):
            return ""
        parts = [f"{one_line(name)}: {sum(wid in self.ok for wid in ids)}/{len(ids)}" if with_acks
                 else f"{one_line(name)}: {len(ids)}" for name, ids in sorted(by_name.items())]
        return f" ({', '.join(parts)})"

    def ack_time_ms(self) -> float | None:
        """Publish to the last expected ack, as the service measured each ack."""
        latencies = [self.ok.get(wid, {}).get("latency_ms") for wid in self.expected or []]
        numbers = [float(v) for v in latencies if isinstance(v, (int, float))]
        return max(numbers) if numbers else None


def worker_lines(ids: list[str], progress: ClearProgress, known: dict[str, dict[str, Any]] | None,
                 now: float | None = None) -> list[str]:
    """One line per process: its name and id, its error if its purge failed, its state and when it was
    last heard from (``known``: id -> worker, None when the service's list could not be read)."""
    labels = [label(wid, progress.names.get(wid)) for wid in ids]
    width = max(map(len, labels), default=0)
    lines = []
    for wid, who in zip(ids, labels, strict=True):
        worker = None if known is None else known.get(wid)
        if known is None:
            where = "state unknown (the worker list could not be read)"
        elif worker is None:
            where = "forgotten"
        else:
            where = f"{one_line(worker.get('state', '-'))}, last seen {seconds_ago(worker.get('last_seen'), now)}"
        ack = progress.failed.get(wid)
        if ack is not None:
            where = f"{one_line(ack.get('error') or 'purge failed')} ({where})"
        lines.append(f"  {who:{width}}  {where}")
    return lines


WORKER_COLUMNS = ("NAME", "ID", "STATE", "HOST", "VIA", "PID", "LAST SEEN", "LAST ACKED SEQ", "ENTRIES",
                  "HIT RATIO", "LAST PURGE")


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else one_line(value)


def worker_row(worker: dict[str, Any], now: float | None = None) -> tuple[str, ...]:
    stats = worker.get("stats")
    if not isinstance(stats, dict):
        stats = {}
    ratio = stats.get("hit_ratio")
    purge = _cell(worker.get("last_purge_cause"))
    if worker.get("last_outcome") == PurgeOutcome.FAILED:
        purge += " (failed)"
    return (
        _cell(worker.get("name")),
        _cell(worker.get("id") or worker.get("instance")),
        _cell(worker.get("state")) + (" (degraded)" if worker.get("degraded") is True else ""),
        _cell(worker.get("host")),
        _cell(worker.get("via")),
        _cell(worker.get("pid")),
        seconds_ago(worker.get("last_seen"), now),
        _cell(worker.get("last_acked_seq")),
        _cell(stats.get("entries")),
        f"{ratio:.1%}" if isinstance(ratio, (int, float)) else "-",
        purge,
    )


def worker_table(workers: list[dict[str, Any]], now: float | None = None) -> str:
    """The worker table: one row per process, grouped by name (sorted by name, then id); columns
    aligned, numbers right-aligned."""
    ordered = sorted(workers, key=lambda w: (str(w.get("name") or ""), str(w.get("id") or w.get("instance") or "")))
    rows = [WORKER_COLUMNS, *(worker_row(w, now) for w in ordered)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(WORKER_COLUMNS))]
    right = {5, 7, 8, 9}
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def names_from_snapshot(data: Any) -> dict[str, str]:
    """Worker id -> name from the event stream's ``snapshot``."""
    workers = data.get("workers") if isinstance(data, dict) else None
    return {worker_id(w): str(w.get("name") or "") for w in workers or [] if isinstance(w, dict)}


#: ``cachebus clear --wait``'s exit statuses (1, for errors, comes from the command).
PROVEN, NOT_PROVEN, NOBODY_LISTENING = 0, 2, 3


def follow_clear(api: Api, stream: EventStream, clear_id: str, deadline: float, out: TextIO, tty: bool, *,
                 names: dict[str, str] | None = None, expect: int | None = None,
                 allow_empty: bool = False) -> int:
    """Follow the clear on the event ``stream`` until it is proven or not; the exit status.

    Proven (0): every process expected at publish time acked a successful purge, and with
    ``expect`` at least that many did. Not proven (2): ``deadline`` passed first, a purge failed
    and no successful one from that process followed, the service itself stopped waiting, or
    fewer than ``expect`` processes acked. Nobody listening (3; 0 with ``allow_empty``): no
    process was live when the clear was published, so there is nothing to prove.

    ``stream`` must have been opened before the clear was published, so that no event about it
    is missed; ``names`` (id -> name, from its snapshot) lets the output group processes by name.
    On a terminal one progress bar line is redrawn in place; otherwise each ack gets its own
    line, so logs and pipes read well.
    """
    started = time.monotonic()
    progress = ClearProgress(clear_id, dict(names or {}))
    drawn = 0  # length of the progress bar on the terminal; 0 while none is open

    def end_bar() -> None:
        nonlocal drawn
        if drawn:
            out.write("\n")
            out.flush()
            drawn = 0

    def draw() -> None:
        nonlocal drawn
        line = progress_bar(progress.acked_ok(), len(progress.expected or []), failed=len(progress.failed))
        out.write("\r" + line.ljust(drawn))
        out.flush()
        drawn = len(line)

    try:
        stream.settimeout(max(0.001, deadline - time.monotonic()))
        for event in stream.events():
            kind, data = event.kind, event.data
            if not isinstance(data, dict):
                continue
            if kind == "worker.joined":
                progress.seen(data)
            elif data.get("clear_id") != clear_id:
                pass
            elif kind == "clear.published":
                progress.published(data)
                if not progress.expected:
                    return _nobody_listening(clear_id, out, allow_empty)
                print(f"clear {clear_id} accepted: waiting for {plural(len(progress.expected))}"
                      f"{progress.groups(with_acks=False)}", file=out, flush=True)
                if tty:
                    draw()
            elif kind == "clear.acked":
                progress.acked(data)
                if tty:
                    draw()
                else:
                    print(ack_line(data), file=out, flush=True)
                if progress.proven:
                    break
            elif kind == "clear.completed":
                progress.complete(data)
                break
            stream.settimeout(max(0.001, deadline - time.monotonic()))
        else:
            raise ClientError("the service ended its event stream before the clear completed")
    except TimeoutError:
        pass
    except (OSError, http.client.HTTPException) as exc:
        raise ClientError(f"lost the event stream from {api.where}: {_reason(exc)}") from None
    finally:
        end_bar()
    return _verdict(api, progress, time.monotonic() - started, out, expect)


def _nobody_listening(clear_id: str, out: TextIO, allow_empty: bool) -> int:
    print(f"clear {clear_id}: nobody was listening: no worker process was live when it was published, "
          f"so none purged ({'accepted with --allow-empty' if allow_empty else '--allow-empty accepts that'})",
          file=out)
    return PROVEN if allow_empty else NOBODY_LISTENING


def _verdict(api: Api, progress: ClearProgress, waited: float, out: TextIO, expect: int | None) -> int:
    clear_id, expected = progress.clear_id, progress.expected
    if expected is None:
        print(f"clear {clear_id}: timed out after {waited:.1f} s before the service announced it", file=out)
        return NOT_PROVEN
    acked = progress.acked_ok()
    if progress.proven:
        took = progress.completed.get("duration_ms") if progress.completed else progress.ack_time_ms()
        took = float(took) if isinstance(took, (int, float)) else None
        print(f"clear {clear_id}: all {plural(len(expected))} acked in "
              f"{f'{took:.1f} ms' if took is not None else f'{waited:.1f} s'}{progress.groups(with_acks=True)}",
              file=out)
        if expect is not None and acked < expect:
            print(f"clear {clear_id}: only {plural(acked)} acked, --expect asked for at least {expect}", file=out)
        _print_excluded(api, progress, out)
        return NOT_PROVEN if expect is not None and acked < expect else PROVEN
    if progress.completed is not None:
        why = f"the service stopped waiting after {ms_text(progress.completed.get('duration_ms'))}"
    else:
        why = f"timed out after {waited:.1f} s"
    print(f"clear {clear_id}: {why}, {acked} of {plural(len(expected))} acked"
          f"{progress.groups(with_acks=True)}", file=out)
    failed, missing = [wid for wid in expected if wid in progress.failed], progress.missing
    try:
        known: dict[str, dict[str, Any]] | None = {worker_id(w): w for w in api.workers()}
    except ClientError:
        known = None
    if failed:
        print("failed (a purge raised, so no proof):", file=out)
        print("\n".join(worker_lines(failed, progress, known)), file=out)
    if missing:
        print("missing:", file=out)
        print("\n".join(worker_lines(missing, progress, known)), file=out)
    _print_excluded(api, progress, out)
    return NOT_PROVEN


def _print_excluded(api: Api, progress: ClearProgress, out: TextIO) -> None:
    """The processes the service knew but did not expect (suspect or lost at publish time): outside
    this proof, which a deploy script should hear about."""
    try:
        record = api.clear_record(progress.clear_id)
    except ClientError:
        return
    excluded = [w for w in record.get("excluded") or [] if isinstance(w, dict) and w.get("worker")]
    if not excluded:
        return
    for worker in excluded:
        progress.seen(worker)
    print("not expected (not live when the clear was published, so outside this proof):", file=out)
    print("\n".join(worker_lines([str(w["worker"]) for w in excluded], progress,
                                 {str(w["worker"]): w for w in excluded})), file=out)
