"""Settings loading: layers, validation, secrets. Every test passes its own env mapping."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from valmi_sidecar.config import (
    ConfigError,
    Secret,
    Settings,
    default_data_dir,
    is_loopback,
    load_settings,
    split_listen,
)

HOME = {"HOME": "/home/test"}


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    return path


def write_secret(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return path


# --- layers ---------------------------------------------------------------------------


def test_defaults_without_any_source() -> None:
    """No file, no variables, no flags: the dataclass defaults, data_dir from HOME."""
    s = load_settings(env=HOME)
    expected = dataclasses.replace(
        Settings(), data_dir=Path("/home/test/.local/state/valmi-sidecar")
    )
    assert expected == s


def test_file_overrides_defaults(tmp_path: Path) -> None:
    cfg = write_toml(
        tmp_path,
        'max_queue_events = 1_000\ndurability = "normal"\nbackoff_cap_s = 60\naccess_log = true\n',
    )
    s = load_settings(env=HOME, config_file=cfg)
    assert (1000, "normal", 60.0, True) == (
        s.max_queue_events,
        s.durability,
        s.backoff_cap_s,
        s.access_log,
    )
    assert isinstance(s.backoff_cap_s, float)


def test_config_file_from_environment_variable(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, "max_queue_events = 7\n")
    s = load_settings(env={**HOME, "VALMI_SIDECAR_CONFIG": str(cfg)})
    assert 7 == s.max_queue_events


def test_environment_overrides_file(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, "max_queue_events = 1000\nrate_limit_per_min = 50\n")
    s = load_settings(env={**HOME, "VALMI_SIDECAR_MAX_QUEUE_EVENTS": "2_000"}, config_file=cfg)
    assert (2000, 50) == (s.max_queue_events, s.rate_limit_per_min)


def test_flags_override_environment() -> None:
    env = {**HOME, "VALMI_SIDECAR_MAX_QUEUE_EVENTS": "2000", "VALMI_SIDECAR_DURABILITY": "normal"}
    s = load_settings(env=env, argv_overrides={"max_queue_events": "3000", "durability": None})
    assert (3000, "normal") == (s.max_queue_events, s.durability)


def test_every_plain_field_has_an_environment_variable() -> None:
    env = {
        **HOME,
        "VALMI_SIDECAR_LISTEN": "[::1]:9000",
        "VALMI_SIDECAR_DATA_DIR": "~/q",
        "VALMI_SIDECAR_API_URL": "http://localhost:8788/",
        "VALMI_SIDECAR_DURABILITY": "NORMAL",
        "VALMI_SIDECAR_MAX_QUEUE_BYTES": "4_194_304",
        "VALMI_SIDECAR_MAX_QUEUE_EVENTS": "10",
        "VALMI_SIDECAR_MAX_BODY_BYTES": "2048",
        "VALMI_SIDECAR_RATE_LIMIT_PER_MIN": "1000",
        "VALMI_SIDECAR_MAX_EVENT_AGE_S": "3600",
        "VALMI_SIDECAR_DEDUP_WINDOW_S": "60.5",
        "VALMI_SIDECAR_BACKOFF_BASE_S": "0.1",
        "VALMI_SIDECAR_BACKOFF_CAP_S": "5",
        "VALMI_SIDECAR_UPSTREAM_TIMEOUT_S": "3",
        "VALMI_SIDECAR_UPSTREAM_CONCURRENCY": "4",
        "VALMI_SIDECAR_FLUSH_BATCH_SIZE": "32",
        "VALMI_SIDECAR_FINAL_FLUSH_S": "1",
        "VALMI_SIDECAR_SHUTDOWN_GRACE_S": "2",
        "VALMI_SIDECAR_LOG_LEVEL": "debug",
        "VALMI_SIDECAR_LOG_FORMAT": "json",
        "VALMI_SIDECAR_ACCESS_LOG": "yes",
    }
    s = load_settings(env=env)
    assert (
        Settings(
            listen="[::1]:9000",
            data_dir=Path("/home/test/q"),
            api_url="http://localhost:8788",
            durability="normal",
            max_queue_bytes=4_194_304,
            max_queue_events=10,
            max_body_bytes=2048,
            rate_limit_per_min=1000,
            max_event_age_s=3600.0,
            dedup_window_s=60.5,
            backoff_base_s=0.1,
            backoff_cap_s=5.0,
            upstream_timeout_s=3.0,
            upstream_concurrency=4,
            flush_batch_size=32,
            final_flush_s=1.0,
            shutdown_grace_s=2.0,
            log_level="debug",
            log_format="json",
            access_log=True,
        )
        == s
    )


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("sk_api_abc123", 1_000),
        ("sk_live_abc123", 10_000),
        ("sk_test_abc123", 10_000),
        ("some_other_key", 10_000),
        (None, 10_000),
    ],
)
def test_the_default_rate_limit_follows_the_api_key_kind(key: str | None, expected: int) -> None:
    """Valmi's documented budgets: 1,000 a minute for ``sk_api_`` keys, 10,000 for SDK keys."""
    env = {**HOME, "VALMI_API_KEY": key} if key else HOME
    s = load_settings(env=env)
    assert None is s.rate_limit_per_min
    assert (expected, "api_key_kind") == (s.rate_limit_per_min_effective, s.rate_limit_source)


def test_a_rate_limit_that_is_set_wins_over_the_key_kind(tmp_path: Path) -> None:
    env = {**HOME, "VALMI_API_KEY": "sk_api_abc123"}
    for s in (
        load_settings(env={**env, "VALMI_SIDECAR_RATE_LIMIT_PER_MIN": "5000"}),
        load_settings(env=env, config_file=write_toml(tmp_path, "rate_limit_per_min = 5000\n")),
        load_settings(env=env, argv_overrides={"rate_limit_per_min": "5000"}),
    ):
        assert (5000, "setting") == (s.rate_limit_per_min_effective, s.rate_limit_source)
    with pytest.raises(ConfigError, match="RATE_LIMIT_PER_MIN: 'x' is not a whole number"):
        load_settings(env={**env, "VALMI_SIDECAR_RATE_LIMIT_PER_MIN": "x"})


def test_empty_environment_variable_counts_as_unset() -> None:
    s = load_settings(env={**HOME, "VALMI_SIDECAR_MAX_QUEUE_EVENTS": ""})
    assert Settings().max_queue_events == s.max_queue_events


def test_sidecar_api_url_wins_over_generic_one() -> None:
    env = {
        **HOME,
        "VALMI_API_URL": "https://a.example",
        "VALMI_SIDECAR_API_URL": "https://b.example",
    }
    assert "https://b.example" == load_settings(env=env).api_url


def test_relative_paths_in_file_are_taken_from_its_directory(tmp_path: Path) -> None:
    write_secret(tmp_path, "key", "sk_test_rel\n")
    cfg = write_toml(tmp_path, 'data_dir = "q"\napi_key_file = "key"\n')
    s = load_settings(env=HOME, config_file=cfg)
    assert tmp_path / "q" == s.data_dir
    assert s.api_key is not None
    assert "sk_test_rel" == s.api_key.reveal()


# --- unknown keys ---------------------------------------------------------------------


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, "max_queue_evnts = 5\n")
    with pytest.raises(ConfigError) as e:
        load_settings(env=HOME, config_file=cfg)
    msg = str(e.value)
    assert f"config file {cfg}: unknown key 'max_queue_evnts'" in msg
    assert "did you mean 'max_queue_events'" in msg
    assert "known keys:" in msg


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(env={**HOME, "VALMI_SIDECAR_CONFIG": str(tmp_path / "nope.toml")})


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, "max_queue_events = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(env=HOME, config_file=cfg)


def test_unknown_sidecar_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env={**HOME, "VALMI_SIDECAR_MAX_QUEUE_EVNTS": "5"})
    assert "unknown key 'VALMI_SIDECAR_MAX_QUEUE_EVNTS'" in str(e.value)
    assert "VALMI_SIDECAR_MAX_QUEUE_EVENTS" in str(e.value)


def test_sidecar_prefixed_api_key_points_to_the_right_variable() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env={**HOME, "VALMI_SIDECAR_API_KEY": "sk_live_x"})
    assert "VALMI_API_KEY or VALMI_API_KEY_FILE" in str(e.value)
    assert "sk_live_x" not in str(e.value)


def test_unknown_flag_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_settings(env=HOME, argv_overrides={"bogus": "1"})


def test_other_environment_variables_are_ignored() -> None:
    s = load_settings(env={**HOME, "VALMI_OTHER_TOOL": "x", "PATH": "/bin"})
    assert "127.0.0.1:8787" == s.listen


# --- bad values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("VALMI_SIDECAR_MAX_QUEUE_EVENTS", "abc", "'abc' is not a whole number"),
        ("VALMI_SIDECAR_MAX_QUEUE_EVENTS", "1.5", "'1.5' is not a whole number"),
        ("VALMI_SIDECAR_MAX_QUEUE_EVENTS", "0", "'0' must be greater than 0"),
        ("VALMI_SIDECAR_RATE_LIMIT_PER_MIN", "-5", "'-5' must be greater than 0"),
        ("VALMI_SIDECAR_BACKOFF_BASE_S", "soon", "'soon' is not a number"),
        ("VALMI_SIDECAR_UPSTREAM_TIMEOUT_S", "nan", "'nan' is not a number"),
        ("VALMI_SIDECAR_UPSTREAM_TIMEOUT_S", "inf", "'inf' is not a number"),
        ("VALMI_SIDECAR_ACCESS_LOG", "maybe", "true/false, 1/0 or yes/no"),
        ("VALMI_SIDECAR_DURABILITY", "extra", "use one of: full, normal"),
        ("VALMI_SIDECAR_LOG_LEVEL", "trace", "use one of: debug, info, warning, error"),
        ("VALMI_SIDECAR_LISTEN", "8787", "is not HOST:PORT"),
        ("VALMI_SIDECAR_LISTEN", "127.0.0.1:99999", "is not HOST:PORT"),
    ],
)
def test_bad_environment_value_names_the_variable(var: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env={**HOME, var: value})
    assert str(e.value).startswith(f"{var}: ")
    assert expected in str(e.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('max_queue_events = "many"', "max_queue_events: 'many' is not a whole number"),
        ("max_queue_events = true", "max_queue_events: True is not a whole number"),
        ("backoff_cap_s = [1]", "backoff_cap_s: [1] is not a number"),
        ('access_log = "perhaps"', "access_log: 'perhaps' is not a boolean"),
        ('durability = "off"', "durability: 'off' is not allowed; use one of: full, normal"),
        ("listen = 8787", "listen: 8787 is not HOST:PORT"),
        ("data_dir = 5", "data_dir: 5 is not a directory path"),
        ('data_dir = ""', "data_dir: '' is not a directory path"),
    ],
)
def test_bad_file_value_names_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    cfg = write_toml(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as e:
        load_settings(env=HOME, config_file=cfg)
    assert f"config file {cfg}: {expected}" in str(e.value)


def test_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--upstream-concurrency: 'x' is not a whole number"):
        load_settings(env=HOME, argv_overrides={"upstream_concurrency": "x"})


def test_pause_after_refusals_is_read_from_the_environment() -> None:
    assert 5 == load_settings(env=HOME).pause_after_refusals
    env = {**HOME, "VALMI_SIDECAR_PAUSE_AFTER_REFUSALS": "8"}
    assert 8 == load_settings(env=env).pause_after_refusals


def test_pause_after_a_single_refusal_is_an_error_that_says_why() -> None:
    """One refusal cannot tell a bad event from a bad setting: it would never dead-letter."""
    env = {**HOME, "VALMI_SIDECAR_PAUSE_AFTER_REFUSALS": "1"}
    with pytest.raises(ConfigError) as e:
        load_settings(env=env)
    assert str(e.value).startswith("pause_after_refusals (VALMI_SIDECAR_PAUSE_AFTER_REFUSALS)")
    assert "use 2 or more" in str(e.value)


def test_a_disk_budget_too_small_for_the_body_limit_is_an_error_that_says_how_much() -> None:
    """max_queue_bytes bounds the files, WAL included: a budget that cannot hold one
    request's worth of WAL and the room forwarding needs is refused at start-up."""
    env = {**HOME, "VALMI_SIDECAR_MAX_QUEUE_BYTES": "2000000"}
    with pytest.raises(
        ConfigError, match=r"^max_queue_bytes \(VALMI_SIDECAR_MAX_QUEUE_BYTES\).*max_body_bytes"
    ) as info:
        load_settings(env=env)
    least = int(str(info.value).split("use at least ")[1].split()[0])
    s = load_settings(env={**env, "VALMI_SIDECAR_MAX_QUEUE_BYTES": str(least)})
    assert least == s.max_queue_bytes
    # The 8 MiB with the default 1 MiB body limit is enough.
    assert (
        8 * 1024**2
        == load_settings(env=HOME, argv_overrides={"max_queue_bytes": "8388608"}).max_queue_bytes
    )


def test_backoff_base_above_cap_is_an_error() -> None:
    env = {**HOME, "VALMI_SIDECAR_BACKOFF_BASE_S": "10", "VALMI_SIDECAR_BACKOFF_CAP_S": "1"}
    with pytest.raises(ConfigError, match="VALMI_SIDECAR_BACKOFF_BASE_S"):
        load_settings(env=env)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.valmi.io", "https://api.valmi.io"),
        ("https://api.valmi.io/", "https://api.valmi.io"),
        ("http://127.0.0.1:8788", "http://127.0.0.1:8788"),
        ("http://[::1]:8788", "http://[::1]:8788"),
        ("http://valmi_fake:8788", "http://valmi_fake:8788"),
        ("https://api.valmi.io.", "https://api.valmi.io."),
        ("https://äpi.valmi.io", "https://äpi.valmi.io"),
        (f"https://{'a' * 63}.valmi.io", f"https://{'a' * 63}.valmi.io"),
    ],
)
def test_api_url_accepted(url: str, expected: str) -> None:
    assert expected == load_settings(env={**HOME, "VALMI_API_URL": url}).api_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://api.valmi.io", "is not an http:// or https:// URL"),
        ("api.valmi.io", "is not an http:// or https:// URL"),
        ("https://", "is not an http:// or https:// URL"),
        ("https://api.valmi.io/v1", "without a path"),
        ("https://api.valmi.io?x=1", "without a path, query"),
        ("https://user:pw@api.valmi.io", "must not carry credentials"),
        ("https://api.valmi.io:notaport", "is not a valid URL"),
        ("https://api.valmi.io:70000", "is not a valid URL"),
        ("https://api.valmi.io:0", "has port 0"),
        ("https://api..valmi.io", "host 'api..valmi.io' is not a valid name"),
        ("https://.valmi.io", "host '.valmi.io' is not a valid name"),
        (f"https://{'a' * 64}.valmi.io", "longer than 63 characters"),
        (f"https://{'a.' * 127}io", "longer than 253 characters"),
        ("https://-api.valmi.io", "starts or ends with '-'"),
        ("https://api valmi.io", "only letters, digits"),
        ("https://api%2evalmi.io", "only letters, digits"),
        ("https://999.1.1.1", "is not an IPv4 address"),
        ("https://10.0.0.1.2", "is not an IPv4 address"),
    ],
)
def test_api_url_rejected(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env={**HOME, "VALMI_API_URL": url})
    assert str(e.value).startswith("VALMI_API_URL: ")
    assert expected in str(e.value)


@pytest.mark.parametrize(
    ("url", "listen"),
    [
        ("http://127.0.0.1:8787", None),  # the default listen address
        ("http://localhost:8787", None),
        ("http://[::1]:8787", None),
        ("http://127.0.0.1:9000", "127.0.0.1:9000"),
        ("http://127.0.0.1:80", "127.0.0.1:80"),  # the scheme's port
    ],
)
def test_api_url_that_is_the_sidecars_own_address_is_refused(url: str, listen: str | None) -> None:
    """A mistyped URL that names the sidecar itself would have every event 'delivered' to
    the sidecar: a 202, counted delivered, never sent to Valmi."""
    env = {**HOME, "VALMI_API_URL": url}
    if listen is not None:
        env["VALMI_SIDECAR_LISTEN"] = listen
    with pytest.raises(ConfigError) as e:
        load_settings(env=env)
    assert str(e.value).startswith("api_url (VALMI_API_URL): ")
    assert "this sidecar's own listen address" in str(e.value)
    assert "https://api.valmi.io" in str(e.value)


@pytest.mark.parametrize(
    ("url", "listen"),
    [
        ("http://127.0.0.1:8788", None),  # the fake API beside it
        ("https://127.0.0.1:443", "127.0.0.1:8787"),
        ("http://10.0.0.5:8787", None),  # another host on the same port
        ("http://127.0.0.1:8787", "127.0.0.1:0"),  # a port the OS picks
    ],
)
def test_api_url_on_another_address_is_accepted(url: str, listen: str | None) -> None:
    env = {**HOME, "VALMI_API_URL": url}
    if listen is not None:
        env["VALMI_SIDECAR_LISTEN"] = listen
    assert url.rstrip("/") == load_settings(env=env).api_url.rstrip("/")


# --- secrets --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["api_key", "ingest_token"])
def test_secret_is_not_allowed_in_the_file(tmp_path: Path, key: str) -> None:
    cfg = write_toml(tmp_path, f'{key} = "sk_live_in_file"\n')
    with pytest.raises(ConfigError) as e:
        load_settings(env=HOME, config_file=cfg)
    msg = str(e.value)
    assert "not allowed in the config file" in msg
    assert "sk_live_in_file" not in msg


def test_api_key_message_names_the_environment_variables(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, 'api_key = "sk_live_in_file"\n')
    with pytest.raises(ConfigError, match="use VALMI_API_KEY / VALMI_API_KEY_FILE"):
        load_settings(env=HOME, config_file=cfg)


def test_secret_is_not_allowed_as_a_flag() -> None:
    with pytest.raises(ConfigError, match="VALMI_API_KEY"):
        load_settings(env=HOME, argv_overrides={"api_key": "sk_live_flag"})


def test_api_key_from_environment() -> None:
    s = load_settings(env={**HOME, "VALMI_API_KEY": "sk_live_env"})
    assert s.api_key is not None
    assert "sk_live_env" == s.api_key.reveal()


def test_api_key_from_file_is_stripped(tmp_path: Path) -> None:
    path = write_secret(tmp_path, "api_key", "  sk_live_file\n\n")
    s = load_settings(env={**HOME, "VALMI_API_KEY_FILE": str(path)})
    assert s.api_key is not None
    assert "sk_live_file" == s.api_key.reveal()


def test_api_key_file_from_toml(tmp_path: Path) -> None:
    path = write_secret(tmp_path, "api_key", "sk_live_toml\n")
    cfg = write_toml(tmp_path, f'api_key_file = "{path}"\n')
    s = load_settings(env=HOME, config_file=cfg)
    assert s.api_key is not None
    assert "sk_live_toml" == s.api_key.reveal()


def test_api_key_in_environment_overrides_key_file_in_toml(tmp_path: Path) -> None:
    path = write_secret(tmp_path, "api_key", "sk_live_toml\n")
    cfg = write_toml(tmp_path, f'api_key_file = "{path}"\n')
    s = load_settings(env={**HOME, "VALMI_API_KEY": "sk_live_env"}, config_file=cfg)
    assert s.api_key is not None
    assert "sk_live_env" == s.api_key.reveal()


def test_ingest_token_from_file_flag(tmp_path: Path) -> None:
    path = write_secret(tmp_path, "token", "tok_flag\n")
    s = load_settings(env=HOME, argv_overrides={"ingest_token_file": str(path)})
    assert s.ingest_token is not None
    assert "tok_flag" == s.ingest_token.reveal()


@pytest.mark.parametrize(
    ("direct", "via_file"),
    [
        ("VALMI_API_KEY", "VALMI_API_KEY_FILE"),
        ("VALMI_SIDECAR_INGEST_TOKEN", "VALMI_SIDECAR_INGEST_TOKEN_FILE"),
    ],
)
def test_secret_and_its_file_both_set_is_an_error(
    tmp_path: Path, direct: str, via_file: str
) -> None:
    path = write_secret(tmp_path, "s", "from_file_value\n")
    with pytest.raises(ConfigError) as e:
        load_settings(env={**HOME, direct: "direct_value", via_file: str(path)})
    msg = str(e.value)
    assert f"both {direct} and {via_file} are set" in msg
    assert "direct_value" not in msg
    assert "from_file_value" not in msg


def test_key_file_that_is_a_directory_names_the_path(tmp_path: Path) -> None:
    """Unreadable even for root: a directory."""
    with pytest.raises(ConfigError) as e:
        load_settings(env={**HOME, "VALMI_API_KEY_FILE": str(tmp_path)})
    assert f"VALMI_API_KEY_FILE: cannot read '{tmp_path}'" in str(e.value)


def test_missing_key_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(ConfigError, match="No such file"):
        load_settings(env={**HOME, "VALMI_API_KEY_FILE": str(path)})


def test_empty_key_file_is_an_error(tmp_path: Path) -> None:
    path = write_secret(tmp_path, "api_key", " \n")
    with pytest.raises(ConfigError, match=f"'{path}' is empty"):
        load_settings(env={**HOME, "VALMI_API_KEY_FILE": str(path)})


def test_binary_key_file_does_not_show_its_content(tmp_path: Path) -> None:
    path = tmp_path / "api_key"
    path.write_bytes(b"\xff\xfesk_live_bin")
    with pytest.raises(ConfigError) as e:
        load_settings(env={**HOME, "VALMI_API_KEY_FILE": str(path)})
    assert "is not UTF-8 text" in str(e.value)
    assert "sk_live_bin" not in str(e.value)


def test_secret_repr_and_str_hide_the_value() -> None:
    secret = Secret("sk_live_abcdef")
    assert "sk_live_abcdef" not in repr(secret)
    assert "sk_live_abcdef" not in str(secret)
    assert "sk_live_abcdef" not in f"{secret}"
    assert "sk_live_abcdef" == secret.reveal()


def test_settings_repr_hides_secrets() -> None:
    s = load_settings(
        env={**HOME, "VALMI_API_KEY": "sk_live_abcdef", "VALMI_SIDECAR_INGEST_TOKEN": "tok_xyz"}
    )
    assert "sk_live_abcdef" not in repr(s)
    assert "tok_xyz" not in repr(s)
    assert ["sk_live_abcdef", "tok_xyz"] == s.secrets()


# --- listen ---------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:8787", "[::]:8787", "10.1.2.3:80", "example.com:80"])
def test_non_loopback_listen_without_token_is_an_error(listen: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env={**HOME, "VALMI_SIDECAR_LISTEN": listen})
    msg = str(e.value)
    assert "VALMI_SIDECAR_INGEST_TOKEN" in msg
    assert "127.0.0.1" in msg


def test_non_loopback_listen_with_token_is_allowed() -> None:
    env = {**HOME, "VALMI_SIDECAR_LISTEN": "0.0.0.0:8787", "VALMI_SIDECAR_INGEST_TOKEN": "tok"}
    assert ("0.0.0.0", 8787) == split_listen(load_settings(env=env).listen)


def test_non_loopback_listen_with_token_file_is_allowed(tmp_path: Path) -> None:
    path = write_secret(tmp_path, "token", "tok\n")
    env = {
        **HOME,
        "VALMI_SIDECAR_LISTEN": "0.0.0.0:1",
        "VALMI_SIDECAR_INGEST_TOKEN_FILE": str(path),
    }
    assert "0.0.0.0" == load_settings(env=env).host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LOCALHOST"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


def test_listen_port_zero_is_allowed() -> None:
    """Tests and supervisors may ask for any free port."""
    s = load_settings(env={**HOME, "VALMI_SIDECAR_LISTEN": "127.0.0.1:0"})
    assert 0 == s.port


# --- data directory -------------------------------------------------------------------


def test_data_dir_from_state_directory() -> None:
    """systemd's StateDirectory=; the first of several."""
    env = {**HOME, "STATE_DIRECTORY": "/var/lib/valmi-sidecar:/var/lib/other"}
    assert Path("/var/lib/valmi-sidecar") == load_settings(env=env).data_dir


def test_data_dir_from_xdg_state_home() -> None:
    env = {**HOME, "XDG_STATE_HOME": "/xdg/state"}
    assert Path("/xdg/state/valmi-sidecar") == load_settings(env=env).data_dir


def test_relative_xdg_state_home_is_ignored() -> None:
    assert Path("/home/test/.local/state/valmi-sidecar") == default_data_dir(
        {**HOME, "XDG_STATE_HOME": "rel"}
    )


def test_explicit_data_dir_wins_over_state_directory(tmp_path: Path) -> None:
    env = {**HOME, "STATE_DIRECTORY": "/var/lib/x", "VALMI_SIDECAR_DATA_DIR": str(tmp_path)}
    assert tmp_path == load_settings(env=env).data_dir


def test_data_dir_tilde_expands_from_env_home() -> None:
    s = load_settings(env=HOME, argv_overrides={"data_dir": "~/queue"})
    assert Path("/home/test/queue") == s.data_dir


def test_loading_reads_no_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an env mapping given, os.environ plays no part."""
    monkeypatch.setenv("VALMI_SIDECAR_BOGUS", "1")
    monkeypatch.setenv("STATE_DIRECTORY", "/should/not/be/used")
    assert Path("/home/test/.local/state/valmi-sidecar") == load_settings(env=HOME).data_dir


def test_secret_file_mode_is_not_changed(tmp_path: Path) -> None:
    """Reading a key file must not touch it."""
    path = write_secret(tmp_path, "api_key", "sk\n")
    load_settings(env={**HOME, "VALMI_API_KEY_FILE": str(path)})
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)


# --- who may call: allowed_origins, allowed_hosts -------------------------------------------


def test_allowed_origins_and_hosts_from_every_layer(tmp_path: Path) -> None:
    """A TOML list, or comma-separated text in the environment and flags; normalized to
    lower case, brackets and duplicates dropped."""
    cfg = write_toml(
        tmp_path, 'allowed_origins = ["http://localhost:3000", "HTTPS://Dash.Example/"]\n'
    )
    s = load_settings(env=HOME, config_file=cfg)
    assert ("http://localhost:3000", "https://dash.example") == s.allowed_origins
    env = {**HOME, "VALMI_SIDECAR_ALLOWED_HOSTS": "sidecar.internal, [::1], Sidecar.Internal"}
    s = load_settings(env=env, config_file=cfg)
    assert ("sidecar.internal", "::1") == s.allowed_hosts
    s = load_settings(env=env, argv_overrides={"allowed_origins": "chrome-extension://abcdef"})
    assert ("chrome-extension://abcdef",) == s.allowed_origins
    assert () == load_settings(env=HOME).allowed_hosts


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ALLOWED_ORIGINS", "*", "'*' is not an origin"),
        ("ALLOWED_ORIGINS", "null", "'null' is not an origin"),
        ("ALLOWED_ORIGINS", "http://localhost:3000/app", "is not an origin"),
        ("ALLOWED_ORIGINS", "localhost:3000", "is not an origin"),
        ("ALLOWED_ORIGINS", "http://a.example,,http://b.example", "an entry is empty"),
        ("ALLOWED_HOSTS", "sidecar:8787", "give the name alone, without a port"),
        ("ALLOWED_HOSTS", "*.internal", "is not a host name"),
        ("ALLOWED_HOSTS", "http://sidecar", "is not a host name"),
    ],
)
def test_bad_allowed_origins_and_hosts_name_the_variable_and_the_entry(
    name: str, value: str, expected: str
) -> None:
    var = "VALMI_SIDECAR_" + name
    with pytest.raises(ConfigError) as err:
        load_settings(env={**HOME, var: value})
    assert str(err.value).startswith(var + ": ")
    assert expected in str(err.value)


def test_allowed_hosts_in_toml_must_be_a_list_of_strings(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, "allowed_hosts = [1, 2]\n")
    with pytest.raises(ConfigError, match=r"allowed_hosts: .* is not a list of host names"):
        load_settings(env=HOME, config_file=cfg)
