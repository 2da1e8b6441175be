"""Identity policies: the grammar, the glob rules and the evaluation order."""

from __future__ import annotations

import json
import re
import textwrap
import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms_agent import policy
from kms_agent.errors import ConfigError
from kms_agent.policy import (
    ACTIONS,
    DESCRIBE_SECRET,
    GET_SECRET_VALUE,
    LIST_SECRETS,
    PolicySet,
    peer_principals,
    service_account_principal,
    token_principal,
)

GET = GET_SECRET_VALUE
PRINCIPALS = (
    "token:ci-1",
    "token:web",
    "unix:uid:1001",
    "unix:gid:kms-readers",
    "k8s:payments:api",
    "k8s:ops:bot",
)
PRINCIPAL_PATTERNS = (
    *PRINCIPALS,
    "*",
    "token:ci-*",
    "k8s:payments:*",
    "k8s:*:*",
    "unix:gid:*",
    "k8s:pay?ents:api",
)
ACTION_PATTERNS = (*ACTIONS, "kms:*", "*", "kms:Describe*", "KMS:getsecretvalue", "kms:List*")
NAMES = (
    "db",
    "payments/db",
    "payments/root",
    "payments/a/b",
    "aigw!x",
    "aigw!x/y",
    "mcp!token",
    "prod/db",
    "pay/db",
)
RESOURCE_PATTERNS = (
    "*",
    "secret/**",
    "secret/*",
    "secret/payments/*",
    "secret/payments/**",
    "secret/aigw!*",
    "secret/db",
    "secret/pay*/db",
    "secret/?b",
    "secret/*/db",
    "acs:kms:*:*:secret/aigw!*",
    "acs:kms:cn-hangzhou:*:secret/**",
    "acs:kms:*:123:secret/payments/*",
)
ARNS = (None, "acs:kms:cn-hangzhou:123:secret/x", "acs:kms:cn-shanghai:456:secret/x")


def one(statements: list[dict[str, Any]], **extra: Any) -> PolicySet:
    """A policy set of one policy ``p`` holding ``statements``."""
    return PolicySet.from_config({"p": json.dumps({"Statement": statements, **extra})})


def allow(principal: Any = "*", action: Any = GET, resource: Any = "*"):
    return {"Effect": "Allow", "Principal": principal, "Action": action, "Resource": resource}


def deny(principal: Any = "*", action: Any = GET, resource: Any = "*"):
    return {"Effect": "Deny", "Principal": principal, "Action": action, "Resource": resource}


def lists(values, max_size=3):
    return st.lists(st.sampled_from(values), min_size=1, max_size=max_size)


statements = st.lists(
    st.fixed_dictionaries(
        {
            "Effect": st.sampled_from(["Allow", "Deny"]),
            "Principal": lists(PRINCIPAL_PATTERNS),
            "Action": lists(ACTION_PATTERNS),
            "Resource": lists(RESOURCE_PATTERNS),
        }
    ),
    min_size=1,
    max_size=8,
)
callers = st.lists(st.sampled_from(PRINCIPALS), min_size=1, max_size=3, unique=True).map(tuple)
queries = st.tuples(
    callers, st.sampled_from(ACTIONS), st.sampled_from(NAMES), st.sampled_from(ARNS)
)


# --------------------------------------------------------------------------- the grammar


def test_the_documented_config_shape_loads_from_toml():
    """The module docstring's example config is valid TOML and loads: both forms of a
    policy (the document as a JSON string; a table with document and attach) behave as the
    docstring says."""
    doc = policy.__doc__ or ""
    start = doc.index("    [policies]\n")
    block = textwrap.dedent(doc[start : doc.index("A statement holds")])
    policies = PolicySet.from_config(tomllib.loads(block)["policies"])
    assert policies.enabled
    assert policies.policies == ("payments", "readers")
    assert policies.decide(["k8s:payments:api"], GET, "payments/db").allowed
    assert policies.decide(["k8s:payments:api"], "kms:DescribeSecret", "payments/db").allowed
    root = policies.decide(["k8s:payments:api"], GET, "payments/root")
    assert (root.allowed, root.reason) == (False, "explicit_deny")
    assert root.statement == "policies.payments.Statement[1] (Sid NeverRoot)"
    shared = policies.decide(["unix:uid:1", "unix:gid:kms-readers"], GET, "shared/a/b")
    assert shared.allowed
    assert shared.statement == "policies.readers.document.Statement[0]"
    assert not policies.decide(["token:web"], GET, "shared/a").allowed


def test_a_document_table_with_statement_tables_loads_from_toml():
    """A document written as TOML tables (``[[policies.x.document.Statement]]``) is the
    same document as its JSON spelling."""
    raw = tomllib.loads(
        textwrap.dedent(
            """
            [policies.ops]
            attach = ["k8s:ops:*"]
            [policies.ops.document]
            Version = "1"
            [[policies.ops.document.Statement]]
            Effect = "Allow"
            Action = ["kms:GetSecretValue"]
            Resource = "acs:kms:*:*:secret/ops/*"
            """
        )
    )
    policies = PolicySet.from_config(raw["policies"])
    assert policies.decide(["k8s:ops:bot"], GET, "ops/db").allowed
    assert not policies.decide(["k8s:ops:bot"], GET, "ops/db/x").allowed
    assert not policies.decide(["k8s:dev:bot"], GET, "ops/db").allowed


def _doc(*statements: Any, **top: Any) -> dict[str, Any]:
    return {"p": json.dumps({"Version": "2017-10-17", "Statement": list(statements), **top})}


GOOD = allow("token:ci")
BAD_CONFIGS = [
    # (raw policies table, expected start of the message)
    (["not", "a", "table"], "policies: expected a table of named policies"),
    ({"bad.name": json.dumps({"Statement": [GOOD]})}, "policies.bad.name: a policy name"),
    ({"p": 5}, "policies.p: expected a policy document as a JSON string"),
    ({"p": "{not json"}, "policies.p: not valid JSON"),
    ({"p": '{"Statement": [], "Statement": []}'}, "policies.p: the JSON key 'Statement' appears"),
    ({"p": {"doc": "{}"}}, "policies.p.doc: unknown key; expected one of document, attach"),
    ({"p": {"attach": ["token:a"]}}, "policies.p.document: missing"),
    ({"p": {"document": "{oops"}}, "policies.p.document: not valid JSON"),
    ({"p": {"document": "[]"}}, "policies.p.document: a policy document is an object"),
    ({"p": {"document": {"Statement": [GOOD]}, "attach": []}}, "policies.p.attach: expected"),
    (
        {"p": {"document": {"Statement": [GOOD]}, "attach": ["k8s:*"]}},
        "policies.p.attach[0]: 'k8s:*'",
    ),
    (
        {"p": {"document": {"Statement": [GOOD]}, "attach": ["token:a"]}},
        "policies.p.document.Statement[0].Principal: this policy is attached",
    ),
    (
        _doc(GOOD, Versoin="1"),
        "policies.p.Versoin: unknown key; expected one of Version, Statement",
    ),
    (_doc(GOOD, Version="2008-10-17"), "policies.p.Version: '2008-10-17' is not allowed"),
    (_doc(GOOD, Version=1), "policies.p.Version: 1 is not allowed"),
    ({"p": json.dumps({"Statement": []})}, "policies.p.Statement: expected a non-empty list"),
    ({"p": json.dumps({"Version": "1"})}, "policies.p.Statement: expected a non-empty list"),
    (_doc("Allow"), "policies.p.Statement[0]: a statement is an object"),
    (
        _doc(GOOD, {**GOOD, "Actoin": GET}),
        "policies.p.Statement[1].Actoin: unknown key; expected one of Sid, Effect",
    ),
    (_doc({**GOOD, "Condition": {}}), "policies.p.Statement[0].Condition: is not supported"),
    (
        _doc({**GOOD, "NotResource": "secret/x"}),
        "policies.p.Statement[0].NotResource: is not supported",
    ),
    (_doc({**GOOD, "Effect": "allow"}), "policies.p.Statement[0].Effect: 'allow' is not allowed"),
    (
        _doc({k: v for k, v in GOOD.items() if k != "Effect"}),
        "policies.p.Statement[0].Effect: missing",
    ),
    (
        _doc({k: v for k, v in GOOD.items() if k != "Action"}),
        "policies.p.Statement[0].Action: missing",
    ),
    (
        _doc({k: v for k, v in GOOD.items() if k != "Resource"}),
        "policies.p.Statement[0].Resource: missing",
    ),
    (
        _doc({k: v for k, v in GOOD.items() if k != "Principal"}),
        "policies.p.Statement[0].Principal: missing",
    ),
    (_doc({**GOOD, "Action": []}), "policies.p.Statement[0].Action: expected actions"),
    (_doc({**GOOD, "Action": [GET, 3]}), "policies.p.Statement[0].Action: expected actions"),
    (_doc({**GOOD, "Resource": ""}), "policies.p.Statement[0].Resource: expected resources"),
    (
        _doc({**GOOD, "Principal": {"AWS": "x"}}),
        "policies.p.Statement[0].Principal: give a principal",
    ),
    (
        _doc({**GOOD, "Principal": ["token:a", "k8s:a"]}),
        "policies.p.Statement[0].Principal[1]: 'k8s:a'",
    ),
    (
        _doc({**GOOD, "Principal": "unix:*:1001"}),
        "policies.p.Statement[0].Principal: 'unix:*:1001'",
    ),
    (_doc({**GOOD, "Principal": "user:bob"}), "policies.p.Statement[0].Principal: 'user:bob'"),
    (_doc({**GOOD, "Principal": "token:**"}), "policies.p.Statement[0].Principal: 'token:**'"),
    (_doc({**GOOD, "Principal": "token:a b"}), "policies.p.Statement[0].Principal: 'token:a b'"),
    (_doc({**GOOD, "Sid": "no spaces"}), "policies.p.Statement[0].Sid: 'no spaces'"),
    (_doc({**GOOD, "Sid": "A"}, {**GOOD, "Sid": "A"}), "policies.p.Statement[1].Sid: 'A' is used"),
    (
        _doc({**GOOD, "Resource": "prod/db"}),
        "policies.p.Statement[0].Resource: 'prod/db' is not a secret resource",
    ),
    (
        _doc({**GOOD, "Resource": ["secret/a", "secret/"]}),
        "policies.p.Statement[0].Resource[1]: 'secret/' names no secret",
    ),
    (_doc({**GOOD, "Resource": "secret/a***"}), "policies.p.Statement[0].Resource: 'secret/a***'"),
    (
        _doc({**GOOD, "Resource": "secret/a\x01"}),
        "policies.p.Statement[0].Resource: a resource holds",
    ),
    (
        _doc({**GOOD, "Resource": "acs:kms:cn-hangzhou:secret/x"}),
        "policies.p.Statement[0].Resource: 'acs:kms:cn-hangzhou:secret/x'",
    ),
    (
        _doc({**GOOD, "Resource": "acs:kms:CN:*:secret/x"}),
        "policies.p.Statement[0].Resource: 'acs:kms:CN:*:secret/x': the region",
    ),
    (
        _doc({**GOOD, "Resource": "acs:kms:**:*:secret/x"}),
        "policies.p.Statement[0].Resource: 'acs:kms:**:*:secret/x': the region",
    ),
    (
        _doc({**GOOD, "Resource": "acs:kms:*:abc:secret/x"}),
        "policies.p.Statement[0].Resource: 'acs:kms:*:abc:secret/x': the account",
    ),
    (
        _doc({**GOOD, "Resource": "acs:kms:*:*:key/x"}),
        "policies.p.Statement[0].Resource: 'acs:kms:*:*:key/x': an ARN resource ends",
    ),
]


@pytest.mark.parametrize(("raw", "message"), BAD_CONFIGS)
def test_a_bad_policy_is_refused_naming_its_dotted_path(raw, message):
    """Every grammar error is one ConfigError line that starts with the dotted path of the
    offending key (inside a JSON document too) and says what is wrong."""
    with pytest.raises(ConfigError) as info:
        PolicySet.from_config(raw)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("pattern", "suggestion"),
    [
        ("kms:GetSecretVal", "did you mean kms:GetSecretValue?"),
        ("kms:DescribeSecrets", "did you mean kms:DescribeSecret?"),
        ("kms:ListSecret", "did you mean kms:ListSecrets?"),
        ("secretsmanager:GetSecretValue", ""),
        ("kms:Decrypt", ""),
        ("kms:Get*Key", ""),
    ],
)
def test_an_action_pattern_that_matches_no_action_is_refused(pattern, suggestion):
    """An action glob that can match none of the agent's actions is an error (a typo would
    otherwise grant nothing, or deny nothing, silently), with the nearest action when one is
    close."""
    with pytest.raises(
        ConfigError, match=r"Statement\[0\]\.Action\[1\]: .* matches no action"
    ) as info:
        one([allow(action=[GET, pattern])])
    assert suggestion in str(info.value)
    assert "kms:GetSecretValue, kms:ListSecrets, kms:DescribeSecret" in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "granted"),
    [
        ("kms:GetSecretValue", {GET}),
        ("KMS:getsecretvalue", {GET}),
        ("kms:Describe*", {DESCRIBE_SECRET}),
        ("kms:*Secret*", set(ACTIONS)),
        ("kms:?etSecretValue", {GET}),
        ("kms:*", set(ACTIONS)),
        ("*", set(ACTIONS)),
    ],
)
def test_action_patterns_are_case_insensitive_globs(pattern, granted):
    """An action pattern grants exactly the actions its case-insensitive glob matches, and
    decide() takes the action in any case too."""
    policies = one([allow(action=pattern)])
    assert {a for a in ACTIONS if policies.decide(["token:a"], a, "x").allowed} == granted
    assert policies.decide(["token:a"], GET.upper(), "x").allowed == (GET in granted)


def test_a_single_statement_object_and_every_documented_version_are_accepted():
    """``Statement`` may be one object, as AWS accepts; ``Version`` may be left out or be
    any of the documented ones."""
    for version in (*policy.VERSIONS, None):
        top = {} if version is None else {"Version": version}
        policies = PolicySet.from_config({"p": json.dumps({"Statement": allow(), **top})})
        assert policies.decide(["token:a"], GET, "x").allowed


def test_a_deny_whose_star_stops_at_a_separator_is_noted():
    """A Deny with a single ``*`` in its name glob (which, unlike IAM's, does not cross
    ``/`` or ``!``) loads, and is reported in ``notes`` with the ``**`` spelling; Allows,
    ``**`` and region wildcards are not reported."""
    policies = one(
        [
            deny(resource=["secret/payments/*", "secret/ok/**", "acs:kms:*:*:secret/x"]),
            allow(resource="secret/payments/*"),
        ]
    )
    assert len(policies.notes) == 1
    assert policies.notes[0].startswith("policies.p.Statement[0].Resource[0]: 'secret/payments/*'")
    assert "'secret/payments/**'" in policies.notes[0]


# --------------------------------------------------------------------------- evaluation


def test_no_policies_means_everything_is_allowed_and_the_step_can_be_skipped():
    """An empty ``[policies]`` gives a disabled set that allows every request and lists
    every name."""
    policies = PolicySet.from_config({})
    assert not policies.enabled
    assert policies.decide([], GET, "anything").allowed
    assert policies.decide_list([]).allowed
    assert policies.may_list([])("anything")


@given(queries)
def test_with_policies_on_no_matching_statement_means_denied(query):
    """Once any policy is configured, a request no Allow matches is denied as
    ``no_allow``, naming no statement: here the only statement grants another caller."""
    principals, action, name, arn = query
    policies = one([allow("token:someone-else", "kms:*", "**")])
    decision = policies.decide(principals, action, name, arn)
    assert (decision.allowed, decision.reason, decision.statement) == (False, "no_allow", None)
    assert decision.hint is not None
    assert "no policy statement allows" in decision.hint


def test_a_near_miss_is_explained_in_the_hint():
    """A name an Allow would match with IAM's ``*`` gets a hint naming the statement and
    the ``**`` spelling; a plain miss says no statement covers the name."""
    policies = one([{**allow("token:a", GET, "secret/payments/*"), "Sid": "Pay"}])
    near = policies.decide(["token:a"], GET, "payments/a/b")
    assert not near.allowed
    assert near.hint is not None
    assert "policies.p.Statement[0] (Sid Pay) allows 'secret/payments/*'" in near.hint
    assert "'secret/payments/**'" in near.hint
    miss = policies.decide(["token:a"], GET, "other")
    assert (
        miss.hint == "statements allow kms:GetSecretValue to this caller, but none on secret/other"
    )


@settings(max_examples=300)
@given(statements, queries)
def test_an_explicit_deny_always_wins(stmts, query):
    """Whatever Allows a policy set holds, adding a Deny that matches the request makes it
    denied as ``explicit_deny``, naming that Deny (or another matching Deny before it)."""
    principals, action, name, arn = query
    target = {**deny(principals[-1], action, f"secret/{name}"), "Sid": "TheDeny"}
    policies = PolicySet.from_config(
        {"p": json.dumps({"Statement": stmts}), "q": json.dumps({"Statement": [target]})}
    )
    decision = policies.decide(principals, action, name, arn)
    assert (decision.allowed, decision.reason) == (False, "explicit_deny")
    assert decision.statement is not None
    without = PolicySet.from_config({"p": json.dumps({"Statement": stmts})})
    if without.decide(principals, action, name, arn).reason != "explicit_deny":
        assert decision.statement == "policies.q.Statement[0] (Sid TheDeny)"


@given(statements.map(lambda s: [{**x, "Effect": "Allow"} for x in s]), queries)
def test_without_any_deny_nothing_is_explicitly_denied(stmts, query):
    """The other half: a policy set of Allows only never answers ``explicit_deny``, and
    whatever it allows names an Allow statement."""
    decision = one(stmts).decide(*query)
    assert decision.reason != "explicit_deny"
    assert decision.allowed == (decision.statement is not None)


def test_several_principals_any_allow_allows_unless_any_deny_matches():
    """A peer's uid and gids are one caller: an Allow of any of them allows, a Deny of any
    of them denies, whichever principal the Allow came from."""
    policies = PolicySet.from_config(
        {
            "byuid": json.dumps({"Statement": allow("unix:uid:1001", GET, "secret/app/*")}),
            "bygid": json.dumps(
                {"Statement": allow("unix:gid:kms-readers", GET, "secret/shared/*")}
            ),
            "nobody": json.dumps({"Statement": deny("unix:gid:nobody", "kms:*", "**")}),
        }
    )
    peer = peer_principals(1001, ["kms-readers", "staff"])
    assert peer == ("unix:uid:1001", "unix:gid:kms-readers", "unix:gid:staff")
    assert policies.decide(peer, GET, "app/db").statement == "policies.byuid.Statement[0]"
    assert policies.decide(peer, GET, "shared/db").statement == "policies.bygid.Statement[0]"
    assert not policies.decide(peer, GET, "other").allowed
    assert not policies.decide(peer_principals(1002, ["staff"]), GET, "app/db").allowed
    locked = policies.decide(peer_principals(1001, ["kms-readers", "nobody"]), GET, "app/db")
    assert (locked.allowed, locked.statement) == (False, "policies.nobody.Statement[0]")


def test_the_principal_helpers_spell_what_patterns_match():
    """Principals built by the helpers are matched by the documented pattern forms."""
    policies = one([allow(["token:ci-*", "k8s:payments:*"], GET, "**")])
    assert policies.decide([token_principal("ci-7")], GET, "x").allowed
    assert policies.decide([service_account_principal("payments", "api")], GET, "x").allowed
    assert not policies.decide([token_principal("web")], GET, "x").allowed
    assert not policies.decide([service_account_principal("pay", "ments")], GET, "x").allowed


# --------------------------------------------------------------------------- globs

SEPARATORS = "/!:"
segment = st.text(alphabet="abz09-_.", min_size=1, max_size=4)
glob_part = st.one_of(segment, st.sampled_from(["*", "?", "/", "!"]))
fill = st.text(alphabet="ab0-_./!:", max_size=5)


def _separators(text: str) -> list[str]:
    return [c for c in text if c in SEPARATORS]


@settings(max_examples=400)
@given(st.lists(glob_part, min_size=1, max_size=6), st.lists(fill, min_size=6, max_size=6))
def test_a_resource_star_never_crosses_a_separator(parts, fills):
    """A name glob without ``**`` matches only names with exactly its own separators
    (``/``, ``!``, ``:``) in the same order: ``*`` and ``?`` never stand for one. And
    filling its wildcards with separator-free text always matches."""
    glob = re.sub(r"\*+", "*", "".join(parts))
    policies = one([allow("*", GET, f"secret/{glob}")])
    wildcards = iter(fills)
    name = "".join(
        next(wildcards) if p == "*" else (next(wildcards)[:1] or "a") if p == "?" else p
        for p in _glob_parts(glob)
    )
    decision = policies.decide(["token:a"], GET, name)
    if decision.allowed:
        assert _separators(name) == _separators(glob)
    clean = re.sub(f"[{re.escape(SEPARATORS)}]", "x", "".join(fills)) or "x"
    plain = "".join(clean if p == "*" else clean[0] if p == "?" else p for p in _glob_parts(glob))
    assert policies.decide(["token:a"], GET, plain).allowed


def _glob_parts(glob: str) -> list[str]:
    return re.findall(r"\*\*|\*|\?|[^*?]+", glob)


@given(segment, st.lists(st.tuples(st.sampled_from("/!"), segment), min_size=1, max_size=3))
def test_star_stays_in_its_level_and_double_star_crosses(prefix, rest):
    """Under ``secret/<p>/``: ``*`` matches one more level and nothing deeper, ``**``
    every name below, ``?`` one character; the same for ``<p>!``."""
    tail = "".join(sep + seg for sep, seg in rest)[1:]
    name = f"{prefix}/{tail}"
    one_level = not any(c in tail for c in "/!")
    assert (
        one([allow(resource=f"secret/{prefix}/*")]).decide(["token:a"], GET, name).allowed
        == one_level
    )
    assert one([allow(resource=f"secret/{prefix}/**")]).decide(["token:a"], GET, name).allowed
    assert one([allow(resource=f"secret/{prefix}/?")]).decide(["token:a"], GET, name).allowed == (
        len(tail) == 1 and one_level
    )
    bang = f"{prefix}!{tail}"
    assert (
        one([allow(resource=f"secret/{prefix}!*")]).decide(["token:a"], GET, bang).allowed
        == one_level
    )
    assert one([allow(resource="secret/*")]).decide(["token:a"], GET, bang).allowed is False
    assert one([allow(resource="*")]).decide(["token:a"], GET, bang).allowed


def test_the_documented_examples_of_the_separator_rule():
    """The docstring's examples, literally."""
    cases = [
        ("secret/mcp!*", "mcp!token", True),
        ("secret/mcp!*", "mcp!a/b", False),
        ("secret/payments/*", "payments/x", True),
        ("secret/payments/*", "payments/x/y", False),
        ("secret/*", "db-password", True),
        ("secret/*", "aigw!x", False),
        ("secret/*", "prod/db", False),
        ("secret/**", "aigw!x/y", True),
        ("secret/Prod/*", "prod/db", False),  # case-sensitive
    ]
    for pattern, name, expected in cases:
        assert one([allow(resource=pattern)]).decide(["token:a"], GET, name).allowed is expected


native_statements = statements.map(
    lambda s: [
        {**x, "Resource": [r for r in x["Resource"] if r.startswith("secret/")] or ["*"]} for x in s
    ]
)


def _as_arn(stmts):
    return [
        {**x, "Resource": [r if r == "*" else "acs:kms:*:*:" + r for r in x["Resource"]]}
        for x in stmts
    ]


@settings(max_examples=200)
@given(native_statements, queries)
def test_arn_form_resources_match_the_same_names(stmts, query):
    """Writing every ``secret/X`` as ``acs:kms:*:*:secret/X`` changes no decision, with or
    without the request's ARN, and a name given as an Alibaba ARN is decided as that
    name with that ARN."""
    principals, action, name, arn = query
    native, arn_form = one(stmts), one(_as_arn(stmts))
    expected = native.decide(principals, action, name, arn)
    assert arn_form.decide(principals, action, name, arn).allowed == expected.allowed
    assert (
        arn_form.decide(principals, action, name).allowed
        == native.decide(principals, action, name).allowed
    )
    as_arn = f"acs:kms:cn-hangzhou:123:secret/{name}"
    assert (
        native.decide(principals, action, as_arn).allowed
        == native.decide(principals, action, name, as_arn).allowed
    )


def test_a_region_or_account_is_checked_when_the_arn_is_known_and_assumed_otherwise():
    """``acs:kms:cn-hangzhou:*:secret/...`` matches only that region's ARN. With no ARN the
    secret could be anywhere: such an Allow does not allow, such a Deny does deny."""
    hz = "acs:kms:cn-hangzhou:*:secret/app/*"
    allows = one([allow(resource=hz)])
    assert allows.decide(
        ["token:a"], GET, "app/db", "acs:kms:cn-hangzhou:123:secret/app/db"
    ).allowed
    assert allows.decide(["token:a"], GET, "acs:kms:cn-hangzhou:123:secret/app/db").allowed
    assert not allows.decide(
        ["token:a"], GET, "app/db", "acs:kms:cn-shanghai:123:secret/app/db"
    ).allowed
    assert not allows.decide(["token:a"], GET, "app/db").allowed
    denies = one([allow(resource="**"), deny(resource=hz)])
    assert not denies.decide(
        ["token:a"], GET, "app/db", "acs:kms:cn-hangzhou:1:secret/app/db"
    ).allowed
    assert denies.decide(["token:a"], GET, "app/db", "acs:kms:cn-shanghai:1:secret/app/db").allowed
    assert not denies.decide(["token:a"], GET, "app/db").allowed
    account = one([allow(resource="acs:kms:*:12?:secret/app/*")])
    assert account.decide(["token:a"], GET, "acs:kms:eu-central-1:123:secret/app/db").allowed
    assert not account.decide(["token:a"], GET, "acs:kms:eu-central-1:1234:secret/app/db").allowed


def test_a_name_given_as_an_aws_arn_is_decided_for_every_secret_it_could_be():
    """A full AWS ARN ends in a random ``-XXXXXX``; it could be ``prod/db`` or a secret
    literally named ``prod/db-AbCdEf``: a Deny of either denies, and it is allowed only if
    both are."""
    full = "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf"
    partial = "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db"
    denied = one([allow(resource="secret/**"), deny(resource="secret/prod/db")])
    assert not denied.decide(["token:a"], GET, full).allowed
    assert not denied.decide(["token:a"], GET, partial).allowed
    assert denied.decide(
        ["token:a"], GET, "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/dbx"
    ).allowed
    assert not one([allow(resource="secret/prod/db")]).decide(["token:a"], GET, full).allowed
    assert one([allow(resource="secret/prod/*")]).decide(["token:a"], GET, full).allowed
    assert one([allow(resource="secret/prod/db")]).decide(["token:a"], GET, partial).allowed


principal_segment = st.text(alphabet="abz09-_.:", min_size=1, max_size=6)


@settings(max_examples=300)
@given(
    st.sampled_from(
        ["token:*", "token:ci-*", "k8s:payments:*", "k8s:*:*", "k8s:*:api", "unix:gid:*", "token:?"]
    ),
    st.sampled_from(["token", "k8s", "unix"]),
    st.lists(principal_segment, min_size=1, max_size=3),
)
def test_a_principal_star_never_crosses_a_colon(pattern, kind, segments):
    """A principal pattern other than ``*`` matches only principals with exactly as many
    ``:``-separated segments as it has."""
    principal = ":".join([kind, *segments])
    decision = one([allow(pattern, GET, "**")]).decide([principal], GET, "x")
    if decision.allowed:
        assert principal.count(":") == pattern.count(":")
        assert principal.split(":")[0] == pattern.split(":")[0]
    assert one([allow("*", GET, "**")]).decide([principal], GET, "x").allowed


def test_principal_examples():
    """``k8s:payments:*`` is every service account of that namespace and nothing longer;
    ``token:ci-*`` does not reach into another segment."""
    policies = one([allow(["k8s:payments:*", "token:ci-*", "unix:uid:1001"], GET, "**")])
    yes = ["k8s:payments:api", "token:ci-", "token:ci-x", "unix:uid:1001"]
    no = [
        "k8s:payments:api:x",
        "k8s:payments",
        "token:ci-a:b",
        "unix:uid:10011",
        "unix:gid:1001",
        "K8S:payments:api",
    ]
    assert [p for p in yes + no if policies.decide([p], GET, "x").allowed] == yes


# --------------------------------------------------------------------------- memo and list


@settings(max_examples=200)
@given(statements, st.lists(queries, min_size=1, max_size=20), st.integers(1, 5))
def test_the_memo_answers_as_a_fresh_evaluation(stmts, asked, memo_max):
    """Repeated and interleaved requests answered through the bounded memo (small here,
    so it is cleared and refilled) get exactly the decision a fresh policy set computes."""
    raw = {"p": json.dumps({"Statement": stmts})}
    memoised = PolicySet.from_config(raw)
    memoised._memo_max = memo_max
    for query in asked + asked[::-1]:
        assert memoised.decide(*query) == PolicySet.from_config(raw).decide(*query)
        assert len(memoised._memo) <= memo_max


@settings(max_examples=200)
@given(statements, callers, st.lists(st.sampled_from(NAMES), min_size=1, unique=True))
def test_the_list_predicate_admits_exactly_the_documented_names(stmts, principals, names):
    """A listed name is shown iff ListSecrets and (GetSecretValue or DescribeSecret) are
    allowed on it: so it never admits a name decide() would deny ListSecrets on, nor one
    the caller may neither read nor describe."""
    policies = one(stmts)
    shown = policies.may_list(principals)
    for name in names:
        ok = {a: policies.decide(principals, a, name).allowed for a in ACTIONS}
        assert shown(name) == (ok[LIST_SECRETS] and (ok[GET] or ok[DESCRIBE_SECRET]))


def test_the_list_predicate_checks_arn_statements_with_the_sources_place():
    """Given the listed source's region and account, region-specific statements apply to
    its names; without them such an Allow shows nothing."""
    policies = one([allow(action="kms:*", resource="acs:kms:cn-hangzhou:*:secret/app/*")])
    assert policies.may_list(["token:a"], region="cn-hangzhou", account="1")("app/db")
    assert not policies.may_list(["token:a"], region="cn-shanghai", account="1")("app/db")
    assert not policies.may_list(["token:a"])("app/db")


def test_the_list_route_needs_a_list_allow_and_no_list_deny_of_everything():
    """decide_list: allowed when an Allow of ListSecrets applies to the caller; denied by
    a Deny of ListSecrets on every secret; a Deny of some secrets only hides those."""
    some = one([allow("token:a", "kms:List*", "secret/app/*")])
    assert some.decide_list(["token:a"]).statement == "policies.p.Statement[0]"
    refused = some.decide_list(["token:b"])
    assert (refused.allowed, refused.reason) == (False, "no_allow")
    assert refused.hint == "no policy statement allows kms:ListSecrets to token:b"
    for everything in ("*", "secret/**", "acs:kms:*:*:*"):
        blocked = one([allow(action="kms:*"), deny(action="kms:ListSecrets", resource=everything)])
        assert blocked.decide_list(["token:a"]).reason == "explicit_deny"
    partly = one([allow(action="kms:*"), deny(action="kms:ListSecrets", resource="secret/app/*")])
    assert partly.decide_list(["token:a"]).allowed
    shown = partly.may_list(["token:a"])
    assert [n for n in ("app/db", "other") if shown(n)] == ["other"]


def test_an_unknown_action_asked_of_decide_is_denied():
    """decide() with an action the agent does not know denies and says so (a caller of
    the API cannot get an allow by misspelling)."""
    decision = one([allow(action="*")]).decide(["token:a"], "kms:Decrypt", "x")
    assert (decision.allowed, decision.reason) == (False, "no_allow")
    assert decision.hint is not None
    assert "'kms:Decrypt' is not one of" in decision.hint
