"""The fault table: each fault, on all four clouds at once, under a steady client load.

One agent serves four sources — the Alibaba and Huawei emulators, moto and OpenBao — each
behind its own :class:`~tests.reliability.faults.FaultProxy`. Per fault: warm keys are
read once; then the fault starts and every secret gets a new version upstream (written
past the proxy); clients read warm and never-read (cold) keys at ~100 req/s for
``FAULT_SECONDS``; the fault ends and reading goes on until every key answers its new
version fresh. Each answer is judged:

* wrong: another secret's value, an older version after a newer one was served, or a
  value after a permanent error for that key during the fault — there must be none;
* unmarked: an answer older than the new version, served after every entry from before
  it had expired, without ``Age`` (and ``"stale": true`` in the native shape) — none;
* upstream calls, per source: in the fault's first two deadlines (the burst, until the
  breaker opens) at most keys x max_attempts per deadline; afterwards at most
  ``MAX_STEADY_CALLS_PER_S`` (one single-attempt probe at a time), or for a permanent
  refusal keys / ``NEGATIVE_TTL``; a flapping source (half healthy, the breaker stays
  closed) is held to a healthy one's refresh rate;
* recovery: from the fault's end to the last answer that was not the new value fresh —
  at most ``MAX_RECOVERY_S`` (the longest probe wait, a negative-cache life, two seconds
  for the next reads and a loaded machine).

Vault's answers carry no path: its source checks each value against the version's
metadata, read beside it (``verify_answers``), so its calls count twice.

The table (fault x source x warm/cold) is printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from kms_agent.cache import BREAKER_MAX_WAIT
from tests.conftest import PLANTED, TOKEN, running_agent
from tests.emulators.alibaba_kms import KmsEmulator
from tests.emulators.huawei_csms import CsmsEmulator
from tests.reliability.conftest import TABLE, Row
from tests.reliability.faults import PERMANENT, VENDORS, Fault, FaultProxy

pytestmark = pytest.mark.reliability

TTL = 1.0
NEGATIVE_TTL = 2.0
TIMEOUT = 1.0
FAULT_SECONDS = 4.0
#: The fault's first seconds: every key in flight fails its attempts, until the breaker
#: opens; the rest of the fault is its steady state.
BURST_SECONDS = 2 * TIMEOUT
RATE = 100  # client requests per second, over all keys
KEYS = 5  # warm and cold keys per source
#: Bounds the table is held to (see the module docstring): in the burst (two deadlines),
#: each key's fetch makes at most max_attempts (4) calls per deadline; afterwards one probe
#: at a time per source (a Vault probe is two calls). A flapping source is half healthy
#: and never opens the breaker: it is held to the refresh rate of a healthy one, keys / TTL,
#: times the attempts.
MAX_BURST_CALLS = 2 * (2 * KEYS) * 4
#: Upstream calls per fetch: Vault reads the version's metadata beside the value.
CALLS_PER_FETCH = {"vault": 2}
MAX_STEADY_CALLS_PER_S = 2.0
#: A permanent refusal is remembered per key for NEGATIVE_TTL: keys / NEGATIVE_TTL calls/s
#: (x2 on Vault), plus one.
MAX_PERMANENT_CALLS_PER_S = 2 * (2 * KEYS) / NEGATIVE_TTL + 1
MAX_RECOVERY_S = BREAKER_MAX_WAIT + NEGATIVE_TTL + 2.0
RECOVERY_WINDOW = 12.0

MARK = re.compile(r":([^:\"]+):v(\d+)")
SOURCES = ("alibaba", "huawei", "aws", "vault")
PREFIX = {"alibaba": "ali-", "huawei": "hw-", "aws": "aws-", "vault": "vault/"}


def value_of(name: str, version: int) -> str:
    return f"{PLANTED}:{name}:v{version}"


@dataclass
class Answer:
    started: float
    ended: float
    source: str
    name: str
    cold: bool
    status: int
    code: str = ""
    version: int | None = None
    other: str | None = None  # the name a value belonged to, if not the one asked for
    stale: bool = False
    marked: bool = True


@dataclass
class Upstreams:
    """Writes new versions straight to each store (past the proxies)."""

    kms: KmsEmulator
    csms: CsmsEmulator
    moto: dict[str, Any]
    bao: str
    session: aiohttp.ClientSession
    _boto: Any = None  # a boto3 client (boto3 has no type hints)

    def aws(self):
        if self._boto is None:
            import boto3

            self._boto = boto3.client(
                "secretsmanager",
                endpoint_url=self.moto["url"],
                region_name="us-east-1",
                aws_access_key_id=self.moto["ak"],
                aws_secret_access_key=self.moto["sk"],
            )
        return self._boto

    async def write(self, source: str, name: str, version: int) -> None:
        value = value_of(name, version)
        if source == "alibaba":
            if version == 1:
                self.kms.add_secret(name, value)
            else:
                self.kms.put_version(name, value)
        elif source == "huawei":
            if version == 1:
                self.csms.add_secret(name, value)
            else:
                self.csms.put_version(name, value)
        elif source == "aws":
            client = self.aws()
            if version == 1:
                await asyncio.to_thread(client.create_secret, Name=name, SecretString=value)
            else:
                await asyncio.to_thread(client.put_secret_value, SecretId=name, SecretString=value)
        else:
            async with self.session.post(
                f"{self.bao}/v1/secret/data/{name}",
                json={"data": {"value": value}},
                headers={"X-Vault-Token": "root"},
            ) as resp:
                assert resp.status == 200, await resp.text()


def agent_config(proxies: dict[str, FaultProxy], kms, csms, moto) -> str:
    return f"""
[cache]
ttl = {TTL}
negative_ttl = {NEGATIVE_TTL}
max_stale = 60
refresh_min_interval = 0

[[sources]]
name = "alibaba"
provider = "alibaba"
region = "cn-hangzhou"
endpoint = "{proxies["alibaba"].url}"
timeout_seconds = {TIMEOUT}
match = ["ali-*"]

[[sources]]
name = "huawei"
provider = "huawei"
endpoint = "{proxies["huawei"].url}"
project_id = "{csms.project_id}"
timeout_seconds = {TIMEOUT}
match = ["hw-*"]

[[sources]]
name = "aws"
provider = "aws"
region = "us-east-1"
endpoint = "{proxies["aws"].url}"
timeout_seconds = {TIMEOUT}
match = ["aws-*"]
[sources.credentials]
access_key_id = "{moto["ak"]}"
secret_access_key = "{moto["sk"]}"

[[sources]]
name = "vault"
provider = "vault"
address = "{proxies["vault"].url}"
token = "root"
timeout_seconds = {TIMEOUT}
match = ["vault/*"]
"""


@dataclass
class Load:
    """Reads the keys in turn at RATE per second, a quarter in the AWS agent's shape."""

    base: str
    keys: list[tuple[str, str, bool]]
    session: aiohttp.ClientSession
    answers: list[Answer] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _n: int = 0

    async def run_until(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not stop.is_set():
            self._n += 1
            source, name, cold = self.keys[self._n % len(self.keys)]
            task = loop.create_task(self._one(source, name, cold, aws=self._n % 4 == 0))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            delay = start + self._n / RATE - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        await asyncio.gather(*self._tasks)

    async def _one(self, source: str, name: str, cold: bool, *, aws: bool) -> None:
        path = f"/secretsmanager/get?secretId={name}" if aws else f"/secrets/{name}"
        started = time.monotonic()
        try:
            async with self.session.get(self.base + path, headers={"X-KMS-Token": TOKEN}) as r:
                body = await r.read()
                status, headers = r.status, r.headers
        except aiohttp.ClientError as exc:
            self.answers.append(
                Answer(started, time.monotonic(), source, name, cold, 0, type(exc).__name__)
            )
            return
        answer = Answer(started, time.monotonic(), source, name, cold, status)
        doc = json.loads(body) if body else {}
        if status != 200:
            answer.code = str((doc.get("error") or {}).get("code") or doc.get("__type") or "")
        else:
            text = str(doc.get("SecretString") if aws else doc.get("value"))
            found = MARK.search(text)
            assert found is not None, f"an answer of {name} carries no mark"
            answer.version = int(found.group(2))
            if found.group(1) != name:
                answer.other = found.group(1)
            answer.stale = "Age" in headers
            answer.marked = aws or bool(doc.get("stale")) == answer.stale
        self.answers.append(answer)


def judge(
    answers: list[Answer], fault: Fault, t_fault: float, t_end: float
) -> tuple[Counter[str], float]:
    """Wrong and unmarked answers by kind, and the recovery time."""
    bad: Counter[str] = Counter()
    newest: dict[str, int] = {}
    refused_at: dict[str, float] = {}
    for a in sorted(answers, key=lambda a: a.ended):
        if a.status == 200 and a.version is not None:
            if a.other is not None:
                bad["crossed"] += 1
            elif a.version < newest.get(a.name, 0):
                bad["older"] += 1
            elif fault in PERMANENT and refused_at.get(a.name, 1e18) < a.started < t_end:
                bad["after_permanent_error"] += 1
            newest[a.name] = max(newest.get(a.name, 0), a.version)
            if not a.marked:
                bad["unmarked"] += 1
            if a.version == 1 and not a.stale and a.started > t_fault + TTL * 1.1 + 0.3:
                bad["unmarked"] += 1  # from before the new version, past every TTL
        elif fault in PERMANENT and a.status in (403, 404, 502) and t_fault <= a.started < t_end:
            refused_at.setdefault(a.name, a.ended)
    late = [a.ended for a in answers if a.started >= t_end and not _fresh_new(a)]
    return bad, max(late, default=t_end) - t_end


def _fresh_new(a: Answer) -> bool:
    return a.status == 200 and a.version == 2 and not a.stale and a.other is None


@pytest.mark.parametrize("fault", [f for f in Fault if f is not Fault.NONE], ids=lambda f: f.value)
async def test_fault(fault, tmp_path, kms, csms, aiohttp_server, moto, bao):
    """Under ``fault`` on every source: no wrong answer, stale only marked, upstream calls
    bounded, and recovery within MAX_RECOVERY_S once it ends."""
    run = secrets.token_hex(3)
    ak, sk = kms.add_access_key(
        {"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}
    )
    hw_ak, hw_sk = csms.add_identity(["*"])
    targets = {
        "alibaba": f"http://127.0.0.1:{(await aiohttp_server(kms.app(), host='127.0.0.1')).port}",
        "huawei": f"http://127.0.0.1:{(await aiohttp_server(csms.app(), host='127.0.0.1')).port}",
        "aws": moto["url"],
        "vault": bao,
    }
    proxies = {s: FaultProxy(targets[s], VENDORS[s], latency=TIMEOUT * 1.5) for s in SOURCES}
    env = {
        "ALIBABA_CLOUD_ACCESS_KEY_ID": ak,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": sk,
        "HUAWEICLOUD_SDK_AK": hw_ak,
        "HUAWEICLOUD_SDK_SK": hw_sk,
    }
    keys = [
        (s, f"{PREFIX[s]}{run}-{kind}{i}", kind == "c")
        for s in SOURCES
        for kind in ("w", "c")
        for i in range(KEYS)
    ]
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128))
        )
        upstreams = Upstreams(kms, csms, moto, bao, session)
        for proxy in proxies.values():
            await proxy.start()
            stack.push_async_callback(proxy.close)
        for source, name, _ in keys:
            await upstreams.write(source, name, 1)
        agent = await stack.enter_async_context(
            running_agent(tmp_path, agent_config(proxies, kms, csms, moto), env=env)
        )
        load = Load(f"http://{agent.addresses[0]}", keys, session)
        for _, name, cold in keys:
            if not cold:
                async with session.get(
                    f"{load.base}/secrets/{name}", headers={"X-KMS-Token": TOKEN}
                ) as resp:
                    assert resp.status == 200, (name, await resp.text())
        stop = asyncio.Event()
        t_fault = time.monotonic()
        for proxy in proxies.values():
            await proxy.set(fault)
        for source, name, _ in keys:
            await upstreams.write(source, name, 2)
        running = asyncio.create_task(load.run_until(stop))
        await asyncio.sleep(FAULT_SECONDS)  # the fault's duration is the point: wall time
        t_end = time.monotonic()
        for proxy in proxies.values():
            await proxy.set(Fault.NONE)
        deadline = t_end + RECOVERY_WINDOW
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            done = [a for a in load.answers if a.started >= t_end]
            late = max((a.ended for a in done if not _fresh_new(a)), default=t_end)
            seen = {a.name for a in done if _fresh_new(a) and a.started > late}
            if time.monotonic() - late > 1.0 and len(seen) == len(keys):
                break
        stop.set()
        await running

    failures = []
    for source in SOURCES:
        proxy = proxies[source]
        burst = proxy.calls_between(t_fault, t_fault + BURST_SECONDS)
        calls = proxy.calls_between(t_fault + BURST_SECONDS, t_end) / (
            FAULT_SECONDS - BURST_SECONDS
        )
        for cold in (False, True):
            mine = [a for a in load.answers if a.source == source and a.cold == cold]
            bad, recovery = judge(mine, fault, t_fault, t_end)
            during = [a for a in mine if a.started < t_end]
            row = Row(
                fault=fault.value,
                source=source,
                keys="cold" if cold else "warm",
                answers=len(during),
                fresh=sum(1 for a in during if a.status == 200 and not a.stale),
                stale=sum(1 for a in during if a.status == 200 and a.stale),
                errors=Counter(f"{a.status} {a.code}" for a in during if a.status != 200),
                wrong=sum(bad.values()) - bad["unmarked"],
                unmarked=bad["unmarked"],
                burst_calls=burst,
                calls_per_s=calls,
                recovery_s=recovery,
            )
            TABLE.append(row)
            if row.wrong or row.unmarked:
                failures.append(f"{source}/{row.keys}: {dict(bad)}")
            per_fetch = CALLS_PER_FETCH.get(source, 1)
            if fault in (Fault.SLOW, Fault.FLAP):
                steady = (2 * KEYS) / TTL * 4 * per_fetch
            elif fault in PERMANENT:
                steady = MAX_PERMANENT_CALLS_PER_S
            else:
                steady = MAX_STEADY_CALLS_PER_S * per_fetch
            if burst > MAX_BURST_CALLS * per_fetch or calls > steady:
                failures.append(f"{source}: {burst} calls in the burst, then {calls:.1f}/s")
            if recovery > MAX_RECOVERY_S:
                failures.append(f"{source}/{row.keys}: recovered after {recovery:.1f} s")
    assert not failures, failures
