"""The settings file (SPEC 4): defaults, overrides from the environment, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.settings import config_path, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "postbackd.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_and_paths_relative_to_the_file(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""), {})
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.rules_path == (tmp_path / "rules.d").resolve()
    assert s.webhooks_path == (tmp_path / "webhooks").resolve()
    assert s.store == "sqlite:///../var/postbackd.db"
    assert s.outbound.timeout == 10
    assert s.outbound.per_host_concurrency == 8
    assert s.retention == 30 * 86400
    assert s.log.mask_pii is True
    assert s.secrets_path is None


def test_the_shipped_local_config_loads() -> None:
    path = Path(__file__).parent.parent / "config" / "postbackd.yaml"
    s = load_settings(path, {})
    assert s.rules_path == (path.parent.parent / "rules.d").resolve()
    assert s.outbound.allow_cidrs == ["127.0.0.1/32"]


def test_environment_overrides_top_level_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:9000\nlog: {level: warning}\n")
    s = load_settings(
        path,
        {
            "POSTBACKD_LISTEN": "0.0.0.0:7000",
            "POSTBACKD_RETENTION": "7d",
            "POSTBACKD_LOG": "{level: debug, format: json}",
            "POSTBACKD_SECRET_X": "not a setting",
            "POSTBACKD_CONFIG": "ignored here",
        },
    )
    assert (s.host, s.port, s.retention) == ("0.0.0.0", 7000, 7 * 86400)
    assert (s.log.level, s.log.format) == ("debug", "json")


def test_config_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert config_path(None, {}) is None
    assert config_path("a.yaml", {"POSTBACKD_CONFIG": "b.yaml"}) == Path("a.yaml")
    assert config_path(None, {"POSTBACKD_CONFIG": "b.yaml"}) == Path("b.yaml")
    write(tmp_path, "")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "postbackd.yaml").write_text("")
    assert config_path(None, {}) == Path("config/postbackd.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour: red\n", "postbackd.yaml:1: unknown key 'colour'"),
        (
            "outbound: {timeout: 10s, retries: 3}\n",
            "postbackd.yaml:1: unknown key 'outbound.retries'",
        ),
        ("listen: 8080\n", "postbackd.yaml:1: listen: Input should be a valid string"),
        (
            "listen: localhost\n",
            "postbackd.yaml:1: listen: 'localhost' is not host:port (e.g. 127.0.0.1:8080)",
        ),
        (
            "listen: '127.0.0.1:99999'\n",
            "postbackd.yaml:1: listen: '127.0.0.1:99999' is not host:port (e.g. 127.0.0.1:8080)",
        ),
        (
            "outbound:\n  timeout: soon\n",
            "postbackd.yaml:2: outbound.timeout: 'soon' is not a duration such as 10s, 5m, 24h or 30d",
        ),
        (
            "outbound:\n  allow_cidrs: [10.0.0.0/33]\n",
            "postbackd.yaml:1: outbound: allow_cidrs: '10.0.0.0/33' is not a CIDR",
        ),
        (
            "outbound:\n  per_host_concurrency: 0\n",
            "postbackd.yaml:2: outbound.per_host_concurrency: Input should be greater than or equal to 1",
        ),
        (
            "log: {level: loud}\n",
            "postbackd.yaml:1: log.level: must be debug, info, warning or error, not 'loud'",
        ),
        (
            "log: {mask_pii: no}\n",
            "postbackd.yaml:1: log.mask_pii: Input should be a valid boolean",
        ),
        (
            "api:\n  tokens:\n    - {name: a, role: admin}\n",
            "postbackd.yaml:3: api.tokens: give exactly one of token_sha256 or secret",
        ),
        (
            "api:\n  tokens:\n    - {name: a, role: affiliate, secret: t}\n",
            "postbackd.yaml:3: api.tokens: an affiliate token needs `affiliate: ID`",
        ),
        (
            "api:\n  tokens:\n    - {name: a, role: root, secret: t}\n",
            "postbackd.yaml:3: api.tokens.role: must be admin or affiliate, not 'root'",
        ),
        (
            "retention: -1d\n",
            "postbackd.yaml:1: retention: '-1d' is not a duration such as 10s, 5m, 24h or 30d",
        ),
        (
            "listen: [\n",
            "postbackd.yaml:2: while parsing a flow node; did not find expected node content",
        ),
        ("- a list\n", "postbackd.yaml:1: the settings file must be a mapping"),
        ("a: 1\na: 2\n", "postbackd.yaml:2: duplicate key 'a'"),
        ("config_dir: /etc\n", "postbackd.yaml: unknown key 'config_dir'"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, {})
    assert str(err.value).replace(str(path.parent) + "/", "") == message


def test_oversized_and_binary_files(tmp_path: Path) -> None:
    big = write(tmp_path, "# " + "x" * (1024 * 1024 + 10))
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load_settings(big, {})
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_settings(binary, {})
    with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
        load_settings(tmp_path / "missing.yaml", {})


def test_a_bad_environment_override_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match="POSTBACKD_LOG: "):
        load_settings(path, {"POSTBACKD_LOG": "{level: ["})
    with pytest.raises(ConfigError, match="listen"):
        load_settings(path, {"POSTBACKD_LISTEN": "nope"})
