"""Huawei Cloud credentials: permanent or temporary AK/SK, or the ECS metadata service."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import aiohttp

from kms_agent.credentials import Credentials, Fetch, credential_kind
from kms_agent.errors import BadCredentials, ConfigError
from kms_agent.upstream import mapped_errors

TYPES = ("auto", "aksk", "ecs")
METADATA_ENDPOINT = "http://169.254.169.254"
ENV_AK, ENV_SK, ENV_TOKEN = (
    "HUAWEICLOUD_SDK_AK",
    "HUAWEICLOUD_SDK_SK",
    "HUAWEICLOUD_SDK_SECURITY_TOKEN",
)
_KEYS = {"type", "ak", "sk", "security_token", "metadata_endpoint"}


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def resolve(
    table: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    session: Callable[[], aiohttp.ClientSession],
    where: str,
) -> tuple[str, Fetch]:
    kind = credential_kind(table, _KEYS, TYPES, where)
    if kind == "auto":
        kind = "aksk" if ("ak" in table or environ.get(ENV_AK)) else "ecs"
    if kind == "aksk":
        ak = table.get("ak") or environ.get(ENV_AK)
        sk = table.get("sk") or environ.get(ENV_SK)
        token = table.get("security_token") or environ.get(ENV_TOKEN) or None
        if not ak or not sk:
            raise ConfigError(
                f"{where}: AK/SK credentials need ak and sk (or ${ENV_AK}, ${ENV_SK})"
            )
        creds = Credentials(str(ak), str(sk), token, origin="temporary_aksk" if token else "aksk")

        async def static() -> Credentials:
            return creds

        return "aksk", static
    endpoint = str(table.get("metadata_endpoint", METADATA_ENDPOINT)).rstrip("/")

    async def from_metadata() -> Credentials:
        http = session()
        with mapped_errors("the ECS metadata service"):
            async with http.put(
                f"{endpoint}/meta-data/latest/api/token",
                headers={"X-Metadata-Token-Ttl-Seconds": "21600"},
            ) as resp:
                if resp.status != 200:
                    raise BadCredentials(f"ECS metadata token request failed: HTTP {resp.status}")
                token = (await resp.text()).strip()
            async with http.get(
                f"{endpoint}/openstack/latest/securitykey", headers={"X-Metadata-Token": token}
            ) as resp:
                body = await resp.json(content_type=None)
        credential = body.get("credential") if isinstance(body, dict) else None
        if resp.status != 200 or not isinstance(credential, dict):
            raise BadCredentials(
                f"the ECS metadata service gave no credential (HTTP {resp.status})",
                hint="bind an agency to the ECS instance, or configure ak/sk",
            )
        return Credentials(
            credential["access"],
            credential["secret"],
            credential.get("securitytoken"),
            parse_time(credential["expires_at"]),
            origin="ecs",
        )

    return "ecs", from_metadata
