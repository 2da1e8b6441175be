"""Failover across the endpoints of one source: a refusing first endpoint costs no failed
request (the retry inside the deadline goes to the next), and once it is back it is used
again; which endpoint answered is a metric label, never a secret name."""

from __future__ import annotations

import time

import aiohttp

from tests.conftest import PLANTED, TOKEN, FakeClock, running_agent
from tests.reliability.faults import VENDORS, Fault, FaultProxy


async def test_a_refusing_first_endpoint_fails_over_and_is_used_again(tmp_path, csms, csms_url):
    """Huawei with endpoints = [first, second]: while the first refuses connections every
    read (cache off) is answered, by the second; after the first is back and its back-off
    is over, reads go to it again. The answers metric counts by endpoint."""
    csms.add_secret("db-password", PLANTED)
    ak, sk = csms.add_identity(["*"])
    first = FaultProxy(csms_url, VENDORS["huawei"])
    await first.start()
    try:
        await first.set(Fault.REFUSE)
        text = f"""
[cache]
ttl = 0

[[sources]]
name = "huawei"
provider = "huawei"
endpoints = ["{first.url}", "{csms_url}"]
project_id = "{csms.project_id}"
timeout_seconds = 3
match = ["*"]
"""
        env = {"HUAWEICLOUD_SDK_AK": ak, "HUAWEICLOUD_SDK_SK": sk}
        async with running_agent(tmp_path, text, env) as agent:
            provider = agent.state.router.providers["huawei"]
            clock = FakeClock(start=time.monotonic())
            provider.endpoints._clock = clock
            url = f"http://{agent.addresses[0]}/secrets/db-password?format=raw"
            async with aiohttp.ClientSession(headers={"X-KMS-Token": TOKEN}) as session:

                async def read() -> tuple[int, str]:
                    async with session.get(url) as resp:
                        return resp.status, await resp.text()

                first_host = first.url.removeprefix("http://")
                second_host = csms_url.removeprefix("http://")
                answered = provider.stats.answered_by
                before = answered.get(second_host, 0)  # the readiness check's, at start
                for _ in range(10):
                    assert await read() == (200, PLANTED)
                assert answered.get(first_host, 0) == 0
                assert answered[second_host] == before + 10
                await first.set(Fault.NONE)
                clock.advance(60)  # past any back-off
                for _ in range(5):
                    assert await read() == (200, PLANTED)
                assert answered[first_host] == 5
                assert first.calls_between(0, float("inf")) == 5
                async with session.get(f"http://{agent.metrics_addresses[0]}/metrics") as resp:
                    metrics = await resp.text()
            assert (
                f'kms_agent_upstream_answers_total{{endpoint="{first_host}",source="huawei"}} 5.0'
                in metrics
            )
            assert "db-password" not in metrics
    finally:
        await first.close()
