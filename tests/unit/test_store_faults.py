"""The local store under faults: a full disk, a read-only directory, unreadable files.

Full and read-only filesystems are real: a 200 KiB tmpfs, remounted read-only (we run as
root; the tests skip with the reason otherwise). "Unreadable" is a directory in a file's
place: as root, permission bits do not stop a read, and a directory fails every read the
way an unreadable file does (an OSError from open/read). The e2e tests add a real EACCES
by running the CLI as another user.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kms_agent.errors import AgentError, StoreIOError
from kms_agent.store import LocalStore
from tests.conftest import PLANTED


def _mount(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["mount", *args], capture_output=True, check=False, timeout=30)


def _write_until_error(fd: int, chunk: bytes) -> int:
    while True:
        try:
            os.write(fd, chunk)
        except OSError as exc:
            return exc.errno or 0


def fill(mnt: Path) -> Path:
    """Write a filler file until the filesystem is full; return it (delete it to free)."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert _write_until_error(fd, b"\0" * 4096) == errno.ENOSPC
        assert _write_until_error(fd, b"\0") == errno.ENOSPC  # the last partial page
    finally:
        os.close(fd)
    return filler


def leftovers(store: LocalStore) -> list[Path]:
    return [p for p in store.root.rglob(".*") if p.name != ".lock"]


def test_first_put_on_a_full_disk_leaves_no_key_file(tmpfs):
    """Creating the store on a full disk fails cleanly and leaves no (empty) key file in
    place; once space is freed the store is created and works."""
    filler = fill(tmpfs)
    store = LocalStore(tmpfs / "data")
    with pytest.raises(StoreIOError) as info:
        store.put("db", PLANTED.encode())
    assert str(store.key_path) in info.value.message
    assert "full" in info.value.message + (info.value.hint or "")
    assert not store.key_path.exists()
    assert leftovers(store) == []
    filler.unlink()
    store = LocalStore(tmpfs / "data")
    store.put("db", PLANTED.encode())
    assert store.get("db").text() == PLANTED


def test_empty_key_file_with_no_secrets_is_replaced(tmp_path):
    """A zero-byte key file (what a full disk left before the key was written atomically)
    with no secret sealed under it is replaced, not a dead end."""
    store = LocalStore(tmp_path / "data")
    store.key_path.parent.mkdir(parents=True)
    store.key_path.touch(mode=0o600)
    store.put("db", PLANTED.encode())
    assert store.get("db").text() == PLANTED


def test_empty_key_file_with_secrets_is_not_replaced(tmp_path):
    """With secrets sealed under it, a zero-byte key is damage to report, never replaced."""
    store = LocalStore(tmp_path / "data")
    store.put("db", PLANTED.encode())
    store.key_path.write_bytes(b"")
    store = LocalStore(tmp_path / "data")
    with pytest.raises(AgentError, match="damaged"):
        store.put("other", b"x")
    assert store.key_path.read_bytes() == b""


def test_full_disk_loses_no_secret(tmpfs):
    """On a full disk a put fails with one clear error naming the file; every secret stored
    before still reads, and once space is freed puts work again."""
    store = LocalStore(tmpfs / "data")
    store.put("a", f"{PLANTED}-a".encode())
    store.put("b", f"{PLANTED}-b".encode())
    filler = fill(tmpfs)
    for name in ("a", "c"):
        with pytest.raises(StoreIOError) as info:
            store.put(name, f"{PLANTED}-new".encode() * 50)
        assert str(store.secrets_dir) in info.value.message
        assert "full" in info.value.message
        assert PLANTED not in info.value.message + (info.value.hint or "")
    assert leftovers(store) == []
    assert store.get("a").text() == f"{PLANTED}-a"
    assert store.get("b").text() == f"{PLANTED}-b"
    filler.unlink()
    store.put("c", b"c")
    assert store.list_names() == ["a", "b", "c"]


def test_read_only_store_reads_and_refuses_writes_clearly(tmpfs):
    """A read-only data dir serves what it holds; a write says it is read-only."""
    store = LocalStore(tmpfs / "data")
    store.put("a", PLANTED.encode())
    remounted = _mount("-o", "remount,ro", str(tmpfs))
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount read-only: {remounted.stderr.decode().strip()}")
    try:
        reader = LocalStore(tmpfs / "data")
        assert reader.init().key_id == store.key_info().key_id  # the agent's open()
        assert reader.get("a").text() == PLANTED
        assert reader.list_names() == ["a"]
        for write in (lambda: reader.put("b", b"x"), lambda: reader.delete("a")):
            with pytest.raises(StoreIOError) as info:
                write()
            assert "read-only" in info.value.message
            assert str(reader.root) in info.value.message
    finally:
        _mount("-o", "remount,rw", str(tmpfs))


def test_unreadable_key_file_is_one_clear_error(tmp_path):
    """A key file that cannot be read is an AgentError naming it, not an OSError."""
    store = LocalStore(tmp_path / "data")
    store.put("a", b"x")
    store.key_path.unlink()
    store.key_path.mkdir()
    fresh = LocalStore(tmp_path / "data")
    for call in (fresh.init, fresh.key_info, lambda: fresh.get("a")):
        with pytest.raises(StoreIOError) as info:
            call()
        assert str(fresh.key_path) in info.value.message
        assert info.value.hint


def test_unreadable_secret_file_is_skipped_by_listing(tmp_path, log_capture):
    """One unreadable secret file: listing skips it (and logs it), reading it names it."""
    store = LocalStore(tmp_path / "data")
    for name in ("a", "b", "c"):
        store.put(name, PLANTED.encode())
    bad = store.path_for("b")
    bad.unlink()
    bad.mkdir()
    (store.secrets_dir / "0000garbage.json").write_bytes(b"\x00not json")
    mark = len(log_capture.getvalue())
    assert store.list_names() == ["a", "c"]
    logged = [json.loads(line) for line in log_capture.getvalue()[mark:].splitlines()]
    skipped = {e["path"] for e in logged if e["event"] == "store_file_skipped"}
    assert skipped == {str(bad), str(store.secrets_dir / "0000garbage.json")}
    with pytest.raises(StoreIOError) as info:
        store.get("b")
    assert str(bad) in info.value.message
    assert store.get("a").text() == PLANTED


def test_world_writable_secret_file_is_warned_about(tmp_path, log_capture):
    """A secret file others may write is warned about (once), like an over-open key file."""
    store = LocalStore(tmp_path / "data")
    store.put("a", PLANTED.encode())
    store.put("b", PLANTED.encode())
    os.chmod(store.path_for("a"), 0o666)  # noqa: S103 -- the over-open file under test
    mark = len(log_capture.getvalue())
    reader = LocalStore(tmp_path / "data")
    reader.get("a")
    reader.get("a")
    reader.get("b")
    reader.list_names()
    logged = [json.loads(line) for line in log_capture.getvalue()[mark:].splitlines()]
    warned = [e for e in logged if e["event"] == "file_exposed"]
    assert [e["path"] for e in warned] == [str(store.path_for("a"))]
    assert warned[0]["mode"] == "0o666"


_KILLED_MID_PUT = """
import os, signal, sys
from kms_agent.store import LocalStore
store = LocalStore(sys.argv[1])
store.init()
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # after the temp's fsync
store.put("a", b"second")
"""


def test_temp_file_of_a_killed_put_is_swept_by_the_next_write(tmp_path):
    """kill -9 between a put's fsync and its rename leaves a temp file; the next write
    removes it, and the old value is intact."""
    store = LocalStore(tmp_path / "data")
    store.put("a", b"first")
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_PUT, str(store.root)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(leftovers(store)) == 1
    assert store.get("a").text() == "first"
    store.put("b", b"x")
    assert leftovers(store) == []
    assert store.get("a").text() == "first"
