"""The wire format both sides import: round trips, signing, and rejection of garbage."""

from __future__ import annotations

import functools
import itertools

import pytest

from cachebus.bus.protocol import (
    VERSION,
    Ack,
    Bye,
    Clear,
    Codec,
    Heartbeat,
    Hello,
    ProtocolError,
    PurgeCause,
    Welcome,
    WorkerHeartbeat,
    worst,
)

MESSAGES = [
    Clear(epoch="e", seq=1, id="c1", ts=1.5),
    Heartbeat(epoch="e", seq=7, ts=2.0),
    Hello(name="w", instance="i", host="h", pid=42, endpoint="http://127.0.0.1:1", epoch="e", seq=3),
    Ack(name="w", instance="i", epoch="e", seq=3, clear_id="c3", dropped=10, purge_ms=0.25,
        cause=PurgeCause.GAP),
    WorkerHeartbeat(name="w", instance="i", host="h", pid=42, endpoint="", epoch="e", seq=3,
                    stats={"entries": 5, "hits": 1}),
    Bye(name="w", instance="i"),
    Welcome(epoch="e", seq=9),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.KIND.decode())
@pytest.mark.parametrize("key", [b"", b"secret"])
def test_every_message_round_trips(msg, key):
    codec = Codec(key)
    frames = codec.encode(msg)
    assert frames[0] == msg.KIND and frames[1] == VERSION
    assert bool(frames[2]) == bool(key)
    assert codec.decode(frames) == msg


def test_signed_bus_rejects_unsigned_and_wrongly_signed_messages():
    msg = Clear(epoch="e", seq=1, id="c", ts=0.0)
    with pytest.raises(ProtocolError, match="bad signature"):
        Codec(b"key").decode(Codec().encode(msg))
    with pytest.raises(ProtocolError, match="bad signature"):
        Codec(b"key").decode(Codec(b"other").encode(msg))
    tampered = Codec(b"key").encode(msg)
    tampered[3] = tampered[3].replace(b'"seq":1', b'"seq":2')
    with pytest.raises(ProtocolError, match="bad signature"):
        Codec(b"key").decode(tampered)


@pytest.mark.parametrize("frames, reason", [
    ([], "expected 4 frames"),
    ([b"clear", VERSION, b""], "expected 4 frames"),
    ([b"clear", b"2", b"", b"{}"], "unsupported protocol version"),
    ([b"bogus", VERSION, b"", b"{}"], "unknown message kind"),
    ([b"clear", VERSION, b"", b"\xff"], "not JSON"),
    ([b"clear", VERSION, b"", b"[]"], "not a JSON object"),
    ([b"clear", VERSION, b"", b'{"epoch":"e","seq":1,"id":"c"}'], "missing field 'ts'"),
    ([b"clear", VERSION, b"", b'{"epoch":"e","seq":"1","id":"c","ts":0}'], "'seq' must be int"),
    ([b"clear", VERSION, b"", b'{"epoch":"e","seq":true,"id":"c","ts":0}'], "'seq' must be int"),
    ([b"ack", VERSION, b"", b'{"name":"w","instance":"i","epoch":"e","seq":1,"clear_id":"",'
      b'"dropped":0,"purge_ms":0,"cause":"boredom"}'], "cause must be one of"),
    ([b"ack", VERSION, b"", b'{"name":"w","instance":"i","epoch":"e","seq":1,"clear_id":"",'
      b'"dropped":0,"purge_ms":0,"cause":"GAP"}'], "cause must be one of"),
    ([b"ack", VERSION, b"", b'{"name":"w","instance":"i","epoch":"e","seq":1,"clear_id":"",'
      b'"dropped":0,"purge_ms":0,"cause":["gap"]}'], "cause must be one of"),
    ([b"ack", VERSION, b"", b'{"name":"w","instance":"i","epoch":"e","seq":1,"clear_id":"",'
      b'"dropped":0,"purge_ms":0,"cause":null}'], "cause must be one of"),
])
def test_garbage_raises_protocol_error(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        Codec().decode(frames)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    frames = Codec().encode(Clear(epoch="e", seq=1, id="c", ts=0.0))
    frames[3] = frames[3][:-1] + b',"scope":{"prefix":"blog/"}}'
    assert Codec().decode(frames) == Clear(epoch="e", seq=1, id="c", ts=0.0)


def test_an_acks_cause_travels_as_its_string_and_decodes_into_the_enum():
    ack = Ack(name="w", instance="i", epoch="e", seq=1, clear_id="", dropped=0, purge_ms=0.0,
              cause=PurgeCause.RECONNECT)
    frames = Codec().encode(ack)
    assert frames[3].endswith(b',"cause":"reconnect"}')
    decoded = Codec().decode(frames)
    assert isinstance(decoded, Ack) and type(decoded.cause) is PurgeCause


@pytest.mark.parametrize("causes, reported", [
    ((PurgeCause.CLEAR,), PurgeCause.CLEAR),
    ((PurgeCause.CLEAR, PurgeCause.RECONNECT), PurgeCause.RECONNECT),
    ((PurgeCause.RECONNECT, PurgeCause.GAP), PurgeCause.GAP),
    ((PurgeCause.GAP, PurgeCause.CLEAR), PurgeCause.GAP),
    ((PurgeCause.CLEAR, PurgeCause.GAP, PurgeCause.EPOCH), PurgeCause.EPOCH),
    ((PurgeCause.RECONNECT, PurgeCause.EPOCH, PurgeCause.GAP, PurgeCause.CLEAR), PurgeCause.EPOCH),
])
def test_the_most_telling_cause_is_reported_whatever_the_order(causes, reported):
    # A new epoch or lost messages say more than a reconnect, which says more than a clear.
    for order in itertools.permutations(causes):
        assert functools.reduce(worst, order, None) is reported
