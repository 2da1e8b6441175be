"""A soak run: kms-agent under a steady mixed load for minutes, watched for leaks and 5xx.

    python bench/soak.py [--minutes 10] [--rate 150] [--secrets 50] [--every 30]
                         [--source local|moto] [--ttl SECONDS] [--connections 8]

Not a test and not a throughput figure: a load far below saturation, held long enough for a
slow leak (memory, descriptors, connections) or a rare 5xx to show. The agent is started as
run.py starts it (its own process, embedded store seeded with ``--secrets`` 1 KiB secrets);
with ``--source moto`` every name is read from a moto server instead, with a short TTL so
that upstream fetches, refreshes ahead of expiry and misses after it happen all the time.

The load is paced, not closed-loop: requests are due at ``--rate`` per second on a fixed
schedule and sent over ``--connections`` keep-alive connections by an asyncio client in this
process (uvloop when installed), so on 2 cores it takes a few per cent of one and leaves
the agent the rest. A request's latency runs from when the pacer released it, so a stall
that delays the requests queued behind it is counted for each of them. The mix (``ROUTES``): native JSON,
``format=raw``, the AWS-compatible ``/secretsmanager/get``, forced refreshes, names that do
not exist and a wrong token, each checked against the status it must get.

Every ``--every`` seconds one line: elapsed, requests so far, 5xx, other non-2xx by status,
p50/p99 over the interval, the agent's RSS (VmRSS), open descriptors, its established
connections on the secrets port (and to upstreams), upstream calls in the interval. Exits 1
on any 5xx, client error (reset, timeout) or unexpected status, if the agent exits, or if
RSS or descriptors grew past their limits between the end of the warm-up and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from run import (
    TOKEN,
    Servers,
    cpu_ticks,
    fill_name,
    fill_value,
    rss_mb,
    upstream_calls,
)

from kms_agent.config import DEFAULT_TTL

#: A token no agent accepts (the right length, so the refusal is the comparison's).
WRONG_TOKEN = "soak-wrong-token-0123456789ab"
#: Names that exist nowhere: as many as there are real ones, so the negative cache stays bounded.
MISSING = "soak-missing/s{}"
#: Upstream TTL with ``--source moto`` unless ``--ttl`` says otherwise.
MOTO_TTL = 2.0


@dataclass(frozen=True)
class Route:
    """One kind of request in the mix: how often, how it is built, what it must get."""

    kind: str
    weight: int
    path: str  # {name} is replaced by a secret's name
    expect: int
    token: str = TOKEN
    missing: bool = False


ROUTES = (
    Route("native", 34, "/secrets/{name}", 200),
    Route("raw", 30, "/secrets/{name}?format=raw", 200),
    Route("aws", 26, "/secretsmanager/get?secretId={name}", 200),
    Route("refresh", 2, "/secrets/{name}?refresh=true", 200),
    Route("missing", 4, "/secrets/{name}", 404, missing=True),
    Route("bad_token", 4, "/secrets/{name}", 403, token=WRONG_TOKEN),
)


@dataclass
class Tally:
    """What came back over one interval (or the whole run)."""

    requests: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.requests += other.requests
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.unexpected.update(other.unexpected)

    def five_xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def others(self) -> str:
        rest = sorted((s, n) for s, n in self.statuses.items() if not 200 <= s < 300 and s < 500)
        return " ".join(f"{s}:{n}" for s, n in rest) or "-"


@dataclass(frozen=True)
class Sample:
    """The agent process as /proc shows it."""

    rss_mb: float
    fds: int
    callers: int  # established connections on the secrets port
    upstream: int  # every other established TCP connection (to upstreams, metrics scrapes)


def sample(pid: int, port: int) -> Sample:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    fds = os.listdir(fd_dir)
    for fd in fds:
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    callers = upstream = 0
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "01" or cols[9] not in inodes:  # 01: ESTABLISHED
                continue
            if int(cols[1].rsplit(":", 1)[1], 16) == port:
                callers += 1
            else:
                upstream += 1
    return Sample(rss_mb(pid), len(fds), callers, upstream)


def quantile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class Load:
    """Paced requests over a fixed set of keep-alive connections, tallied per interval."""

    def __init__(
        self, base: str, names: list[str], rate: float, connections: int, seed: int
    ) -> None:
        self.base = base
        self.names = names
        self.missing = [MISSING.format(i) for i in range(len(names))]
        self.rate = rate
        self.connections = connections
        self.rng = random.Random(seed)  # noqa: S311 (a reproducible mix, not a secret)
        self.weights = [r.weight for r in ROUTES]
        self.queue: asyncio.Queue[tuple[float, Route, str]] = asyncio.Queue()
        self.tally = Tally()

    def take(self) -> Tally:
        """The interval's tally, and a fresh one for the next."""
        done, self.tally = self.tally, Tally()
        return done

    async def pace(self, until: float) -> None:
        """Put each request on the queue when it is due, ``rate`` per second, until ``until``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        k = 0
        while True:
            now = loop.time()
            while (due := start + k / self.rate) <= now:
                if due >= until:
                    return
                route = self.rng.choices(ROUTES, self.weights)[0]
                name = self.rng.choice(self.missing if route.missing else self.names)
                self.queue.put_nowait((time.perf_counter(), route, name))
                k += 1
            await asyncio.sleep(start + k / self.rate - now)

    async def work(self, session: aiohttp.ClientSession) -> None:
        """One connection's worth of callers: the next due request, sent when this one is done.

        Latency runs from when the pacer released the request: waiting for a free connection
        (the agent slow to answer the ones before) counts, the pacer's own timer does not."""
        while True:
            released, route, name = await self.queue.get()
            url = self.base + route.path.format(name=name)
            status: int | None = None
            try:
                async with session.get(url, headers={"X-KMS-Token": route.token}) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.tally.errors[type(exc).__name__] += 1
            self.tally.requests += 1
            self.tally.latencies_ms.append((time.perf_counter() - released) * 1000)
            if status is not None:
                self.tally.statuses[status] += 1
                if status != route.expect:
                    self.tally.unexpected[f"{route.kind}:{status}"] += 1
            self.queue.task_done()


def moto_config(servers: Servers, names: list[str], tmp: Path) -> Path:
    """Start moto, create ``names`` there, and write a config that reads every name from it."""
    import boto3

    url = servers.start_moto()
    client = boto3.client("secretsmanager", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
    for name in names:
        client.create_secret(Name=name, SecretString=fill_value().decode())
    conf = tmp / "soak-moto.toml"
    conf.write_text(textwrap.dedent(f"""
        [[sources]]
        name = "moto"
        provider = "aws"
        region = "us-east-1"
        endpoint = "{url}"
        match = ["*"]
        [sources.credentials]
        access_key_id = "bench"
        secret_access_key = "bench"
    """))  # fmt: skip
    return conf


def line(label: str, total: Tally, interval: Tally, s: Sample, upstream: float) -> str:
    return (
        f"{label:>7} req {total.requests:>8,} 5xx {total.five_xx():>3} other {total.others():<18} "
        f"p50 {quantile(interval.latencies_ms, 50):6.2f} ms p99 {quantile(interval.latencies_ms, 99):6.2f} ms "
        f"rss {s.rss_mb:6.1f} MB fds {s.fds:>4} conns {s.callers:>3} (+{s.upstream} other) "
        f"upstream calls +{upstream:.0f}"
    )


async def soak(args: argparse.Namespace, servers: Servers, names: list[str]) -> list[str]:
    """Run the load; print a line per interval and the summary; return what failed."""
    proc = servers.procs["agent"]
    base = servers.urls["agent:base"]
    port = int(base.rsplit(":", 1)[1])
    metrics = servers.urls["agent:metrics"]
    loop = asyncio.get_running_loop()
    loop_name = type(loop).__module__.split(".")[0]
    load = Load(base, names, args.rate, args.connections, args.seed)
    idle = sample(proc.pid, port)
    print(f"agent pid {proc.pid}, source {args.source}, ttl {args.ttl:g} s, {len(names)} secrets, "
          f"{args.rate:g} req/s over {args.connections} connections ({loop_name} client), "
          f"idle rss {idle.rss_mb:.1f} MB fds {idle.fds}")  # fmt: skip
    total = Tally()
    failures: list[str] = []
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        workers = [asyncio.create_task(load.work(session)) for _ in range(args.connections)]
        start = loop.time()
        warm_end = start + args.warmup
        end = warm_end + args.minutes * 60
        pacer = asyncio.create_task(load.pace(end))
        cpu0, self0, wall0 = cpu_ticks([proc.pid]), time.process_time(), time.monotonic()
        up_last = await asyncio.to_thread(upstream_calls, metrics)
        marks: list[float] = []
        while (mark := warm_end + (len(marks) + 1) * args.every) < end - 0.001:
            marks.append(mark)
        marks.append(end)
        baseline: Sample | None = None
        last, peak = idle, idle.rss_mb
        for label_at in [warm_end, *marks]:
            await asyncio.sleep(max(0.0, label_at - loop.time()))
            if label_at == end:
                await pacer
                await load.queue.join()  # the last due requests answered
            if proc.poll() is not None:
                break
            interval = load.take()
            total.add(interval)
            last = sample(proc.pid, port)
            peak = max(peak, last.rss_mb)
            up_now = await asyncio.to_thread(upstream_calls, metrics)
            label = "warm-up" if baseline is None else f"{round(label_at - warm_end, 1):g}s"
            print(line(label, total, interval, last, up_now - up_last), flush=True)
            up_last = up_now
            if baseline is None:
                baseline = last
        wall = time.monotonic() - wall0
        agent_cpu = (
            (cpu_ticks([proc.pid]) - cpu0) / os.sysconf("SC_CLK_TCK") if proc.poll() is None else 0
        )
        self_cpu = time.process_time() - self0
        pacer.cancel()
        for task in workers:
            task.cancel()
        await asyncio.gather(pacer, *workers, return_exceptions=True)
    total.add(load.take())  # anything answered after the agent exited
    baseline = baseline or idle
    rss_growth, fd_growth = last.rss_mb - baseline.rss_mb, last.fds - baseline.fds
    print(f"summary: {total.requests:,} requests in {wall:.0f} s ({total.requests / wall:.1f}/s), "
          f"5xx {total.five_xx()}, other {total.others()}, client errors "
          f"{dict(total.errors) or 0}, unexpected {dict(total.unexpected) or 0}")  # fmt: skip
    print(f"  rss {idle.rss_mb:.1f} MB idle, {baseline.rss_mb:.1f} after warm-up -> {last.rss_mb:.1f} at "
          f"the end ({rss_growth:+.1f} MB; peak {peak:.1f}); fds {baseline.fds} -> {last.fds} "
          f"({fd_growth:+d}); conns {baseline.callers} -> {last.callers}; "
          f"CPU agent {agent_cpu / wall:.0%}, load generator {self_cpu / wall:.0%} of a core")  # fmt: skip
    if total.five_xx():
        failures.append(f"{total.five_xx()} 5xx answers")
    if total.errors:
        failures.append(f"client errors {dict(total.errors)}")
    if total.unexpected:
        failures.append(f"unexpected statuses (route:status) {dict(total.unexpected)}")
    if proc.poll() is not None:
        failures.append(f"the agent exited with code {proc.returncode}")
        return failures  # growth is not measured on a process that is gone
    if rss_growth > args.max_rss_growth_mb:
        failures.append(f"RSS grew {rss_growth:.1f} MB (limit {args.max_rss_growth_mb:g})")
    if fd_growth > args.max_fd_growth:
        failures.append(f"descriptors grew by {fd_growth} (limit {args.max_fd_growth})")
    return failures


def positive(kind: type[float | int]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=positive(float), default=10)
    parser.add_argument("--rate", type=positive(float), default=150, help="requests per second")
    parser.add_argument("--secrets", type=positive(int), default=50, help="distinct secret names")
    parser.add_argument("--every", type=positive(float), default=30, help="seconds between lines")
    parser.add_argument(
        "--connections", type=positive(int), default=8, help="keep-alive connections"
    )
    parser.add_argument("--warmup", type=positive(float), default=10,
                        help="seconds of load before the RSS and descriptor baseline")  # fmt: skip
    parser.add_argument("--source", choices=("local", "moto"), default="local")
    parser.add_argument("--ttl", type=positive(float), default=None,
                        help=f"cache TTL in seconds (default: the agent's {DEFAULT_TTL:g}; {MOTO_TTL:g} with moto)")  # fmt: skip
    parser.add_argument("--max-rss-growth-mb", type=float, default=64)
    parser.add_argument("--max-fd-growth", type=int, default=100)
    parser.add_argument("--seed", type=int, default=14, help="of the request mix")
    args = parser.parse_args()
    if args.ttl is None:
        args.ttl = MOTO_TTL if args.source == "moto" else DEFAULT_TTL
    if args.source == "moto" and not (Path(sys.executable).parent / "moto_server").exists():
        sys.exit("--source moto needs moto's server next to this Python: pip install -e '.[bench]'")
    names = [fill_name(i) for i in range(args.secrets)]
    tmp = Path(
        tempfile.mkdtemp(prefix="kms-soak-", dir="/dev/shm" if Path("/dev/shm").exists() else None)
    )
    servers = Servers(tmp, quick=True)
    try:
        config = moto_config(servers, names, tmp) if args.source == "moto" else None
        servers.start_agent(extra_env={"KMS_AGENT_CACHE_TTL": str(args.ttl)}, config=config,
                            fill=args.secrets)  # fmt: skip
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
        with asyncio.Runner(loop_factory=factory) as runner:
            failures = runner.run(soak(args, servers, names))
    except KeyboardInterrupt:
        sys.exit("soak: interrupted")
    finally:
        servers.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for failure in failures:
        print(f"FAIL: {failure}")
    print("soak: FAIL" if failures else "soak: OK")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
