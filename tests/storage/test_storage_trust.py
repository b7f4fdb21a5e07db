"""The checkpoint location is not trusted: paths stay inside it, records are checked,
foreign files survive retention, unreadable manifests never pass for commits,
claims and keys (issue 10, storage half)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest
import torch

from storage import (
    BadSignatureError,
    CheckpointExistsError,
    CheckpointStore,
    CorruptCheckpointError,
    LocationClaimedError,
    StorageError,
    UnsafePathError,
    UnsignedError,
    layout,
)
from storage.cli import main
from tests.storage.testlib import FAST_RETRY, Location, assert_same, save_ranks
from tests.storage.trustlib import (
    WatchedFileSystem,
    first_data_file,
    forge,
    point_files_at,
    reseal,
)

KEY = b"k" * 32


def state(i: int) -> dict:
    return {"model": {"w": torch.arange(64, dtype=torch.float32) * i}, "step": i}


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A secret next to the location, that nothing the store does may read or touch."""
    path = tmp_path / "secret.bin"
    path.write_bytes(b"SECRET" * 43)
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["ckpt", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -------------------------------------------------------------- confinement


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "backslash", "nul", "empty-segment"])
def test_a_resealed_manifest_naming_a_file_outside_is_refused_everywhere(
    local_location: Location,
    sentinel: Path,
    kind: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    store = local_location.store()
    store.save(10, state(10))
    store.save(20, state(20))
    target = {
        "dotdot": "../" * 12 + str(sentinel).lstrip("/"),
        "absolute": str(sentinel),
        "backslash": "..\\..\\secret.bin",
        "nul": "g000000/x\x00/../../../secret.bin",
        "empty-segment": "g000000//data.bin",
    }[kind]
    forge(local_location, 20, lambda body: point_files_at(body, target))
    # The probe: verify said "step 20: ok" and export wrote the secret as weights.
    code, out, _ = cli(capsys, "verify", local_location.url, "--step", "20")
    assert code == 1 and "step 20: BAD" in out and "unsafe" in out
    step, loaded = local_location.store().load()
    assert step == 10  # fell back past the forged step
    assert_same(state(10), loaded)
    with pytest.raises(UnsafePathError, match="unsafe"):
        local_location.store().load(20)
    out_file = tmp_path / "model.pt"
    code, _, err = cli(capsys, "export", local_location.url, "--step", "20", "--out", str(out_file))
    assert code == 1 and "unsafe" in err and not out_file.exists()
    assert [i.step for i in local_location.store().list()] == [10]


def test_a_symlink_inside_the_location_leading_out_is_not_followed(
    local_location: Location,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = local_location.store()
    store.save(10, state(10))
    store.save(20, state(20))
    data = Path(local_location.path(first_data_file(local_location, 20)))
    outside = tmp_path / "outside.bin"
    outside.write_bytes(data.read_bytes())  # same bytes: only the symlink check can tell
    data.unlink()
    data.symlink_to(outside)
    watched = WatchedFileSystem(skip_instance_cache=True)
    suspicious = CheckpointStore(local_location.url, fs=watched, retry=FAST_RETRY)
    report = suspicious.verify(20)
    assert not report.ok and report.problems[0].reason == "unsafe"
    step, loaded = suspicious.load()
    assert step == 10
    assert_same(state(10), loaded)
    assert watched.outside(local_location.root) == []
    # A whole step directory that is a symlink is refused too, and gc/prune leave it alone.
    elsewhere = tmp_path / "elsewhere"
    os.rename(local_location.path(layout.step_dir(10)), elsewhere)
    os.symlink(elsewhere, local_location.path(layout.step_dir(10)))
    with pytest.raises(CorruptCheckpointError):
        suspicious.load()
    suspicious.gc(grace_s=0.0)
    suspicious.prune(keep_last=1, verify=False)
    assert (elsewhere / layout.MANIFEST).exists() and outside.exists()
    assert watched.outside(local_location.root) == []


def test_a_manifest_that_is_a_fifo_is_refused_without_blocking(local_location: Location) -> None:
    store = local_location.store()
    store.save(10, state(10))
    store.save(20, state(20))
    manifest = local_location.path(local_location.manifest(20))
    os.remove(manifest)
    os.mkfifo(manifest)  # opening it for reading would block forever
    step, _ = local_location.store().load()
    assert step == 10
    with pytest.raises(UnsafePathError, match="not a regular file"):
        local_location.store().load(20)


def test_paths_are_confined_on_memory_and_s3_too(memory_location: Location) -> None:
    store = memory_location.store()
    store.save(10, state(10))
    memory_location.write("secret", b"SECRET")
    forge(memory_location, 10, lambda body: point_files_at(body, "../../secret"))
    with pytest.raises(UnsafePathError):
        memory_location.store().load(10)
    assert not memory_location.store().verify().ok


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("step", "20", "field 'step'"),
        ("world_size", 0, "field 'world_size'"),
        ("generation", 2**70, "field 'generation'"),
        ("created", None, "field 'created'"),
        ("files", {"a": 1}, "field 'files'"),
    ],
)
def test_manifest_fields_of_the_wrong_type_or_range_are_corrupt(
    local_location: Location, field: str, value: object, match: str
) -> None:
    local_location.store().save(20, state(20))
    forge(local_location, 20, lambda body: body.__setitem__(field, value))
    with pytest.raises(CorruptCheckpointError, match=match):
        local_location.store().load(20)


def test_a_forged_size_cannot_make_the_loader_allocate_it(local_location: Location) -> None:
    local_location.store().save(20, state(20))

    def huge(body: dict) -> None:
        body["files"][0]["size"] = 2**50
        (tensor,) = [t for t in body["tensors"].values() if t["at"]]
        tensor["shape"] = [2**48]
        tensor["at"] = [[body["files"][0]["path"], 0, 0, 2**50]]

    forge(local_location, 20, huge)
    with pytest.raises(CorruptCheckpointError, match="the manifest says 1125899906842624"):
        local_location.store().load(20)


# ----------------------------------------------------- torn manifests at commit


def test_a_save_over_a_truncated_manifest_moves_it_aside_and_commits(
    local_location: Location,
) -> None:
    store = local_location.store()
    store.save(20, state(1))
    local_location.truncate(local_location.manifest(20))
    assert local_location.store().list() == []  # unreadable: not a checkpoint
    info = local_location.store().save(20, state(20))  # used to raise CheckpointExistsError
    assert info.committed and [i.step for i in local_location.store().list()] == [20]
    assert_same(state(20), local_location.store().load()[1])
    torn = [p for p in local_location.all_files(20) if layout.is_torn_record(p.split("/", 1)[1])]
    assert len(torn) == 1  # kept for an operator, and gc does not delete it
    local_location.store().gc(grace_s=0.0)
    assert local_location.exists(torn[0])


def test_a_multi_rank_save_over_a_truncated_manifest_commits(local_location: Location) -> None:
    local_location.store().save(20, state(1))
    local_location.truncate(local_location.manifest(20))
    results = save_ranks(local_location, 20, state(20), 3, timeout=30)
    assert results[0].committed and not results[1].committed and not results[2].committed
    assert_same(state(20), local_location.store().load()[1])


def test_a_save_over_a_valid_commit_is_still_refused(local_location: Location) -> None:
    local_location.store().save(20, state(20))
    with pytest.raises(CheckpointExistsError, match="already committed"):
        local_location.store().save(20, state(21))


def test_holds_tells_the_committed_state_from_another(local_location: Location) -> None:
    store = local_location.store()
    store.save(20, state(20))
    assert store.holds(20, state(20))
    assert not store.holds(20, state(21))
    assert not store.holds(20, {**state(20), "extra": 1})
    assert not store.holds(30, state(20))


# --------------------------------------------------------------- retention


def test_prune_and_gc_leave_files_they_did_not_write(local_location: Location) -> None:
    store = local_location.store()
    for step in (10, 20, 30):
        store.save(step, state(step))
    notes = [
        f"{layout.step_dir(10)}/notes.txt",
        f"{layout.step_dir(20)}/g000000/mine.bin",
        f"{layout.step_dir(30)}/g000000/r00000-zz/data-00000.bin",
    ]
    for rel in notes:
        local_location.write(rel, b"user data")
    assert store.prune(keep_last=1, verify=False) == [10, 20]
    store.gc(grace_s=0.0)
    for rel in notes:
        assert local_location.exists(rel), rel
    assert [i.step for i in store.list()] == [30] and store.verify().ok
    assert not local_location.exists(local_location.manifest(10))
    assert local_location.data_files(10) == [] and local_location.data_files(20) == [notes[1]]


# ----------------------------------------------------------- location checks


def test_probe_finds_a_location_that_cannot_hold_checkpoints(tmp_path: Path) -> None:
    regular = tmp_path / "a-file"
    regular.write_text("not a directory")
    with pytest.raises(StorageError, match="a-file"):
        CheckpointStore(f"file://{regular}", retry=FAST_RETRY).probe()
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(StorageError, match="permission denied"):
            CheckpointStore(f"file://{readonly}/ck", retry=FAST_RETRY).probe()
    finally:
        readonly.chmod(0o700)
    CheckpointStore(f"file://{tmp_path}/fine", retry=FAST_RETRY).probe()
    assert os.listdir(tmp_path / "fine") == []


def test_memory_locations_are_known_to_be_process_local(tmp_path: Path) -> None:
    assert CheckpointStore("memory://ck").process_local
    assert not CheckpointStore(f"file://{tmp_path}/ck").process_local


# ------------------------------------------------------------------- claims


def test_a_second_claim_is_refused_naming_the_first_owner(local_location: Location) -> None:
    first, second = local_location.store(), local_location.store()
    first.claim("launch-a", "job-1")
    first.claim("launch-a", "job-1")  # again: a no-op
    with pytest.raises(LocationClaimedError) as err:
        second.claim("launch-b", "job-1")
    message = str(err.value)
    assert "job 'job-1'" in message and "launch-a" in message and f"pid {os.getpid()}" in message
    first.save(10, state(10))
    # --resume takes over; the first owner's commits are refused from then on.
    second.claim("launch-b", "job-1", takeover=True)
    with pytest.raises(LocationClaimedError, match="launch-b"):
        first.save(20, state(20))
    assert not local_location.exists(local_location.manifest(20))
    second.save(20, state(20))
    assert [i.step for i in local_location.store().list()] == [10, 20]


def test_claims_are_create_only_on_s3(s3_location: Location) -> None:
    s3_location.store().claim("launch-a", "job")
    with pytest.raises(LocationClaimedError, match="launch-a"):
        s3_location.store().claim("launch-b", "job")


# ---------------------------------------------------------------------- keys


def test_signed_manifests_verify_and_unsigned_or_forged_ones_are_refused(
    local_location: Location,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    local_location.store().save(10, state(10))  # unsigned
    signed = local_location.store(key=KEY)
    signed.save(20, state(20))
    envelope = json.loads(local_location.read(local_location.manifest(20)))
    assert envelope["hmac"].startswith("hmac-sha256:")
    assert all(f["checksum"].startswith("sha256:") for f in envelope["body"]["files"])
    code, out, _ = cli(capsys, "verify", local_location.url, "--checkpoint-key-file", str(key_file))
    assert code == 1 and "step 10: BAD (unsigned)" in out and "step 20: ok (signed)" in out
    code, out, _ = cli(capsys, "verify", local_location.url)
    assert code == 0 and "step 10: ok (unsigned)" in out and "step 20: ok (signed (not" in out
    with pytest.raises(UnsignedError):
        local_location.store(key=KEY).load(10)
    with pytest.raises(BadSignatureError):
        local_location.store(key=b"another key, long enough").load(20)
    # Resealing after an edit fixes the digest, not the signature.
    forge(local_location, 20, lambda body: body.__setitem__("metadata", {"evil": 1}))
    code, out, _ = cli(
        capsys, "verify", local_location.url, "--checkpoint-key-file", str(key_file), "--step", "20"
    )
    assert code == 1 and "step 20: BAD (bad signature)" in out
    with pytest.raises(CorruptCheckpointError, match="no checkpoint .* verifies"):
        local_location.store(key=KEY).load()


def test_a_signed_manifest_with_crc_checksums_is_refused(local_location: Location) -> None:
    from storage import manifest as manifest_format

    local_location.store().save(20, state(20))  # crc32 files
    rel = local_location.manifest(20)
    envelope = json.loads(local_location.read(rel))
    local_location.write(rel, manifest_format.seal(envelope["format"], envelope["body"], KEY))
    with pytest.raises(CorruptCheckpointError, match="CRC"):
        local_location.store(key=KEY).load(20)


def test_a_bad_key_file_is_one_clear_error(tmp_path: Path, capsys, local_location) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    code, _, err = cli(capsys, "list", local_location.url, "--checkpoint-key-file", str(short))
    assert code == 2 and "16..4096 bytes, got 4" in err and str(short) in err
    code, _, err = cli(
        capsys, "list", local_location.url, "--checkpoint-key-file", str(tmp_path / "missing")
    )
    assert code == 2 and "cannot be read" in err


# ------------------------------------------------------------------- export


def test_export_refuses_to_overwrite_without_force_and_never_writes_in_the_store(
    local_location: Location,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    local_location.store().save(20, state(20))
    manifest = local_location.path(local_location.manifest(20))
    before = Path(manifest).read_bytes()
    code, _, err = cli(capsys, "export", local_location.url, "--out", manifest, "--force")
    assert code == 2 and "inside the checkpoint location" in err
    inside = f"file://{local_location.root}/model.pt"
    code, _, err = cli(capsys, "export", local_location.url, "--out", inside)
    assert code == 2 and "inside the checkpoint location" in err
    assert Path(manifest).read_bytes() == before and local_location.store().verify().ok
    out = tmp_path / "model.pt"
    out.write_bytes(b"keep me")
    code, _, err = cli(capsys, "export", local_location.url, "--out", str(out))
    assert code == 2 and "--force" in err and out.read_bytes() == b"keep me"
    code, _, _ = cli(capsys, "export", local_location.url, "--out", str(out), "--force")
    assert code == 0
    assert torch.equal(torch.load(out, weights_only=True)["model"]["w"], state(20)["model"]["w"])


def test_reseal_helper_really_reseals(local_location: Location) -> None:
    # The forged manifests above fail for what they say, not for a stale digest.
    local_location.store().save(20, state(20))
    rel = local_location.manifest(20)
    local_location.write(rel, reseal(json.loads(local_location.read(rel))))
    assert local_location.store().verify().ok
    fsspec.filesystem("file").invalidate_cache()


def test_a_file_named_like_a_step_directory_is_not_a_checkpoint(local_location: Location) -> None:
    local_location.store().save(20, state(20))
    Path(local_location.path(layout.step_dir(30))).write_bytes(b"not a directory")
    store = local_location.store()
    assert [i.step for i in store.list()] == [20] and store.latest().step == 20
    assert store.load()[0] == 20 and store.verify().ok
    store.gc(grace_s=0.0)
    store.prune(keep_last=1)
    assert Path(local_location.path(layout.step_dir(30))).read_bytes() == b"not a directory"


def test_a_keyed_committer_refuses_an_unsigned_part(local_location: Location) -> None:
    from storage import MissingPartsError

    parts = save_ranks(local_location, 20, state(20), 2, ranks=[1])  # written without the key
    assert parts[1].committed is False
    with pytest.raises(MissingPartsError, match="unsigned"):
        local_location.store(key=KEY).save(20, state(20), rank=0, world_size=2, timeout=1.0)
    assert not local_location.exists(local_location.manifest(20))
