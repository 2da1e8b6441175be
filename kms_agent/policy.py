"""Least privilege per caller: identity policies over secret names (issue 15).

One agent may serve several containers; each caller is known by one or more *principals*
and may only do what a policy grants it. Policies are written in the grammar of the
clouds' identity policies, so an operator who knows AWS IAM or Alibaba RAM can read them.
This module parses and checks them once, at load, and answers "may these principals do
this to that secret?" fast enough to sit on the cache-hit path of every request.

Principals (built with :func:`token_principal`, :func:`peer_principals` and
:func:`service_account_principal`, the only place their spelling is made)::

    token:<name>                    a named caller token
    unix:uid:<uid>                  a Unix-socket peer's uid ...
    unix:gid:<group>                ... and one of these per group it is in
    k8s:<namespace>:<serviceaccount> a Kubernetes service account

Configuration (``[policies]``: policy name -> the document alone as a JSON string, or a
table with ``document`` (a JSON string or a table) and optionally ``attach``)::

    [policies]
    # Statements that name their principals: the document alone.
    payments = '''
    {"Version": "2017-10-17", "Statement": [
      {"Sid": "Read", "Effect": "Allow", "Principal": "k8s:payments:*",
       "Action": ["kms:GetSecretValue", "kms:Describe*"], "Resource": "secret/payments/*"},
      {"Sid": "NeverRoot", "Effect": "Deny", "Principal": "*", "Action": "kms:*",
       "Resource": "secret/payments/root"}]}
    '''

    # A policy attached to principals: its statements carry no Principal.
    [policies.readers]
    attach = ["unix:gid:kms-readers", "token:ci-*"]
    document = { Statement = [
      { Effect = "Allow", Action = "kms:GetSecretValue", Resource = "secret/shared/**" } ] }

A statement holds ``Effect`` (``Allow`` or ``Deny``, exact case), ``Action`` and
``Resource`` (a string or a list), ``Principal`` (a string or a list; required unless the
policy has ``attach``, refused when it has) and an optional ``Sid`` (unique within its
document). A document holds ``Statement`` (a non-empty list, or one statement object, as
AWS accepts) and optionally ``Version`` (one of :data:`VERSIONS`). Anything else is an
error naming its dotted path, like ``policies.payments.Statement[1].Actoin``; so is a
duplicated JSON key (JSON parsers keep the last one silently).

Actions are :data:`ACTIONS`. Action patterns are globs (``*`` any run, ``?`` one
character), case-insensitive as in IAM, resolved against the known actions at load; one
that matches none is an error with the nearest action (``kms:GetSecretVal`` is a typo,
not a statement that silently grants nothing).

Resources name a secret as the agent routes it, in two forms:

* ``secret/<name>``: the native form;
* ``acs:kms:<region>:<account>:secret/<name>``: Alibaba's ARN form; region and account
  are globs of their own field, and ``acs:kms:<region>:<account>:*`` means every secret
  there. A region or account other than ``*`` can only be checked when the request's ARN
  is known (an Alibaba source, or a name given as an ARN).

``Resource: "*"`` (or ``"**"``) alone means every secret, as in IAM. Resources are
case-sensitive: secret names are.

Globs in a Resource name: ``*`` matches any run of characters except ``/``, ``!`` and
``:``; ``**`` matches any run including them; ``?`` matches one character other than
those three. So ``secret/mcp!*`` matches ``mcp!token`` but not ``mcp!a/b``,
``secret/payments/*`` matches ``payments/x`` but not ``payments/x/y``, and ``secret/*``
matches ``db-password`` but neither ``aigw!x`` nor ``prod/db``; ``secret/**`` matches
every name.

Why not IAM's rule (where ``*`` crosses ``/``)? Both rules have one silent failure.
With IAM's, an Allow of ``secret/payments/*`` written by someone who thinks in paths
also grants ``payments/admin/root``; nothing can detect that, because it is what the
pattern means. With this rule, an Allow copied from IAM or RAM grants *less* than its
author expected, which fails loudly (a 403 whose hint, :attr:`Decision.hint`, names the
statement and suggests ``**``), and a Deny copied from IAM denies less, which is silent
but detectable at load: every Deny whose Resource holds a single ``*`` is reported in
:attr:`PolicySet.notes` for ``check-config`` to print. Secret names here are
hierarchical (``payments/admin/root``; Alibaba's ``<product>!<secret>``), grants should
stop at the level they name, and ``**`` says "and everything below" explicitly. ``:``
stops a ``*`` because it separates an ARN's fields. (A source's ``match`` globs are
routing, not grants: there ``*`` crosses everything, as in fnmatch.)

Names given as ARNs: a name that is an Alibaba secret ARN is matched as its secret name
with that ARN's region and account; a name that is an AWS Secrets Manager ARN as its
secret name, and, when it ends in AWS's random ``-XXXXXX`` suffix, also as the name
without it (a full ARN could be either). A request is decided for every secret it could
denote: denied if a Deny matches any of them, allowed only if an Allow matches each of
them. An unknown ARN is treated the same way: a Deny's region and account are ignored
(the secret could be there), an Allow's must be ``*`` (it could be anywhere else).

Evaluation: a statement applies when one of its principal patterns matches one of the
caller's principals (a peer has its uid's and every group's) and one of its actions is
the one asked. An applicable Deny whose Resource matches wins over any Allow; else an
applicable matching Allow allows; else it is denied (``no_allow``). The
:class:`Decision` names the statement that decided (its dotted path and Sid).

Listing: the list route is allowed (:meth:`PolicySet.decide_list`) when an Allow of
``kms:ListSecrets`` applies to the caller, unless a Deny of it covers every secret; a
listed name is shown (:meth:`PolicySet.may_list`) only when ``kms:ListSecrets`` *and*
either ``kms:GetSecretValue`` or ``kms:DescribeSecret`` are allowed on it. A caller who
may read a secret already knows its name, and one who may describe it may see it exists;
requiring DescribeSecret alone would hide from lists the secrets that the usual
read-only policies (GetSecretValue only) grant.

Speed: globs are compiled to ``re`` patterns at load (fnmatch's have no separators), a
statement's patterns joined into one; the statements that apply to a principals tuple
are found once per tuple (a bounded memo) and split by action; decisions are memoised
per (principals, action, name, ARN) in a bounded dict cleared when full. An empty
:class:`PolicySet` (no ``[policies]``) has ``enabled = False`` and allows everything.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from kms_agent.errors import ConfigError
from kms_agent.model import ALIBABA_NAMES, AWS_NAMES, NameRule

GET_SECRET_VALUE: Final = "kms:GetSecretValue"  # noqa: S105 (an action name)
LIST_SECRETS: Final = "kms:ListSecrets"
DESCRIBE_SECRET: Final = "kms:DescribeSecret"  # noqa: S105 (an action name)
#: Every action a statement can grant or deny.
ACTIONS: Final = (GET_SECRET_VALUE, LIST_SECRETS, DESCRIBE_SECRET)
#: The ``Version`` strings accepted (IAM's two, RAM's).
VERSIONS: Final = ("2012-10-17", "2017-10-17", "1")
#: Decisions remembered (cleared when full): the cache-hit path asks the same few.
MEMO_ENTRIES: Final = 4096
#: Principals tuples whose applicable statements are remembered.
VIEW_ENTRIES: Final = 256
RESOURCE_PREFIX: Final = "secret/"
ARN_PREFIX: Final = "acs:kms:"

Reason = Literal["allow", "explicit_deny", "no_allow"]

_POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SEGMENT = re.compile(r"[^\s:\x00-\x1f\x7f]+")
_REGION = re.compile(r"[a-z0-9*?-]+")
_ACCOUNT = re.compile(r"[0-9*?]+")
_GLOB_PARTS = re.compile(r"\*\*|\*|\?|[^*?]+")
_SINGLE_STAR = re.compile(r"(?<!\*)\*(?!\*)")
_AWS_SUFFIX = re.compile(r"-[A-Za-z0-9]{6}")
_DOCUMENT_KEYS = ("Version", "Statement")
_STATEMENT_KEYS = ("Sid", "Effect", "Principal", "Action", "Resource")
_POLICY_KEYS = ("document", "attach")
_UNSUPPORTED = ("NotAction", "NotResource", "NotPrincipal", "Condition")
_ACTION_BY_LOWER = {a.lower(): a for a in ACTIONS}


def _arn_rule(rule: NameRule) -> re.Pattern[str]:
    assert rule.arn is not None
    return rule.arn


#: Names that are ARNs: the name rules' own patterns.
_ALIBABA_ARN = _arn_rule(ALIBABA_NAMES)
_AWS_ARN = _arn_rule(AWS_NAMES)
#: One character of a name glob's ``*`` and ``?``: anything but the separators.
_NAME_CHAR = "[^/!:]"
_PRINCIPAL_CHAR = "[^:]"
_PRINCIPAL_FORMS = (
    "token:<name>, unix:uid:<uid>, unix:gid:<group>, k8s:<namespace>:<serviceaccount> or *"
)
_RESOURCE_FORMS = "secret/<name>, acs:kms:<region>:<account>:secret/<name> or *"


# --------------------------------------------------------------------------- principals


def token_principal(name: str) -> str:
    """The principal of the caller token named ``name``."""
    return f"token:{name}"


def peer_principals(uid: int, groups: Iterable[str]) -> tuple[str, ...]:
    """The principals of a Unix-socket peer: its uid's, then one per group it is in."""
    return (f"unix:uid:{uid}", *(f"unix:gid:{group}" for group in groups))


def service_account_principal(namespace: str, name: str) -> str:
    """The principal of a Kubernetes service account."""
    return f"k8s:{namespace}:{name}"


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one request. ``statement`` names the one that decided (its dotted
    path and Sid), None when none did (``no_allow``, or no policies at all); ``hint`` says
    what would change a ``no_allow``."""

    allowed: bool
    reason: Reason
    statement: str | None = None
    hint: str | None = None


def _decided(reason: Reason, statement: str | None = None, hint: str | None = None) -> Decision:
    return Decision(allowed=reason == "allow", reason=reason, statement=statement, hint=hint)


#: What a disabled policy set answers to everything.
UNRESTRICTED = Decision(allowed=True, reason="allow")


@dataclass(frozen=True, slots=True)
class _Statement:
    """One statement, compiled. ``names`` matches a name anywhere; ``placed`` pairs a
    region-and-account pattern (over ``"<region>:<account>"``) with a name pattern."""

    label: str
    deny: bool
    actions: frozenset[str]
    principals: re.Pattern[str] | None  # None: every principal
    names: re.Pattern[str] | None
    placed: tuple[tuple[re.Pattern[str], re.Pattern[str]], ...]
    #: A Resource that covers every secret everywhere.
    covers_all: bool
    #: Each Resource as written with its name glob widened to IAM's ``*``: for hints.
    widened: tuple[tuple[str, re.Pattern[str]], ...]

    def applies_to(self, principals: Sequence[str]) -> bool:
        pattern = self.principals
        return pattern is None or any(pattern.fullmatch(p) for p in principals)

    def matches(self, name: str, place: str | None) -> bool:
        if self.names is not None and self.names.fullmatch(name):
            return True
        if place is None:  # where the secret is is unknown: it could be anywhere
            return self.deny and any(n.fullmatch(name) for _, n in self.placed)
        return any(p.fullmatch(place) and n.fullmatch(name) for p, n in self.placed)


#: For one principals tuple: each action's applicable (denies, allows).
_View = dict[str, tuple[tuple[_Statement, ...], tuple[_Statement, ...]]]


def _judge(
    denies: Sequence[_Statement],
    allows: Sequence[_Statement],
    names: Sequence[str],
    place: str | None,
) -> tuple[Reason, _Statement | None]:
    """The rule: a matching Deny of any denoted name wins; else each name needs an Allow."""
    for statement in denies:
        for name in names:
            if statement.matches(name, place):
                return "explicit_deny", statement
    chosen: _Statement | None = None
    for name in names:
        for statement in allows:
            if statement.matches(name, place):
                chosen = chosen or statement
                break
        else:
            return "no_allow", None
    return "allow", chosen


def _denoted(resource_name: str, arn: str | None) -> tuple[tuple[str, ...], str | None]:
    """The secret names a request could mean, and ``"<region>:<account>"`` if known."""
    place: str | None = None
    names: tuple[str, ...] = (resource_name,)
    if resource_name.startswith(ARN_PREFIX) and _ALIBABA_ARN.fullmatch(resource_name):
        head, _, name = resource_name.partition(":secret/")
        place, names = head[len(ARN_PREFIX) :], (name,)
    elif resource_name.startswith("arn:") and _AWS_ARN.fullmatch(resource_name):
        name = resource_name.partition(":secret:")[2]
        suffix = _AWS_SUFFIX.fullmatch(name, len(name) - 7) if len(name) > 7 else None
        names = (name, name[:-7]) if suffix is not None else (name,)
    if arn is not None and arn.startswith(ARN_PREFIX) and _ALIBABA_ARN.fullmatch(arn):
        place = arn.partition(":secret/")[0][len(ARN_PREFIX) :]
    return names, place


class PolicySet:
    """Every configured policy, compiled; answers :meth:`decide`. Build it with
    :meth:`from_config`; a reload builds a new one (and so a fresh memo)."""

    def __init__(
        self,
        statements: Sequence[_Statement] = (),
        *,
        policies: Sequence[str] = (),
        notes: Sequence[str] = (),
    ) -> None:
        self._statements = tuple(statements)
        #: The configured policy names, in order.
        self.policies = tuple(policies)
        #: Things that load but may not mean what their author meant (for check-config).
        self.notes = tuple(notes)
        #: False when no policy is configured: the pipeline skips the policy step.
        self.enabled = bool(self.policies)
        self._memo: dict[tuple[tuple[str, ...], str, str, str | None], Decision] = {}
        self._memo_max = MEMO_ENTRIES
        self._views: dict[tuple[str, ...], _View] = {}

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], where: str = "policies") -> PolicySet:
        """Build from the ``[policies]`` table; raise :class:`ConfigError` naming the key."""
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"{where}: expected a table of named policies, like [{where}.NAME], got {raw!r}"
            )
        statements: list[_Statement] = []
        notes: list[str] = []
        for name, value in raw.items():
            key = f"{where}.{name}"
            if not isinstance(name, str) or not _POLICY_NAME.fullmatch(name):
                raise ConfigError(
                    f"{key}: a policy name is 1-64 letters, digits, - or _, starting with a "
                    "letter or digit"
                )
            document, doc_where, attach = _policy_table(value, key)
            statements.extend(_document(document, doc_where, attach, notes))
        return cls(statements, policies=list(raw), notes=notes)

    def __repr__(self) -> str:
        return f"PolicySet(policies={self.policies!r}, statements={len(self._statements)})"

    # ------------------------------------------------------------------ answering

    def decide(
        self,
        principals: Sequence[str],
        action: str,
        resource_name: str,
        arn: str | None = None,
    ) -> Decision:
        """May a caller with ``principals`` do ``action`` on the secret ``resource_name``
        (as routed; may itself be an ARN)? ``arn``: its Alibaba ARN, when known."""
        if not self.enabled:
            return UNRESTRICTED
        key = (tuple(principals), action, resource_name, arn)
        decision = self._memo.get(key)
        if decision is None:
            decision = self._evaluate(key[0], action, resource_name, arn)
            if len(self._memo) >= self._memo_max:
                self._memo.clear()
            self._memo[key] = decision
        return decision

    def decide_list(self, principals: Sequence[str]) -> Decision:
        """May the caller use the list route at all (which names it sees: :meth:`may_list`)?"""
        if not self.enabled:
            return UNRESTRICTED
        denies, allows = self._view(tuple(principals))[LIST_SECRETS]
        for statement in denies:
            if statement.covers_all:
                return _decided("explicit_deny", statement.label)
        if allows:
            return _decided("allow", allows[0].label)
        return _decided("no_allow", hint=_no_statement_hint(LIST_SECRETS, principals))

    def may_list(
        self,
        principals: Sequence[str],
        *,
        region: str | None = None,
        account: str | None = None,
    ) -> Callable[[str], bool]:
        """A predicate over listed names: shown when ListSecrets and either GetSecretValue
        or DescribeSecret are allowed on it. ``region`` and ``account``: the listed
        source's, when it is an Alibaba one (so ARN-form statements can be checked)."""
        if not self.enabled:
            return _everything
        view = self._view(tuple(principals))
        place = f"{region}:{account}" if region and account else None
        lister, getter, describer = (view[action] for action in ACTIONS_LISTED)

        def shown(name: str) -> bool:
            names = (name,)
            return _judge(*lister, names, place)[0] == "allow" and (
                _judge(*getter, names, place)[0] == "allow"
                or _judge(*describer, names, place)[0] == "allow"
            )

        return shown

    # ------------------------------------------------------------------ internals

    def _view(self, principals: tuple[str, ...]) -> _View:
        view = self._views.get(principals)
        if view is None:
            applicable = [s for s in self._statements if s.applies_to(principals)]
            view = {
                action: (
                    tuple(s for s in applicable if s.deny and action in s.actions),
                    tuple(s for s in applicable if not s.deny and action in s.actions),
                )
                for action in ACTIONS
            }
            if len(self._views) >= VIEW_ENTRIES:
                self._views.clear()
            self._views[principals] = view
        return view

    def _evaluate(
        self, principals: tuple[str, ...], action: str, resource_name: str, arn: str | None
    ) -> Decision:
        canonical = _ACTION_BY_LOWER.get(action.lower())
        if canonical is None:
            return _decided("no_allow", hint=f"{action!r} is not one of {_actions()}")
        denies, allows = self._view(principals)[canonical]
        names, place = _denoted(resource_name, arn)
        reason, statement = _judge(denies, allows, names, place)
        if reason == "no_allow":
            return _decided(reason, hint=_miss_hint(allows, canonical, names, principals))
        assert statement is not None
        return _decided(reason, statement.label)


#: The actions :meth:`PolicySet.may_list` asks, in the order it unpacks them.
ACTIONS_LISTED: Final = (LIST_SECRETS, GET_SECRET_VALUE, DESCRIBE_SECRET)


def _everything(_name: str) -> bool:
    return True


def _actions() -> str:
    return ", ".join(ACTIONS)


def _no_statement_hint(action: str, principals: Sequence[str]) -> str:
    who = ", ".join(principals) or "no principal"
    return f"no policy statement allows {action} to {who}"


def _miss_hint(
    allows: Sequence[_Statement], action: str, names: Sequence[str], principals: Sequence[str]
) -> str:
    if not allows:
        return _no_statement_hint(action, principals)
    for statement in allows:
        for written, wide in statement.widened:
            if any(wide.fullmatch(name) for name in names):
                return (
                    f"{statement.label} allows {written!r}, but there * stops at '/', '!' and "
                    f"':'; write {_widen_text(written)!r} to include {RESOURCE_PREFIX}{names[0]}"
                )
    return f"statements allow {action} to this caller, but none on {RESOURCE_PREFIX}{names[0]}"


def _widen_text(written: str) -> str:
    """A Resource with its name glob's single ``*`` made ``**`` (the region's untouched)."""
    head, sep, glob = written.rpartition(RESOURCE_PREFIX)
    return head + sep + _SINGLE_STAR.sub("**", glob)


# --------------------------------------------------------------------------- loading


def _policy_table(value: Any, key: str) -> tuple[Any, str, tuple[str, ...] | None]:
    """``(document, its dotted path, attach)`` from one ``policies.NAME`` value."""
    if isinstance(value, str):
        return _json_document(value, key), key, None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{key}: expected a policy document as a JSON string, or a table with "
            "document (and optionally attach)"
        )
    _known_keys(value, _POLICY_KEYS, key)
    if "document" not in value:
        raise ConfigError(f"{key}.document: missing; give the policy document (JSON or a table)")
    doc_where = f"{key}.document"
    document = value["document"]
    if isinstance(document, str):
        document = _json_document(document, doc_where)
    attach: tuple[str, ...] | None = None
    if "attach" in value:
        attach, keys = _strings(value["attach"], f"{key}.attach", "principal patterns")
        for pattern, item_key in zip(attach, keys, strict=True):
            _check_principal(pattern, item_key)
    return document, doc_where, attach


def _json_document(text: str, key: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{key}: the JSON key {exc.key!r} appears twice in one object") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{key}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _known_keys(table: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            what = "is not supported by kms-agent" if key in _UNSUPPORTED else "unknown key"
            raise ConfigError(f"{where}.{key}: {what}; expected one of {', '.join(allowed)}")


def _strings(value: Any, key: str, what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A string or a non-empty list of non-empty strings, and each one's dotted key."""
    if isinstance(value, str) and value:
        return (value,), (key,)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected {what}: a string or a non-empty list of strings")
    return tuple(value), tuple(f"{key}[{i}]" for i in range(len(value)))


def _document(
    document: Any, where: str, attach: tuple[str, ...] | None, notes: list[str]
) -> list[_Statement]:
    if not isinstance(document, Mapping):
        raise ConfigError(f"{where}: a policy document is an object with Version and Statement")
    _known_keys(document, _DOCUMENT_KEYS, where)
    if "Version" in document and document["Version"] not in VERSIONS:
        allowed = ", ".join(repr(v) for v in VERSIONS)
        raise ConfigError(
            f"{where}.Version: {document['Version']!r} is not allowed; use one of {allowed} "
            "or leave it out"
        )
    raw = document.get("Statement")
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.Statement: expected a non-empty list of statements")
    out: list[_Statement] = []
    sids: set[str] = set()
    for i, statement in enumerate(raw):
        out.append(_statement(statement, f"{where}.Statement[{i}]", attach, sids, notes))
    return out


def _statement(
    raw: Any, where: str, attach: tuple[str, ...] | None, sids: set[str], notes: list[str]
) -> _Statement:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: a statement is an object with Effect, Action and Resource")
    _known_keys(raw, _STATEMENT_KEYS, where)
    for required in ("Effect", "Action", "Resource"):
        if required not in raw:
            raise ConfigError(f"{where}.{required}: missing; every statement needs it")
    effect = raw["Effect"]
    if effect not in ("Allow", "Deny"):
        raise ConfigError(f"{where}.Effect: {effect!r} is not allowed; use 'Allow' or 'Deny'")
    sid = raw.get("Sid")
    if sid is not None:
        if not isinstance(sid, str) or not _SID.fullmatch(sid):
            raise ConfigError(f"{where}.Sid: {sid!r} must be 1-128 letters, digits, _ . or -")
        if sid in sids:
            raise ConfigError(f"{where}.Sid: {sid!r} is used by another statement of this policy")
        sids.add(sid)
    if attach is None:
        if "Principal" not in raw:
            raise ConfigError(
                f"{where}.Principal: missing; name the principals, or attach the policy to "
                "them with attach = [...] beside its document"
            )
        principals = _principal_value(raw["Principal"], f"{where}.Principal")
    elif "Principal" in raw:
        raise ConfigError(
            f"{where}.Principal: this policy is attached (attach = [...]); its statements "
            "take no Principal"
        )
    else:
        principals = attach
    actions, action_keys = _strings(raw["Action"], f"{where}.Action", "actions")
    resources, resource_keys = _strings(raw["Resource"], f"{where}.Resource", "resources")
    deny = effect == "Deny"
    compiled = [_resource(r, k) for r, k in zip(resources, resource_keys, strict=True)]
    if deny:
        for text, key, (_, _, _, single) in zip(resources, resource_keys, compiled, strict=True):
            if single:
                notes.append(
                    f"{key}: {text!r} in a Deny: its * stops at '/', '!' and ':', so deeper "
                    f"names stay allowed; write {_widen_text(text)!r} to deny them too"
                )
    anywhere = [name for place, name, _, _ in compiled if place is None]
    label = where if sid is None else f"{where} (Sid {sid})"
    return _Statement(
        label=label,
        deny=deny,
        actions=frozenset(
            action
            for pattern, key in zip(actions, action_keys, strict=True)
            for action in _action(pattern, key)
        ),
        principals=_principals_pattern(principals),
        names=_union(anywhere) if anywhere else None,
        placed=tuple(
            (re.compile(place), re.compile(name)) for place, name, _, _ in compiled if place
        ),
        covers_all=any(place is None and name == ".*" for place, name, _, _ in compiled),
        widened=tuple(
            (text, re.compile(wide))
            for text, (_, _, wide, _) in zip(resources, compiled, strict=True)
        ),
    )


def _principal_value(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, Mapping):
        raise ConfigError(
            f'{key}: give a principal or a list of them, like "k8s:payments:*", '
            'not an object like {"AWS": ...}'
        )
    principals, keys = _strings(value, key, "principal patterns")
    for pattern, item_key in zip(principals, keys, strict=True):
        _check_principal(pattern, item_key)
    return principals


def _check_principal(pattern: str, key: str) -> None:
    if pattern == "*":
        return
    parts = pattern.split(":")
    kind = parts[0]
    shape_ok = (
        (kind == "token" and len(parts) == 2)
        or (kind == "unix" and len(parts) == 3 and parts[1] in ("uid", "gid"))
        or (kind == "k8s" and len(parts) == 3)
    )
    if not shape_ok or not all(_SEGMENT.fullmatch(p) for p in parts) or "**" in pattern:
        raise ConfigError(
            f"{key}: {pattern!r} is not a principal pattern; use {_PRINCIPAL_FORMS} "
            "(a * stays within one segment: k8s:*:* is every service account)"
        )


def _principals_pattern(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if "*" in patterns:
        return None
    return _union([_glob(p, _PRINCIPAL_CHAR) for p in patterns])


def _action(pattern: str, key: str) -> frozenset[str]:
    if _CONTROL.search(pattern):
        raise ConfigError(f"{key}: an action holds a control character")
    regex = re.compile(_glob(pattern.lower(), ".", star=".*"))
    found = frozenset(a for a in ACTIONS if regex.fullmatch(a.lower()))
    if not found:
        near = difflib.get_close_matches(pattern, ACTIONS, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise ConfigError(
            f"{key}: {pattern!r} matches no action; the actions are {_actions()}{hint}"
        )
    return found


#: A compiled Resource: place pattern (None: anywhere), name pattern, the name pattern
#: widened to IAM's ``*`` (for hints), and whether its name glob holds a single ``*``.
_Resource = tuple[str | None, str, str, bool]
_EVERY_SECRET: _Resource = (None, ".*", ".*", False)


def _resource(text: str, key: str) -> _Resource:
    if _CONTROL.search(text):
        raise ConfigError(f"{key}: a resource holds a control character")
    if "***" in text:
        raise ConfigError(f"{key}: {text!r}: use * (within / ! :) or ** (across them)")
    if text in ("*", "**"):
        return _EVERY_SECRET
    if text.startswith(RESOURCE_PREFIX):
        return None, *_name_glob(text[len(RESOURCE_PREFIX) :], text, key)
    parts = text[len(ARN_PREFIX) :].split(":", 2)
    if not text.startswith(ARN_PREFIX) or len(parts) != 3:
        raise ConfigError(
            f"{key}: {text!r} is not a secret resource; write {_RESOURCE_FORMS}, like "
            "secret/prod/db"
        )
    region, account, rest = parts
    if not _REGION.fullmatch(region) or "**" in region:
        raise ConfigError(
            f"{key}: {text!r}: the region is lowercase letters, digits and -, or a glob of "
            "them with * and ?"
        )
    if not _ACCOUNT.fullmatch(account) or "**" in account:
        raise ConfigError(f"{key}: {text!r}: the account is digits, or a glob of them with * and ?")
    if rest == "*":
        _, name, wide, single = _EVERY_SECRET
    elif rest.startswith(RESOURCE_PREFIX):
        name, wide, single = _name_glob(rest[len(RESOURCE_PREFIX) :], text, key)
    else:
        raise ConfigError(
            f"{key}: {text!r}: an ARN resource ends in secret/<name> (or * for every secret)"
        )
    if region == "*" and account == "*":
        return None, name, wide, single
    return _glob(f"{region}:{account}", _NAME_CHAR), name, wide, single


def _name_glob(glob: str, text: str, key: str) -> tuple[str, str, bool]:
    if not glob:
        raise ConfigError(f"{key}: {text!r} names no secret; like secret/prod/db or secret/**")
    single = _SINGLE_STAR.search(glob) is not None
    return _glob(glob, _NAME_CHAR), _glob(glob, ".", star=".*"), single


def _glob(glob: str, one: str, *, star: str | None = None) -> str:
    """A glob as a regex: ``*`` any run of ``one``, ``**`` any run at all, ``?`` one."""
    out: list[str] = []
    for part in _GLOB_PARTS.findall(glob):
        if part == "**":
            out.append(".*")
        elif part == "*":
            out.append(star or f"{one}*")
        elif part == "?":
            out.append(one)
        else:
            out.append(re.escape(part))
    return "".join(out)


def _union(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in dict.fromkeys(patterns)))
