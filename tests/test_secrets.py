"""Secret resolution: lookup order, refusals, and that no value ever reaches a message."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import SecretError
from daemon.macros import parse_template
from daemon.secrets import MAX_SECRET_BYTES, SecretResolver, env_var_name
from daemon.urltemplate import parse_url_template

VALUE = "v4lue-that-must-not-leak"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    creds, secrets = tmp_path / "credentials", tmp_path / "secrets"
    creds.mkdir()
    secrets.mkdir()
    return creds, secrets


def _resolver(dirs: tuple[Path, Path], environ: dict[str, str] | None = None) -> SecretResolver:
    return SecretResolver(credentials_dir=dirs[0], secrets_dir=dirs[1], environ=environ or {})


def test_credentials_beat_secrets_dir_beat_environment(dirs: tuple[Path, Path]) -> None:
    creds, secrets = dirs
    environ = {"POSTBACKD_SECRET_TOKEN": "from-env"}
    resolver = _resolver(dirs, environ)
    assert resolver("token") == "from-env"
    assert resolver.where("token") == "environment"
    (secrets / "token").write_text("from-secrets-dir\n")
    assert resolver("token") == "from-secrets-dir"
    assert resolver.where("token") == "secrets_dir"
    (creds / "token").write_text("from-credentials\n")
    assert resolver("token") == "from-credentials"
    assert resolver.where("token") == "credentials"


def test_values_are_read_at_each_call(dirs: tuple[Path, Path]) -> None:
    resolver = _resolver(dirs)
    path = dirs[1] / "rotating"
    path.write_text("one")
    assert resolver("rotating") == "one"
    path.write_text("two")
    assert resolver("rotating") == "two"


def test_env_var_name_maps_dots_and_dashes() -> None:
    assert env_var_name("tf.api-key") == "POSTBACKD_SECRET_TF_API_KEY"
    resolver = SecretResolver(
        credentials_dir=None, secrets_dir=None, environ={"POSTBACKD_SECRET_TF_API_KEY": "k"}
    )
    assert resolver("tf.api-key") == "k"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("abc\n", "abc"),
        ("abc\r\n", "abc"),
        ("abc", "abc"),
        ("abc\n\n", "abc\n"),  # only the one newline an editor adds
        (" spaced \n", " spaced "),
    ],
)
def test_one_trailing_newline_is_stripped(
    dirs: tuple[Path, Path], content: str, expected: str
) -> None:
    (dirs[0] / "s").write_bytes(content.encode())
    assert _resolver(dirs)("s") == expected


def test_missing_secret_names_itself_and_the_places_looked(dirs: tuple[Path, Path]) -> None:
    creds, secrets = dirs
    resolver = _resolver(dirs, {"POSTBACKD_SECRET_OTHER": VALUE})
    with pytest.raises(SecretError) as caught:
        resolver("api.key")
    assert str(caught.value) == (
        f"secret api.key is not set (looked in {creds / 'api.key'}, {secrets / 'api.key'},"
        " $POSTBACKD_SECRET_API_KEY)"
    )
    assert VALUE not in str(caught.value)


def test_without_folders_only_the_environment_is_named() -> None:
    resolver = SecretResolver(credentials_dir=None, secrets_dir=None, environ={})
    with pytest.raises(SecretError) as caught:
        resolver("x")
    assert str(caught.value) == "secret x is not set (looked in $POSTBACKD_SECRET_X)"


def test_empty_values_count_as_not_set(dirs: tuple[Path, Path]) -> None:
    (dirs[0] / "s").write_text("\n")
    resolver = _resolver(dirs, {"POSTBACKD_SECRET_S": ""})
    assert resolver.where("s") is None
    (dirs[1] / "s").write_text("fallback")
    assert resolver("s") == "fallback"


@pytest.mark.parametrize("name", ["../etc/passwd", "..", ".", "a/b", "a\\b", "a..b", "", "a\n"])
def test_path_traversal_and_bad_names_are_refused(dirs: tuple[Path, Path], name: str) -> None:
    (dirs[0].parent / "passwd").write_text(VALUE)
    resolver = _resolver(dirs)
    with pytest.raises(SecretError) as caught:
        resolver(name)
    assert str(caught.value) == (
        f"secret name {name!r} is not valid: use letters, digits, _ . - (and never ..)"
    )
    assert resolver.where(name) is None


def test_unreadable_file_is_an_error_that_names_the_path(dirs: tuple[Path, Path]) -> None:
    (dirs[0] / "dir").mkdir()  # reading a directory fails even for root
    (dirs[1] / "dir").write_text(VALUE)
    resolver = _resolver(dirs)
    with pytest.raises(SecretError) as caught:
        resolver("dir")
    assert str(caught.value) == f"secret dir cannot be read from {dirs[0] / 'dir'}: Is a directory"
    assert resolver.missing(["dir"]) == ["dir"]


def test_oversized_and_binary_files_are_refused(dirs: tuple[Path, Path]) -> None:
    (dirs[0] / "big").write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    (dirs[0] / "bin").write_bytes(b"\xff\xfe" + VALUE.encode())
    resolver = _resolver(dirs)
    with pytest.raises(SecretError, match=r"^secret big in .* is larger than 65536 bytes$"):
        resolver("big")
    with pytest.raises(SecretError) as caught:
        resolver("bin")
    assert str(caught.value) == f"secret bin in {dirs[0] / 'bin'} is not UTF-8 text"


def test_missing_lists_sorted_unique_unresolved_names(dirs: tuple[Path, Path]) -> None:
    (dirs[0] / "a").write_text("1")
    resolver = _resolver(dirs, {"POSTBACKD_SECRET_B": "2"})
    assert resolver.missing(["z", "a", "c", "b", "z", "../x"]) == ["../x", "c", "z"]
    assert resolver.missing([]) == []


def test_constructor_does_no_io(tmp_path: Path) -> None:
    absent = tmp_path / "does-not-exist"
    resolver = SecretResolver(credentials_dir=absent, secrets_dir=str(absent), environ={})
    assert resolver.missing(["x"]) == ["x"]


def test_templates_resolve_secrets_and_explain_masks_them(dirs: tuple[Path, Path]) -> None:
    (dirs[0] / "tok").write_text("a b/c\n")
    resolver = _resolver(dirs)
    header = parse_template("Bearer ${secret:tok}")
    url = parse_url_template("https://e.com/pb?key=${secret:tok}&cid={click_id}")
    assert header.render({}, secret=resolver) == "Bearer a b/c"
    assert url.render_url({"click_id": "1"}, secret=resolver) == (
        "https://e.com/pb?key=a%20b%2Fc&cid=1"
    )
    assert header.render({}) == "Bearer ****"
    assert url.render_url({"click_id": "1"}) == "https://e.com/pb?key=****&cid=1"
    assert resolver.missing(url.secrets | header.secrets) == []
    with pytest.raises(SecretError, match=r"^secret nope is not set"):
        parse_template("${secret:nope}").render({}, secret=resolver)
