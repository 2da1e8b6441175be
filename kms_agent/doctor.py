"""``kms-agent doctor NAME``: walk the troubleshooting order against the real source.

Steps, in the order a request meets them: a source serves the name → credentials can be
obtained → the endpoint answers → the identity may GetSecretValue on the secret → the
secret's key allows Decrypt → the secret exists and is not scheduled for deletion → the
value reads. One real read tells which step fails; the provider's error carries the fix
(for clouds, the policy statement to grant).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kms_agent import providers
from kms_agent.config import Config
from kms_agent.errors import (
    AccessDenied,
    AgentError,
    BadCredentials,
    DecryptDenied,
    PendingDeletion,
    SecretNotFound,
    Unavailable,
    UpstreamTimeout,
)
from kms_agent.model import check_name

STEPS = (
    ("source", "a source serves this name"),
    ("credentials", "credentials can be obtained"),
    ("endpoint", "the source's endpoint answers from this network"),
    ("permission", "the identity may GetSecretValue on the secret"),
    ("decrypt", "the secret's encryption key allows Decrypt to the identity"),
    ("state", "the secret exists and is not scheduled for deletion"),
    ("read", "the value can be read"),
)


def _step_of(exc: AgentError) -> str:
    if isinstance(exc, BadCredentials):
        return "credentials"
    if isinstance(exc, Unavailable | UpstreamTimeout):
        return "endpoint"
    if isinstance(exc, AccessDenied):
        return "permission"
    if isinstance(exc, DecryptDenied):
        return "decrypt"
    if isinstance(exc, SecretNotFound | PendingDeletion):
        return "state"
    return "read"


def _report(name: str, failed: str | None, details: dict[str, dict[str, Any]]) -> dict[str, Any]:
    steps = []
    status = "ok"
    for step, description in STEPS:
        if step == failed:
            status = "failed"
        entry = {
            "step": step,
            "description": description,
            "status": status,
            **details.get(step, {}),
        }
        steps.append(entry)
        if status == "failed":
            status = "not_checked"
    return {"name": name, "ok": failed is None, "failed_step": failed, "steps": steps}


async def diagnose(config: Config, name: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """Run the steps; return a report (``ok``, ``failed_step``, ``steps``)."""
    details: dict[str, dict[str, Any]] = {}
    try:
        check_name(name)
        built = [(s.match, providers.create(s, config, environ)) for s in config.sources]
        provider = providers.Router(built).route(name)
    except AgentError as exc:
        details["source"] = {"message": exc.message, "hint": exc.hint}
        return _report(name, "source", details)
    details["source"] = {"message": f"source {provider.name!r} ({type(provider).__module__})"}
    try:
        await provider.open()
        credentials = provider.credentials
        if credentials is not None:
            try:
                creds = await credentials.get()
            except AgentError as exc:
                details["credentials"] = {"message": exc.message, "hint": exc.hint}
                return _report(name, "credentials", details)
            details["credentials"] = {
                "message": f"{creds.origin}: access key {creds.access_key_id}"
            }
        else:
            details["credentials"] = {"message": "none needed"}
        try:
            record = await provider.get(name)
        except AgentError as exc:
            step = _step_of(exc)
            details[step] = {"message": exc.message, "hint": exc.hint, "code": exc.code}
            if step == "decrypt":  # name the key: describe needs no decryption
                try:
                    meta = await provider.describe(name)
                    details[step]["key"] = meta.extra.get("kms_key_id") or meta.extra.get(
                        "EncryptionKeyId", ""
                    )
                except AgentError:
                    pass
            return _report(name, step, details)
        size = len(record.value)
        details["read"] = {"message": f"version {record.version_id} ({record.data_type}, {size} B)"}
        return _report(name, None, details)
    finally:
        await provider.close()


def render(report: dict[str, Any]) -> str:
    marks = {"ok": "ok  ", "failed": "FAIL", "not_checked": "--  "}
    lines = [f"kms-agent doctor {report['name']}"]
    for step in report["steps"]:
        lines.append(f"  [{marks[step['status']]}] {step['step']:<11} {step['description']}")
        if step.get("message") and step["status"] != "not_checked":
            lines.append(f"         {step['message']}")
        if step.get("key") and step["status"] == "failed":
            lines.append(f"         key: {step['key']}")
        if step.get("hint") and step["status"] == "failed":
            lines.append(f"         fix: {step['hint']}")
    verdict = "the secret can be read" if report["ok"] else f"fails at: {report['failed_step']}"
    lines.append(f"result: {verdict}")
    return "\n".join(lines)
