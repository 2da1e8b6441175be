"""What a ``[[sources]]`` table may hold, one frozen dataclass per provider.

These classes are the one list of each provider's settings: their names, types, choices
(``Literal``), defaults and bounds (field metadata ``lo``/``hi``, read by the loader).
:mod:`kms_agent.config` builds them from the table, so a wrong type, an unknown key or a
broken cross-field rule is a config error at load time naming the dotted key; then the
provider reads the typed fields and makes only the checks that need the environment or a
file (``$AWS_REGION``, a CA certificate that must load).

This module imports neither :mod:`kms_agent.config` nor a provider, so the loader can
import it. A ``credentials`` table is passed through as given: the provider's
``kms_agent.credentials.*.resolve`` validates it. Settings that may hold a credential are
left out of the repr.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

from kms_agent.errors import ConfigError
from kms_agent.grammar import ROLE_ARN_RE

#: Alibaba's documented GetSecretValue quota on the shared gateway, per account.
SHARED_GATEWAY_QPS = 450.0
#: A KMS instance's dedicated gateway: its QPS is what was bought; stay modest unless told.
DEDICATED_GATEWAY_QPS = 200.0
#: Where Vault's Kubernetes auth reads the pod's service-account token by default.
K8S_JWT = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """What every provider's options have: their own cross-field checks."""

    def validate(self, where: str) -> None:
        """Rules between settings that no single field's type can say; ``where`` is the
        source's dotted key (``sources.NAME``)."""

    @classmethod
    def of(cls, options: SourceOptions) -> Self:
        """``options`` as this provider's own (a source handed to the wrong provider is a
        programming error, not a config one)."""
        if not isinstance(options, cls):
            raise TypeError(f"{cls.__name__} expected, got {type(options).__name__}")
        return options


@dataclass(frozen=True, slots=True)
class CloudOptions(SourceOptions):
    """What every cloud source takes: its quota, deadline, retries, endpoints, identity."""

    #: None: the provider's default (:meth:`default_qps`).
    rate_limit_qps: float | None = None
    #: One call's deadline, retries included (a tenth of a second to five minutes).
    timeout_seconds: float = field(default=10.0, metadata={"lo": 0.1, "hi": 300})
    #: Attempts of one call within that deadline (1: no retries).
    max_attempts: int = field(default=4, metadata={"lo": 1, "hi": 20})
    #: Tried in this order (failover); instead of the provider's single endpoint setting.
    endpoints: tuple[str, ...] | None = None
    #: ``[sources.credentials]``, as given; the provider's credential resolver checks it.
    credentials: Mapping[str, Any] = field(default_factory=dict, repr=False)

    #: The quota a source keeps to when rate_limit_qps is not given.
    DEFAULT_QPS: ClassVar[float] = 100.0

    def default_qps(self) -> float:
        return self.DEFAULT_QPS

    def max_qps(self) -> tuple[float, str] | None:
        """The most rate_limit_qps may be, and why; None: no bound but above 0."""
        return None

    @property
    def qps(self) -> float:
        """The source's quota: rate_limit_qps, else the provider's default."""
        return self.default_qps() if self.rate_limit_qps is None else self.rate_limit_qps

    def validate(self, where: str) -> None:
        qps, most = self.qps, self.max_qps()
        if qps <= 0 or (most is not None and qps > most[0]):
            bound = f" and at most {most[0]:g}, {most[1]}" if most is not None else ""
            raise ConfigError(f"{where}.rate_limit_qps: {qps:g} must be above 0{bound}")


@dataclass(frozen=True, slots=True)
class AlibabaOptions(CloudOptions):
    """Alibaba Cloud KMS: the shared gateway (by region or endpoint) or a KMS instance's
    dedicated gateway (``gateway = "dedicated"``, with instance_id or endpoint, ca_file)."""

    region: str | None = None
    network: Literal["public", "vpc"] = "public"
    gateway: Literal["shared", "dedicated"] = "shared"
    instance_id: str | None = None
    endpoint: str | None = None
    ca_file: str | None = None
    #: RAM credentials (the OpenAPI, either gateway) or a ClientKey (dedicated only).
    auth: Literal["ram", "client_key"] = "ram"
    client_key_file: str | None = None
    client_key_password_file: str | None = None
    client_key_password_env: str | None = None
    account_id: str | int = "*"

    def default_qps(self) -> float:
        return DEDICATED_GATEWAY_QPS if self.gateway == "dedicated" else self.DEFAULT_QPS

    def max_qps(self) -> tuple[float, str] | None:
        if self.gateway == "dedicated":
            return None  # what the instance was bought with
        return SHARED_GATEWAY_QPS, (
            "the shared gateway's GetSecretValue quota per account (shared by all clients)"
        )

    def validate(self, where: str) -> None:
        CloudOptions.validate(self, where)
        if self.auth == "client_key":
            if self.gateway != "dedicated":
                raise ConfigError(
                    f'{where}.auth: "client_key" is a way into a KMS instance: set '
                    'gateway = "dedicated" with instance_id (or endpoint) and ca_file'
                )
            if not self.client_key_file:
                raise ConfigError(
                    f"{where}.client_key_file: the ClientKey JSON file is required for "
                    'auth = "client_key"'
                )
        if (
            self.gateway == "shared"
            and not self.region
            and self.endpoint is None
            and self.endpoints is None
        ):
            raise ConfigError(
                f"{where}.region: give the region (like 'cn-hangzhou') or an endpoint"
            )


@dataclass(frozen=True, slots=True)
class AwsOptions(CloudOptions):
    """AWS Secrets Manager; region and endpoint fall back to ``$AWS_REGION`` (or
    ``$AWS_DEFAULT_REGION``) and ``$AWS_ENDPOINT_URL_SECRETSMANAGER``."""

    region: str | None = None
    endpoint: str | None = None
    #: Roles a caller may ask the source to read as (ARNs).
    assume_roles: tuple[str, ...] = ()

    DEFAULT_QPS: ClassVar[float] = 50.0

    def validate(self, where: str) -> None:
        CloudOptions.validate(self, where)
        for i, role in enumerate(self.assume_roles):
            if ROLE_ARN_RE.fullmatch(role) is None:
                raise ConfigError(
                    f"{where}.assume_roles[{i}]: {role!r} is not a role ARN like "
                    "arn:aws:iam::123456789012:role/reader"
                )


@dataclass(frozen=True, slots=True)
class HuaweiOptions(CloudOptions):
    """Huawei Cloud CSMS; project_id falls back to ``$HUAWEICLOUD_SDK_PROJECT_ID``."""

    region: str | None = None
    project_id: str | None = None
    endpoint: str | None = None

    DEFAULT_QPS: ClassVar[float] = 50.0

    def validate(self, where: str) -> None:
        CloudOptions.validate(self, where)
        if not self.region and self.endpoint is None and self.endpoints is None:
            raise ConfigError(f"{where}.region: give the region (like 'cn-north-4')")


@dataclass(frozen=True, slots=True)
class VaultOptions(CloudOptions):
    """HashiCorp Vault / OpenBao KV v2; address and token fall back to ``$VAULT_ADDR`` and
    ``$VAULT_TOKEN``."""

    address: str | None = None
    mount: str = "secret"
    namespace: str | None = None
    auth: Literal["token", "approle", "kubernetes"] = "token"
    #: None: the auth method's own name.
    auth_mount: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    role_id: str | None = None
    secret_id: str | None = field(default=None, repr=False)
    secret_id_file: str | None = None
    role: str | None = None
    jwt_file: str = K8S_JWT
    #: KV v2 answers carry no path: a crossed answer (another secret's) is caught by
    #: reading the version's metadata beside it and comparing (a second call a fetch).
    verify_answers: bool = True
    ca_file: str | None = None

    def validate(self, where: str) -> None:
        CloudOptions.validate(self, where)
        if self.auth == "approle" and not (
            self.role_id and (self.secret_id or self.secret_id_file)
        ):
            raise ConfigError(
                f"{where}: approle auth needs role_id and secret_id (or secret_id_file)"
            )
        if self.auth == "kubernetes" and not self.role:
            raise ConfigError(f"{where}.role: kubernetes auth needs the Vault role")


@dataclass(frozen=True, slots=True)
class LocalOptions(SourceOptions):
    """The embedded encrypted store: ``path``, else the agent's data dir."""

    path: str | None = None

    def directory(self, data_dir: str, where: str) -> str:
        """The store's directory: ``path`` when given, else ``data_dir``."""
        path = data_dir if self.path is None else self.path
        if not path:
            raise ConfigError(f"{where}.path: {path!r} is not a directory path")
        return path

    def validate(self, where: str) -> None:
        if self.path is not None:
            self.directory("", where)


#: Every provider by name, with what its ``[[sources]]`` table takes: the one list.
PROVIDERS: dict[str, type[SourceOptions]] = {
    "local": LocalOptions,
    "alibaba": AlibabaOptions,
    "huawei": HuaweiOptions,
    "aws": AwsOptions,
    "vault": VaultOptions,
}
