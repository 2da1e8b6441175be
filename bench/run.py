"""kms-agent benchmarks, every figure paired with baselines measured in the same run.

    python bench/run.py [--seconds 3] [--rounds 3] [--quick | --memory]

Needs Debian's wrk and nginx. Servers, each measured in interleaved rounds (this VM's core
speed drifts; only ratios within one run mean anything):
  nginx    1 worker, answering the agent's own response bytes behind the same token check
  minimal  a bare aiohttp handler doing the same, on the event loop the agent uses
  agent    kms-agent serving a cached secret from the embedded store
Also: the herd (1,000 concurrent cold requests -> upstream calls), idle RSS and RSS with
10,000 cached 1 KiB secrets, and start-to-ready time. Results: bench/results/*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kms_agent.store import LocalStore  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
NAME = "bench/secret"
VALUE = "x" * 120
CLK_TCK = os.sysconf("SC_CLK_TCK")

MINIMAL = textwrap.dedent(
    """
    import asyncio, sys
    from aiohttp import web
    BODY = open(sys.argv[2], "rb").read()
    TOKEN = sys.argv[3]
    async def handler(request):
        if request.headers.get("X-Aws-Parameters-Secrets-Token") != TOKEN:
            return web.Response(status=403)
        return web.Response(body=BODY, content_type="application/json")
    app = web.Application()
    app.router.add_get("/secretsmanager/get", handler)
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(web._run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None,
                                access_log=None))
    """
)


def fill_name(i: int) -> str:
    """The name of the ``i``-th secret ``Servers.start_agent(fill=...)`` writes (1 KiB each)."""
    return f"fill/s{i}"


def fill_value() -> bytes:
    return os.urandom(512).hex().encode()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, headers: dict[str, str] | None = None, timeout: float = 20) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=1) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"{url} never answered 200")


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


#: A wrk script that makes every request's bytes differ (a counter header): what a client
#: whose requests vary costs, since the fast path reuses the parse of repeated bytes.
VARYING_LUA = """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", nil, {["X-Aws-Parameters-Secrets-Token"] = "TOKEN", ["X-Seq"] = tostring(n)})
end
""".replace("TOKEN", TOKEN)


def wrk(url: str, conns: int, seconds: int, script: Path | None = None) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency",
         "-H", f"X-Aws-Parameters-Secrets-Token: {TOKEN}", *(["-s", str(script)] if script else []), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    def lat(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if not m:
            return float("nan")
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
        return float(m.group(1)) * scale

    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": requests,
        "errors": int(non2xx.group(1)) if non2xx else 0,
        "p50_ms": lat("50"),
        "p99_ms": lat("99"),
    }


class Servers:
    def __init__(self, tmp: Path, quick: bool) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes] | subprocess.Popen[str]] = {}
        self.urls: dict[str, str] = {}
        self.cpu_pids: dict[str, list[int]] = {}
        self.quick = quick
        self.varying = tmp / "varying.lua"
        self.varying.write_text(VARYING_LUA)

    def start_agent(
        self,
        name: str = "agent",
        extra_env: dict[str, str] | None = None,
        config: Path | None = None,
        fill: int = 0,
        code: Path | None = None,
    ) -> float:
        """An agent process; ``code``: another checkout of kms-agent to run instead (the
        "before" of a before/after comparison in the same run)."""
        port, metrics = free_port(), free_port()
        data = self.tmp / f"{name}-data"
        store = LocalStore(data)
        store.init()
        store.put(NAME, VALUE.encode())
        store.put(NAME + "-cold", VALUE.encode())
        for i in range(fill):
            store.put(fill_name(i), fill_value())
        env = {**os.environ, "KMS_TOKEN": TOKEN, "KMS_AGENT_DATA_DIR": str(data),
               "KMS_AGENT_RUNTIME_DIR": str(self.tmp / f"{name}-run"),
               "KMS_AGENT_METRICS_LISTEN": f"127.0.0.1:{metrics}",
               "KMS_AGENT_CACHE_MAX_ENTRIES": "20000",
               "KMS_AGENT_SERVER_MAX_CONNECTIONS": "4000", **(extra_env or {})}  # fmt: skip
        if code is not None:
            env["PYTHONPATH"] = str(code)
        start = time.monotonic()
        cmd = [sys.executable, "-m", "kms_agent", *(["--config", str(config)] if config else []),
               "run", "--listen", f"127.0.0.1:{port}"]  # fmt: skip
        proc = subprocess.Popen(
            cmd, cwd=code,
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{metrics}/readyz")
        ready = time.monotonic() - start
        self.procs[name] = proc
        self.urls[name] = f"http://127.0.0.1:{port}/secretsmanager/get?secretId={NAME}"
        self.urls[name + ":base"] = f"http://127.0.0.1:{port}"
        self.urls[name + ":metrics"] = f"http://127.0.0.1:{metrics}/metrics"
        self.cpu_pids[name] = [proc.pid]
        self.urls[name + "-varying"] = self.urls[name]  # the same agent, varying requests
        self.cpu_pids[name + "-varying"] = [proc.pid]
        return ready

    def start_moto(self) -> str:
        """moto's server (AWS Secrets Manager, any credentials accepted) on loopback; its URL."""
        port = free_port()
        moto_bin = Path(sys.executable).parent / "moto_server"
        proc = subprocess.Popen([str(moto_bin), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.procs["moto"] = proc
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/moto-api/")
        return url

    def body(self) -> bytes:
        req = urllib.request.Request(
            self.urls["agent"], headers={"X-Aws-Parameters-Secrets-Token": TOKEN}
        )
        with urllib.request.urlopen(req) as resp:
            body: bytes = resp.read()
            return body

    def start_minimal(self, body: Path) -> None:
        port = free_port()
        script = self.tmp / "minimal.py"
        script.write_text(MINIMAL)
        proc = subprocess.Popen([sys.executable, str(script), str(port), str(body), TOKEN])
        self.urls["minimal"] = f"http://127.0.0.1:{port}/secretsmanager/get?secretId={NAME}"
        wait_http(self.urls["minimal"], {"X-Aws-Parameters-Secrets-Token": TOKEN})
        self.procs["minimal"] = proc
        self.cpu_pids["minimal"] = [proc.pid]

    def start_nginx(self, body: bytes) -> None:
        port = free_port()
        conf = self.tmp / "nginx.conf"
        escaped = body.decode().replace("\\", "\\\\").replace("'", "\\'")
        conf.write_text(textwrap.dedent(f"""
            worker_processes 1;
            pid {self.tmp}/nginx.pid;
            error_log {self.tmp}/nginx-error.log;
            events {{ worker_connections 2048; }}
            http {{
              access_log off;
              client_body_temp_path {self.tmp}/nb; proxy_temp_path {self.tmp}/np;
              fastcgi_temp_path {self.tmp}/nf; uwsgi_temp_path {self.tmp}/nu; scgi_temp_path {self.tmp}/ns;
              server {{
                listen 127.0.0.1:{port};
                location /secretsmanager/get {{
                  if ($http_x_aws_parameters_secrets_token != "{TOKEN}") {{ return 403; }}
                  default_type application/json;
                  return 200 '{escaped}';
                }}
              }}
            }}
        """))  # fmt: skip
        proc = subprocess.Popen(
            [shutil.which("nginx") or "nginx", "-c", str(conf), "-g", "daemon off;"]
        )
        self.urls["nginx"] = f"http://127.0.0.1:{port}/secretsmanager/get?secretId={NAME}"
        wait_http(self.urls["nginx"], {"X-Aws-Parameters-Secrets-Token": TOKEN})
        self.procs["nginx"] = proc
        self.cpu_pids["nginx"] = [proc.pid, *children(proc.pid)]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(10)


def measure(
    servers: Servers, names: list[str], conns: list[int], rounds: int, seconds: int
) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {}
    for r in range(rounds):
        for c in conns:
            order = names if r % 2 == 0 else list(reversed(names))  # interleave
            for name in order:
                before = cpu_ticks(servers.cpu_pids[name])
                script = servers.varying if name.endswith("-varying") else None
                result = wrk(servers.urls[name], c, seconds, script)
                used = cpu_ticks(servers.cpu_pids[name]) - before
                result["cpu_us_per_req"] = used / CLK_TCK * 1e6 / max(1, result["requests"])
                samples.setdefault(f"{name}@c{c}", []).append(result)
    return {k: {m: statistics.median(s[m] for s in v) for m in v[0]} for k, v in samples.items()}


def upstream_calls(metrics: str) -> float:
    """Upstream calls the agent has made, all sources and results, from its metrics."""
    text = urllib.request.urlopen(metrics).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kms_agent_upstream_requests_total{"))  # fmt: skip


async def herd(url: str, metrics: str) -> int:
    import aiohttp

    before = upstream_calls(metrics)
    cold = url.replace(NAME, NAME + "-cold")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> int:
            async with s.get(cold, headers={"X-Aws-Parameters-Secrets-Token": TOKEN}) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(1000)))
    assert set(statuses) == {200}, set(statuses)
    return int(upstream_calls(metrics) - before)


async def fill(url: str, count: int, concurrency: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem, s.get(url.replace(NAME, fill_name(i)),
                                  headers={"X-Aws-Parameters-Secrets-Token": TOKEN}) as r:  # fmt: skip
                await r.read()

        await asyncio.gather(*(one(i) for i in range(count)))


async def miss_overhead(servers: Servers, samples: int) -> dict[str, float]:
    """Cold-miss latency through the agent minus the same upstream call made directly.

    The upstream is the Alibaba KMS emulator (signatures checked) in its own process; the
    direct call uses the agent's own provider code and HTTP client from this process, so the
    difference is what the agent adds on a miss: HTTP in, routing, cache, single flight.
    The agent is asked through kms_agent_client (a blocking call: nothing else runs here
    meanwhile), and through an aiohttp client session, whose own cost is in its figure."""
    import aiohttp

    from kms_agent import providers
    from kms_agent.config import load
    from kms_agent_client import Client

    port = free_port()
    emu = subprocess.Popen(
        [sys.executable, "-m", "tests.emulators.alibaba_kms", "--port", str(port),
         "--qps", "1000000", "--secrets", str(3 * samples + 3)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    servers.procs["emulator"] = emu
    assert emu.stdout is not None
    env = dict(
        line.strip().split("=", 1) for line in (emu.stdout.readline(), emu.stdout.readline())
    )
    emu.stdout.readline()
    conf = servers.tmp / "alibaba.toml"
    conf.write_text(textwrap.dedent(f"""
        [[sources]]
        name = "alibaba"
        provider = "alibaba"
        region = "cn-hangzhou"
        endpoint = "http://127.0.0.1:{port}"
        rate_limit_qps = 450
        match = ["*"]
    """))  # fmt: skip
    servers.start_agent("agent-alibaba", env, config=conf)
    base = servers.urls["agent-alibaba:base"]
    cfg = load(conf, environ=env)
    direct = providers.create(cfg.sources[0], cfg, env)
    await direct.open()
    agent_ms: list[float] = []
    aiohttp_ms: list[float] = []
    direct_ms: list[float] = []
    headers = {"X-KMS-Token": TOKEN}
    client = Client(base.removeprefix("http://"), token=TOKEN)
    try:
        async with aiohttp.ClientSession() as session:

            async def via_client(name: str) -> float:
                t0 = time.perf_counter()
                client.get(name)
                return (time.perf_counter() - t0) * 1000

            async def via_aiohttp(name: str) -> float:
                t0 = time.perf_counter()
                async with session.get(f"{base}/secrets/{name}?format=raw", headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status
                return (time.perf_counter() - t0) * 1000

            async def via_direct(name: str) -> float:
                t0 = time.perf_counter()
                await direct.get(name)
                return (time.perf_counter() - t0) * 1000

            await via_client(f"bench/s{3 * samples}")  # open the keep-alive connections
            await via_aiohttp(f"bench/s{3 * samples + 1}")
            await via_direct(f"bench/s{3 * samples + 2}")
            for i in range(samples):
                trio = [(via_client, agent_ms, 3 * i), (via_aiohttp, aiohttp_ms, 3 * i + 1),
                        (via_direct, direct_ms, 3 * i + 2)]  # fmt: skip
                for fn, out, n in trio if i % 2 else reversed(trio):
                    out.append(await fn(f"bench/s{n}"))
                await asyncio.sleep(0.006)  # ~170 trios/s: under each side's 450/s limiter
    finally:
        client.close()
        await direct.close()

    def q(xs: list[float], p: int) -> float:
        return statistics.quantiles(xs, n=100)[p - 1]

    return {
        "samples": samples,
        "agent_p50_ms": statistics.median(agent_ms), "agent_p90_ms": q(agent_ms, 90),
        "agent_aiohttp_client_p50_ms": statistics.median(aiohttp_ms),
        "direct_p50_ms": statistics.median(direct_ms), "direct_p90_ms": q(direct_ms, 90),
        "overhead_p50_ms": statistics.median(agent_ms) - statistics.median(direct_ms),
        "overhead_aiohttp_client_p50_ms": statistics.median(aiohttp_ms) - statistics.median(direct_ms),
    }  # fmt: skip


def client_vs_library(servers: Servers, rounds: int, per_round: int) -> Mapping[str, float | str]:
    """A Python keep-alive client's round trip to the agent (raw value, and the AWS JSON
    parsed) against aws-secretsmanager-caching's cache hit, in interleaved rounds."""
    import http.client
    import json as jsonlib

    try:
        import boto3
        from aws_secretsmanager_caching import SecretCache
    except ImportError:
        return {"skipped": "pip install '.[bench]' (boto3, aws-secretsmanager-caching)"}
    moto = servers.start_moto()
    client = boto3.client("secretsmanager", endpoint_url=moto,
                          region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")  # fmt: skip
    client.create_secret(Name=NAME, SecretString=VALUE)
    cache = SecretCache(client=client)
    assert cache.get_secret_string(NAME) == VALUE

    def library() -> None:
        cache.get_secret_string(NAME)

    conns = {}
    for name in [n for n in ("agent", "agent-before") if n + ":base" in servers.urls]:
        host, port = servers.urls[name + ":base"].removeprefix("http://").split(":")
        conns[name] = http.client.HTTPConnection(host, int(port))
    headers = {"X-KMS-Token": TOKEN}

    def raw(name: str) -> Callable[[], None]:
        conn = conns[name]

        def call() -> None:
            conn.request("GET", f"/secrets/{NAME}?format=raw", headers=headers)
            resp = conn.getresponse()
            resp.read().decode()

        return call

    def parsed(name: str) -> Callable[[], None]:
        conn = conns[name]

        def call() -> None:
            conn.request("GET", f"/secretsmanager/get?secretId={NAME}", headers=headers)
            resp = conn.getresponse()
            jsonlib.loads(resp.read())["SecretString"]

        return call

    def ours(name: str) -> Callable[[], None]:
        """kms_agent_client: keep-alive, request bytes built once, llhttp for the answer."""
        from kms_agent_client import Client

        agent = Client(servers.urls[name + ":base"].removeprefix("http://"), token=TOKEN)

        def call() -> None:
            agent.get_text(NAME)

        return call

    calls = {"library_hit": library, "agent_raw": raw("agent"), "agent_json": parsed("agent"),
             "agent_client": ours("agent")}  # fmt: skip
    if "agent-before" in conns:
        calls["agent_before_raw"] = raw("agent-before")
    for fn in calls.values():
        fn()  # warm: connections open, entries cached
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        for key in list(calls) if r % 2 == 0 else list(reversed(calls)):
            fn = calls[key]
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[key].append((time.perf_counter() - t0) / per_round * 1e6)
    out = {f"{k}_us": statistics.median(v) for k, v in times.items()}
    out["agent_raw_vs_library"] = out["agent_raw_us"] / out["library_hit_us"]
    out["agent_client_vs_library"] = out["agent_client_us"] / out["library_hit_us"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, c=32 only, no memory fill")
    parser.add_argument("--memory", action="store_true", help="start-up and memory alone (~30 s)")
    parser.add_argument("--fill-concurrency", type=int, default=64,
                        help="requests in flight while caching the 10,000 secrets")  # fmt: skip
    parser.add_argument("--label", default="")
    parser.add_argument("--before", default="26e8b4a", metavar="REF",
                        help="git ref of the agent to compare with in the same run ('' for none; "
                        "default: the last commit before the single front door)")  # fmt: skip
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"bench needs {tool}: apt-get install wrk nginx")
    conns = [32] if args.quick else [1, 32, 256]
    rounds = 1 if args.quick else args.rounds
    tmp = Path(
        tempfile.mkdtemp(prefix="kms-bench-", dir="/dev/shm" if Path("/dev/shm").exists() else None)
    )
    servers = Servers(tmp, args.quick)
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0],
                                 "kernel": os.uname().release}, "label": args.label}  # fmt: skip
    try:
        # The 10,000 secrets the memory figure caches are in the store before the agent
        # starts: written while it runs, its file watcher's reaction would count too.
        results["startup_s"] = round(servers.start_agent(fill=0 if args.quick else 10_000), 3)
        results["idle_rss_mb"] = round(rss_mb(servers.procs["agent"].pid), 1)  # no read yet
        before = checkout(args.before, tmp) if args.before else None
        if before is not None:
            servers.start_agent("agent-before", code=before)
        body = servers.body()
        (tmp / "body.json").write_bytes(body)
        results["body_bytes"] = len(body)
        servers.start_minimal(tmp / "body.json")
        servers.start_nginx(body)
        results["first_read_rss_mb"] = round(rss_mb(servers.procs["agent"].pid), 1)
        results["minimal_rss_mb"] = round(rss_mb(servers.procs["minimal"].pid), 1)
        if not args.memory:
            names = ["nginx", "minimal", "agent-varying", "agent"]
            if before is not None:
                names[2:2] = ["agent-before", "agent-before-varying"]
            results["throughput"] = measure(servers, names, conns, rounds, args.seconds)
            results["before"] = args.before
            results["herd_upstream_calls"] = asyncio.run(
                herd(servers.urls["agent"], servers.urls["agent:metrics"])
            )
            results["python_client"] = client_vs_library(servers, 3 if args.quick else 7, 2000)
            results["miss"] = asyncio.run(miss_overhead(servers, 50 if args.quick else 300))
        if not args.quick:
            results["rss_before_fill_mb"] = round(rss_mb(servers.procs["agent"].pid), 1)
            asyncio.run(fill(servers.urls["agent"], 10_000, args.fill_concurrency))
            results["rss_10k_1KiB_mb"] = round(rss_mb(servers.procs["agent"].pid), 1)
    finally:
        servers.stop()
        if args.before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                           check=False, capture_output=True)  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)
    report(results)


def checkout(ref: str, tmp: Path) -> Path:
    """A work tree of this repository at ``ref`` (removed after the run)."""
    path = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
                   check=True, capture_output=True)  # fmt: skip
    return path


def report(results: dict[str, Any]) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = (
        out
        / f"{time.strftime('%Y%m%dT%H%M%S')}{'-' + results['label'] if results['label'] else ''}.json"
    )
    path.write_text(json.dumps(results, indent=2))
    print(f"kms-agent bench ({results['machine']}) body {results['body_bytes']} B -> {path.name}")
    if "throughput" in results:
        report_speed(results)
    print(
        f"startup to ready: {results['startup_s']} s; RSS idle {results['idle_rss_mb']} MB, after the first "
        f"read {results['first_read_rss_mb']} MB (minimal aiohttp process: {results['minimal_rss_mb']} MB)"
        + (
            f"; with 10,000 cached 1 KiB secrets {results['rss_10k_1KiB_mb']} MB "
            f"(+{results['rss_10k_1KiB_mb'] - results['rss_before_fill_mb']:.1f} over the {results['rss_before_fill_mb']} MB before)"
            if "rss_10k_1KiB_mb" in results
            else ""
        )
    )


def report_speed(results: dict[str, Any]) -> None:
    t = results["throughput"]
    print(f"{'server@conns':<20}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}"
          f"{'x nginx':>9}{'x minimal':>11}")  # fmt: skip
    for key in sorted(t, key=lambda k: (int(k.split("@c")[1]), k)):
        row = t[key]
        c = key.split("@")[1]
        vs_nginx = row["rps"] / t[f"nginx@{c}"]["rps"]
        vs_min = row["rps"] / t[f"minimal@{c}"]["rps"]
        print(f"{key:<20}{row['rps']:>10.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
              f"{row['cpu_us_per_req']:>12.0f}{vs_nginx:>9.2f}{vs_min:>11.2f}")  # fmt: skip
    agent_cpu = [t[k]["cpu_us_per_req"] / t[k.replace("agent", "minimal")]["cpu_us_per_req"]
                 for k in t if k.startswith("agent@")]  # fmt: skip
    print(f"agent CPU per request / minimal aiohttp's: {', '.join(f'{x:.2f}' for x in agent_cpu)}")
    pc = results["python_client"]
    if "skipped" in pc:
        print(f"python client vs aws-secretsmanager-caching: skipped ({pc['skipped']})")
    else:
        print(
            f"python keep-alive client, per call: http.client: agent raw {pc['agent_raw_us']:.0f} us, agent AWS JSON "
            f"parsed {pc['agent_json_us']:.0f} us"
            + (
                f", agent before ({results.get('before')}) {pc['agent_before_raw_us']:.0f} us"
                if "agent_before_raw_us" in pc
                else ""
            )
            + "; "
            f"kms_agent_client: agent {pc['agent_client_us']:.0f} us; "
            f"aws-secretsmanager-caching hit {pc['library_hit_us']:.0f} us (agent / library: "
            f"http.client {pc['agent_raw_vs_library']:.2f}, kms_agent_client {pc['agent_client_vs_library']:.2f})"
        )
    m = results["miss"]
    print(
        f"cold miss over the Alibaba emulator: agent p50 {m['agent_p50_ms']:.2f} ms, direct call p50 "
        f"{m['direct_p50_ms']:.2f} ms -> agent overhead {m['overhead_p50_ms']:.2f} ms ({m['samples']} each; "
        f"asked with an aiohttp client session instead: {m['overhead_aiohttp_client_p50_ms']:.2f} ms)"
    )
    print(
        f"herd: 1000 concurrent cold requests -> {results['herd_upstream_calls']} upstream call(s)"
    )


if __name__ == "__main__":
    main()
