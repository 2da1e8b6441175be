"""The embedded encrypted store behind the ``local`` provider.

Layout under the data directory::

    keys/default.json        the store's default key, alias ``local/default`` (mode 0600)
    secrets/<sha256>.json    one file per secret: its versions, each encrypted
    .lock                    writers take an exclusive flock on it

Every version is sealed with AES-256-GCM under a fresh 256-bit data key; the data key is
sealed under the default key. Both seals bind the secret's name, the version id and the
data type as associated data, so a ciphertext copied to another name or version, or a file
renamed to another secret's hash, fails to open. Writes go to a temp file that is fsynced
and renamed over the old one, so a crash leaves the old file or the new one, never half.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_agent.errors import BadRequest, SecretNotFound, StoreCorrupt
from kms_agent.model import (
    STAGE_ALIASES,
    STAGE_CURRENT,
    STAGE_PREVIOUS,
    DataType,
    SecretMetadata,
    SecretRecord,
    SecretValue,
    check_name,
    shared,
)

DEFAULT_KEY_ALIAS = "local/default"
FORMAT = 1
#: Versions kept per secret; the oldest version without a stage goes first.
MAX_VERSIONS = 10
_NONCE = 12


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    alias: str
    created: float
    path: Path


def secret_file_stem(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def canonical_stage(stage: str) -> str:
    return STAGE_ALIASES.get(stage.upper(), stage)


def _aad(kind: str, key_id: str, name: str, version_id: str, data_type: str) -> bytes:
    return "\x00".join(
        ("kms-agent", kind, str(FORMAT), key_id, name, version_id, data_type)
    ).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text, validate=True)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


#: Each distinct tuple of stage labels once (there are a handful).
_STAGE_SETS: dict[tuple[str, ...], tuple[str, ...]] = {}


def _aead(key: bytes) -> AESGCM:
    """AES-256-GCM from cryptography, imported at first use: its OpenSSL costs ~7 MB of
    RSS, which an agent serving only cloud sources never needs."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    return AESGCM(key)


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag  # noqa: PLC0415

    return InvalidTag


class LocalStore:
    """Synchronous access to one store directory. Safe for one writer at a time per host."""

    def __init__(self, data_dir: Path | str, *, source: str = "local") -> None:
        self.root = Path(data_dir)
        self.source = source
        self.key_path = self.root / "keys" / "default.json"
        self.secrets_dir = self.root / "secrets"
        self._key: tuple[KeyInfo, bytes] | None = None
        self._kek: AESGCM | None = None

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ------------------------------------------------------------------ set-up and key

    def init(self) -> KeyInfo:
        """Create the directories and the default key if missing; return the key's info."""
        for directory in (self.root, self.root / "keys", self.secrets_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.key_path.exists():
            created = time.time()
            body = {
                "format": FORMAT,
                "key_id": str(uuid.uuid4()),
                "alias": DEFAULT_KEY_ALIAS,
                "created": created,
                "spec": "AES_256",
                "material": _b64(secrets.token_bytes(32)),  # what AESGCM.generate_key does
            }
            data = json.dumps(body, indent=2).encode()
            # O_EXCL: two processes racing to create the key must not both win.
            try:
                fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
        return self.key_info()

    def key_info(self) -> KeyInfo:
        return self._load_key()[0]

    def _load_key(self) -> tuple[KeyInfo, bytes]:
        if self._key is not None:
            return self._key
        path = self.key_path
        try:
            body = json.loads(path.read_bytes())
            material = _unb64(body["material"])
            if len(material) != 32 or body.get("alias") != DEFAULT_KEY_ALIAS:
                raise ValueError("not a 256-bit default key")
            info = KeyInfo(str(body["key_id"]), DEFAULT_KEY_ALIAS, float(body["created"]), path)
        except FileNotFoundError:
            raise StoreCorrupt(
                f"store key {path} is missing",
                hint="run 'kms-agent store init' for a new store; an existing store's secrets "
                "cannot be read without the key it was written with",
            ) from None
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise StoreCorrupt(
                f"store key {path} is damaged ({type(exc).__name__})",
                hint="restore the key file from backup",
            ) from None
        self._key = (info, material)
        return self._key

    def _key_cipher(self) -> tuple[KeyInfo, AESGCM]:
        info, material = self._load_key()
        if self._kek is None:
            self._kek = _aead(material)
        return info, self._kek

    # ------------------------------------------------------------------ files

    def path_for(self, name: str) -> Path:
        return self.secrets_dir / f"{secret_file_stem(name)}.json"

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        self.init()
        with open(self.root / ".lock", "a+b") as fh:  # noqa: PTH123
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _read_doc(self, name: str) -> dict[str, Any] | None:
        path = self.path_for(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        doc = self._parse(path, raw)
        if doc["name"] != name:
            raise StoreCorrupt(
                f"store file {path} holds secret {doc['name']!r}, not {name!r}: "
                "it was renamed or copied",
                hint="restore the store directory from backup",
            )
        return doc

    @staticmethod
    def _parse(path: Path, raw: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError("unknown format")
            if not isinstance(doc.get("name"), str) or not isinstance(doc.get("versions"), list):
                raise ValueError("missing fields")
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreCorrupt(
                f"store file {path} is truncated or not a kms-agent store file "
                f"({type(exc).__name__})",
                hint="restore it from backup or delete it and put the secret again",
            ) from None
        return doc

    # ------------------------------------------------------------------ reads

    def get(
        self, name: str, *, version_id: str | None = None, version_stage: str | None = None
    ) -> SecretRecord:
        check_name(name)
        doc = self._read_doc(name)
        if doc is None:
            raise SecretNotFound(
                f"secret {name!r} does not exist in the local store",
                hint=f"store it with: kms-agent store put {shlex.quote(name)} < value-file",
            )
        version = self._select(doc, name, version_id, version_stage)
        return self._open(doc, version)

    def _select(
        self, doc: dict[str, Any], name: str, version_id: str | None, version_stage: str | None
    ) -> dict[str, Any]:
        stage = canonical_stage(version_stage) if version_stage else None
        if version_id is None and stage is None:
            stage = STAGE_CURRENT
        for version in doc["versions"]:
            if version_id is not None and version.get("id") != version_id:
                continue
            if stage is not None and stage not in version.get("stages", ()):
                continue
            return dict(version)
        wanted = " and ".join(
            part
            for part in (
                f"version id {version_id!r}" if version_id else "",
                f"stage {stage!r}" if stage else "",
            )
            if part
        )
        raise SecretNotFound(
            f"secret {name!r} has no version with {wanted}",
            hint=f"list its versions with: kms-agent store describe {shlex.quote(name)}",
        )

    def _open(self, doc: dict[str, Any], version: dict[str, Any]) -> SecretRecord:
        name = doc["name"]
        path = self.path_for(name)
        info, kek = self._key_cipher()
        try:
            vid = str(version["id"])
            data_type: DataType = "text" if version["type"] == "text" else "binary"
            if version["type"] != data_type:
                raise ValueError("bad type")
            if version.get("key_id") != info.key_id:
                raise StoreCorrupt(
                    f"store file {path}: version {vid} of {name!r} was sealed by key "
                    f"{version.get('key_id')!r}, not this store's key {info.key_id}",
                    hint="the key file does not belong to this store; restore the right one",
                )
            wrapped = _unb64(version["wrapped_key"])
            sealed = _unb64(version["ciphertext"])
            dek = kek.decrypt(
                wrapped[:_NONCE], wrapped[_NONCE:], _aad("dek", info.key_id, name, vid, data_type)
            )
            plain = _aead(dek).decrypt(
                sealed[:_NONCE], sealed[_NONCE:], _aad("data", info.key_id, name, vid, data_type)
            )
            # Shared: a cache of many secrets holds one ("ACSCurrent",), not one each.
            stages = tuple(str(s) for s in version.get("stages", ()))
            stages = shared(_STAGE_SETS, stages, 64)
            created = float(version["created"])
        except StoreCorrupt:
            raise
        except _invalid_tag():
            raise StoreCorrupt(
                f"store file {path}: version {version.get('id')!r} of {name!r} "
                "failed authentication; "
                "it was altered, truncated or moved from another secret or version",
                hint="restore the file from backup or put the secret again",
            ) from None
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise StoreCorrupt(
                f"store file {path}: version {version.get('id')!r} of {name!r} is damaged "
                f"({type(exc).__name__})",
                hint="restore the file from backup or put the secret again",
            ) from None
        return SecretRecord(
            name=name,
            value=SecretValue(plain),
            data_type=data_type,
            version_id=vid,
            version_stages=stages,
            created=created,
            source=self.source,
        )

    def describe(self, name: str) -> SecretMetadata:
        check_name(name)
        doc = self._read_doc(name)
        if doc is None:
            raise SecretNotFound(f"secret {name!r} does not exist in the local store")
        return SecretMetadata(
            name=name,
            source=self.source,
            created=float(doc.get("created", 0)),
            versions=tuple(
                (str(v.get("id")), tuple(str(s) for s in v.get("stages", ())))
                for v in doc["versions"]
            ),
        )

    def list_names(self, prefix: str = "") -> list[str]:
        """Names starting with ``prefix``, sorted. Unreadable files are reported, not skipped."""
        names: list[str] = []
        try:
            paths = sorted(self.secrets_dir.glob("*.json"))
        except FileNotFoundError:
            return []
        for path in paths:
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue  # deleted while listing
            name = self._parse(path, raw)["name"]
            if name.startswith(prefix):
                names.append(name)
        return sorted(names)

    # ------------------------------------------------------------------ writes

    def put(self, name: str, value: bytes, *, data_type: DataType = "text") -> str:
        """Store a new version, make it ``ACSCurrent``, move the old one to ``ACSPrevious``."""
        check_name(name)
        if data_type == "text":
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(
                    "the value is not UTF-8 text", hint="store bytes with --binary"
                ) from None
        with self._write_lock():
            info, kek = self._key_cipher()
            doc = self._read_doc(name) or {
                "format": FORMAT,
                "name": name,
                "created": time.time(),
                "versions": [],
            }
            vid = str(uuid.uuid4())
            dek = secrets.token_bytes(32)
            n1, n2 = secrets.token_bytes(_NONCE), secrets.token_bytes(_NONCE)
            wrapped = n1 + kek.encrypt(n1, dek, _aad("dek", info.key_id, name, vid, data_type))
            sealed = n2 + _aead(dek).encrypt(
                n2, value, _aad("data", info.key_id, name, vid, data_type)
            )
            versions: list[dict[str, Any]] = []
            for old in doc["versions"]:
                stages = [s for s in old.get("stages", []) if s != STAGE_PREVIOUS]
                if STAGE_CURRENT in stages:
                    stages = [STAGE_PREVIOUS if s == STAGE_CURRENT else s for s in stages]
                versions.append({**old, "stages": stages})
            versions.insert(
                0,
                {
                    "id": vid,
                    "created": time.time(),
                    "stages": [STAGE_CURRENT],
                    "type": data_type,
                    "key_id": info.key_id,
                    "wrapped_key": _b64(wrapped),
                    "ciphertext": _b64(sealed),
                },
            )
            while len(versions) > MAX_VERSIONS:
                idle = [i for i, v in enumerate(versions) if not v["stages"]]
                if not idle:
                    break
                del versions[idle[-1]]
            doc["versions"] = versions
            _write_atomic(self.path_for(name), json.dumps(doc, indent=1).encode(), 0o600)
        return vid

    def delete(self, name: str) -> bool:
        """Remove a secret and all its versions; return whether it existed."""
        check_name(name)
        with self._write_lock():
            if self._read_doc(name) is None:
                return False
            self.path_for(name).unlink()
            dir_fd = os.open(self.secrets_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return True
