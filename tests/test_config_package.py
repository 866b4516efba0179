"""The config package's seams: its public surface, and the rules across settings checked
on their own, apart from loading."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import valmi_sidecar.config as config
from valmi_sidecar.config import ConfigError, Settings
from valmi_sidecar.config.validation import check_together

PACKAGE = Path(config.__file__).parent
#: Each module's place from the bottom; a module imports only modules below it.
ORDER = [
    "errors",
    "names",
    "paths",
    "secret",
    "addresses",
    "proxy",
    "settings",
    "validation",
    "loading",
]


def test_every_name_in_all_is_importable_from_the_package() -> None:
    missing = [name for name in config.__all__ if not hasattr(config, name)]
    assert [] == missing


def test_every_module_imports_only_modules_below_it() -> None:
    upward: list[str] = []
    for place, name in enumerate(ORDER):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 1
                and node.module not in ORDER[:place]
            ):
                upward.append(f"{name} imports {node.module}")
    assert [] == upward
    assert sorted(ORDER) == sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_check_together_names_where_each_value_came_from(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, backoff_base_s=10.0, backoff_cap_s=5.0)
    with pytest.raises(ConfigError) as err:
        check_together(settings, {"backoff_base_s": "VALMI_SIDECAR_BACKOFF_BASE_S"})
    assert (
        "backoff_base_s (VALMI_SIDECAR_BACKOFF_BASE_S) is 10 but backoff_cap_s (default) is 5; "
        "the base must not exceed the cap"
    ) == str(err.value)


def test_check_together_wants_a_token_off_loopback(tmp_path: Path) -> None:
    exposed = Settings(data_dir=tmp_path, listen="0.0.0.0:8787")
    with pytest.raises(ConfigError) as err:
        check_together(exposed, {"listen": "--listen"})
    assert str(err.value).startswith(
        "listen (--listen): '0.0.0.0:8787' is not a loopback address and no ingest token is set"
    )
