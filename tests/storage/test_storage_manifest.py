"""Manifest and part-record encoding: sealed, so any flipped bit is detected."""

from __future__ import annotations

from dataclasses import replace

import pytest

from storage import CorruptCheckpointError, UnsupportedFormatError
from storage.manifest import (
    FileEntry,
    Location,
    Manifest,
    PartRecord,
    TensorEntry,
    decode_manifest,
    decode_part,
    encode_manifest,
    encode_part,
)

DATA = "g000003/r00000-x/data-00000.bin"
MANIFEST = Manifest(
    step=42,
    generation=3,
    world_size=2,
    plan_id="sha256:abc",
    commit_id="c0ffee",
    files=(FileEntry("g000003/r00000-x/data-00000.bin", 12, "crc32:0badf00d"),),
    tensors={
        '["w"]': TensorEntry(
            "float32", (3,), (Location("g000003/r00000-x/data-00000.bin", 0, 0, 12),)
        )
    },
    state={"d": [["w", {"t": '["w"]'}], ["n", 1]]},
    per_rank={0: {"d": []}, 1: {"d": [["cursor", 5]]}},
    metadata={"loss": 0.25},
    created=1700000000.5,
)


def test_a_manifest_round_trips() -> None:
    assert decode_manifest(encode_manifest(MANIFEST), "m") == MANIFEST


def test_a_part_record_round_trips() -> None:
    part = PartRecord(
        step=1,
        generation=2,
        rank=1,
        world_size=2,
        plan_id="p",
        writer="g000002/r00001-y",
        files=MANIFEST.files,
        locations={'["w"]': MANIFEST.tensors['["w"]'].locations},
        per_rank_state={"d": []},
        per_rank_tensors={},
    )
    assert decode_part(encode_part(part), "p") == part


def test_every_single_bit_flip_in_a_manifest_is_detected() -> None:
    data = encode_manifest(MANIFEST)
    for byte in range(len(data)):
        for bit in (0, 5):
            damaged = bytearray(data)
            damaged[byte] ^= 1 << bit
            if damaged[byte] in b" \n\t\r" and data[byte] in b" \n\t\r":
                continue  # whitespace between tokens carries no data
            with pytest.raises((CorruptCheckpointError, UnsupportedFormatError)):
                decode_manifest(bytes(damaged), "m")


def test_a_truncated_manifest_is_detected() -> None:
    data = encode_manifest(MANIFEST)
    for keep in (0, 1, len(data) // 2, len(data) - 3):
        with pytest.raises(CorruptCheckpointError, match="m: unreadable"):
            decode_manifest(data[:keep], "m")


def test_a_part_record_is_not_a_manifest() -> None:
    part = encode_part(PartRecord(1, 0, 0, 1, "p", "w", (), {}, {"d": []}, {}))
    with pytest.raises(CorruptCheckpointError, match="expected format 'elastic-ckpt-manifest'"):
        decode_manifest(part, "m")


@pytest.mark.parametrize(
    ("locations", "message"),
    [
        ((Location(DATA, 0, 0, 8),), "do not cover its 12 bytes"),
        ((Location(DATA, 4, 0, 12),), "points outside"),
        ((Location("elsewhere.bin", 0, 0, 12),), "points outside"),
        ((Location(DATA, 0, 0, 8), Location(DATA, 8, 4, 4)), "do not cover"),
    ],
)
def test_a_sealed_but_inconsistent_manifest_is_refused(
    locations: tuple[Location, ...], message: str
) -> None:
    bad = replace(MANIFEST, tensors={'["w"]': TensorEntry("float32", (3,), locations)})
    with pytest.raises(CorruptCheckpointError, match=message):
        decode_manifest(encode_manifest(bad), "m")
