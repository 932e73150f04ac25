"""Readable lists and `rules show` (labels, names beside ids, every setting), and every action
addable without YAML (`rules add --action TYPE` with generated options, `--template TYPE`)
(issue 18), through the real `postbackd` command on a temporary git repository of rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.cli.action_options import models
from daemon.loader import load_rules
from daemon.yamlfile import YMap, load_yaml
from tests.test_cli_ops_kit import SOLAR, make_repo, run, write_files

CATALOGUE = (
    "offers:\n  1234: {name: Solar Leads, goals: [lead, sale]}\naffiliates: {42: Partner 42}\n"
)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("POSTBACKD_CONFIG", raising=False)
    monkeypatch.setenv("COLUMNS", "400")
    return make_repo(tmp_path / "repo", {"offer-1234.yaml": SOLAR})


def test_rules_show_lists_every_setting_defaults_marked_secrets_masked(repo: Path) -> None:
    write_files(repo, {"catalogue.yaml": CATALOGUE})
    r = run("rules", "show", "102", "--rules", str(repo))
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == "postback 102: offer 1234 Solar Leads (offer-1234.yaml:18)"
    text = "\n".join(lines)
    for expected in (
        "  trigger               Conversion Done",
        "  affiliate             42 (Partner 42)",
        "  goal                  sale (evaluated)",
        "  when                  payout >= 5",
        "  status                Active",
        "  created_at            2026-11-02T09:30:00Z",
        "  author                Sam Lee (12, affiliate 42)",
        "  retry                 the daemon's defaults",
        "  action                Ping Url",
        "    method              POST",
        "    headers.X-Api-Key   ****",
        "    json.click_id       {click_id}",
        "    idempotency_header  true   (default)",
    ):
        assert expected in lines, (expected, text)
    assert "${secret" not in r.out
    missing = run("rules", "show", "999", "--rules", str(repo))
    assert missing.code == 1
    assert "no postback with id 999" in missing.err


def test_rules_list_shows_catalogue_names_and_labels(repo: Path) -> None:
    write_files(repo, {"catalogue.yaml": CATALOGUE})
    out = run("rules", "list", "--rules", str(repo)).out
    assert out.splitlines()[0] == "Offer 1234 Solar Leads (goals on)"
    assert "affiliate 42 (Partner 42), goal sale" in out
    assert "Conversion Reject" in out
    assert "Ping Url" in out


def test_any_action_type_is_added_with_generated_options(repo: Path) -> None:
    r = run(
        "rules", "add", "--rules", str(repo), "--offer", "1234", "--trigger", "conversion_done",
        "--affiliate", "42", "--author", "7:Jane Doe",
        "--action", "smtp", "--host", "smtp.example.com", "--port", "587",
        "--username", "mailer", "--password", "${secret:smtp_password}",
        "--action-from", "ops@example.com", "--to", "{email}", "--to", "sales@example.com",
        "--subject", "Sale {conversion_id}", "--text", "Payout {payout}",
    )  # fmt: skip
    assert r.code == 0, r.err
    lp = load_rules(repo, git=False).postbacks[104]
    action = lp.postback.action
    assert action.type == "smtp"
    dumped = action.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert dumped["host"] == "smtp.example.com"
    assert dumped["port"] == 587
    assert dumped["to"] == ["{email}", "sales@example.com"]
    assert dumped["from"] == "ops@example.com"
    wrong = run(
        "rules", "add", "--rules", str(repo), "--offer", "1234", "--trigger", "conversion_done",
        "--affiliate", "42", "--action", "smtp", "--pixel-id", "5",
    )  # fmt: skip
    assert wrong.code == 2
    assert "--pixel-id: action smtp has no setting 'pixel_id'" in wrong.err
    help_text = run("rules", "add", "--help").out
    for kind in models():
        assert f"  {kind}:" in help_text
    assert "--pixel-id* --access-token*" in help_text


@pytest.mark.parametrize("kind", sorted(models()))
def test_template_prints_an_annotated_skeleton_of_each_type(kind: str) -> None:
    r = run("rules", "add", "--template", kind)
    assert r.code == 0, r.err
    doc = load_yaml(r.out.encode())
    assert isinstance(doc, YMap)
    assert doc["action"]["type"] == kind
    assert "# " in r.out
    required = [
        k for k, f in models()[kind].model_fields.items() if f.is_required() and k != "type"
    ]
    for key in required:
        alias = models()[kind].model_fields[key].alias or key
        assert f"\n  {alias}: " in r.out, (kind, alias)


@pytest.mark.parametrize(
    "extra",
    [
        ["--port", "not-a-port"],
        ["--host", "smtp\x00.example.com"],
        ["--to", "[" * 5000 + "]" * 5000],
        ["--to", "{" * 3000],
        ["--subject", "x" * 200_000],
        ["--security", "rot13"],
    ],
)
def test_hostile_action_settings_write_nothing(repo: Path, extra: list[str]) -> None:
    before = (repo / "offer-1234.yaml").read_text()
    base = [
        "rules", "add", "--rules", str(repo), "--offer", "1234", "--trigger", "conversion_done",
        "--affiliate", "42", "--author", "7:Jane Doe", "--action", "smtp",
        "--host", "smtp.example.com", "--action-from", "a@example.com", "--to", "b@example.com",
        "--subject", "s",
    ]  # fmt: skip
    r = run(*base, *extra)
    assert r.code in (1, 2), r.out
    assert "Traceback" not in r.out + r.err
    assert (repo / "offer-1234.yaml").read_text() == before
