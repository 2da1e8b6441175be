"""CPU per cache hit with per-caller policies on, against the same agent without them.

    python bench/policy_hits.py [--rounds 3] [--seconds 5] [--connections 32] [--secrets 50]
                                [--max-ratio 1.5]

Issue 15 asks that the hit path with policies on stay within 1.5x the CPU per hit without
them. Two agents run at once, started as run.py starts them (its helpers, imported), each
on its own embedded store seeded with ``--secrets`` 1 KiB secrets, both reading the same
token file of named callers (``NAME:TOKEN`` lines; the bench's caller is ``token:bench-app``):

  plain     no ``[policies]``: every request skips the policy step
  policies  ``POLICIES``: 24 statements in 6 policies over several principals, with globs,
            one Deny, the caller's own Allow in the middle; every request is decided

wrk drives cache hits (``GET /secrets/NAME?format=raw``, keep-alive, ``--connections``) at
the two agents in 1 s slices, alternating A B B A ... (this VM's speed drifts within seconds:
both see the same drift), ``--seconds`` slices of each per shape and round, in three shapes:

  repeat    each connection polls its own names (connection i: secrets i, i+C, ...): the
            agent's remembered-request path (``Front.answer``: the memoised decision, then
            the cache), where a caller polling its secrets lands
  rotate    one counter hands the names to whichever connection is free: a connection
            seldom repeats one of its last few targets, so most requests take the full
            path (token, routing, ``Front.authorize``, the cache)
  denied    every connection reads the one secret the Deny refuses: a 403 from the
            policies agent, a 200 (a 120 B hit) from the plain one, for scale

The figure is the agent's CPU (utime + stime of its process, /proc/PID/stat) over a wrk run
divided by the answers wrk counted: CPU per hit, not latency. wrk runs in its own process,
so its CPU is not counted. The rounds' ratios (policies / plain, same shape, same round) are
printed with their median; exit 1 when a hit shape's median ratio is over ``--max-ratio``,
or when an answer is not what it must be (2xx, but for ``denied`` at the policies agent:
non-2xx, each a policy denial by the agent's own metric).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from run import CLK_TCK, NAME, ROOT, TOKEN, Servers, cpu_ticks, fill_name

from kms_agent_client import DEFAULT_HEADER, TOKEN_ENV

#: The bench's caller (its principal ``token:bench-app``, as POLICIES names it); the others
#: only fill the token file.
CALLER = "bench-app"
OTHER_CALLERS = ("ci-deploy", "web-1", "batch-nightly", "ops-a", "etl-1")
#: The secret the Deny refuses (run.py's start_agent stores it; the caller's Allow covers it).
DENIED = NAME

#: A policy set as an operator might write one: the caller's policy among others it does
#: not match, statements naming principals with globs, one Deny that applies to everyone.
POLICIES = textwrap.dedent(
    """
    [policies]
    platform = '''
    {"Version": "2012-10-17", "Statement": [
      {"Sid": "OpsAll", "Effect": "Allow", "Principal": ["unix:uid:0", "token:ops-?"],
       "Action": "kms:*", "Resource": "*"},
      {"Sid": "PaymentsRead", "Effect": "Allow", "Principal": "k8s:payments:*",
       "Action": ["kms:GetSecretValue", "kms:Describe*"], "Resource": "secret/payments/*"},
      {"Sid": "PaymentsList", "Effect": "Allow", "Principal": "k8s:payments:*",
       "Action": "kms:ListSecrets", "Resource": "secret/payments/*"},
      {"Sid": "WebRead", "Effect": "Allow", "Principal": ["k8s:frontend:*", "token:web-*"],
       "Action": "kms:GetSecretValue", "Resource": ["secret/web/*", "secret/cdn/*"]},
      {"Sid": "WebDescribe", "Effect": "Allow", "Principal": ["k8s:frontend:*", "token:web-*"],
       "Action": "kms:DescribeSecret", "Resource": "secret/web/**"},
      {"Sid": "McpTokens", "Effect": "Allow", "Principal": "k8s:mcp:*",
       "Action": "kms:GetSecretValue", "Resource": "acs:kms:cn-*:*:secret/mcp!*"},
      {"Sid": "NeverRoot", "Effect": "Deny", "Principal": "*", "Action": "kms:*",
       "Resource": ["secret/bench/secret", "secret/**/root"]}
    ]}
    '''

    [policies.ci]
    attach = ["token:ci-*"]
    [[policies.ci.document.Statement]]
    Sid = "CiRead"
    Effect = "Allow"
    Action = "kms:GetSecretValue"
    Resource = ["secret/ci/**", "secret/deploy/*"]
    [[policies.ci.document.Statement]]
    Sid = "CiDescribe"
    Effect = "Allow"
    Action = "kms:DescribeSecret"
    Resource = "secret/deploy/**"
    [[policies.ci.document.Statement]]
    Sid = "CiList"
    Effect = "Allow"
    Action = "kms:ListSecrets"
    Resource = "secret/ci/**"

    [policies.readers]
    attach = ["unix:gid:kms-readers", "unix:gid:wheel"]
    [[policies.readers.document.Statement]]
    Sid = "SharedRead"
    Effect = "Allow"
    Action = "kms:GetSecretValue"
    Resource = "secret/shared/**"
    [[policies.readers.document.Statement]]
    Sid = "SharedDescribe"
    Effect = "Allow"
    Action = "kms:Describe*"
    Resource = "secret/shared/**"

    # The bench's caller: its Allow covers the denied secret too (the Deny decides).
    [policies.bench-app]
    attach = ["token:bench-app"]
    [[policies.bench-app.document.Statement]]
    Sid = "ReadOwn"
    Effect = "Allow"
    Action = ["kms:GetSecretValue", "kms:DescribeSecret"]
    Resource = ["secret/fill/*", "secret/bench/*"]
    [[policies.bench-app.document.Statement]]
    Sid = "ListOwn"
    Effect = "Allow"
    Action = "kms:ListSecrets"
    Resource = "secret/fill/*"

    [policies.batch]
    attach = ["token:batch-*", "k8s:jobs:*"]
    [[policies.batch.document.Statement]]
    Sid = "BatchRead"
    Effect = "Allow"
    Action = "kms:GetSecretValue"
    Resource = ["secret/batch/*", "secret/reports/**"]
    [[policies.batch.document.Statement]]
    Sid = "BatchDescribe"
    Effect = "Allow"
    Action = "kms:DescribeSecret"
    Resource = "secret/batch/**"
    [[policies.batch.document.Statement]]
    Sid = "BatchList"
    Effect = "Allow"
    Action = "kms:ListSecrets"
    Resource = "secret/batch/*"
    [[policies.batch.document.Statement]]
    Sid = "BatchShared"
    Effect = "Allow"
    Action = "kms:GetSecretValue"
    Resource = "secret/shared/batch-*"

    [policies.analytics]
    document = '''
    {"Version": "2017-10-17", "Statement": [
      {"Sid": "WarehouseRead", "Effect": "Allow", "Principal": "k8s:analytics:*",
       "Action": "kms:GetSecretValue", "Resource": "secret/warehouse/*"},
      {"Sid": "EtlRead", "Effect": "Allow", "Principal": ["token:etl-?", "k8s:etl:*"],
       "Action": "kms:GetSecretValue", "Resource": ["secret/warehouse/**", "secret/s3/*"]},
      {"Sid": "EtlDescribe", "Effect": "Allow", "Principal": ["token:etl-?", "k8s:etl:*"],
       "Action": "kms:DescribeSecret", "Resource": "secret/warehouse/**"},
      {"Sid": "EtlList", "Effect": "Allow", "Principal": "token:etl-?",
       "Action": "kms:ListSecrets", "Resource": "secret/warehouse/*"},
      {"Sid": "DashRead", "Effect": "Allow", "Principal": "k8s:dash:grafana",
       "Action": "kms:GetSecretValue", "Resource": "secret/dash/*"},
      {"Sid": "RegionalKeys", "Effect": "Allow", "Principal": "k8s:analytics:*",
       "Action": "kms:GetSecretValue", "Resource": "acs:kms:cn-hangzhou:*:secret/dw!*"}
    ]}
    '''
    """
)

#: wrk's script: each thread cycles through its own list of requests, built once; at the
#: end, one line of what wrk counted (parsed by ``drive``).
LUA = textwrap.dedent(
    """
    local lists = {LISTS}
    local created = 0
    function setup(thread)
      thread:set("id", created)
      created = created + 1
    end
    function init(args)
      reqs = {}
      for _, name in ipairs(lists[id % #lists + 1]) do
        reqs[#reqs + 1] = wrk.format("GET", "/secrets/" .. name .. "?format=raw")
      end
      n = 0
    end
    function request()
      n = n % #reqs + 1
      return reqs[n]
    end
    function done(summary, latency, requests)
      local e = summary.errors
      io.write(string.format("answers=%d non2xx=%d connect=%d read=%d write=%d timeout=%d\\n",
        summary.requests, e.status, e.connect, e.read, e.write, e.timeout))
    end
    """
)
_COUNTS = re.compile(
    r"^answers=(\d+) non2xx=(\d+) connect=(\d+) read=(\d+) write=(\d+) timeout=(\d+)$", re.MULTILINE
)
_DENIALS = re.compile(
    r'^kms_agent_policy_denials_total\{reason="explicit_deny"\} ([\d.e+]+)$', re.MULTILINE
)


@dataclass(frozen=True)
class Shape:
    """One kind of load: the name lists of wrk's threads (one connection each, or all
    connections sharing one list when there is one thread); ``denied``: the policies agent
    refuses every request."""

    name: str
    lists: tuple[tuple[str, ...], ...]
    threads: int
    denied: bool = False


@dataclass(frozen=True)
class Run:
    """wrk at one agent (one slice, or a round's slices summed): answers, the agent's CPU."""

    answers: int
    non2xx: int
    socket_errors: int
    cpu_s: float
    wall_s: float

    @property
    def us_per_answer(self) -> float:
        return self.cpu_s / self.answers * 1e6 if self.answers else float("nan")

    @classmethod
    def total(cls, runs: list[Run]) -> Run:
        return cls(*(sum(getattr(r, f.name) for r in runs) for f in fields(cls)))


def shapes(secrets_count: int, connections: int) -> list[Shape]:
    names = [fill_name(i) for i in range(secrets_count)]
    own = tuple(tuple(names[i::connections]) for i in range(min(connections, secrets_count)))
    return [
        Shape("repeat", own, threads=len(own)),
        Shape("rotate", (tuple(names),), threads=1),
        Shape("denied", ((DENIED,),), threads=1, denied=True),
    ]


def lua(shape: Shape) -> str:
    lists = ", ".join("{" + ", ".join(json.dumps(n) for n in names) + "}" for names in shape.lists)
    return LUA.replace("{LISTS}", "{" + lists + "}")


def denials(metrics_url: str) -> int:
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        m = _DENIALS.search(resp.read().decode())
    return int(float(m.group(1))) if m else 0


def drive(
    servers: Servers, agent: str, shape: Shape, script: Path, connections: int, seconds: int
) -> Run:
    """wrk at ``agent`` for ``seconds``; the agent's CPU from /proc across exactly that run."""
    base = servers.urls[agent + ":base"]
    pid = servers.procs[agent].pid
    conns = max(connections, shape.threads)
    cpu0, wall0 = cpu_ticks([pid]), time.monotonic()
    out = subprocess.run(
        ["wrk", f"-t{shape.threads}", f"-c{conns}", f"-d{seconds}s", "-s", str(script),
         "-H", f"{DEFAULT_HEADER}: {TOKEN}", base + "/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cpu, wall = (cpu_ticks([pid]) - cpu0) / CLK_TCK, time.monotonic() - wall0
    m = _COUNTS.search(out)
    if m is None:
        sys.exit(f"policy_hits: wrk printed no counts:\n{out}")
    answers, non2xx, *errors = (int(g) for g in m.groups())
    return Run(answers, non2xx, sum(errors), cpu, wall)


def check(run: Run, shape: Shape, agent: str, denied: int, conns: int) -> list[str]:
    """What is wrong with a slice's answers: every hit a 200; every denial a policy's 403.

    The agent's denial count may run ahead of wrk's by the requests in flight when wrk
    stopped counting (at most one per connection)."""
    where = f"{shape.name} at {agent}"
    problems = []
    if run.socket_errors:
        problems.append(f"{where}: {run.socket_errors} socket errors")
    refused = shape.denied and agent == "policies"
    if refused and (run.non2xx != run.answers or not 0 <= denied - run.answers <= conns):
        problems.append(
            f"{where}: {run.answers} answers, {run.non2xx} non-2xx, {denied} policy denials"
        )
    if not refused and (run.non2xx or denied):
        problems.append(f"{where}: {run.non2xx} of {run.answers} answers not 2xx, {denied} denied")
    return problems


def write_tokens(path: Path) -> None:
    """The token file both agents read: the bench's caller and a few others, named."""
    lines = [
        f"{CALLER}:{TOKEN}",
        *(f"{name}:{secrets.token_urlsafe(24)}" for name in OTHER_CALLERS),
    ]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def measure(
    args: argparse.Namespace, servers: Servers, tmp: Path
) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    table: dict[str, dict[str, list[Run]]] = {}
    plan = shapes(args.secrets, args.connections)
    scripts = {}
    for shape in plan:
        scripts[shape.name] = tmp / f"{shape.name}.lua"
        scripts[shape.name].write_text(lua(shape))
        table[shape.name] = {"plain": [], "policies": []}
    agents = ["plain", "policies"]
    for shape in plan:  # warm: every entry cached, every connection's targets remembered
        for agent in agents:
            drive(servers, agent, shape, scripts[shape.name], args.connections, 1)
    for r in range(args.rounds):
        for shape in plan:
            slices: dict[str, list[Run]] = {agent: [] for agent in agents}
            for k in range(args.seconds):  # 1 s slices, A B B A ...: the same drift for both
                for agent in agents if (r + k) % 2 == 0 else reversed(agents):
                    metrics = servers.urls[agent + ":metrics"]
                    before = denials(metrics)
                    run = drive(servers, agent, shape, scripts[shape.name], args.connections, 1)
                    problems += check(
                        run, shape, agent, denials(metrics) - before, args.connections
                    )
                    slices[agent].append(run)
            for agent, runs in slices.items():
                run = Run.total(runs)
                table[shape.name][agent].append(run)
                print(f"  round {r + 1} {shape.name:<7} {agent:<9} {run.answers / run.wall_s:>8.0f}/s "
                      f"{run.us_per_answer:6.1f} us CPU each", flush=True)  # fmt: skip
    return table, problems


def report(
    table: dict[str, dict[str, list[Run]]], gated: set[str], max_ratio: float
) -> tuple[dict[str, Any], list[str]]:
    """Print the table; return the medians, and the ``gated`` shapes over ``max_ratio``."""
    print(f"\n{'round':<7}{'shape':<8}{'plain us/hit':>13}{'policies us':>13}{'ratio':>8}"
          f"{'plain /s':>10}{'policies /s':>13}")  # fmt: skip
    figures: dict[str, dict[str, float]] = {}
    over = []
    for shape, runs in table.items():
        rounds = len(runs["plain"])
        plain = runs["plain"]
        ratios = []
        for r in range(rounds):
            p, q = plain[r], runs["policies"][r]
            ratios.append(q.us_per_answer / p.us_per_answer)
            print(f"{r + 1:<7}{shape:<8}{p.us_per_answer:>13.1f}{q.us_per_answer:>13.1f}{ratios[-1]:>8.2f}"
                  f"{p.answers / p.wall_s:>10.0f}{q.answers / q.wall_s:>13.0f}")  # fmt: skip
        med = {
            "plain_us": statistics.median(x.us_per_answer for x in plain),
            "policies_us": statistics.median(x.us_per_answer for x in runs["policies"]),
            "ratio": statistics.median(ratios),
        }
        figures[shape] = med
        print(
            f"{'median':<7}{shape:<8}{med['plain_us']:>13.1f}{med['policies_us']:>13.1f}{med['ratio']:>8.2f}"
        )
        if shape in gated and med["ratio"] > max_ratio:
            over.append(f"{shape}: median ratio {med['ratio']:.2f} is over {max_ratio:g}")
    print("median: of each column; the ratio's is the median of the rounds' ratios. denied: "
          "us CPU per 403 with policies, against the plain agent's hit of the same secret")  # fmt: skip
    return figures, over


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5,
                        help="per shape and agent in a round, in 1 s slices alternating agents")  # fmt: skip
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--secrets", type=int, default=50, help="distinct secrets read")
    parser.add_argument("--max-ratio", type=float, default=1.5, help="policies / plain, per hit")
    args = parser.parse_args()
    if min(args.rounds, args.seconds, args.connections, args.secrets) < 1:
        sys.exit("policy_hits: --rounds, --seconds, --connections and --secrets must be above 0")
    if shutil.which("wrk") is None:
        sys.exit("policy_hits needs wrk: apt-get install wrk")
    tmp = Path(
        tempfile.mkdtemp(
            prefix="kms-policy-", dir="/dev/shm" if Path("/dev/shm").exists() else None
        )
    )
    servers = Servers(tmp, quick=True)
    tokens, plain, config = tmp / "tokens", tmp / "plain.toml", tmp / "policies.toml"
    write_tokens(tokens)
    plain.write_text("# the defaults: no [policies]\n")
    config.write_text(POLICIES)
    env = {TOKEN_ENV: f"file://{tokens}", "KMS_AGENT_CACHE_TTL": "86400"}  # no refresh mid-run
    try:
        servers.start_agent("plain", extra_env=env, config=plain, fill=args.secrets)
        servers.start_agent("policies", extra_env=env, config=config, fill=args.secrets)
        print(f"agents: plain pid {servers.procs['plain'].pid}, policies pid {servers.procs['policies'].pid}; "
              f"{args.rounds} rounds x {args.seconds:g} s per shape and agent, c={args.connections}, "
              f"{args.secrets} secrets", flush=True)  # fmt: skip
        table, problems = measure(args, servers, tmp)
    except KeyboardInterrupt:
        sys.exit("policy_hits: interrupted")
    finally:
        servers.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    hits = {s.name for s in shapes(args.secrets, args.connections) if not s.denied}
    figures, over = report(table, hits, args.max_ratio)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y%m%dT%H%M%S')}-policy-hits.json"
    path.write_text(json.dumps({
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "args": vars(args), "medians": figures,
        "runs": {s: {a: [vars(x) for x in runs] for a, runs in by.items()} for s, by in table.items()},
    }, indent=2))  # fmt: skip
    print(f"-> {path.relative_to(ROOT)}")
    for line in problems + over:
        print(f"FAIL: {line}")
    sys.exit(1 if problems or over else 0)


if __name__ == "__main__":
    main()
