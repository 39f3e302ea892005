"""The command line: parsing, refusal of bad settings (exit 2), the settings listing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastpath import cli


def test_bad_setting_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--workers", "lots"]) == 2
    err = capsys.readouterr().err
    assert "'workers'" in err and "integer" in err


def test_bad_bind_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--bind", "localhost"]) == 2
    assert "'bind'" in capsys.readouterr().err


def test_bad_set_syntax_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["settings", "--set", "workers"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_missing_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_settings_listing_applies_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text('bind = "127.0.0.1:9999"\n[http]\nmax_headers = 50\n')
    code = cli.main(
        ["settings", "--config", str(cfg), "--workers", "2", "--set", "http.max_headers=60"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "bind = '127.0.0.1:9999'" in out
    assert "workers = 2" in out
    assert "http.max_headers = 60" in out


def test_no_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
