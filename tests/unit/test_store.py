"""The embedded encrypted store: crypto, stages, tamper evidence, atomic writes."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from kms_agent.errors import BadRequest, SecretNotFound, StoreCorrupt, StoreIOError
from kms_agent.store import DEFAULT_KEY_ALIAS, MAX_VERSIONS, LocalStore
from tests.conftest import PLANTED


@pytest.fixture(name="store")
def _store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "data")
    store.init()
    return store


def test_init_creates_a_private_256_bit_default_key(store):
    """The default key is created once, 0600, 256 bits, aliased local/default."""
    info = store.init()
    assert info.alias == DEFAULT_KEY_ALIAS
    assert stat.S_IMODE(store.key_path.stat().st_mode) == 0o600
    material = base64.b64decode(json.loads(store.key_path.read_text())["material"])
    assert len(material) == 32
    assert store.init().key_id == info.key_id  # not recreated


def test_put_get_round_trip_and_nothing_in_plaintext_on_disk(store):
    """A stored value reads back exactly, and its bytes appear in no file of the store."""
    value = f"{PLANTED}-p@ss w0rd ✓"
    store.put("aigw!secret-abc", value.encode())
    record = store.get("aigw!secret-abc")
    assert record.text() == value
    assert record.data_type == "text"
    assert record.version_stages == ("ACSCurrent",)
    for path in store.root.rglob("*"):
        if path.is_file():
            assert PLANTED.encode() not in path.read_bytes(), path


def test_binary_values_round_trip(store):
    """--binary values come back byte for byte."""
    blob = bytes(range(256)) * 4
    store.put("certs/p12", blob, data_type="binary")
    record = store.get("certs/p12")
    assert record.value.reveal() == blob
    assert record.data_type == "binary"


def test_text_must_be_utf8(store):
    """Non-UTF-8 bytes stored as text are refused with a hint to use --binary."""
    with pytest.raises(BadRequest, match="UTF-8"):
        store.put("bad", b"\xff\xfe")


def test_new_version_moves_stages(store):
    """Writing a value makes it current and the previous one ACSPrevious."""
    v1 = store.put("db", b"one")
    v2 = store.put("db", b"two")
    v3 = store.put("db", b"three")
    assert store.get("db").text() == "three"
    assert store.get("db", version_stage="ACSPrevious").version_id == v2
    assert store.get("db", version_stage="AWSPREVIOUS").text() == "two"  # AWS alias
    assert store.get("db", version_stage="AWSCURRENT").version_id == v3
    assert store.get("db", version_id=v1).version_stages == ()
    with pytest.raises(SecretNotFound):
        store.get("db", version_id="no-such-version")


def test_old_versions_are_pruned(store):
    """At most MAX_VERSIONS versions are kept; the staged ones always survive."""
    ids = [store.put("db", str(i).encode()) for i in range(MAX_VERSIONS + 5)]
    meta = store.describe("db")
    assert len(meta.versions) == MAX_VERSIONS
    assert meta.versions[0] == (ids[-1], ("ACSCurrent",))
    assert meta.versions[1] == (ids[-2], ("ACSPrevious",))


def test_list_and_delete(store):
    """list filters by prefix; delete removes every version."""
    for name in ("aigw!a", "aigw!b", "bailian!c"):
        store.put(name, b"x")
    assert store.list_names("aigw!") == ["aigw!a", "aigw!b"]
    assert store.delete("aigw!a") is True
    assert store.delete("aigw!a") is False
    with pytest.raises(SecretNotFound):
        store.get("aigw!a")


@pytest.mark.parametrize("name", ["", "a b", "semi;colon", "x" * 257, "ü"])
def test_invalid_names_are_refused(store, name):
    """Names outside the allowed alphabet get a BadRequest naming the rule."""
    with pytest.raises(BadRequest, match="letters, digits"):
        store.put(name, b"x")


def _doc(store: LocalStore, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(store.path_for(name).read_text())
    return doc


def _write(store: LocalStore, name: str, doc: dict[str, Any]) -> None:
    store.path_for(name).write_text(json.dumps(doc))


def test_flipped_ciphertext_byte_is_detected_and_names_the_file(store):
    """One changed ciphertext byte fails authentication; the error names the file."""
    store.put("db", PLANTED.encode())
    doc = _doc(store, "db")
    raw = bytearray(base64.b64decode(doc["versions"][0]["ciphertext"]))
    raw[-1] ^= 1
    doc["versions"][0]["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    _write(store, "db", doc)
    with pytest.raises(StoreCorrupt) as info:
        store.get("db")
    assert str(store.path_for("db")) in info.value.message
    assert "authentication" in info.value.message
    assert PLANTED not in info.value.message


def test_ciphertext_swapped_between_secrets_fails(store):
    """A version copied into another secret's file does not decrypt there."""
    store.put("alpha", b"alpha-value")
    store.put("beta", b"beta-value")
    alpha, beta = _doc(store, "alpha"), _doc(store, "beta")
    beta["versions"][0] = {**alpha["versions"][0]}
    _write(store, "beta", beta)
    with pytest.raises(StoreCorrupt, match="moved from another"):
        store.get("beta")


def test_ciphertext_swapped_between_versions_fails(store):
    """Relabelling a version id breaks the binding to its ciphertext."""
    v1 = store.put("db", b"one")
    store.put("db", b"two")
    doc = _doc(store, "db")
    doc["versions"][0]["id"], doc["versions"][1]["id"] = v1, doc["versions"][0]["id"]
    _write(store, "db", doc)
    with pytest.raises(StoreCorrupt):
        store.get("db")


def test_file_renamed_to_another_secret_is_detected(store):
    """A file copied over another name's file is refused, not served under that name."""
    store.put("alpha", b"a")
    store.put("beta", b"b")
    store.path_for("alpha").replace(store.path_for("beta"))
    with pytest.raises(StoreCorrupt, match="holds secret 'alpha'"):
        store.get("beta")


def test_binary_relabelled_as_text_fails(store):
    """The data type is authenticated too."""
    store.put("blob", b"\x00\x01", data_type="binary")
    doc = _doc(store, "blob")
    doc["versions"][0]["type"] = "text"
    _write(store, "blob", doc)
    with pytest.raises(StoreCorrupt):
        store.get("blob")


@pytest.mark.parametrize("cut", [0, 1, 40, -10])
def test_truncated_file_gives_a_clear_error(store, cut):
    """A truncated file is reported with its path, never as a traceback."""
    store.put("db", b"value")
    path = store.path_for("db")
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(StoreCorrupt) as info:
        store.get("db")
    assert str(path) in info.value.message


def test_damaged_or_foreign_key_file(store, tmp_path):
    """A damaged key file or another store's key is named in the error."""
    store.put("db", b"value")
    other = LocalStore(tmp_path / "other")
    other.init()
    store.key_path.write_bytes(other.key_path.read_bytes())
    with pytest.raises(StoreCorrupt, match="sealed by key"):
        LocalStore(store.root).get("db")
    store.key_path.write_text("{not json")
    with pytest.raises(StoreCorrupt, match="damaged") as info:
        LocalStore(store.root).get("db")
    assert str(store.key_path) in info.value.message


def test_crash_mid_write_loses_nothing(store, monkeypatch):
    """If the process dies between writing the temp file and renaming it, the old
    version is intact and no temp file is left behind."""
    store.put("db", b"old")

    def crash(*_args):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreIOError, match="cannot write store file"):
        store.put("db", b"new")
    monkeypatch.undo()
    assert store.get("db").text() == "old"
    assert [p.name for p in store.secrets_dir.iterdir()] == [store.path_for("db").name]


def test_secret_files_are_private(store):
    """Secret files are written 0600."""
    store.put("db", b"x")
    assert stat.S_IMODE(store.path_for("db").stat().st_mode) == 0o600


def test_repr_never_shows_a_value(store):
    """Records and values redact themselves in repr and str."""
    store.put("db", PLANTED.encode())
    record = store.get("db")
    assert PLANTED not in repr(record)
    assert PLANTED not in str(record.value)
    assert PLANTED not in repr(store)
