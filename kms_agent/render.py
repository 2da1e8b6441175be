"""Response bodies built from a secret record, in each shape the API speaks.

Bodies are built once per cache entry and shape (see ``Entry.bodies``), so a cache hit only
looks them up. A long text value that appears verbatim in its body is not held twice: the
entry keeps the bytes before and after it, and a response joins them around the value.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kms_agent.model import ALIBABA_STAGES, AWS_STAGES, SecretRecord, shared, stage_in

JSON_TYPE = "application/json"
#: Values at least this long are referenced by their rendered bodies, not copied into them.
SHARE_MIN = 128
#: What follows the value in many bodies (``"}``), and others, held once for all entries.
_AFTERS: dict[bytes, bytes] = {}
_AFTERS_MAX = 256
_AFTER_SHARED = 64  # bytes; longer tails are rarely repeated


@dataclass(slots=True)
class Rendered:
    """One shape's body for one record: ``before + value + after``, or ``before`` alone
    when ``after`` is None (a short value, or one the shape escapes or encodes).

    Three fields and nothing derived (not even the length): a cache holds one per entry."""

    shape: str
    before: bytes
    after: bytes | None

    def body(self, value: bytes) -> bytes:
        return self.before if self.after is None else b"".join((self.before, value, self.after))

    def length(self, value: bytes) -> int:
        """The body's length in bytes, for the record's ``value``."""
        if self.after is None:
            return len(self.before)
        return len(self.before) + len(value) + len(self.after)


def rendered(record: SecretRecord, shape: str) -> Rendered:
    """``record`` in ``shape``: "raw" (the value), "native", or one of :data:`COMPAT`."""
    raw = record.value.reveal()
    if shape == "raw":
        return Rendered(shape, b"", b"")
    body = native(record) if shape == "native" else COMPAT[shape](record)
    at = body.find(raw) if len(raw) >= SHARE_MIN and record.data_type == "text" else -1
    if at >= 0 and body.find(raw, at + 1) < 0:  # exactly once: the split is exact
        after = body[at + len(raw) :]
        if len(after) <= _AFTER_SHARED:
            after = shared(_AFTERS, after, _AFTERS_MAX)
        return Rendered(shape, body[:at], after)
    return Rendered(shape, body, None)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def iso_time(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def value_text(record: SecretRecord) -> str:
    """Text values as text, binary ones base64-encoded."""
    raw = record.value.reveal()
    return (
        raw.decode("utf-8") if record.data_type == "text" else base64.b64encode(raw).decode("ascii")
    )


def native_dict(record: SecretRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "source": record.source,
        "version_id": record.version_id,
        "version_stages": list(record.version_stages),
        "created": iso_time(record.created),
        "secret_type": record.secret_type,
        "data_type": record.data_type,
        "value": value_text(record),
    }


def native(record: SecretRecord) -> bytes:
    return _dumps(native_dict(record))


def native_stale(record: SecretRecord, age: float) -> bytes:
    body = native_dict(record)
    body["stale"] = True
    body["age_seconds"] = round(age, 3)
    return _dumps(body)


def arn(record: SecretRecord) -> str:
    """The store's own ARN when it gave one (AWS), else a kms-agent resource name."""
    return record.extra.get("arn") or f"kms-agent:{record.source}:secret/{record.name}"


def created_seconds(epoch: float) -> str:
    """Epoch seconds with their fraction, as the AWS agent writes ``CreatedDate``: the
    shortest decimal that reads back as the same float, whole seconds without ``.0``."""
    text = repr(float(epoch))
    return text.removesuffix(".0")


def aws(record: SecretRecord) -> bytes:
    """Secrets Manager GetSecretValue, as the AWS agent answers it: stages in AWS's
    spelling whatever the store, ``CreatedDate`` a string of epoch seconds."""
    body: dict[str, Any] = {
        "ARN": arn(record),
        "Name": record.name,
        "VersionId": record.version_id,
    }
    if record.data_type == "text":
        body["SecretString"] = value_text(record)
    else:
        body["SecretBinary"] = value_text(record)
    body["VersionStages"] = [stage_in(s, AWS_STAGES) for s in record.version_stages]
    body["CreatedDate"] = created_seconds(record.created)
    return _dumps(body)


def kms(record: SecretRecord) -> bytes:
    """Alibaba Cloud KMS GetSecretValue, as the Alibaba Cloud KMS Agent answers it."""
    return _dumps(
        {
            "SecretName": record.name,
            "VersionId": record.version_id,
            "SecretData": value_text(record),
            "SecretDataType": record.data_type,
            "VersionStages": {
                "VersionStage": [stage_in(s, ALIBABA_STAGES) for s in record.version_stages]
            },
            "CreateTime": iso_time(record.created)[:19] + "Z",
            "SecretType": record.secret_type,
            "RequestId": record.extra.get("request_id", record.version_id),
        }
    )


def json_object(record: SecretRecord) -> dict[str, Any] | None:
    """The value as a JSON object, if it is one."""
    if record.data_type != "text":
        return None
    try:
        data = json.loads(record.value.reveal())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def vault_data(record: SecretRecord) -> Any:
    """A KV v2 version's ``data``: a JSON object value as it is, anything else wrapped as
    ``{"value": …}``."""
    data = json_object(record)
    return data if data is not None else {"value": value_text(record)}


def vault_version(record: SecretRecord) -> Any:
    return int(record.version_id) if record.version_id.isdigit() else record.version_id


def vault_metadata(record: SecretRecord) -> dict[str, Any]:
    return {
        "created_time": iso_time(record.created),
        "custom_metadata": None,
        "deletion_time": "",
        "destroyed": False,
        "version": vault_version(record),
    }


def vault(record: SecretRecord) -> bytes:
    """A Vault KV v2 read envelope, all but its leading ``{"request_id":"…",`` (the
    responder writes it per request: see :func:`with_request_id`)."""
    body = _dumps(
        {
            "lease_id": "",
            "renewable": False,
            "lease_duration": 0,
            "data": {"data": vault_data(record), "metadata": vault_metadata(record)},
            "wrap_info": None,
            "warnings": None,
            "auth": None,
        }
    )
    return body[1:]


def with_request_id(shape: str, body: bytes, request_id: str) -> bytes:
    """A whole body of ``shape`` (the vault envelope's request id is per response)."""
    if shape != "vault":
        return body
    return b'{"request_id":"%s",%s' % (request_id.encode(), body)


COMPAT = {"aws": aws, "kms": kms, "vault": vault}
