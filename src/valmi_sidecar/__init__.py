"""valmi-sidecar: a local buffering agent for the Valmi metering API."""

__version__ = "0.1.0"
