"""Huawei Cloud credentials: permanent or temporary AK/SK, or the ECS metadata service."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from kms_agent.credentials import Fetch, blocks

TYPES = ("auto", "aksk", "ecs")
METADATA_ENDPOINT = "http://169.254.169.254"
ENV_AK, ENV_SK, ENV_TOKEN = (
    "HUAWEICLOUD_SDK_AK",
    "HUAWEICLOUD_SDK_SK",
    "HUAWEICLOUD_SDK_SECURITY_TOKEN",
)
_KEYS = {"type", "ak", "sk", "security_token", "metadata_endpoint"}
_KINDS = blocks.Kinds(_KEYS, TYPES, None)
_KEY_NAMES = blocks.KeyNames(
    ("ak", ENV_AK), ("sk", ENV_SK), ("security_token", ENV_TOKEN), "AK/SK credentials"
)
#: ``GET /openstack/latest/securitykey``: ``{"credential": {access, secret, ...}}``.
_METADATA = blocks.Document(
    "access", "secret", "securitytoken", "expires_at", token_optional=True, within="credential"
)
_METADATA_TOKEN = blocks.SessionToken(
    "/meta-data/latest/api/token",
    "X-Metadata-Token-Ttl-Seconds",
    "X-Metadata-Token",
    "ECS metadata",
)


def resolve(
    table: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    session: Callable[[], aiohttp.ClientSession],
    where: str,
) -> tuple[str, Fetch]:
    kind = _KINDS.of(
        table, where, lambda: "aksk" if ("ak" in table or environ.get(ENV_AK)) else "ecs"
    )
    if kind == "aksk":
        ak, sk, token = blocks.static_keys(table, environ, _KEY_NAMES, where)
        return "aksk", blocks.static(ak, sk, token, "temporary_aksk" if token else "aksk")
    endpoint = blocks.endpoint_setting(table, "metadata_endpoint", METADATA_ENDPOINT, where)
    return "ecs", blocks.metadata(
        session,
        "the ECS metadata service",
        blocks.session_token(endpoint, _METADATA_TOKEN),
        blocks.at(
            f"{endpoint}/openstack/latest/securitykey",
            "the ECS metadata service gave no credential",
        ),
        _METADATA,
        "ecs",
        hint="bind an agency to the ECS instance, or configure ak/sk",
    )
