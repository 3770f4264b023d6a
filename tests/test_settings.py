"""Settings come from the environment and from a .env file; .env.example names them all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_LINE = re.compile(r"^#?\s?([A-Z][A-Z0-9_]*)=", re.MULTILINE)


def test_env_example_names_every_setting() -> None:
    named = EXAMPLE_LINE.findall((ROOT / ".env.example").read_text())
    assert len(named) == len(set(named)), "a variable is listed twice in .env.example"
    assert set(named) == {name.upper() for name in Settings.model_fields}


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [n.upper() for n in Settings.model_fields if f"`{n.upper()}`" not in readme]
    assert missing == []


def test_settings_are_read_from_a_dot_env_file_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("WIRO_MAX_IN_FLIGHT=5\nS3_BUCKET=from-file\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WIRO_MAX_IN_FLIGHT", raising=False)
    monkeypatch.setenv("S3_BUCKET", "from-env")
    settings = Settings()
    assert settings.wiro_max_in_flight == 5
    assert settings.s3_bucket == "from-env"
