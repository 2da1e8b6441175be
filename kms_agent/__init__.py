"""kms-agent: a local secrets sidecar."""

__version__ = "0.1.0"
