"""The settings table: defaults, TOML, flags, refusal of bad values, and its document."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastpath import settings
from fastpath.errors import SettingsError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_issue_contract() -> None:
    s = settings.load()
    assert s["data_dir"] == "./data"
    assert s.bind_address == ("127.0.0.1", 8774)
    assert s["workers"] == 0
    assert s.worker_count == (os.cpu_count() or 1)
    assert s["http.max_header_size"] == 16384
    assert s["http.max_body_size"] == 1024 * 1024
    assert s["auth.strategy"] == "noauth2"


def test_toml_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "fastpath.toml"
    cfg.write_text(
        'data_dir = "/srv/fastpath"\nworkers = 3\n\n[http]\nmax_body_size = 2048\n'
        'keepalive_timeout = 5\n'
    )
    s = settings.load(str(cfg), {"workers": "4", "http.header_timeout": "2.5"})
    assert s["data_dir"] == "/srv/fastpath"
    assert s["workers"] == 4  # the flag wins over the file
    assert s.worker_count == 4
    assert s["http.max_body_size"] == 2048
    assert s["http.keepalive_timeout"] == 5.0  # an integer is accepted for a float
    assert s["http.header_timeout"] == 2.5
    assert s.source == str(cfg)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"workers": "-1"}, "workers"),
        ({"workers": "many"}, "workers"),
        ({"workers": "257"}, "workers"),
        ({"bind": "8774"}, "bind"),
        ({"bind": "127.0.0.1:99999"}, "bind"),
        ({"bind": ":80"}, "bind"),
        ({"http.max_header_size": "10"}, "http.max_header_size"),
        ({"auth.strategy": "keystone-maybe"}, "auth.strategy"),
        ({"auth.default_project": "a:b"}, "auth.default_project"),
        ({"http.public_url": "ftp://x"}, "http.public_url"),
        ({"debug.test_routes": "perhaps"}, "debug.test_routes"),
        ({"no.such.setting": "1"}, "no.such.setting"),
    ],
)
def test_bad_values_are_refused_naming_the_key(overrides: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings.load(None, overrides)
    assert named in str(info.value)


def test_bad_toml_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("workers = = 2\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        settings.load(str(cfg))
    cfg.write_text("[http]\nmax_body_size = 'big'\n")
    with pytest.raises(SettingsError, match="http.max_body_size"):
        settings.load(str(cfg))
    cfg.write_text("[http]\nmax_bodysize = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'http.max_bodysize'"):
        settings.load(str(cfg))
    with pytest.raises(SettingsError, match="does not exist"):
        settings.load(str(tmp_path / "missing.toml"))


def test_ipv6_bind() -> None:
    assert settings.load(None, {"bind": "[::1]:9000"}).bind_address == ("::1", 9000)


def test_replace_validates() -> None:
    s = settings.load()
    assert s.replace(workers=2)["workers"] == 2
    with pytest.raises(SettingsError):
        s.replace(workers=-3)


def test_settings_document_is_current() -> None:
    """docs/settings.md is generated; regenerate with `fastpath settings --markdown`."""
    doc = (ROOT / "docs" / "settings.md").read_text()
    assert doc == settings.markdown()
    for s in settings.SETTINGS:
        assert f"`{s.name}`" in doc


def test_extension_groups_match_the_views_table() -> None:
    from fastpath.api.views import GROUPS

    assert set(settings.EXTENSION_GROUPS) == set(GROUPS)
    assert settings.load(None, {"api.disabled_extensions": "OS-EXT-STS, OS-DCF"})
    with pytest.raises(SettingsError, match="api.disabled_extensions"):
        settings.load(None, {"api.disabled_extensions": "OS-EXT-NOPE"})
