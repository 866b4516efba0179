"""Settings: one frozen object, built from defaults < TOML file < environment < CLI flags.

Unknown keys and bad values stop start-up with a ``ConfigError`` that names the key, the
place it came from, and says what is allowed. Secrets (the API key, the ingest token) are
wrapped in ``Secret`` so that no repr, log line or status page can show them; they come
from the environment or from a file, never from the TOML file or the command line.

Every public name is importable from here. Inside, from the bottom: ``errors``
(``ConfigError``), ``names`` (environment variables, flags, files), ``paths``,
``secret``, ``addresses`` (listen addresses, the API's URL), ``proxy``, ``settings``
(the fields and their help), ``validation`` (one value, and the rules across values)
and ``loading`` (the layers merged).
"""

from .addresses import is_loopback, split_listen, url_without_credentials
from .errors import ConfigError
from .loading import load_settings
from .names import (
    ADDRESS_NAME,
    ENV_API_KEY,
    ENV_API_KEY_FILE,
    ENV_API_URL,
    ENV_CONFIG,
    ENV_INGEST_TOKEN,
    ENV_INGEST_TOKEN_FILE,
    ENV_PREFIX,
    SECRET_FIELDS,
    env_var,
    flag,
)
from .paths import default_data_dir
from .proxy import env_proxy
from .secret import Secret, read_secret_file
from .settings import (
    API_KEY_PREFIX,
    API_KEY_RATE_LIMIT_PER_MIN,
    DEFAULT_TEXT,
    PLAIN_FIELDS,
    SDK_KEY_RATE_LIMIT_PER_MIN,
    SECRET_FILE_KEYS,
    GiB,
    Settings,
    field_choices,
    field_default,
    field_help,
    field_kind,
    field_metavar,
    key_rate_limit_per_min,
)
from .validation import MAX_INGEST_PROCESSES, MIN_PAUSE_AFTER_REFUSALS

__all__ = [
    "ADDRESS_NAME",
    "API_KEY_PREFIX",
    "API_KEY_RATE_LIMIT_PER_MIN",
    "DEFAULT_TEXT",
    "ENV_API_KEY",
    "ENV_API_KEY_FILE",
    "ENV_API_URL",
    "ENV_CONFIG",
    "ENV_INGEST_TOKEN",
    "ENV_INGEST_TOKEN_FILE",
    "ENV_PREFIX",
    "MAX_INGEST_PROCESSES",
    "MIN_PAUSE_AFTER_REFUSALS",
    "PLAIN_FIELDS",
    "SDK_KEY_RATE_LIMIT_PER_MIN",
    "SECRET_FIELDS",
    "SECRET_FILE_KEYS",
    "ConfigError",
    "GiB",
    "Secret",
    "Settings",
    "default_data_dir",
    "env_proxy",
    "env_var",
    "field_choices",
    "field_default",
    "field_help",
    "field_kind",
    "field_metavar",
    "flag",
    "is_loopback",
    "key_rate_limit_per_min",
    "load_settings",
    "read_secret_file",
    "split_listen",
    "url_without_credentials",
]
