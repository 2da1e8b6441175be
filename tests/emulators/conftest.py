"""Fixtures for the Alibaba KMS emulator in KMS-instance mode (the dedicated gateway on TLS).

``kms_instance`` is a fresh emulator for :data:`INSTANCE_ID`; ``instance_tls`` a new test CA
and the instance's server certificate (a new CA per test, so no client trusts it by
accident); ``kms_instance_url`` serves the emulator on ``https://127.0.0.1:PORT`` with that
certificate; ``instance_ca_file`` is the CA as a PEM file, for clients' ``ca_file`` options.
"""

from __future__ import annotations

import sys

import pytest

from tests.emulators.alibaba_kms import KmsEmulator, make_instance_tls

#: A KMS instance id in Alibaba's shape (``kst-``, a region code, then an id).
INSTANCE_ID = "kst-hzz65f1e2b3c4d5e6f7a8b"


@pytest.fixture(name="kms_instance")
def _kms_instance() -> KmsEmulator:
    """A fresh emulator of a KMS instance (not yet serving)."""
    return KmsEmulator(instance_id=INSTANCE_ID)


@pytest.fixture(name="instance_tls")
def _instance_tls(kms_instance):
    """A new CA and a certificate for the instance's host name, localhost and 127.0.0.1."""
    return make_instance_tls(kms_instance.instance_host)


def close_sdk_connections() -> None:
    """Close the connections the vendor SDKs keep in class-level pools across tests."""
    for module, name in (("Tea.core", "TeaCore"), ("darabonba.core", "DaraCore")):
        core = getattr(sys.modules.get(module), name, None)
        sessions = getattr(core, "_sessions", {})
        for session in sessions.values():
            session.close()
        sessions.clear()


@pytest.fixture(name="kms_instance_url")
async def _kms_instance_url(aiohttp_server, kms_instance, instance_tls):
    """The instance emulator on TLS at 127.0.0.1: RAM-auth OpenAPI and dkms-gcs on ``/``."""
    server = await aiohttp_server(
        kms_instance.app(), host="127.0.0.1", ssl=instance_tls.server_context()
    )
    yield f"https://127.0.0.1:{server.port}"
    close_sdk_connections()
    # A TLS connection still open when the server stops waits for the peer's close_notify,
    # which a pooled client never sends, and outlives the test's loop: end them here.
    for handler in server.runner.server.connections:
        if handler.transport is not None:
            handler.transport.abort()


@pytest.fixture(name="instance_ca_file")
def _instance_ca_file(tmp_path, instance_tls):
    """The instance CA as a PEM file."""
    return instance_tls.write_ca(tmp_path / "instance-ca.pem")
