"""A role chain's base credentials live in a Refreshing of their own, inside the chain's
fetch: closing the source's credentials closes the base's too (its background refresh
would otherwise outlive the source, and a reload would leak one per chained source)."""

from __future__ import annotations

import asyncio

from kms_agent.credentials import Credentials, Holding, Refreshing, assume


async def test_closing_a_chain_closes_its_base() -> None:
    """The chain's fetch holds the base Refreshing; Refreshing.close reaches it, and a base
    refresh in flight is cancelled rather than left running."""
    gate, entered = asyncio.Event(), asyncio.Event()
    base_fetches = 0

    async def base() -> Credentials:
        nonlocal base_fetches
        base_fetches += 1
        if base_fetches > 1:
            entered.set()
            await gate.wait()  # the second (background) refresh never finishes by itself
        return Credentials("AKIDBASE", "base-secret", "tok", expiration=None, origin="base")

    async def take_role(signer: Credentials) -> Credentials:
        return Credentials("ASIAROLE", "role-secret", "tok", origin=f"as:{signer.access_key_id}")

    fetch = assume.chained(base, take_role, "sources.x.credentials")
    holding: object = fetch
    assert isinstance(holding, Holding)
    assert isinstance(fetch, assume._Chained)
    held = Refreshing(fetch, "x")
    assert (await held.get()).origin == "as:AKIDBASE"
    inner = fetch.base  # the chain's own Refreshing
    inner._background = asyncio.get_running_loop().create_task(inner._refresh_quietly())
    await entered.wait()  # the base's refresh is in flight, blocked on the gate
    assert base_fetches == 2
    task = inner._background
    await held.close()
    done, _ = await asyncio.wait({task}, timeout=5)  # bounded: without the fix it never ends
    assert task in done
    assert task.cancelled()


async def test_a_plain_fetch_is_not_holding() -> None:
    """A fetch that holds nothing (static keys, a metadata call) is closed as before."""

    async def static() -> Credentials:
        return Credentials("AKID", "s")

    plain: object = static
    assert not isinstance(plain, Holding)
    held = Refreshing(static, "x")
    await held.get()
    await held.close()
    await held.close()  # idempotent
