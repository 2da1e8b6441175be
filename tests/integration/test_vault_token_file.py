"""Vault's token as a credential source: a token file is re-read after a refusal, so a
rotation (new token written, old one revoked) costs no failed request and no restart."""

from __future__ import annotations

import secrets

import aiohttp

from tests.conftest import PLANTED, TOKEN, running_agent
from tests.integration.test_real_peers import bao_call


async def test_a_rotated_token_file_is_picked_up_with_no_failed_request(tmp_path, bao):
    """Token A reads; the operator writes token B to the file and revokes A; the next
    upstream read is refused (403), the agent re-reads the file and retries with B inside
    the same request: every request answers 200."""
    path = f"vault/rotate-{secrets.token_hex(3)}"
    await bao_call(bao, "POST", f"/v1/secret/data/{path}", {"data": {"password": PLANTED}})
    policy = f'path "secret/data/{path}" {{ capabilities = ["read"] }}\n'
    policy += f'path "secret/metadata/{path}" {{ capabilities = ["read"] }}\n'
    name = f"reader-{secrets.token_hex(3)}"
    await bao_call(bao, "PUT", f"/v1/sys/policies/acl/{name}", {"policy": policy})

    async def new_token() -> str:
        body = await bao_call(bao, "POST", "/v1/auth/token/create", {"policies": [name]})
        token: str = body["auth"]["client_token"]
        return token

    token_file = tmp_path / "vault-token"
    first = await new_token()
    token_file.write_text(first + "\n")
    text = f"""
[cache]
ttl = 0

[[sources]]
name = "vault"
provider = "vault"
address = "{bao}"
token_file = "{token_file}"
match = ["vault/*"]
"""
    async with running_agent(tmp_path, text) as agent:
        url = f"http://{agent.addresses[0]}/secrets/{path}?field=password&format=raw"
        async with aiohttp.ClientSession(headers={"X-KMS-Token": TOKEN}) as session:

            async def read() -> tuple[int, str]:
                async with session.get(url) as resp:
                    return resp.status, await resp.text()

            assert await read() == (200, PLANTED)
            token_file.write_text(await new_token() + "\n")
            await bao_call(bao, "POST", "/v1/auth/token/revoke", {"token": first})
            assert await read() == (200, PLANTED)
            assert await read() == (200, PLANTED)
        held = agent.state.router.providers["vault"].credentials.current
        assert held is not None and held.access_key_secret != first
