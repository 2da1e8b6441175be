"""``kms-agent``: run the agent, manage the local store, read a secret from a shell."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import json
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kms_agent import __version__
from kms_agent import config as config_mod
from kms_agent.auth import TOKEN_FILE_NAME, new_token, token_variable
from kms_agent.config import Config, ListenAddress
from kms_agent.errors import AgentError, ConfigError
from kms_agent.policy import ACTIONS, GET_SECRET_VALUE
from kms_agent.providers.options import LocalOptions
from kms_agent.store import DEFAULT_KEY_ALIAS, LocalStore
from kms_agent_client import Client, ClientError, read_token_file

EXIT_OK = 0
EXIT_FAIL = 1  # not found, or the operation was refused
EXIT_ERROR = 2  # bad usage or config, agent unreachable, or it refused the request
#: How often ``health --wait`` asks /readyz again.
HEALTH_POLL_INTERVAL = 0.1


def _global_options() -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (``kms-agent check-config
    --config F`` and ``kms-agent --config F check-config``). Defaults are suppressed, so a
    subcommand that was not given one leaves the value given before it in place."""
    g = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    g.add_argument("--config", metavar="PATH", help="TOML config file (default: $KMS_AGENT_CONFIG)")
    g.add_argument("--data-dir", metavar="DIR", help="the local store's directory")
    g.add_argument("--runtime-dir", metavar="DIR", help="where the generated token file goes")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return g


def _parser() -> argparse.ArgumentParser:
    common = _global_options()
    p = argparse.ArgumentParser(
        prog="kms-agent", description="A local secrets sidecar.", parents=[common]
    )
    p.add_argument("--version", action="version", version=f"kms-agent {__version__}")
    sub = _Subparsers(p.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)

    run = sub.add_parser("run", help="serve secrets")
    run.add_argument(
        "--listen",
        metavar="[DIALECT@]ADDRESS",
        action="append",
        help="a secrets listener: HOST:PORT or unix:/PATH, optionally aws@, kms@ or vault@ "
        "(repeat for several)",
    )

    check = sub.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--show", action="store_true", help="print the effective configuration")

    get = sub.add_parser("get", help="ask the running agent for a secret; print its value")
    get.add_argument("name")
    get.add_argument("--version-id")
    get.add_argument("--version-stage")
    get.add_argument("--field", help="one key of a JSON secret")
    get.add_argument("--refresh", action="store_true", help="bypass the agent's cache")
    get.add_argument(
        "--token-file", metavar="PATH", help="default: $KMS_TOKEN, then the runtime dir"
    )
    get.add_argument("--agent", metavar="HOST:PORT", help="default: server.listen")
    get.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")

    doctor = sub.add_parser(
        "doctor", help="walk the troubleshooting order for one secret; say which step fails"
    )
    doctor.add_argument("name")
    doctor.add_argument("--json", action="store_true", help="machine-readable report")

    health = sub.add_parser(
        "health", help="exit 0 if the running agent reports ready (for probes and HEALTHCHECK)"
    )
    health.add_argument("--agent", metavar="HOST:PORT", help="default: metrics.listen")
    health.add_argument(
        "--timeout", type=float, default=3.0, metavar="SECONDS", help="one probe's deadline"
    )
    health.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="poll until ready for up to this long (exit 2 if it is not ready by then)",
    )

    store = sub.add_parser("store", help="manage the embedded local store")
    store.add_argument("--source", help="which local source (default: the first one)")
    ssub = _Subparsers(
        store.add_subparsers(dest="store_command", required=True, metavar="ACTION"), common
    )
    ssub.add_parser("init", help="create the store and its default key")
    put = ssub.add_parser("put", help="store a new version read from stdin")
    put.add_argument("name")
    put.add_argument("--binary", action="store_true", help="store the bytes as they are")
    put.add_argument(
        "--keep-newline", action="store_true", help="keep a trailing newline (text values)"
    )
    put.add_argument(
        "--allow-empty", action="store_true", help="store an empty value (refused otherwise)"
    )
    sget = ssub.add_parser("get", help="print a stored value")
    sget.add_argument("name")
    sget.add_argument("--version-id")
    sget.add_argument("--version-stage")
    desc = ssub.add_parser("describe", help="print a secret's versions and stages (no value)")
    desc.add_argument("name")
    lst = ssub.add_parser("list", help="print stored names")
    lst.add_argument("--prefix", default="")
    dele = ssub.add_parser("delete", help="delete a secret and all its versions")
    dele.add_argument("name")
    key = ssub.add_parser("key", help="the store's keys")
    key.add_argument("action", choices=["list", "delete", "disable"])
    key.add_argument("alias", nargs="?")

    policy = sub.add_parser("policy", help="the [policies] of the configuration")
    psub = _Subparsers(
        policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION"), common
    )
    pcheck = psub.add_parser(
        "check", help="would a caller be allowed this action on this secret? (exit 0 yes, 1 no)"
    )
    pcheck.add_argument(
        "--principal", action="append", required=True, metavar="P",
        help="the caller's principal (repeatable: a peer has a uid and groups), like "
        "k8s:payments:api, token:ci, unix:uid:1001",
    )  # fmt: skip
    pcheck.add_argument(
        "--action", default=GET_SECRET_VALUE, help=f"default {GET_SECRET_VALUE}; or one of "
        + ", ".join(a for a in ACTIONS if a != GET_SECRET_VALUE),
    )  # fmt: skip
    pcheck.add_argument("name", help="the secret's name, as a caller asks for it")

    token = sub.add_parser("token", help="caller tokens")
    tsub = _Subparsers(
        token.add_subparsers(dest="token_command", required=True, metavar="ACTION"), common
    )
    tnew = tsub.add_parser("new", help="print a new random token")
    tnew.add_argument(
        "--add-to", metavar="FILE", help="append it to this token file (mode 0640), for rotation"
    )
    return p


class _Subparsers:
    """``add_parser`` that gives every subcommand the global options too."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self._action = action
        self._common = common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._action.add_parser(
            name, parents=[self._common], **kwargs
        )
        return parser


def _load(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "runtime_dir", None):
        overrides["runtime_dir"] = args.runtime_dir
    if getattr(args, "log_level", None):
        overrides["logging"] = {"level": args.log_level}
    if getattr(args, "listen", None):
        overrides["server"] = {"listen": args.listen}
    return config_mod.load(getattr(args, "config", None), environ=environ, overrides=overrides)


def _log_to_stderr(cfg: Config, args: argparse.Namespace) -> None:
    """Commands other than ``run`` keep stdout for what they print (``doctor --json``,
    ``store get``): their log lines go to stderr, warnings and up unless --log-level says
    otherwise. A process that configured logging already (a test harness) keeps its own."""
    import structlog  # noqa: PLC0415

    from kms_agent import logging as agent_logging  # noqa: PLC0415

    if structlog.is_configured():
        return
    quiet = dataclasses.replace(cfg.logging, level="warning")
    # --log-level was applied to cfg by _load; without it the config's own level is for the agent
    chosen = cfg.logging if getattr(args, "log_level", None) else quiet
    agent_logging.configure(chosen, stream=sys.stderr)


def _err(message: str, hint: str | None = None) -> None:
    print(f"kms-agent: {message}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)


# --------------------------------------------------------------------------- run


def _cmd_run(cfg: Config, args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from kms_agent import logging as agent_logging  # noqa: PLC0415
    from kms_agent.agent import Agent  # noqa: PLC0415
    from kms_agent.systemd import harden  # noqa: PLC0415

    agent_logging.configure(cfg.logging)
    hardened = harden()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop  # noqa: PLC0415

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    structlog_log = agent_logging.get("kms_agent.cli")
    structlog_log.info("starting", version=__version__, config=cfg.path or None, **hardened)
    agent = Agent(cfg, loader=lambda: _load(args, environ), environ=environ)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(agent.run())
    return EXIT_OK


def _cmd_check_config(cfg: Config, args: argparse.Namespace) -> int:
    from kms_agent import providers  # noqa: PLC0415

    for source in cfg.sources:
        providers.create(source, cfg)  # validates the provider's own settings
    if args.show:
        print(json.dumps(_as_dict(cfg), indent=2, default=str))
    else:
        names = ", ".join(f"{s.name} ({s.provider})" for s in cfg.sources)
        policies = ", ".join(cfg.policies.policies) or "none (every token reads everything)"
        print(
            f"ok: {cfg.path or 'built-in defaults'}; listen {', '.join(cfg.server.listen)}; "
            f"sources: {names}; policies: {policies}"
        )
        for note in cfg.policies.notes:
            print(f"  note: {note}")
    return EXIT_OK


#: One rule for what ``--show`` never prints: the value of a key that names a credential
#: (a secret, token, password, passphrase, private key, JWT, Huawei's ``sk``)...
_CREDENTIAL_KEY = re.compile(
    r"secret|token|passw(or)?d|passphrase|private|credential|jwt|api_?key|(^|_)sk$", re.IGNORECASE
)
#: ...unless the key names where one is kept or a switch (a file, a variable, a URL, a flag).
_LOCATION_KEY = re.compile(
    r"(_file|_files|_env|_path|_dir|_endpoint|_uri|_url|_header|_headers)$|^generate_",
    re.IGNORECASE,
)
REDACTED = "[redacted]"


def _is_credential(key: object) -> bool:
    return (
        isinstance(key, str)
        and _CREDENTIAL_KEY.search(key) is not None
        and _LOCATION_KEY.search(key) is None
    )


def _as_dict(obj: Any, key: object = None) -> Any:
    """The config as JSON-able data, every credential-like value redacted."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _as_dict(getattr(obj, k), k) for k in obj.__dataclass_fields__}
    if isinstance(obj, Mapping):
        return {k: _as_dict(v, k) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_as_dict(v, key) for v in obj]
    if _is_credential(key) and not isinstance(obj, bool) and obj not in (None, ""):
        return REDACTED
    return obj


# --------------------------------------------------------------------------- get


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _read_token(args: argparse.Namespace, cfg: Config, environ: Mapping[str, str]) -> str:
    path: Path | None = Path(args.token_file) if args.token_file else None
    if path is None:
        _, value = token_variable(cfg.auth.token_env, environ)
        if value is not None and value.startswith("file://"):
            path = Path(value[len("file://") :])
        elif value is not None:
            return value.strip().splitlines()[0]
    if path is None:
        path = (
            Path(cfg.auth.token_files[0])
            if cfg.auth.token_files
            else cfg.runtime_path / TOKEN_FILE_NAME
        )
    return read_token_file(path, hint="pass --token-file, or set $KMS_TOKEN")


def _cmd_get(cfg: Config, args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        token = _read_token(args, cfg, environ)
    except ClientError as exc:
        raise ConfigError(exc.message, hint=exc.hint) from None
    target = config_mod.parse_listen(args.agent, "--agent") if args.agent else cfg.server.address
    address, header = str(target.dialable), cfg.auth.headers[0]
    with Client(address, token=token, header=header, timeout=args.timeout) as agent:
        try:
            value = agent.get(
                args.name,
                version_id=args.version_id or None,
                version_stage=args.version_stage or None,
                field=args.field or None,
                refresh=args.refresh,
            )
        except ClientError as exc:
            _err(f"{exc.message} ({exc.code or exc.status})", exc.hint)
            return EXIT_FAIL if exc.not_found else EXIT_ERROR
    sys.stdout.buffer.write(value)
    sys.stdout.buffer.flush()
    return EXIT_OK


def _connect(target: ListenAddress, timeout: float) -> http.client.HTTPConnection:
    if target.unix_path:
        return _UnixConnection(target.unix_path, timeout)
    dial = target.dialable
    return http.client.HTTPConnection(dial.host, dial.port, timeout=timeout)


def _cmd_doctor(cfg: Config, args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from kms_agent import doctor  # noqa: PLC0415

    report = asyncio.run(doctor.diagnose(cfg, args.name, environ))
    print(json.dumps(report, indent=2) if args.json else doctor.render(report))
    return EXIT_OK if report["ok"] else EXIT_FAIL


def _probe(target: ListenAddress, timeout: float) -> tuple[bool | None, str]:
    """One GET /readyz: (True, "") when ready, (False, why) when it answered not ready,
    (None, why) when nothing answered."""
    conn = _connect(target, timeout)
    try:
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return None, f"the agent at {target} is unreachable ({type(exc).__name__})"
    finally:
        conn.close()
    if resp.status == 200:
        return True, ""
    try:
        reason = str(json.loads(body).get("reason") or f"HTTP {resp.status}")
    except (ValueError, AttributeError):
        reason = body.decode(errors="replace")
    return False, " ".join(reason.split())[:200]


def _cmd_health(cfg: Config, args: argparse.Namespace) -> int:
    if args.agent:
        target = config_mod.parse_listen(args.agent, "--agent")
    else:
        metrics = cfg.metrics.address
        target = metrics if metrics is not None else cfg.server.address
    deadline = time.monotonic() + (args.wait or 0.0)
    while True:
        remaining = deadline - time.monotonic()
        probe_timeout = (
            args.timeout if args.wait is None else max(0.05, min(args.timeout, remaining))
        )
        ready, reason = _probe(target, probe_timeout)
        if ready:
            print("ready")
            return EXIT_OK
        if args.wait is None:
            _err(reason if ready is None else f"not ready: {reason}")
            return EXIT_ERROR if ready is None else EXIT_FAIL
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _err(f"not ready after {args.wait:g} s: {reason}")
            return EXIT_ERROR
        time.sleep(min(HEALTH_POLL_INTERVAL, remaining))  # nothing to await: poll


# --------------------------------------------------------------------------- store


def _store(cfg: Config, args: argparse.Namespace) -> LocalStore:
    local = [s for s in cfg.sources if s.provider == "local"]
    if args.source:
        chosen = [s for s in local if s.name == args.source]
        if not chosen:
            raise ConfigError(
                f"--source {args.source!r} is not a local source",
                hint=f"local sources: {', '.join(s.name for s in local) or 'none'}",
            )
        local = chosen
    if local:
        where = f"sources.{local[0].name}"
        path = LocalOptions.of(local[0].options).directory(cfg.data_dir, where)
        return LocalStore(Path(path), source=local[0].name)
    return LocalStore(cfg.data_path)


def _cmd_store(cfg: Config, args: argparse.Namespace) -> int:
    store = _store(cfg, args)
    action = args.store_command
    if action == "init":
        info = store.init()
        print(f"store {store.root}: default key {info.alias} ({info.key_id})")
        return EXIT_OK
    if action == "put":
        if sys.stdin.isatty():
            print("reading the value from stdin; end with Ctrl-D", file=sys.stderr)
        value = sys.stdin.buffer.read()
        if not args.binary and not args.keep_newline:
            value = value.removesuffix(b"\n").removesuffix(b"\r")
        if not value and not args.allow_empty:
            _err(
                f"refusing to store an empty value for {args.name!r}: stdin was empty",
                f"pipe the value in (kms-agent store put {shlex.quote(args.name)} < value-file), "
                "or pass --allow-empty to store an empty secret on purpose",
            )
            return EXIT_FAIL
        store.init()
        vid = store.put(args.name, value, data_type="binary" if args.binary else "text")
        print(f"stored {args.name} version {vid}", file=sys.stderr)
        return EXIT_OK
    if action == "get":
        record = store.get(args.name, version_id=args.version_id, version_stage=args.version_stage)
        sys.stdout.buffer.write(record.value.reveal())
        sys.stdout.buffer.flush()
        return EXIT_OK
    if action == "describe":
        meta = store.describe(args.name)
        print(
            json.dumps(
                {
                    "name": meta.name,
                    "versions": [
                        {"version_id": vid, "stages": list(stages)} for vid, stages in meta.versions
                    ],
                },
                indent=2,
            )
        )
        return EXIT_OK
    if action == "list":
        for name in store.list_names(args.prefix):
            print(name)
        return EXIT_OK
    if action == "delete":
        if not store.delete(args.name):
            _err(f"secret {args.name!r} does not exist")
            return EXIT_FAIL
        print(f"deleted {args.name}", file=sys.stderr)
        return EXIT_OK
    return _cmd_key(store, args)


def _cmd_key(store: LocalStore, args: argparse.Namespace) -> int:
    info = store.key_info()
    if args.action == "list":
        print(
            f"{info.alias}\t{info.key_id}\tEnabled\t"
            "default key (usable; cannot be deleted or disabled)"
        )
        return EXIT_OK
    if not args.alias:
        _err(f"store key {args.action} needs a key alias")
        return EXIT_ERROR
    if args.alias in (DEFAULT_KEY_ALIAS, info.key_id):
        _err(
            f"refusing to {args.action} {DEFAULT_KEY_ALIAS}: it is the store's default key, "
            "which can be used but never deleted or disabled",
            "every stored secret is sealed under it",
        )
        return EXIT_FAIL
    _err(f"no key {args.alias!r} in this store; it has only {DEFAULT_KEY_ALIAS}")
    return EXIT_FAIL


def _cmd_policy(cfg: Config, args: argparse.Namespace) -> int:
    """``policy check``: the decision and the statement that made it."""
    policies = cfg.policies
    if not policies.enabled:
        print(f"allow: no [policies] in {cfg.path or 'the configuration'}: every caller with a "
              "valid token may read every secret")  # fmt: skip
        return EXIT_OK
    if args.action.lower() not in {a.lower() for a in ACTIONS}:
        _err(f"--action {args.action!r} is not an action", "one of " + ", ".join(ACTIONS))
        return EXIT_ERROR
    decision = policies.decide(tuple(args.principal), args.action, args.name)
    who = ", ".join(args.principal)
    if decision.allowed:
        print(f"allow: {who} may {args.action} {args.name!r}: {decision.statement}")
        return EXIT_OK
    if decision.reason == "explicit_deny":
        print(f"deny: {who} may not {args.action} {args.name!r}: denied by {decision.statement}")
    else:
        print(f"deny: {who} may not {args.action} {args.name!r}: no statement allows it")
    if decision.hint:
        print(f"  hint: {decision.hint}")
    return EXIT_FAIL


def _cmd_token(args: argparse.Namespace) -> int:
    token = new_token()
    if args.add_to:
        path = Path(args.add_to)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(token + "\n")
        print(f"added a token to {path}", file=sys.stderr)
    print(token)
    return EXIT_OK


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        if args.command == "token":
            return _cmd_token(args)
        cfg = _load(args, env)
        if args.command == "run":
            return _cmd_run(cfg, args, env)
        if args.command in ("check-config", "doctor", "store"):
            _log_to_stderr(cfg, args)
        if args.command == "check-config":
            return _cmd_check_config(cfg, args)
        if args.command == "get":
            return _cmd_get(cfg, args, env)
        if args.command == "health":
            return _cmd_health(cfg, args)
        if args.command == "doctor":
            return _cmd_doctor(cfg, args, env)
        if args.command == "policy":
            return _cmd_policy(cfg, args)
        return _cmd_store(cfg, args)
    except ConfigError as exc:
        _err(exc.message, exc.hint)
        return EXIT_ERROR
    except AgentError as exc:
        _err(exc.message, exc.hint)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
