"""The names settings go by outside Python: environment variables, flags, files."""

from __future__ import annotations

from collections.abc import Mapping

#: Environment variables that are not ``VALMI_SIDECAR_<FIELD>``.
ENV_CONFIG = "VALMI_SIDECAR_CONFIG"
ENV_API_URL = "VALMI_API_URL"
ENV_API_KEY = "VALMI_API_KEY"
ENV_API_KEY_FILE = "VALMI_API_KEY_FILE"
ENV_INGEST_TOKEN = "VALMI_SIDECAR_INGEST_TOKEN"  # noqa: S105 - a variable name, not a secret
ENV_INGEST_TOKEN_FILE = "VALMI_SIDECAR_INGEST_TOKEN_FILE"  # noqa: S105 - a variable name
ENV_PREFIX = "VALMI_SIDECAR_"
#: The file in the data directory where a running sidecar records where it listens, so
#: that an operator command given only the directory asks that sidecar and no other.
ADDRESS_NAME = "listening.json"

#: The fields that hold secrets, with the environment variables that set them directly
#: and through a file. The TOML file and the command line may only name the file.
SECRET_FIELDS: Mapping[str, tuple[str, str]] = {
    "api_key": (ENV_API_KEY, ENV_API_KEY_FILE),
    "ingest_token": (ENV_INGEST_TOKEN, ENV_INGEST_TOKEN_FILE),
}


def env_var(name: str) -> str:
    """The environment variable for a non-secret field: ``VALMI_SIDECAR_<FIELD>``."""
    return ENV_PREFIX + name.upper()


def flag(name: str) -> str:
    """The command-line flag for a field: ``--max-queue-bytes``."""
    return "--" + name.replace("_", "-")
