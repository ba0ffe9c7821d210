"""The cachebus wire format: framing, signing, versioning and message types.

Every message, in either direction, is four ZeroMQ frames::

    [kind, version, signature, body]

* ``kind`` names the message type (``b"clear"``, ``b"ack"``, ...). On the PUB
  socket it is also the subscription topic, so a subscriber can filter by prefix.
* ``version`` is :data:`VERSION`. A peer speaking another version is rejected
  before its body is parsed.
* ``signature`` is empty unless the bus uses a shared key (``bus.key``, the
  HMAC mode of :mod:`cachebus.bus.security`). Then it is ``<sent>:<hmac>``:
  the send time (Unix seconds, six decimals) and the hex HMAC-SHA256, under the
  key, of kind, version, send time and body. A receiver refuses a message sent
  more than a lease ago (or as far in the future), and one whose signature it
  has already accepted, so a captured message cannot be replayed.
* ``body`` is a compact UTF-8 JSON object holding the message's fields.

Every byte comes from the network, so :meth:`Codec.decode` trusts none of them:
it bounds the size and the nesting of a body before parsing it, refuses numbers
that are not finite, checks every field's type, and raises nothing but
:class:`ProtocolError`, so no message can stop a receive loop.

A ROUTER socket prepends the peer's routing id; callers strip it before
:meth:`Codec.decode`. Both the service and the workers import this module, so
the format has exactly one definition.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import heapq
import hmac
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .scope import MAX_SCOPE_ITEMS, ClearScope, PurgeExtent, Scope, check_item

#: Protocol version carried in every message's second frame. Version 2 added the
#: send time to signatures (replay protection). Version 3 carries the service's
#: lease terms in welcomes and heartbeats, and a purge's outcome in acks. Version 4
#: names an ack's all-or-scoped field ``extent`` (it was ``scope``) and gives a
#: worker heartbeat typed ``on_silence`` and ``degraded`` fields (they were keys of
#: its ``stats``).
VERSION = b"4"

#: Versions :meth:`Codec.decode` reads: this one, and for one release the one before, through
#: :func:`_from_v3`, so embedded workers can be upgraded after the service. Older ones are refused
#: with a line naming the version.
READ_VERSIONS = frozenset({b"3", VERSION})

#: The kinds whose body changed in version 4. Every other message still goes out as version 3,
#: which it also is, so a peer a release behind reads it: a service sends its clears, heartbeats
#: and welcomes to workers of either version.
_CHANGED_IN_4 = frozenset({b"ack", b"worker_heartbeat"})

#: Sockets refuse larger messages, so garbage cannot grow a peer's memory, and
#: :meth:`Codec.decode` refuses them too, in case a socket option was forgotten.
MAX_MESSAGE_SIZE = 64 * 1024

#: Most ``[`` and ``{`` a body may hold outside its strings. Bodies are flat objects;
#: a heartbeat's ``stats`` nests one level and a scoped clear's lists one level, so
#: counting them before parsing makes deep nesting (and the parser's RecursionError)
#: impossible. Two ``bytes.count`` settle almost every body; only one whose strings
#: hold brackets (a key such as ``entries[blog]``) has its strings cut out first.
MAX_BRACKETS = 16

#: A heartbeat's ``stats``: at most this many entries, and this long a key or string value.
MAX_STATS_ENTRIES = 32
MAX_STATS_STRING = 256

#: Integers longer than this many digits are refused: a counter or a pid never
#: needs more, and a bigger one would overflow when read as a float.
_MAX_INT_DIGITS = 18


class PurgeCause(enum.StrEnum):
    """Why a worker purged: a clear command, coming back after losing contact
    with the service, a sequence gap, or a new service epoch.

    Declared from the least to the most telling: when several apply to one
    purge, the worker reports the most telling (:func:`worst`), because a new
    epoch or lost messages say more than a reconnect, which says more than a clear.
    """

    CLEAR = "clear"
    RECONNECT = "reconnect"
    GAP = "gap"
    EPOCH = "epoch"

    @property
    def rank(self) -> int:
        """How telling this cause is: higher wins in :func:`worst`."""
        return _CAUSE_RANK[self]


_CAUSE_RANK = {cause: rank for rank, cause in enumerate(PurgeCause)}


class PurgeOutcome(enum.StrEnum):
    """Whether every purge target of a worker dropped its entries.

    A failed purge is acked too, so the service knows at once, but it is no
    proof: the service lists the worker under ``failed`` until a later purge
    of every target succeeds.
    """

    OK = "ok"
    FAILED = "failed"


class OnSilence(enum.StrEnum):
    """What a worker does with its caches once it has heard no service for a lease (``bus.on_silence``).

    Not a message field: a worker reports its choice in its heartbeat's
    stats, and the record shows it beside the worker.
    """

    #: Stop serving from the caches until the service is heard again and they are purged:
    #: the guarantee's bound holds (the default).
    BYPASS = "bypass"
    #: Keep serving: the origin is spared during an outage, but the bound is lost until the
    #: service is heard again (the worker purges then, and reports itself degraded meanwhile).
    SERVE = "serve"


def worst(current: PurgeCause | None, new: PurgeCause) -> PurgeCause:
    """The more telling of two causes that apply to one purge; ``current`` may be unset yet."""
    if current is None or new.rank > current.rank:
        return new
    return current


class ProtocolError(ValueError):
    """A frame set that is not a valid cachebus message."""


@dataclass(frozen=True)
class Message:
    """Base of every wire message. Subclasses set :attr:`KIND`."""

    KIND: ClassVar[bytes] = b""

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: fields are JSON values, and asdict's deep copy is
        # the slowest part of encoding a heartbeat.
        # An empty list is left out: an unscoped clear stays as short as before scopes existed.
        return {name: value for name, _, _ in _schema(type(self)) if (value := getattr(self, name)) != ()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        """Build the message from decoded JSON, checking every field's type."""
        values = {}
        for name, type_name, required in _schema(cls):
            if name not in data:
                if required:
                    raise ProtocolError(f"{cls.KIND.decode()}: missing field {name!r}")
                continue
            values[name] = _check_field(cls.KIND, name, type_name, data[name])
        return cls(**values)


#: Each message class's fields, worked out once per class (see :func:`_schema`).
_SCHEMAS: dict[type[Message], tuple[tuple[str, str, bool], ...]] = {}


def _schema(cls: type[Message]) -> tuple[tuple[str, str, bool], ...]:
    """Each field's name, type name and whether it is required; worked out once per
    message class, since the service decodes one message per ack and heartbeat."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = tuple(
            (f.name, str(f.type), f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls))
    return schema


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}

#: Fields whose JSON string must be one of an enum's values; decoded into the enum.
_ENUM_TYPES: dict[str, type[enum.StrEnum]] = {
    "PurgeCause": PurgeCause,
    "PurgeOutcome": PurgeOutcome,
    "PurgeExtent": PurgeExtent,
    "OnSilence": OnSilence,
}
_ENUM_MEMBERS: dict[type[enum.StrEnum], dict[str, enum.StrEnum]] = {
    enum_type: {member.value: member for member in enum_type} for enum_type in _ENUM_TYPES.values()
}


def _check_field(kind: bytes, name: str, type_name: str, value: Any) -> Any:
    if type_name == "dict[str, Any]":  # the annotation's text: a heartbeat's stats
        return _check_stats(kind, name, value)
    expected = _SIMPLE_TYPES.get(type_name)
    if expected is None:
        if type_name == "tuple[str, ...]":  # after the common types: an ack carries none
            return _check_strings(kind, name, value)
        enum_type = _ENUM_TYPES.get(type_name)
        if enum_type is None:
            raise TypeError(f"unsupported field type {type_name!r}")  # pragma: no cover
        # A dict lookup, not enum_type(value): calling an enum was 3% of the service's CPU per ack.
        member = _ENUM_MEMBERS[enum_type].get(value) if isinstance(value, str) else None
        if member is None:
            raise ProtocolError(f"{kind.decode()}: {name} must be one of {', '.join(enum_type)}")
        return member
    # bool is an int in Python, but never a valid count or sequence number. (A
    # plain `if not isinstance(...)` would make mypy narrow value to object.)
    valid = isinstance(value, expected) and (bool in expected or not isinstance(value, bool))
    if not valid:
        raise ProtocolError(f"{kind.decode()}: field {name!r} must be {type_name}")
    if type_name == "str" and not _printable(value):
        raise ProtocolError(f"{kind.decode()}: field {name!r} is not valid UTF-8 text")
    return float(value) if type_name == "float" else value


def _printable(text: str) -> bool:
    """Whether ``text`` can be logged and served: JSON escapes can carry lone
    surrogates, which no UTF-8 log or response can hold."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_stats(kind: bytes, name: str, value: Any) -> dict[str, Any]:
    """A flat, bounded mapping of names to finite numbers, strings, booleans or null."""
    where = f"{kind.decode()}: field {name!r}"
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be an object")
    if len(value) > MAX_STATS_ENTRIES:
        raise ProtocolError(f"{where} has more than {MAX_STATS_ENTRIES} entries")
    for key, item in value.items():
        if len(key) > MAX_STATS_STRING or not _printable(key):
            raise ProtocolError(f"{where} has a bad key")
        if isinstance(item, str):
            if len(item) > MAX_STATS_STRING or not _printable(item):
                raise ProtocolError(f"{where} has a bad string value")
        elif not (item is None or isinstance(item, (bool, int, float))):
            # Numbers are already finite and bounded (see _parse_float, _parse_int).
            raise ProtocolError(f"{where} must be flat: numbers, strings, booleans or null")
    return value


def _check_strings(kind: bytes, name: str, value: Any) -> tuple[str, ...]:
    """A list of at most :data:`~cachebus.bus.scope.MAX_SCOPE_ITEMS` scope entries, each as the API allows."""
    if not isinstance(value, list) or len(value) > MAX_SCOPE_ITEMS:
        raise ProtocolError(f"{kind.decode()}: field {name!r} must be a list of at most {MAX_SCOPE_ITEMS} strings")
    try:
        return tuple(check_item(name, item) for item in value)
    except ValueError as exc:
        raise ProtocolError(f"{kind.decode()}: {exc}") from None


def _parse_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not a number a message may carry")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError("a number too large to be finite")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ProtocolError("an integer too large")
    return int(text)


# --- Service to workers, on the PUB socket -------------------------------------


@dataclass(frozen=True)
class Clear(Message):
    """Purge: everything, or what ``keys``, ``prefixes`` and ``tags`` name (docs/scoped-clears.md).

    ``seq`` rises by one per command within an ``epoch``, whoever the command
    is for. ``group`` (worker names or labels; empty: every process) says who
    applies it; every worker still sees it and counts it, so a worker that
    misses any command, meant for it or not, sees the gap and purges everything.
    A worker that predates scopes ignores the lists and purges everything: safe.
    """

    KIND: ClassVar[bytes] = b"clear"
    epoch: str
    seq: int
    id: str
    ts: float
    keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    group: tuple[str, ...] = ()

    @property
    def scope(self) -> Scope:
        """What the clear drops, in each process it is for."""
        return Scope(self.keys, self.prefixes, self.tags)

    @property
    def reach(self) -> ClearScope:
        """What the clear drops, and in which processes: the value the service published it from."""
        return ClearScope(self.scope, self.group)

    @classmethod
    def of(cls, epoch: str, seq: int, id: str, ts: float, reach: ClearScope) -> Clear:
        what = reach.what
        return cls(epoch=epoch, seq=seq, id=id, ts=ts, keys=what.keys, prefixes=what.prefixes, tags=what.tags,
                   group=reach.group)


@dataclass(frozen=True)
class LeaseTerms(Message):
    """The service's heartbeat interval and liveness, which every worker follows;
    not sent on its own.

    A worker trusts its targets for ``heartbeat_interval * liveness`` seconds
    after it last heard the service. The service carries the two values in
    every welcome and heartbeat, so no worker has to copy them by hand.
    """

    heartbeat_interval: float
    liveness: int

    #: Bounds a worker accepts, so that no message can stretch a lease without limit.
    MAX_HEARTBEAT_INTERVAL: ClassVar[float] = 3600.0
    MAX_LIVENESS: ClassVar[int] = 1000

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval <= self.MAX_HEARTBEAT_INTERVAL:
            raise ProtocolError(f"{self.KIND.decode()}: heartbeat_interval must be in (0, "
                                f"{self.MAX_HEARTBEAT_INTERVAL:g}] seconds")
        if not 1 <= self.liveness <= self.MAX_LIVENESS:
            raise ProtocolError(f"{self.KIND.decode()}: liveness must be in [1, {self.MAX_LIVENESS}]")

    @property
    def lease(self) -> float:
        """Seconds a worker may trust its targets after hearing this message."""
        return self.heartbeat_interval * self.liveness


@dataclass(frozen=True)
class Heartbeat(LeaseTerms):
    """Sent every heartbeat interval: the last ``seq`` published in ``epoch``.

    A worker compares it with the last command it saw to detect losses.
    """

    KIND: ClassVar[bytes] = b"heartbeat"
    epoch: str
    seq: int
    ts: float


# --- Workers to service, on the DEALER -> ROUTER back channel ------------------


@dataclass(frozen=True)
class WorkerIdentity(Message):
    """Who a worker is and where it stands on the bus; not sent on its own.

    ``instance`` is unique per process start, so the service can tell a
    restarted worker from the one it replaces under the same ``name``;
    ``endpoint`` is its read API, if it has one; ``epoch`` and ``seq`` are the
    last command it has seen.
    """

    name: str
    instance: str
    host: str
    pid: int
    endpoint: str
    epoch: str
    seq: int
    #: More names the process answers to in a clear's ``group`` (docs/scoped-clears.md).
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hello(WorkerIdentity):
    """A worker announces itself once it is subscribed and in sync."""

    KIND: ClassVar[bytes] = b"hello"


@dataclass(frozen=True)
class Ack(Message):
    """A worker purged after it had seen every command up to ``seq`` of ``epoch``.

    One purge covers every clear published up to that point: the clears that
    arrived together and were coalesced, and after a gap the ones that never
    arrived. ``clear_id`` is the newest clear the worker received (empty when a
    heartbeat revealed the gap); ``cause`` says why it purged.

    ``outcome`` is ``failed`` when a target raised; ``error`` then names the
    exception's type and message (scrubbed of credentials by the worker), and
    the ack proves nothing: the worker retries, and acks again.

    ``extent`` is ``all`` when the purge dropped everything (an unscoped clear,
    a gap, or a target that cannot drop less), ``scoped`` when every target
    dropped only what the clears named.
    """

    KIND: ClassVar[bytes] = b"ack"
    name: str
    instance: str
    epoch: str
    seq: int
    clear_id: str
    dropped: int
    purge_ms: float
    cause: PurgeCause
    outcome: PurgeOutcome = PurgeOutcome.OK
    error: str = ""
    extent: PurgeExtent = PurgeExtent.ALL


@dataclass(frozen=True)
class WorkerHeartbeat(WorkerIdentity):
    """Sent by a worker every heartbeat interval, so the service knows it is alive.

    It carries the worker's whole identity, so a service that lost track of
    the worker (a restart, a forgotten entry) can list it again at once.
    ``on_silence`` is what its caches do once no service is heard, and
    ``degraded`` whether they serve without the bound now (``bus.on_silence:
    serve``, and silent). ``stats`` holds its counters for the record.
    """

    KIND: ClassVar[bytes] = b"worker_heartbeat"
    stats: dict[str, Any] = field(default_factory=dict)
    on_silence: OnSilence = OnSilence.BYPASS
    degraded: bool = False


@dataclass(frozen=True)
class Bye(Message):
    """A worker is shutting down cleanly and should no longer be expected."""

    KIND: ClassVar[bytes] = b"bye"
    name: str
    instance: str


# --- Service to one worker, on the ROUTER -> DEALER back channel ---------------


@dataclass(frozen=True)
class Welcome(LeaseTerms):
    """The service's answer to :class:`Hello`: its epoch, current seq and lease terms."""

    KIND: ClassVar[bytes] = b"welcome"
    epoch: str
    seq: int


# --- A relay and the service (docs/scale-out.md) ---------------------------------


@dataclass(frozen=True)
class Relayed(Message):
    """A relay's envelope on the ack channel: ``items`` of its workers' own messages follow it.

    Each item is :data:`RELAYED_ITEM_FRAMES` frames: the worker's routing tag at
    the relay, the worker's CURVE public key as the relay's ZAP check
    authenticated it (z85, or empty without CURVE), then the worker's message,
    unchanged (kind, version, signature, body). See :meth:`Codec.decode_relayed`.
    """

    KIND: ClassVar[bytes] = b"relayed"
    relay: str
    items: int


#: The first frame of the service's answer to one relayed worker: ``[RELAYED_REPLY, tag, *message]``.
RELAYED_REPLY = b"relayed-reply"
RELAYED_ITEM_FRAMES = 6
#: Most items in one envelope: a relay batches a host's acks of one clear, and hosts run far fewer processes.
MAX_RELAYED_ITEMS = 1024
#: Longest routing tag a relay may use for one of its workers (ZeroMQ's own routing ids are 5 bytes).
MAX_RELAYED_TAG = 64
#: The messages a relay forwards for its workers.
RELAYABLE = frozenset({b"hello", b"ack", b"worker_heartbeat", b"bye"})


MESSAGE_TYPES: dict[bytes, type[Message]] = {
    cls.KIND: cls for cls in (Clear, Heartbeat, Hello, Ack, WorkerHeartbeat, Bye, Welcome, Relayed)
}


class RecentSignatures:
    """Signatures of recently accepted messages, to refuse a replay, in bounded memory.

    Like jupyter_client's digest history, but never forgetting one too soon: a
    signature is kept until its message is too old to be accepted anyway. When
    more than ``capacity`` are kept, the oldest is dropped and nothing sent
    before it is accepted any more (:attr:`floor`). A flood can then cost a
    delayed message, never a replay.
    """

    def __init__(self, max_age: float, capacity: int = 1 << 16) -> None:
        self.max_age = max_age
        self.capacity = capacity
        #: Messages sent at or before this time are refused.
        self.floor = float("-inf")
        self._seen: set[bytes] = set()
        self._by_age: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, signature: bytes, sent: float, now: float) -> bool:
        """Remember ``signature``; False if it was already seen or its message is below the floor."""
        by_age = self._by_age
        while by_age and by_age[0][0] < now - self.max_age:
            self._seen.discard(heapq.heappop(by_age)[1])
        if sent <= self.floor or signature in self._seen:
            return False
        self._seen.add(signature)
        heapq.heappush(by_age, (sent, signature))
        if len(by_age) > self.capacity:
            oldest, forgotten = heapq.heappop(by_age)
            self._seen.discard(forgotten)
            self.floor = max(self.floor, oldest)
        return True


@dataclass
class Codec:
    """Encodes and decodes messages, signing them when a key is set.

    With an empty ``key`` messages carry an empty signature frame and any
    signature is ignored. With a key, unsigned or wrongly signed messages are
    rejected, and so are messages sent more than ``max_age`` seconds ago (or
    ahead: clocks may differ a little) and messages already accepted once.
    Both ends use the lease, ``heartbeat_interval x liveness``, as ``max_age``.
    """

    key: bytes = b""
    max_age: float = 1.5
    _recent: RecentSignatures = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._recent = RecentSignatures(self.max_age)

    def follow_lease(self, seconds: float) -> None:
        """Accept messages up to ``seconds`` old from now on (a worker follows the
        service's lease terms). The replay memory is kept, so no window opens."""
        self.max_age = self._recent.max_age = seconds

    def sign(self, kind: bytes, version: bytes, sent: bytes, body: bytes) -> bytes:
        """The hex HMAC of one message under :attr:`key` (NUL never occurs in the first three parts)."""
        return hmac.new(self.key, b"\0".join((kind, version, sent, body)), hashlib.sha256).hexdigest().encode()

    def encode(self, msg: Message) -> list[bytes]:
        body = _ENCODER.encode(msg.to_dict()).encode()
        version = VERSION if msg.KIND in _CHANGED_IN_4 else b"3"
        signature = b""
        if self.key:
            sent = b"%.6f" % time.time()
            signature = sent + b":" + self.sign(msg.KIND, version, sent, body)
        return [msg.KIND, version, signature, body]

    def decode(self, frames: Sequence[bytes]) -> Message:
        """Turn frames back into a message, or raise :class:`ProtocolError`.

        Nothing else ever leaves here, whatever the frames hold: the receive
        loops rely on it (and a property test in tests/test_protocol.py checks it).
        """
        if len(frames) != 4:
            raise ProtocolError(f"expected 4 frames, got {len(frames)}")
        try:
            kind, version, signature, body = (bytes(f) for f in frames)
        except TypeError:
            raise ProtocolError("frames must be bytes") from None
        if len(kind) + len(version) + len(signature) + len(body) > MAX_MESSAGE_SIZE:
            raise ProtocolError(f"message larger than {MAX_MESSAGE_SIZE} bytes")
        if version not in READ_VERSIONS:
            raise ProtocolError(f"unsupported protocol version {version[:16]!r}")
        cls = MESSAGE_TYPES.get(kind)
        if cls is None:
            raise ProtocolError(f"unknown message kind {kind[:32]!r}")
        if self.key:
            self._verify(kind, version, signature, body)
        data = _parse_body(body)
        if version == b"3" and kind in _CHANGED_IN_4:
            data = _from_v3(kind, data)
        return cls.from_dict(data)

    def encode_relayed(self, relay: str, items: Sequence[tuple[bytes, bytes, Sequence[bytes]]]) -> list[bytes]:
        """A relay's envelope of ``items``, each (routing tag, worker key or b"", the worker's frames)."""
        frames = self.encode(Relayed(relay=relay, items=len(items)))
        for tag, key, message in items:
            frames += [tag, key, *message]
        return frames

    def decode_relayed(self, frames: Sequence[bytes]) -> tuple[Relayed, list[tuple[bytes, str | None, list[bytes]]]]:
        """The envelope and its items, each (tag, worker key or None, the worker's four frames, not
        yet decoded), or :class:`ProtocolError` for the envelope as a whole.

        An item's own message is decoded by the caller with :meth:`decode`, so one bad
        item is refused alone and never costs its batch mates their acks.
        """
        if len(frames) < 4:
            raise ProtocolError(f"expected at least 4 frames, got {len(frames)}")
        header = self.decode(frames[:4])
        if not isinstance(header, Relayed):
            raise ProtocolError(f"expected a relayed envelope, got {header.KIND.decode()}")
        rest = frames[4:]
        if not 1 <= header.items <= MAX_RELAYED_ITEMS or len(rest) != header.items * RELAYED_ITEM_FRAMES:
            raise ProtocolError(f"relayed: {len(rest)} frames for {header.items} items "
                                f"(at most {MAX_RELAYED_ITEMS} items of {RELAYED_ITEM_FRAMES} frames)")
        items = []
        for start in range(0, len(rest), RELAYED_ITEM_FRAMES):
            tag, key, *message = (bytes(frame) for frame in rest[start:start + RELAYED_ITEM_FRAMES])
            if not 1 <= len(tag) <= MAX_RELAYED_TAG:
                raise ProtocolError(f"relayed: a routing tag of {len(tag)} bytes (1 to {MAX_RELAYED_TAG})")
            if key and (len(key) != 40 or not key.isascii() or not key.decode().isprintable()):
                raise ProtocolError("relayed: a worker key that is not a z85 CURVE public key")
            if message[0] not in RELAYABLE:
                raise ProtocolError("relayed: a relay forwards only hellos, acks, worker heartbeats and byes")
            items.append((tag, key.decode() if key else None, message))
        return header, items

    def _verify(self, kind: bytes, version: bytes, signature: bytes, body: bytes) -> None:
        """Check the signature, then that the message is fresh and new (after the
        signature, so that only the key's holders can fill the replay memory)."""
        sent, colon, digest = signature.partition(b":")
        if not colon or len(sent) > 32 or not hmac.compare_digest(digest, self.sign(kind, version, sent, body)):
            raise ProtocolError("bad signature")
        try:
            sent_at = float(sent)
        except ValueError:
            raise ProtocolError("bad send time in the signature") from None
        now = time.time()
        age = now - sent_at
        if not abs(age) <= self.max_age:  # also refuses NaN
            raise ProtocolError(f"message sent {age:.1f} s ago, outside the {self.max_age:g} s window: "
                                "too old to trust, or clocks disagree")
        if not self._recent.add(digest, sent_at, now):
            raise ProtocolError("repeated signature: a replayed message")

#: One encoder for every body: json.dumps with options builds a new JSONEncoder per call.
#: allow_nan=False: a receiver refuses NaN and Infinity, so the sender finds out at once.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

#: One decoder for every body: json.loads with hooks builds a new JSONDecoder per call.
_DECODER = json.JSONDecoder(parse_constant=_parse_constant, parse_float=_parse_float, parse_int=_parse_int)


#: A JSON string, escapes included.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _outside_strings(body: bytes) -> int:
    """``[`` and ``{`` outside the body's strings (an unterminated string counts as outside)."""
    bare = _JSON_STRING.sub(b"", body)
    return bare.count(b"[") + bare.count(b"{")


def _parse_body(body: bytes) -> dict[str, Any]:
    """A body's JSON object, parsed only once it is known to be shallow."""
    if body.count(b"[") + body.count(b"{") > MAX_BRACKETS and _outside_strings(body) > MAX_BRACKETS:
        raise ProtocolError("body nests too deep or holds too many brackets")
    try:
        data = _DECODER.decode(body.decode())
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("body is not a JSON object")
    return data


def _from_v3(kind: bytes, data: dict[str, Any]) -> dict[str, Any]:
    """A version 3 ack or worker heartbeat's body as version 4 has it (read for one release)."""
    if kind == b"ack":
        if "scope" in data and "extent" not in data:
            data["extent"] = data.pop("scope")
        return data
    stats = data.get("stats")
    if isinstance(stats, dict):  # checked as a field afterwards; only these two keys are looked at here
        if "on_silence" not in data and stats.get("on_silence") in (OnSilence.BYPASS, OnSilence.SERVE):
            data["on_silence"] = stats["on_silence"]
        if "degraded" not in data and isinstance(stats.get("degraded"), bool):
            data["degraded"] = stats["degraded"]
    return data


def now() -> float:
    """Wall-clock timestamp used in messages (seconds since the epoch)."""
    return time.time()
