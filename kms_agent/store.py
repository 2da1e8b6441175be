"""The embedded encrypted store behind the ``local`` provider.

Layout under the data directory::

    keys/default.json        the store's default key, alias ``local/default`` (mode 0600)
    secrets/<sha256>.json    one file per secret: its versions, each encrypted
    .lock                    writers take an exclusive flock on it

Every version is sealed with AES-256-GCM under a fresh 256-bit data key; the data key is
sealed under the default key. Both seals bind the secret's name, the version id and the
data type as associated data, so a ciphertext copied to another name or version, or a file
renamed to another secret's hash, fails to open. Writes go to a temp file that is fsynced
and renamed over the old one, so a crash leaves the old file or the new one, never half;
the key file is created the same way (linked into place once written), so a full disk
never leaves an empty key. A temp file left by a killed writer is removed by the next
write. A file or directory that cannot be read or written (full disk, read-only
filesystem, permissions) raises :class:`StoreIOError` naming it and what to do; listing
skips, and logs, a file it cannot read.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_agent.errors import BadRequest, SecretNotFound, StoreCorrupt, StoreIOError
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

log = structlog.get_logger("kms_agent.store")

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


#: A temp file of a write: ``.<file name>.<random>.tmp`` beside the file.
_TEMP_GLOB = ".*.tmp"

#: What to do, by errno; the message says what failed.
_REASONS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (
        "the disk is full",
        "free space on that filesystem and retry; what was stored before is unchanged",
    ),
    errno.EDQUOT: (
        "the disk quota is used up",
        "free space or raise the quota and retry; what was stored before is unchanged",
    ),
    errno.EROFS: (
        "the filesystem is read-only",
        (
            "remount it read-write or point data_dir (--data-dir) at a writable directory; "
            "reading the store still works"
        ),
    ),
    errno.EACCES: (
        "permission denied",
        (
            "run kms-agent as the store's owner, or give this user access "
            "(directories 0700 and files 0600, owned by it)"
        ),
    ),
    errno.EPERM: (
        "operation not permitted",
        "run kms-agent as the store's owner; check for immutable attributes (lsattr)",
    ),
    errno.EISDIR: (
        "it is a directory, not a file",
        "move it aside and restore the file from backup",
    ),
    errno.ENOTDIR: (
        "a part of the path is not a directory",
        "move the file that is in the way aside; the store's layout is keys/ and secrets/",
    ),
}


def _io_error(exc: OSError, what: str, path: Path) -> StoreIOError:
    reason, hint = _REASONS.get(
        exc.errno or 0,
        (
            os.strerror(exc.errno) if exc.errno else type(exc).__name__,
            "check the disk and the store directory, then retry",
        ),
    )
    return StoreIOError(f"cannot {what} {path}: {reason}", hint=hint)


@contextlib.contextmanager
def _io(what: str, path: Path) -> Iterator[None]:
    """Map an OSError (other than a missing file, which callers handle) to StoreIOError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _io_error(exc, what, path) from None


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_temp(path: Path, data: bytes, mode: int) -> str:
    """A fsynced temp file beside ``path`` holding ``data``; removed again if that fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = _write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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
        #: (path, mode) of files already warned about: one warning each, not one per read.
        self._warned: set[tuple[str, int]] = set()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ------------------------------------------------------------------ set-up and key

    def init(self) -> KeyInfo:
        """Create the directories and the default key if missing; return the key's info.

        A store that exists already is only read, so a read-only one can be served."""
        for directory in (self.root, self.root / "keys", self.secrets_dir):
            with _io("create the store directory", directory):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._key_needed():
            with self._locked():
                if self._key_needed():
                    self._create_key()
        return self.key_info()

    def _key_needed(self) -> bool:
        """No key file; or an empty one (a full disk under an older version left it) with no
        secret sealed under it, which nothing could ever open: replacing it loses nothing."""
        with _io("read the store key", self.key_path):
            try:
                st = self.key_path.stat()
            except FileNotFoundError:
                return True
            if not (stat.S_ISREG(st.st_mode) and st.st_size == 0):
                return False
            return not any(p.suffix == ".json" for p in self.secrets_dir.iterdir())

    def _create_key(self) -> None:
        body = {
            "format": FORMAT,
            "key_id": str(uuid.uuid4()),
            "alias": DEFAULT_KEY_ALIAS,
            "created": time.time(),
            "spec": "AES_256",
            "material": _b64(secrets.token_bytes(32)),  # what AESGCM.generate_key does
        }
        path = self.key_path
        with _io("create the store key", path):
            tmp = _write_temp(path, json.dumps(body, indent=2).encode(), 0o600)
            try:
                if path.exists():
                    os.replace(tmp, path)  # the empty key _key_needed allows replacing
                else:
                    # link, not rename: a writer of an older version racing without the
                    # lock must not have its key replaced (it may have sealed with it).
                    with contextlib.suppress(FileExistsError):
                        os.link(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _fsync_dir(path.parent)
        self._key = None
        self._kek = None

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
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                raise _io_error(exc, "read the store key", path) from None
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
    def _locked(self) -> Iterator[None]:
        lock = self.root / ".lock"
        with _io("lock the store with", lock):
            fh = open(lock, "a+b")  # noqa: PTH123, SIM115
        with fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        self.init()
        with self._locked():
            self._sweep()
            yield

    def _sweep(self) -> None:
        """Remove temp files of writes that never finished (a writer killed mid-put): every
        writer holds the lock while its temp file exists, so under the lock none is live."""
        for directory in (self.secrets_dir, self.key_path.parent):
            with _io("clean up temp files in", directory):
                for tmp in directory.glob(_TEMP_GLOB):
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                    log.info("store_temp_removed", path=str(tmp))

    def _read_file(self, path: Path) -> bytes:
        """A secret file's bytes (FileNotFoundError if there is none); warns once if others
        may write it."""
        with _io("read store file", path), open(path, "rb") as fh:  # noqa: PTH123
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            raw = fh.read()
        if mode & 0o022 and (str(path), mode) not in self._warned:
            self._warned.add((str(path), mode))
            log.warning(
                "file_exposed",
                what="store secret file",
                path=str(path),
                mode=oct(mode),
                allowed=oct(0o600),
                hint=f"others can replace or delete this secret: chmod 600 {path}",
            )
        return raw

    def check_files(self) -> None:
        """Read every secret file once, so files others may write are warned about at start."""
        self.list_names()

    def _read_doc(self, name: str) -> dict[str, Any] | None:
        path = self.path_for(name)
        try:
            raw = self._read_file(path)
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
        """Names starting with ``prefix``, sorted. A file that cannot be read or parsed is
        skipped and logged (``store_file_skipped``): one bad file must not hide the rest."""
        names: list[str] = []
        try:
            with _io("list the store directory", self.secrets_dir):
                entries = sorted(p.name for p in self.secrets_dir.iterdir())
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.startswith(".") or not entry.endswith(".json"):
                continue
            path = self.secrets_dir / entry
            try:
                name = self._parse(path, self._read_file(path))["name"]
            except FileNotFoundError:
                continue  # deleted while listing
            except (StoreIOError, StoreCorrupt) as exc:
                log.warning(
                    "store_file_skipped", path=str(path), message=exc.message, hint=exc.hint
                )
                continue
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
            path = self.path_for(name)
            with _io("write store file", path):
                _write_atomic(path, json.dumps(doc, indent=1).encode(), 0o600)
        return vid

    def delete(self, name: str) -> bool:
        """Remove a secret and all its versions; return whether it existed."""
        check_name(name)
        with self._write_lock():
            if self._read_doc(name) is None:
                return False
            path = self.path_for(name)
            with _io("delete store file", path):
                path.unlink()
                _fsync_dir(self.secrets_dir)
        return True
