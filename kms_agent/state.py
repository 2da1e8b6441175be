"""What the secrets listeners, the metrics listener and the lifecycle share.

No HTTP here (neither aiohttp nor the protocol): the state is plain data and a few small
helpers, so every layer above can use it and none below needs to.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from kms_agent.auth import Authenticator
from kms_agent.cache import Cache
from kms_agent.config import Config
from kms_agent.metrics import Metrics
from kms_agent.providers import Router


class Phase(enum.Enum):
    """Where the agent is in its life. ``/readyz``, the ready gauge and sd_notify's
    STATUS derive from it (:meth:`AgentState.enter`)."""

    STARTING = "starting"
    WAITING = "waiting"  # a source check failed: the reason says which
    READY = "ready"
    DRAINING = "draining"


@dataclass(slots=True)
class AgentState:
    """What the request path shares. Swapped attributes (config, token set) are atomic."""

    config: Config
    router: Router
    cache: Cache
    auth: Authenticator
    metrics: Metrics = field(default_factory=Metrics)
    phase: Phase = Phase.STARTING
    reason: str = "starting"
    request_prefix: str = field(default_factory=lambda: secrets.token_hex(4))
    request_counter: int = 0
    #: Cache hits not logged one by one, by route, since the last summary line.
    hit_counts: dict[str, int] = field(default_factory=dict)
    #: Refused requests not logged one by one, by status, since the last summary line.
    refused_counts: dict[int, int] = field(default_factory=dict)
    #: Called with the new phase and reason (the lifecycle tells systemd).
    on_phase: Callable[[Phase, str], None] | None = None

    def next_request_id(self) -> str:
        self.request_counter += 1
        return f"{self.request_prefix}-{self.request_counter:x}"

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    def enter(self, phase: Phase, reason: str = "") -> None:
        """Move to ``phase``; draining is final."""
        if self.phase is Phase.DRAINING:
            return
        self.phase = phase
        self.reason = reason or phase.value
        self.metrics.ready.set(1 if phase is Phase.READY else 0)
        if self.on_phase is not None:
            self.on_phase(phase, self.reason)

    def readiness(self) -> tuple[int, dict[str, str]]:
        """``/readyz``'s status and body."""
        if self.phase is Phase.READY:
            return 200, {"status": "ready"}
        return 503, {"status": "not_ready", "reason": self.reason}
