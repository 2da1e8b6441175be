"""A wire-faithful Alibaba Cloud KMS emulator (shared gateway, API 2016-01-20), with STS
AssumeRoleWithOIDC and AssumeRole (2015-04-01) and the ECS instance metadata service, for
tests and local development.

It verifies requests the way KMS does — ACS3-HMAC-SHA256 and the older RPC HMAC-SHA1
signature, the ±15 minute timestamp window, nonce replay, STS tokens — evaluates RAM-style
identity policies per access key, and answers in the real JSON shapes and error codes.
Its canonicalization is written here independently of the agent's signer, and the tests
check it against requests signed by Alibaba's own SDKs.

Modelled, not confirmed by a public source (see shared/PROTOCOLS.md), and flagged:
GetSecretValue on a secret pending deletion answers ``Rejected.ResourceInDeleteWindow``
(409); a secret under a customer managed key without ``kms:Decrypt`` answers
``Forbidden.NoPermission`` naming ``kms:Decrypt`` and the key; ListSecrets lists the secrets
whose ARN the identity may ``kms:ListSecrets`` on.

KMS-instance mode (``KmsEmulator(instance_id="kst-…")``, served on TLS with a certificate
from :func:`make_instance_tls`) is the dedicated gateway of a KMS 3.0 instance: the same
RAM-auth OpenAPI at ``<instance>.cryptoservice.kms.aliyuncs.com``, and dkms-gcs, the ClientKey
protocol (protobuf over ``POST /``, RSA PKCS#1 v1.5 SHA-256 over a string to sign, ``Bearer``
authorization, protobuf ``Error`` bodies). Its secrets live under a customer key of the
instance (paid default secrets such as ``aigw!secret-abc``); the instance's bought QPS is one
limit for both ways in. The protobuf wire format is read and written here by hand (only
varints and length-delimited fields occur), so the emulator does not share a decoder with the
agent or the SDK; Alibaba's dkms-gcs SDK is the judge in the tests.

Documented on Alibaba's "common error codes" page of the instance API, and served as such:
``InvalidApiVersion``, ``InvalidApiName``, ``InvalidParam`` (Date, x-kms-signaturemethod),
``MissingParameter`` (x-kms-acccesskeyid), ``RequestTimeTooSkewed`` (15 minutes),
``InvalidParameter``, all 400.

STS AssumeRole is verified like a KMS call (either signature, version 2015-04-01): the
caller must be in the role's trust list (:meth:`KmsEmulator.add_role` ``trusted``) and give
the role's ExternalId when it has one; the credentials it issues carry the role's policy,
intersected with the request's session Policy. Documented: ``NoPermission`` 403 "You are
not authorized to do this action. You should be authorized by RAM." (the AssumeRole API
page, for a caller the trust policy does not name), ``InvalidParameter.DurationSeconds``,
``InvalidParameter.PolicyGrammar``, ``InvalidParameter.RoleSessionName`` (STS common-errors
page). Modelled and flagged: a wrong or missing ExternalId answers the same ``NoPermission``;
an unknown role is 404 ``EntityNotExist.Role``. dkms-gcs refusals, as the KMS instance API's "Common error codes" page lists
them: a signature that does not verify is 401 ``SignatureNotMatch`` "Signature is not
matched."; an unknown ClientKey is 404 ``Unauthorized`` ("The AccessKey ID ... does not
exist in our records"); a wrong ``content-sha256`` or ``date`` is 400 ``InvalidParam``
("The Param ... is invalid."); an access policy that refuses is 403
``Forbidden.NoPermission``. Modelled and flagged (no public source gives them): a
missing or non-``Bearer`` authorization is 400 ``InvalidParam`` "The Param Authorization
is invalid." (Alibaba's transfer SDKs map that message to ``IncompleteSignature``); a
missing secret is 404 ``Forbidden.ResourceNotFound`` (the shape the SDK turns into its
exception is confirmed);
throttling is 429 ``Rejected.Throttling`` (the SDK retries on that code whatever the status);
an unchanged request replayed inside the window is accepted (dkms-gcs has no nonce); the
application access point's policy is written in the RAM statement shape (``secret/<name>``
resources) and needs no ``kms:Decrypt`` on the key.

Run standalone: ``python -m tests.emulators.alibaba_kms --port 8443`` prints an AccessKey
and serves two demo secrets; with ``--instance kst-… --out DIR`` it serves a KMS instance on
TLS and writes the CA, a ClientKey file and its password into DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import calendar
import datetime as dt
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import secrets
import ssl
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TIME_WINDOW = 15 * 60
GET_SECRET_VALUE_QPS = 450
#: A KMS instance's dedicated gateway is ``<instance id>.`` + this.
INSTANCE_DOMAIN = "cryptoservice.kms.aliyuncs.com"
DKMS_API_VERSION = "dkms-gcs-0.2"
DKMS_SIGNATURE_METHOD = "RSA_PKCS1_SHA_256"
PROTOBUF = "application/x-protobuf"
RFC1123 = "%a, %d %b %Y %H:%M:%S GMT"


def rfc3986(text: str) -> str:
    return quote(text, safe="~")


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class KmsError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(code)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass
class Version:
    id: str
    data: bytes
    data_type: str
    stages: set[str]
    created: float


@dataclass
class Secret:
    name: str
    versions: list[Version]
    created: float
    product: str | None = None  # a default secret, owned by this cloud product
    key_id: str | None = None  # a customer managed key (paid mode); None = service key
    state: str = "Normal"
    planned_delete: float | None = None
    secret_type: str = "Generic"


@dataclass
class Identity:
    access_key_id: str
    secret: str
    policy: dict[str, Any]
    principal: str
    security_token: str | None = None
    expires: float | None = None


@dataclass
class Role:
    arn: str
    policy: dict[str, Any]
    provider_arn: str = ""  # RRSA: the OIDC provider and subject it trusts
    subject: str = ""
    trusted: tuple[str, ...] = ()  # AssumeRole: principals that may assume it
    external_id: str | None = None  # AssumeRole: the ExternalId its trust policy requires

    @property
    def principal(self) -> str:
        """The principal of credentials issued for this role."""
        return f"assumed-role/{self.arn.rsplit('/', 1)[-1]}"


@dataclass
class Faults:
    """Knobs for reliability tests; each answer consumes one entry of ``next``."""

    latency: float = 0.0
    next: deque[str] = field(
        default_factory=deque
    )  # "500", "503", "reset", "garbage", "throttle", "hang"


@dataclass
class Key:
    """A customer master key; ``instance_id`` is the KMS instance that holds it."""

    id: str
    instance_id: str | None


@dataclass
class ClientKey:
    """A ClientKey of an application access point: the instance keeps its public key."""

    key_id: str
    public_key: rsa.RSAPublicKey
    policy: dict[str, Any]


@dataclass(frozen=True)
class ClientKeyFile:
    """What the console hands out for a ClientKey: the JSON ``{KeyId, PrivateKeyData}``
    (base64 PKCS#12) and, separately, the password that opens it."""

    key_id: str
    content: str = field(repr=False)
    password: str = field(repr=False)

    def private_key(self) -> rsa.RSAPrivateKey:
        data = base64.b64decode(json.loads(self.content)["PrivateKeyData"])
        key, _, _ = pkcs12.load_key_and_certificates(data, self.password.encode())
        assert isinstance(key, rsa.RSAPrivateKey)
        return key


def make_client_key_file(key_id: str | None = None) -> ClientKeyFile:
    """A fresh RSA-2048 ClientKey in the console's shape, with a random password."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_id = key_id or f"KAAP.{uuid.uuid4()}"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key_id)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    password = secrets.token_urlsafe(18)
    data = pkcs12.serialize_key_and_certificates(
        b"clientkey", key, cert, None, serialization.BestAvailableEncryption(password.encode())
    )
    content = json.dumps({"KeyId": key_id, "PrivateKeyData": base64.b64encode(data).decode()})
    return ClientKeyFile(key_id, content, password)


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class InstanceTls:
    """A test CA and the instance's server certificate (PEM), for ``hostname`` plus
    ``localhost`` and ``127.0.0.1``, since tests connect to loopback."""

    hostname: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:  # load_cert_chain reads files only
            cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert.write_bytes(self.cert_pem)
            key.write_bytes(self.key_pem)
            context.load_cert_chain(cert, key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cadata=self.ca_pem.decode())

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.ca_pem)
        return path


def make_instance_tls(hostname: str, *, days: int = 1) -> InstanceTls:
    """A new CA (each call another one: a "wrong CA" is a second call) and a server
    certificate it signed. The real chain has a per-region intermediate; this has none."""
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kms-agent tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Emulated Private KMS Root CA {secrets.token_hex(4)}"),
    ])  # fmt: skip
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(hostname), x509.DNSName("localhost"),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return InstanceTls(hostname, ca.public_bytes(pem), cert.public_bytes(pem), key_pem)


# --------------------------------------------------------------------------- protobuf wire format


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def pb_encode(fields: list[tuple[int, str | int | list[str]]]) -> bytes:
    """A proto3 message from ``(field number, value)`` pairs: strings as length-delimited,
    ints and bools as varints, a list as a repeated string field (every element written);
    singular default values (empty, 0) are omitted, as proto3 does."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, list):
            for item in value:
                data = item.encode()
                out += _varint(number << 3 | 2) + _varint(len(data)) + data
        elif isinstance(value, str):
            data = value.encode()
            if data:
                out += _varint(number << 3 | 2) + _varint(len(data)) + data
        elif value:
            out += _varint(number << 3) + _varint(int(value))
    return bytes(out)


def pb_decode(data: bytes) -> dict[int, list[int | bytes]]:
    """Every field of a message by number (values in order). Unknown fixed-width fields are
    skipped as protobuf parsers do; truncation or a bad wire type raises ValueError."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        value: int | bytes
        if wire == 0:
            value = varint()
        elif wire == 2:
            size = varint()
            if pos + size > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos : pos + size], pos + size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(data):
                raise ValueError("truncated field")
            continue
        else:
            raise ValueError(f"wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def pb_string(fields: dict[int, list[int | bytes]], number: int) -> str:
    values = fields.get(number)
    if not values:
        return ""
    last = values[-1]  # proto3: the last value of a singular field wins
    if not isinstance(last, bytes):
        raise ValueError(f"field {number} is not a string")
    return last.decode("utf-8")


def dkms_string_to_sign(method: str, headers: dict[str, str]) -> str:
    """dkms-gcs: method, content-sha256, content-type and date lines, every ``x-kms-*``
    header sorted as ``name:trimmed value``, then the resource, always ``/``. ``headers``
    has lower-case names."""
    head = f"{method}\n{headers.get('content-sha256', '')}\n{headers.get('content-type', '')}\n{headers.get('date', '')}\n"
    kms = "".join(f"{n}:{headers[n].strip()}\n" for n in sorted(headers) if n.startswith("x-kms-"))
    return head + kms + "/"


def _secret_data(version: Version) -> str:
    """SecretData as both APIs give it: text as is, binary as base64."""
    if version.data_type == "binary":
        return base64.b64encode(version.data).decode()
    return version.data.decode()


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def allowed(policy: dict[str, Any], action: str, resource: str) -> bool:
    """RAM evaluation: an explicit Deny wins, then any Allow, else deny. Action and Resource
    are globs; a Resource without ``acs:`` matches the part after ``<account>:``."""

    def matches(stmt: dict[str, Any]) -> bool:
        acts = _as_list(stmt.get("Action", []))
        res = _as_list(stmt.get("Resource", []))
        short = resource.split(":", 4)[-1] if resource.startswith("acs:") else resource
        act_ok = any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in acts)
        res_ok = any(
            fnmatch.fnmatchcase(resource if r.startswith("acs:") or r == "*" else short, r)
            for r in res
        )
        return act_ok and res_ok

    if "AllOf" in policy:  # a role's policy intersected with a session policy
        return all(allowed(p, action, resource) for p in policy["AllOf"])
    statements = policy.get("Statement", [])
    if any(s.get("Effect") == "Deny" and matches(s) for s in statements):
        return False
    return any(s.get("Effect") == "Allow" and matches(s) for s in statements)


class KmsEmulator:
    def __init__(
        self,
        *,
        region: str = "cn-hangzhou",
        account_id: str = "1234567890123456",
        qps: int = GET_SECRET_VALUE_QPS,
        clock: Any = time.time,
        instance_id: str | None = None,
    ) -> None:
        """``instance_id`` makes this a KMS instance's dedicated gateway (serve it on TLS);
        ``qps`` is then the instance's bought rate, shared by both ways in."""
        if instance_id is not None and not instance_id.startswith("kst-"):
            raise ValueError(f"a KMS instance id starts with kst-, not {instance_id!r}")
        self.region, self.account_id, self.qps, self.clock = region, account_id, qps, clock
        self.instance_id = instance_id
        self.keys: dict[str, Key] = {}
        self.client_keys: dict[str, ClientKey] = {}
        #: The instance's customer key that its secrets are encrypted under by default.
        self.instance_key_id: str | None = self.add_key() if instance_id else None
        self.identities: dict[str, Identity] = {}
        self.roles: dict[str, Role] = {}
        self.oidc_tokens: dict[str, tuple[str, str]] = {}  # token -> (provider arn, subject)
        self.secrets: dict[str, Secret] = {}
        self.ecs_role: tuple[str, dict[str, Any]] | None = None
        self.temp_duration: float | None = None  # override STS/ECS credential lifetime
        self.faults = Faults()
        self.nonces: dict[str, float] = {}
        self.metadata_tokens: set[str] = set()
        self.calls: list[tuple[float, str, str]] = []  # (time, action, access key) accepted
        self.rejections: list[str] = []  # codes of every refused request
        #: Every request to / as received: (method, raw path and query, headers, body).
        self.recorded: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
        self.sts_calls = 0
        self.metadata_calls = 0
        self._window: dict[str, deque[float]] = {}

    # ------------------------------------------------------------------ set-up (not KMS APIs)

    def arn(self, name: str) -> str:
        return f"acs:kms:{self.region}:{self.account_id}:secret/{name}"

    @property
    def instance_host(self) -> str:
        """The dedicated gateway's host name (for certificates and endpoints)."""
        if self.instance_id is None:
            raise ValueError("not a KMS instance: construct with instance_id")
        return f"{self.instance_id}.{INSTANCE_DOMAIN}"

    def add_key(self) -> str:
        """A customer master key (of the instance, in instance mode); returns its id."""
        key_id = "key-" + (self.instance_id or "kst-sha")[4:7] + secrets.token_hex(10)
        self.keys[key_id] = Key(key_id, self.instance_id)
        return key_id

    def register_client_key(
        self, key_id: str, public_key: rsa.RSAPublicKey, policy: dict[str, Any]
    ) -> ClientKey:
        """Accept dkms-gcs requests signed by ``key_id``'s private key, as far as ``policy``
        (RAM statement shape, ``secret/<name>`` resources) allows."""
        client_key = ClientKey(key_id, public_key, policy)
        self.client_keys[key_id] = client_key
        return client_key

    def add_client_key(self, policy: dict[str, Any]) -> ClientKeyFile:
        """A new ClientKey whose public key the instance keeps; the file (JSON + password)
        is what an application is given."""
        issued = make_client_key_file()
        self.register_client_key(issued.key_id, issued.private_key().public_key(), policy)
        return issued

    def add_access_key(
        self, policy: dict[str, Any], principal: str = "user/app"
    ) -> tuple[str, str]:
        ak = "LTAI" + secrets.token_hex(8)
        sk = secrets.token_urlsafe(24)
        self.identities[ak] = Identity(ak, sk, policy, principal)
        return ak, sk

    def add_secret(
        self,
        name: str,
        value: str | bytes,
        *,
        product: str | None = None,
        key_id: str | None = None,
        data_type: str = "text",
    ) -> Version:
        """In instance mode a secret lives under a key of the instance (its default customer
        key unless ``key_id`` names another); a default secret is named ``product!id``."""
        if product is not None and not name.startswith(f"{product}!"):
            raise ValueError(f"a default secret of {product} is named {product}!<id>, not {name!r}")
        if self.instance_id is not None:
            key_id = key_id or self.instance_key_id
            if key_id not in self.keys or self.keys[key_id].instance_id != self.instance_id:
                raise ValueError(f"{key_id} is not a key of instance {self.instance_id}")
        now = self.clock()
        data = value.encode() if isinstance(value, str) else value
        version = Version(uuid.uuid4().hex, data, data_type, {"ACSCurrent"}, now)
        self.secrets[name] = Secret(name, [version], now, product=product, key_id=key_id)
        return version

    def put_version(self, name: str, value: str) -> Version:
        secret = self.secrets[name]
        for v in secret.versions:
            v.stages.discard("ACSPrevious")
            if "ACSCurrent" in v.stages:
                v.stages.discard("ACSCurrent")
                v.stages.add("ACSPrevious")
        version = Version(uuid.uuid4().hex, value.encode(), "text", {"ACSCurrent"}, self.clock())
        secret.versions.append(version)
        return version

    def schedule_deletion(self, name: str, days: int = 7) -> None:
        secret = self.secrets[name]
        secret.state = "PendingDelete"
        secret.planned_delete = self.clock() + days * 86400

    def add_role(
        self,
        arn: str,
        policy: dict[str, Any],
        provider_arn: str = "",
        subject: str = "",
        *,
        trusted: tuple[str, ...] = (),
        external_id: str | None = None,
    ) -> Role:
        """A RAM role with ``policy``: assumable with an OIDC token of ``provider_arn`` for
        ``subject`` (RRSA), and by AssumeRole from the principals in ``trusted`` (an access
        key's ``principal``, or another role's :attr:`Role.principal`), giving
        ``external_id`` when set."""
        role = Role(arn, policy, provider_arn, subject, tuple(trusted), external_id)
        self.roles[arn] = role
        return role

    def issue_oidc_token(self, provider_arn: str, subject: str) -> str:
        token = "eyJ" + secrets.token_urlsafe(48)
        self.oidc_tokens[token] = (provider_arn, subject)
        return token

    def expire_temporary_credentials(self) -> int:
        """Make every STS credential issued so far expired (as if time passed)."""
        n = 0
        for identity in self.identities.values():
            if identity.security_token is not None:
                identity.expires = self.clock() - 1
                n += 1
        return n

    def max_calls_in_window(self, action: str = "GetSecretValue", window: float = 1.0) -> int:
        """The most accepted calls of ``action`` seen in any ``window`` seconds."""
        times = sorted(t for t, a, _ in self.calls if a == action)
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def _temporary(self, policy: dict[str, Any], principal: str, duration: float) -> Identity:
        ak = "STS." + secrets.token_hex(10)
        ident = Identity(
            ak, secrets.token_urlsafe(24), policy, principal,
            security_token="CAIS" + secrets.token_urlsafe(40),
            expires=self.clock() + (self.temp_duration or duration),
        )  # fmt: skip
        self.identities[ak] = ident
        return ident

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/", self._root)
        app.router.add_put("/latest/api/token", self._metadata_token)
        app.router.add_get("/latest/meta-data/ram/security-credentials/", self._metadata_role)
        app.router.add_get(
            "/latest/meta-data/ram/security-credentials/{role}", self._metadata_creds
        )
        return app

    def _reply(self, status: int, body: dict[str, Any]) -> web.Response:
        return web.Response(
            status=status, body=json.dumps(body).encode(), content_type="application/json"
        )

    def _error(self, exc: KmsError, request_id: str) -> web.Response:
        self.rejections.append(exc.code)
        body = {"HttpStatus": exc.status, "Code": exc.code, "Message": exc.message,
                "RequestId": request_id, **exc.extra}  # fmt: skip
        return self._reply(exc.status, body)

    def _dkms_error(self, exc: KmsError, request_id: str) -> web.Response:
        """dkms-gcs refusals: protobuf ``Error{StatusCode, ErrorCode, ErrorMessage, RequestId}``."""
        self.rejections.append(exc.code)
        body = pb_encode([(1, exc.status), (2, exc.code), (3, exc.message), (4, request_id)])
        return web.Response(status=exc.status, body=body, content_type=PROTOBUF)

    async def _faults(self, request: web.Request, dkms: bool = False) -> web.StreamResponse | None:
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        if not self.faults.next:
            return None
        fault = self.faults.next.popleft()
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if fault == "hang":
            await asyncio.Event().wait()
        if fault == "garbage":
            return web.Response(
                status=200, body=b"<html>upstream proxy error", content_type="text/html"
            )
        if fault == "throttle":
            message = "Request was denied due to request throttling."
            exc = KmsError(429, "Rejected.Throttling", message)
        else:
            code = "ServiceUnavailableTemporary" if fault == "503" else "InternalFailure"
            exc = KmsError(int(fault), code, "The request processing has failed.")
        return self._dkms_error(exc, "x") if dkms else self._error(exc, "x")

    def _is_dkms(self, request: web.Request) -> bool:
        """A dkms-gcs request (only a KMS instance speaks it): named by ``x-kms-apiname``."""
        return self.instance_id is not None and "x-kms-apiname" in request.headers

    async def _root(self, request: web.Request) -> web.StreamResponse:
        request_id = str(uuid.uuid4()).upper()
        dkms = self._is_dkms(request)
        faulted = await self._faults(request, dkms)
        if faulted is not None:
            return faulted
        body = await request.read()
        self.recorded.append(
            (request.method, request.rel_url.raw_path_qs, list(request.headers.items()), body)
        )
        if dkms:
            return self._dkms(request, body, request_id.lower())
        query = dict(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True))
        try:
            if query.get("Action") == "AssumeRoleWithOIDC":
                return self._assume_role_with_oidc(query, request_id)
            params = dict(query)
            if request.content_type == "application/x-www-form-urlencoded" and body:
                params.update(parse_qsl(body.decode(), keep_blank_values=True))
            auth = request.headers.get("Authorization", "")
            if auth.startswith("ACS3-HMAC-SHA256 "):
                identity, action, version = self._verify_acs3(request, auth, query, body)
            elif "Signature" in params:
                identity, action, version = self._verify_rpc_v1(request.method, params)
            else:
                raise KmsError(
                    400,
                    "MissingParameter",
                    "The input parameter Signature that is mandatory for processing this request is not supplied.",
                )
            if version != ("2015-04-01" if action == "AssumeRole" else "2016-01-20"):
                raise KmsError(400, "InvalidVersion", "Specified parameter Version is not valid.")
            if action == "AssumeRole":
                return self._assume_role(identity, params, request_id)
            return self._dispatch(identity, action, params, request_id)
        except KmsError as exc:
            return self._error(exc, request_id)

    # ------------------------------------------------------------------ signatures

    def _identity(self, ak: str, token: str | None) -> Identity:
        identity = self.identities.get(ak)
        if identity is None or (identity.expires is not None and self.clock() >= identity.expires):
            raise KmsError(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        if identity.security_token is not None and not (
            token and hmac.compare_digest(token.encode(), identity.security_token.encode())
        ):
            raise KmsError(
                400,
                "InvalidSecurityToken.MismatchWithAccessKey",
                "The security token does not match the access key.",
            )
        return identity

    def _check_time_and_nonce(self, stamp: str, nonce: str) -> None:
        try:
            when = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            raise KmsError(
                400,
                "IllegalTimestamp",
                f"The input parameter Timestamp {stamp!r} is not in ISO 8601 UTC.",
            ) from None
        now = self.clock()
        if abs(now - when) > TIME_WINDOW:
            raise KmsError(
                400, "IllegalTimestamp", "The request timestamp is outside the 15 minute window."
            )
        for old in [n for n, t in self.nonces.items() if now - t > 2 * TIME_WINDOW]:
            del self.nonces[old]
        if not nonce or nonce in self.nonces:
            raise KmsError(400, "SignatureNonceUsed", "Specified signature nonce was used already.")
        self.nonces[nonce] = now

    def _verify_acs3(
        self, request: web.Request, auth: str, query: dict[str, str], body: bytes
    ) -> tuple[Identity, str, str]:
        try:
            fields = dict(
                part.split("=", 1) for part in auth[len("ACS3-HMAC-SHA256 ") :].split(",")
            )
            ak, signed, given = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
        except (ValueError, KeyError):
            raise KmsError(
                400, "IncompleteSignature", "The Authorization header is malformed."
            ) from None
        names = signed.split(";")
        for required in ("host", "x-acs-action", "x-acs-version", "x-acs-date",
                         "x-acs-signature-nonce", "x-acs-content-sha256"):  # fmt: skip
            if required not in names:
                raise KmsError(400, "IncompleteSignature", f"The header {required} must be signed.")
        if names != sorted(names):
            raise KmsError(400, "IncompleteSignature", "SignedHeaders must be sorted.")
        headers = request.headers
        if headers.get("x-acs-content-sha256") != hashlib.sha256(body).hexdigest():
            raise KmsError(
                400, "IncompleteSignature", "x-acs-content-sha256 does not match the body."
            )
        canonical_query = "&".join(f"{rfc3986(k)}={rfc3986(v)}" for k, v in sorted(query.items()))
        canonical_headers = "".join(
            f"{n}:{','.join(sorted(v.strip() for v in headers.getall(n, [])))}\n" for n in names
        )
        canonical = "\n".join(
            [request.method, request.rel_url.raw_path or "/", canonical_query, canonical_headers,
             signed, headers["x-acs-content-sha256"]]
        )  # fmt: skip
        to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical.encode()).hexdigest()
        identity = self._identity(ak, headers.get("x-acs-security-token"))
        expected = hmac.new(identity.secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise KmsError(
                400,
                "SignatureDoesNotMatch",
                f"Specified signature is not matched with our calculation. server string to sign is:{to_sign}",
            )
        self._check_time_and_nonce(headers["x-acs-date"], headers["x-acs-signature-nonce"])
        return identity, headers["x-acs-action"], headers.get("x-acs-version", "")

    def _verify_rpc_v1(self, method: str, params: dict[str, str]) -> tuple[Identity, str, str]:
        for required in ("AccessKeyId", "SignatureMethod", "SignatureVersion", "SignatureNonce",
                         "Timestamp", "Action", "Version"):  # fmt: skip
            if required not in params:
                raise KmsError(
                    400,
                    "MissingParameter",
                    f"The input parameter {required} that is mandatory for processing this request is not supplied.",
                )
        if params["SignatureMethod"] != "HMAC-SHA1" or params["SignatureVersion"] != "1.0":
            raise KmsError(
                400, "InvalidParameter", "Only HMAC-SHA1 signature version 1.0 is served here."
            )
        unsigned = {k: v for k, v in params.items() if k != "Signature"}
        canonical = "&".join(f"{rfc3986(k)}={rfc3986(v)}" for k, v in sorted(unsigned.items()))
        to_sign = f"{method}&{rfc3986('/')}&{rfc3986(canonical)}"
        identity = self._identity(params["AccessKeyId"], params.get("SecurityToken"))
        digest = hmac.new(f"{identity.secret}&".encode(), to_sign.encode(), hashlib.sha1).digest()
        if not hmac.compare_digest(base64.b64encode(digest), params["Signature"].encode()):
            raise KmsError(
                400,
                "SignatureDoesNotMatch",
                f"Specified signature is not matched with our calculation. server string to sign is:{to_sign}",
            )
        self._check_time_and_nonce(params["Timestamp"], params["SignatureNonce"])
        return identity, params["Action"], params["Version"]

    # ------------------------------------------------------------------ KMS actions

    def _dispatch(
        self, identity: Identity, action: str, params: dict[str, str], request_id: str
    ) -> web.Response:
        handler = {
            "GetSecretValue": self._get_secret_value,
            "DescribeSecret": self._describe_secret,
            "ListSecrets": self._list_secrets,
        }.get(action)
        if handler is None:
            raise KmsError(400, "InvalidAction.NotFound", f"Specified api {action} is not found.")
        self.calls.append((self.clock(), action, identity.access_key_id))  # arrivals
        body = handler(identity, params)
        return self._reply(200, {**body, "RequestId": request_id})

    def _secret_for(self, policy: dict[str, Any], action: str, name: str) -> Secret:
        if not name:
            raise KmsError(
                400,
                "MissingParameter",
                "The input parameter SecretName that is mandatory for processing this request is not supplied.",
            )
        if name.startswith("acs:kms:"):
            name = name.split(":secret/", 1)[-1]
        if not allowed(policy, f"kms:{action}", self.arn(name)):
            raise KmsError(
                403,
                "Forbidden.NoPermission",
                f"This operation for {self.arn(name)} is forbidden by permission system.",
            )
        secret = self.secrets.get(name)
        if secret is None:
            raise KmsError(404, "Forbidden.ResourceNotFound", "The resource is not found.")
        return secret

    def _throttle(self, identity: Identity | None) -> None:
        """One window per account on the shared gateway; one per instance (both ways in)."""
        if self.instance_id is not None or identity is None:
            bucket = str(self.instance_id)
        else:
            bucket = identity.principal.split("/")[0] + self.account_id
        window = self._window.setdefault(bucket, deque())
        now = self.clock()
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= self.qps:
            raise KmsError(
                429, "Rejected.Throttling", "Request was denied due to request throttling."
            )
        window.append(now)

    def _version(self, secret: Secret, version_id: str | None, stage: str | None) -> Version:
        """The version GetSecretValue answers with (both protocols)."""
        if secret.state == "PendingDelete":
            message = "The resource is planned to be deleted."
            raise KmsError(409, "Rejected.ResourceInDeleteWindow", message)
        if not version_id and not stage:
            stage = "ACSCurrent"
        for v in secret.versions:
            if (not version_id or v.id == version_id) and (not stage or stage in v.stages):
                return v
        message = "The specified secret version is not found."
        raise KmsError(404, "Forbidden.ResourceNotFound", message)

    def _get_secret_value(self, identity: Identity, params: dict[str, str]) -> dict[str, Any]:
        self._throttle(identity)
        secret = self._secret_for(identity.policy, "GetSecretValue", params.get("SecretName", ""))
        if secret.key_id is not None:
            key_arn = f"acs:kms:{self.region}:{self.account_id}:key/{secret.key_id}"
            if not allowed(identity.policy, "kms:Decrypt", key_arn):
                raise KmsError(
                    403,
                    "Forbidden.NoPermission",
                    f"This operation (kms:Decrypt) for {key_arn} is forbidden by permission system.",
                    KeyId=secret.key_id,
                )
        v = self._version(secret, params.get("VersionId"), params.get("VersionStage"))
        return {
            "SecretName": secret.name, "VersionId": v.id, "SecretData": _secret_data(v),
            "SecretDataType": v.data_type,
            "VersionStages": {"VersionStage": sorted(v.stages)},
            "CreateTime": iso(v.created), "SecretType": secret.secret_type,
        }  # fmt: skip

    def _describe_secret(self, identity: Identity, params: dict[str, str]) -> dict[str, Any]:
        secret = self._secret_for(identity.policy, "DescribeSecret", params.get("SecretName", ""))
        body = {
            "Arn": self.arn(secret.name), "SecretName": secret.name,
            "EncryptionKeyId": secret.key_id or "", "CreateTime": iso(secret.created),
            "UpdateTime": iso(secret.versions[-1].created), "SecretType": secret.secret_type,
        }  # fmt: skip
        if secret.product:
            body["OwingService"] = secret.product
        if secret.planned_delete:
            body["PlannedDeleteTime"] = iso(secret.planned_delete)
        return body

    def _list_secrets(self, identity: Identity, params: dict[str, str]) -> dict[str, Any]:
        prefixes: list[str] = []
        if params.get("Filters"):
            try:
                for f in json.loads(params["Filters"]):
                    if f["Key"] == "SecretName":
                        prefixes += f["Values"]
            except (ValueError, KeyError, TypeError):
                raise KmsError(
                    400, "InvalidParameter", "Specified parameter Filters is not valid."
                ) from None
        try:
            page, size = int(params.get("PageNumber", "1")), int(params.get("PageSize", "10"))
        except ValueError:
            raise KmsError(
                400, "InvalidParameter", "PageNumber and PageSize must be integers."
            ) from None
        if not 1 <= size <= 100 or page < 1:
            raise KmsError(400, "InvalidParameter", "PageSize must be 1-100.")
        visible = [
            s for name, s in sorted(self.secrets.items())
            if allowed(identity.policy, "kms:ListSecrets", self.arn(name))
            and (not prefixes or any(name.startswith(p) for p in prefixes))
        ]  # fmt: skip
        may_list = allowed(identity.policy, "kms:ListSecrets", self.arn("*")) or any(
            allowed(identity.policy, "kms:ListSecrets", self.arn(n)) for n in self.secrets
        )
        if not may_list:
            raise KmsError(
                403,
                "Forbidden.NoPermission",
                "This operation for kms:ListSecrets is forbidden by permission system.",
            )
        chunk = visible[(page - 1) * size : page * size]
        return {
            "PageNumber": page, "PageSize": size, "TotalCount": len(visible),
            "SecretList": {"Secret": [
                {"SecretName": s.name, "CreateTime": iso(s.created), "SecretType": s.secret_type}
                for s in chunk
            ]},
        }  # fmt: skip

    # ------------------------------------------------------------------ dkms-gcs (ClientKey)

    def _dkms(self, request: web.Request, body: bytes, request_id: str) -> web.Response:
        try:
            client_key = self._verify_dkms(request, body)
            api = request.headers["x-kms-apiname"]
            if api != "GetSecretValue":
                raise KmsError(400, "InvalidApiName", f'The ApiName "{api}" is invalid.')
            try:
                fields = pb_decode(body)
                name, stage, version_id = (pb_string(fields, n) for n in (1, 2, 3))
            except ValueError:
                raise KmsError(
                    400, "InvalidParameter", "The specified parameter is not valid."
                ) from None
            self.calls.append((self.clock(), api, client_key.key_id))  # arrivals
            self._throttle(None)
            secret = self._secret_for(client_key.policy, api, name)
            v = self._version(secret, version_id or None, stage or None)
        except KmsError as exc:
            return self._dkms_error(exc, request_id)
        answer: list[tuple[int, str | int | list[str]]] = [(1, secret.name), (2, secret.secret_type), (3, _secret_data(v)),
                  (4, v.data_type), (5, sorted(v.stages)), (6, v.id),
                  (7, iso(v.created)), (8, request_id)]  # fmt: skip
        return web.Response(status=200, body=pb_encode(answer), content_type=PROTOBUF)

    def _verify_dkms(self, request: web.Request, body: bytes) -> ClientKey:
        """The ClientKey that signed this request, or the refusal (order: header checks,
        body hash, key, signature, time window)."""
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            low = name.lower()
            headers[low] = f"{headers[low]},{value}" if low in headers else value
        version = headers.get("x-kms-apiversion", "")
        if version != DKMS_API_VERSION:
            raise KmsError(400, "InvalidApiVersion", f'The ApiVersion "{version}" is invalid.')
        method = headers.get("x-kms-signaturemethod")
        if not method:
            raise KmsError(400, "InvalidParam", "The Param x-kms-signaturemethod is invalid.")
        if method != DKMS_SIGNATURE_METHOD:
            raise KmsError(
                400,
                "InvalidParam",
                f'The Param x-kms-signaturemethod is invalid. message:"{method}".',
            )
        key_id = headers.get("x-kms-acccesskeyid")
        if not key_id:
            raise KmsError(
                400,
                "MissingParameter",
                "Parameter x-kms-acccesskeyid does not exist in http header or body.",
            )
        try:
            when = calendar.timegm(time.strptime(headers.get("date", ""), RFC1123))
        except ValueError:
            raise KmsError(400, "InvalidParam", "The Param Date is invalid.") from None
        if headers.get("content-sha256") != hashlib.sha256(body).hexdigest().upper():
            raise KmsError(400, "InvalidParam", "The Param content-sha256 is invalid.")
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise KmsError(400, "InvalidParam", "The Param Authorization is invalid.")
        client_key = self.client_keys.get(key_id)
        if client_key is None:
            raise KmsError(
                404,
                "Unauthorized",
                f"The AccessKey ID {key_id[:64]} does not exist in our records.",
            )
        to_sign = dkms_string_to_sign(request.method, headers)
        try:
            signature = base64.b64decode(auth[len("Bearer ") :], validate=True)
            client_key.public_key.verify(
                signature, to_sign.encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except (binascii.Error, InvalidSignature):
            raise KmsError(401, "SignatureNotMatch", "Signature is not matched.") from None
        if abs(self.clock() - when) > TIME_WINDOW:
            raise KmsError(
                400,
                "RequestTimeTooSkewed",
                "Request time exceeds server time more than 15 minutes.",
            )
        return client_key

    # ------------------------------------------------------------------ STS and metadata

    def _assume_role_with_oidc(self, query: dict[str, str], request_id: str) -> web.Response:
        self.sts_calls += 1
        role = self.roles.get(query.get("RoleArn", ""))
        token = self.oidc_tokens.get(query.get("OIDCToken", ""))
        if token is None:
            raise KmsError(
                400, "AuthenticationFail.OIDCToken.Invalid", "The OIDC token is invalid."
            )
        if (
            role is None
            or token != (role.provider_arn, role.subject)
            or query.get("OIDCProviderArn") != role.provider_arn
        ):
            raise KmsError(
                403,
                "AuthenticationFail.NoPermission",
                "The role's trust policy does not allow this token.",
            )
        duration = float(query.get("DurationSeconds", "3600"))
        ident = self._temporary(role.policy, role.principal, duration)
        return self._sts_reply(ident, role, request_id)

    def _sts_reply(self, ident: Identity, role: Role, request_id: str) -> web.Response:
        return self._reply(200, {"RequestId": request_id, "Credentials": {
            "AccessKeyId": ident.access_key_id, "AccessKeySecret": ident.secret,
            "SecurityToken": ident.security_token, "Expiration": iso(ident.expires or 0),
        }, "AssumedRoleUser": {"Arn": role.arn}})  # fmt: skip

    def _assume_role(
        self, identity: Identity, params: dict[str, str], request_id: str
    ) -> web.Response:
        """STS AssumeRole by a verified caller: trust, ExternalId, then the role's credentials."""
        self.sts_calls += 1
        self.calls.append((self.clock(), "AssumeRole", identity.access_key_id))
        name = params.get("RoleSessionName", "")
        if not 2 <= len(name) <= 64 or not all(c.isalnum() or c in "._@-" for c in name):
            raise KmsError(
                400,
                "InvalidParameter.RoleSessionName",
                "The parameter RoleSessionName is wrongly formed.",
            )
        duration = params.get("DurationSeconds", "3600")
        if not duration.isdigit() or not 900 <= int(duration) <= 43200:
            raise KmsError(
                400,
                "InvalidParameter.DurationSeconds",
                "The Min/Max value of DurationSeconds is 15min/12hr.",
            )
        role = self.roles.get(params.get("RoleArn", ""))
        if role is None:
            raise KmsError(404, "EntityNotExist.Role", "The specified Role not exists .")
        given = params.get("ExternalId")
        if identity.principal not in role.trusted or (
            role.external_id is not None
            and not (given and hmac.compare_digest(given.encode(), role.external_id.encode()))
        ):
            raise KmsError(
                403,
                "NoPermission",
                "You are not authorized to do this action. You should be authorized by RAM.",
            )
        policy = role.policy
        if "Policy" in params:
            try:
                session_policy = json.loads(params["Policy"])
            except ValueError:
                session_policy = None
            if not isinstance(session_policy, dict):
                raise KmsError(
                    400,
                    "InvalidParameter.PolicyGrammar",
                    "The parameter Policy has not passed grammar check.",
                )
            policy = {"AllOf": [role.policy, session_policy]}
        ident = self._temporary(policy, role.principal, float(duration))
        return self._sts_reply(ident, role, request_id)

    async def _metadata_token(self, request: web.Request) -> web.Response:
        ttl = request.headers.get("X-aliyun-ecs-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400, text="ttl seconds 1-21600 required")
        token = secrets.token_urlsafe(32)
        self.metadata_tokens.add(token)
        return web.Response(text=token)

    def _metadata_auth(self, request: web.Request) -> None:
        if request.headers.get("X-aliyun-ecs-metadata-token") not in self.metadata_tokens:
            raise web.HTTPUnauthorized(text="metadata token required")

    async def _metadata_role(self, request: web.Request) -> web.Response:
        self._metadata_auth(request)
        if self.ecs_role is None:
            raise web.HTTPNotFound()
        return web.Response(text=self.ecs_role[0])

    async def _metadata_creds(self, request: web.Request) -> web.Response:
        self._metadata_auth(request)
        self.metadata_calls += 1
        if self.ecs_role is None or request.match_info["role"] != self.ecs_role[0]:
            raise web.HTTPNotFound()
        ident = self._temporary(self.ecs_role[1], f"ecs-role/{self.ecs_role[0]}", 6 * 3600)
        return web.json_response({
            "AccessKeyId": ident.access_key_id, "AccessKeySecret": ident.secret,
            "SecurityToken": ident.security_token, "Expiration": iso(ident.expires or 0),
            "LastUpdated": iso(self.clock()), "Code": "Success",
        })  # fmt: skip


def main() -> None:  # pragma: no cover - for local development
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument(
        "--qps",
        type=int,
        default=GET_SECRET_VALUE_QPS,
        help="GetSecretValue quota (the real one by default; the bench raises it)",
    )
    parser.add_argument("--secrets", type=int, default=0, help="also create bench/s0..N-1")
    parser.add_argument("--instance", metavar="KST_ID", help="serve this KMS instance on TLS")
    parser.add_argument(
        "--out",
        type=Path,
        help="with --instance: where ca.pem, clientkey.json and clientkey-password are written",
    )
    args = parser.parse_args()
    if args.instance and not args.out:
        parser.error("--instance needs --out DIR for the CA and the ClientKey files")
    emulator = KmsEmulator(qps=args.qps, instance_id=args.instance)
    for i in range(args.secrets):
        emulator.add_secret(f"bench/s{i}", "x" * 120)
    read = {"Statement": [{"Effect": "Allow", "Action": ["kms:GetSecretValue", "kms:List*",
            "kms:DescribeSecret", "kms:Decrypt"], "Resource": ["*"]}]}  # fmt: skip
    ak, sk = emulator.add_access_key(read)
    emulator.add_secret("aigw!secret-abc", "demo-value", product="aigw")
    emulator.add_secret("db-password", "hunter2")
    print(f"ALIBABA_CLOUD_ACCESS_KEY_ID={ak}\nALIBABA_CLOUD_ACCESS_KEY_SECRET={sk}")
    context = None
    if args.instance:
        tls = make_instance_tls(emulator.instance_host, days=30)
        context = tls.server_context()
        args.out.mkdir(parents=True, exist_ok=True)
        issued = emulator.add_client_key(read)
        tls.write_ca(args.out / "ca.pem")
        (args.out / "clientkey.json").write_text(issued.content)
        (args.out / "clientkey-password").write_text(issued.password)
        print(
            f"ClientKey {issued.key_id}: {args.out}/clientkey.json, password in "
            f"{args.out}/clientkey-password; CA {args.out}/ca.pem"
        )
        print(
            f'endpoint = "https://127.0.0.1:{args.port}"  # certificate for '
            f"{emulator.instance_host}, localhost, 127.0.0.1",
            flush=True,
        )
    else:
        print(f'endpoint = "http://127.0.0.1:{args.port}"', flush=True)
    web.run_app(emulator.app(), host="127.0.0.1", port=args.port, ssl_context=context)


if __name__ == "__main__":  # pragma: no cover
    main()
