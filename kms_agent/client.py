"""Kept for old imports (``from kms_agent.client import Client``): the client is the
``kms_agent_client`` package, its own distribution ``kms-agent-client`` (``client/``), which
the server ships too. Import it from there."""

from kms_agent_client import *  # noqa: F403
from kms_agent_client import __all__  # noqa: F401
