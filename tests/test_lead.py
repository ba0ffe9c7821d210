"""The lead among service instances (service/lead.py): the lock, and the record nobody can forge."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from cachebus.service.lead import LEAD_FILE, RECORD_SIZE, Lead, LeadRecord

RECORD = LeadRecord(name="s0", url="http://127.0.0.1:8080", acks="tcp://127.0.0.1:5557", epoch="ab" * 8, seq=7,
                    pid=123, boot="boot")


def test_a_record_reads_back_only_with_the_key_it_was_signed_with():
    data = RECORD.to_bytes(b"secret")
    assert len(data) == RECORD_SIZE
    assert LeadRecord.from_bytes(data, b"secret") == RECORD
    assert LeadRecord.from_bytes(data, b"another") is None
    assert LeadRecord.from_bytes(data) is None


@pytest.mark.parametrize("data", [
    b"",
    b" " * RECORD_SIZE,
    b"\xff" * RECORD_SIZE,
    b"[]",
    RECORD.to_bytes(b"secret")[:100],  # torn
    RECORD.to_bytes(b"secret").replace(b'"seq":7', b'"seq":8'),  # edited
    RECORD.to_bytes(b"secret").replace(b"127.0.0.1:8080", b"evil.example:80"),  # sent elsewhere
    dataclasses.replace(RECORD, seq=-1).to_bytes(b"secret"),
    dataclasses.replace(RECORD, url="x" * 300).to_bytes(b"secret"),
])
def test_anything_else_is_no_record(data: bytes):
    assert LeadRecord.from_bytes(data, b"secret") is None


def test_one_holder_at_a_time_and_the_lock_goes_with_the_holder(tmp_path: Path):
    first, second = Lead(tmp_path / LEAD_FILE, b"k"), Lead(tmp_path / LEAD_FILE, b"k")
    first.open()
    second.open()
    try:
        assert first.try_take() and not second.try_take()
        first.write(RECORD)
        assert second.read() == RECORD
        first.close()
        assert second.try_take()
        assert second.read() == RECORD  # the record outlives its writer: the next one continues it
    finally:
        first.close()
        second.close()


def test_a_removed_or_replaced_file_is_noticed(tmp_path: Path):
    lead = Lead(tmp_path / LEAD_FILE)
    lead.open()
    try:
        assert not lead.replaced()
        os.unlink(lead.path)
        assert lead.replaced()
        lead.path.write_bytes(b"")
        assert lead.replaced()
    finally:
        lead.close()


def test_a_link_planted_in_place_of_the_file_is_refused(tmp_path: Path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / LEAD_FILE).symlink_to(target)
    with pytest.raises(OSError):
        Lead(tmp_path / LEAD_FILE).open()
    assert target.read_text() == "keep"
