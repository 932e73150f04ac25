"""Source definitions (webhooks/*.yaml, SPEC 6): one bad file per validation error with its exact
`file:line: message`, presets and their overrides, all-or-nothing hot reload with the rules, and
`postbackd validate --webhooks`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.errors import RulesError
from daemon.source_files import preset_names
from daemon.sources import GENERIC, load_sources
from tests.cli_support import run_cli
from tests.harness import start_daemon, wait_for

REPO = Path(__file__).resolve().parent.parent

CASES = {
    "yaml_syntax": ("fields: {offer: [\n", "w/s.yaml:2: while parsing a flow node; did not find expected node content"),
    "not_a_mapping": ("- offer\n", "w/s.yaml:1: a source file must be a mapping"),
    "empty_file": ("", "w/s.yaml:1: a source file must be a mapping"),
    "duplicate_yaml_key": ("response: json\nresponse: text\n", "w/s.yaml:2: duplicate key 'response'"),
    "unknown_key": ("respones: text\n", "w/s.yaml:1: unknown key 'respones'"),
    "unknown_auth_key": ("auth:\n  token: {secret: t, parm: key}\n", "w/s.yaml:2: unknown key 'auth.token.parm'"),
    "unknown_canonical_field": (
        "fields:\n  offer: offer_id\n  payot: amount\n",
        "w/s.yaml:3: fields: unknown canonical field 'payot' (did you mean 'payout'?)",
    ),
    "unknown_default_field": ("defaults: {colour: blue}\n", "w/s.yaml:1: defaults: unknown canonical field 'colour' (did you mean 'country'?)"),
    "empty_param_name": ("fields: {offer: ''}\n", "w/s.yaml:1: fields.offer: '' is not a parameter name (1 to 128 characters)"),
    "bad_status_target": (
        "status_map:\n  ok: approved\n  fail: failed\n",
        "w/s.yaml:3: status_map.fail: 'failed' is not a status (pending, approved or rejected)",
    ),
    "status_case_twins": (
        "status_map:\n  Approved: approved\n  approved: approved\n",
        "w/s.yaml:1: status_map: 'Approved' and 'approved' are the same value (status values compare case-insensitively)",
    ),
    "bad_response": ("response: xml\n", "w/s.yaml:1: response: Input should be 'json' or 'text'"),
    "bad_name": ("name: 'no spaces'\n", "w/s.yaml:1: name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'"),
    "unknown_preset": ("preset: hasoffers\n", "w/s.yaml:1: unknown preset 'hasoffers' (known: binom, cake, everflow, keitaro, tune, voluum)"),
    "auth_string": ("auth: token\n", "w/s.yaml:1: auth: must be none or a mapping with one of token, hmac, basic"),
    "auth_two_kinds": (
        "auth:\n  token: {secret: a}\n  basic: {username: u, secret: b}\n",
        "w/s.yaml:1: auth: give exactly one of token, hmac, basic (or write auth: none)",
    ),
    "auth_no_kind": ("auth: {}\n", "w/s.yaml:1: auth: give exactly one of token, hmac, basic (or write auth: none)"),
    "bad_secret_name": (
        "auth:\n  token: {secret: ../etc/passwd}\n",
        "w/s.yaml:2: auth.token.secret: '../etc/passwd' is not a secret name (letters, digits, _ . -) or ${secret:NAME}",
    ),
    "hmac_two_secrets": (
        "auth:\n  hmac: {secret: a, secrets: [b]}\n",
        "w/s.yaml:2: auth.hmac: give exactly one of secret or secrets (a list, for key rotation)",
    ),
    "hmac_scheme": (
        "auth:\n  hmac: {scheme: github, secret: a}\n",
        "w/s.yaml:2: auth.hmac.scheme: Input should be 'standard-webhooks'",
    ),
    "hmac_tolerance": (
        "auth:\n  hmac: {secret: a, tolerance: 2h}\n",
        "w/s.yaml:2: auth.hmac.tolerance: Input should be less than or equal to 3600",
    ),
    "basic_colon": (
        "auth:\n  basic: {username: 'a:b', secret: p}\n",
        "w/s.yaml:2: auth.basic.username: String should match pattern '^[^:\\x00-\\x1f\\x7f]+$'",
    ),
    "bad_header": ("auth:\n  token: {secret: t, header: 'X Token'}\n", "w/s.yaml:2: auth.token.header: 'X Token' is not a header name"),
    "token_param_mapped": (
        "fields: {click_id: key}\nauth:\n  token: {param: key, secret: t}\n",
        "w/s.yaml:3: auth.token.param 'key' is also mapped in fields (a credential must never be stored)",
    ),
    "bad_cidr": ("allow_ips:\n  - 10.0.0.0/8\n  - 10.0.0.300\n", "w/s.yaml:3: allow_ips: '10.0.0.300' is not an address or CIDR"),
    "bad_proxy": ("trusted_proxies: [proxy.example]\n", "w/s.yaml:1: trusted_proxies: 'proxy.example' is not an address or CIDR"),
    "rate_zero": ("rate_limit: {requests: 0}\n", "w/s.yaml:1: rate_limit.requests: Input should be greater than or equal to 1"),
    "rate_per": ("rate_limit: {requests: 5, per: soon}\n", "w/s.yaml:1: rate_limit.per: 'soon' is not a duration such as 10s, 5m, 24h or 30d"),
    "default_payout_nan": ("defaults:\n  payout: NaN\n", "w/s.yaml:2: defaults.payout: not a finite decimal number"),
    "default_currency": ("defaults:\n  currency: dollars\n", "w/s.yaml:2: defaults.currency: not an ISO 4217 currency code"),
    "default_status": ("defaults:\n  status: done\n", "w/s.yaml:2: defaults.status: 'done' is not a status (pending, approved or rejected)"),
    "default_control": ('defaults:\n  goal: "a\\x01"\n', "w/s.yaml:2: defaults.goal: value contains control characters"),
    "default_list": ("defaults:\n  goal: [a]\n", "w/s.yaml:2: defaults.goal: must be a string or a number"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_bad_file_per_error(tmp_path: Path, case: str) -> None:
    text, expected = CASES[case]
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "s.yaml").write_text(text)
    (folder / "good.yaml").write_text("preset: everflow\n")
    with pytest.raises(RulesError) as caught:
        load_sources(folder)
    assert [str(issue) for issue in caught.value.issues] == [expected]


def test_duplicate_source_names(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: ef\npreset: everflow\n")
    (tmp_path / "b.yml").write_text("response: text\nname: ef\n")
    with pytest.raises(RulesError) as caught:
        load_sources(tmp_path)
    name = tmp_path.name
    assert [str(i) for i in caught.value.issues] == [
        f"{name}/b.yml:2: duplicate source name 'ef' (also {name}/a.yaml:1)"
    ]


def test_every_problem_of_every_file_is_listed(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("fields: {offr: x}\n")
    (tmp_path / "b.yaml").write_text("defaults: {payout: -1}\nresponse: text\n")
    (tmp_path / "c.yaml").write_text("preset: cake\n")
    with pytest.raises(RulesError) as caught:
        load_sources(tmp_path)
    name = tmp_path.name
    assert [str(i) for i in caught.value.issues] == [
        f"{name}/a.yaml:1: fields: unknown canonical field 'offr' (did you mean 'offer'?)",
        f"{name}/b.yaml:1: defaults.payout: must not be negative",
    ]


def test_ignored_files_and_a_symlink_out(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "README.md").write_text("not a source")
    (folder / ".hidden.yaml").write_text("garbage: [")
    (folder / "cake.yaml~").write_text("garbage: [")
    (folder / "notes.txt").write_text("x")
    (tmp_path / "outside.yaml").write_text("preset: cake\n")
    assert load_sources(folder) == {}
    os.symlink(tmp_path / "outside.yaml", folder / "linked.yaml")
    with pytest.raises(RulesError) as caught:
        load_sources(folder)
    assert [str(i) for i in caught.value.issues] == [
        "w/linked.yaml:0: symlink leads out of the webhooks directory"
    ]


def test_no_directory_means_no_sources(tmp_path: Path) -> None:
    assert load_sources(tmp_path / "absent") == {}
    assert load_sources(None) == {}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_an_unreadable_directory_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    folder.chmod(0)
    try:
        with pytest.raises(RulesError) as caught:
            load_sources(folder)
    finally:
        folder.chmod(0o755)
    assert [str(i) for i in caught.value.issues] == [
        "w:0: cannot read the directory: Permission denied"
    ]


def test_a_preset_with_overrides(tmp_path: Path) -> None:
    (tmp_path / "ef-eu.yaml").write_text(
        "preset: everflow\n"
        "fields: {click_id: sub5, payout: amount, goal: ~}\n"
        "status_map: {declined: rejected, invalid: pending}\n"
        "defaults: {currency: EUR}\n"
        "response: text\n"
    )
    source = load_sources(tmp_path)["ef-eu"]
    assert source.name == "ef-eu"  # the file's stem, not the preset's name
    assert source.response == "text"
    assert source.fields["click_id"] == "sub5"
    assert source.fields["payout"] == "amount"
    assert source.fields["conversion_id"] == "transaction_id"  # kept from the preset
    assert source.status_map["declined"] == "rejected"
    assert source.status_map["invalid"] == "pending"  # overridden
    assert source.status_map["1"] == "approved"  # kept
    assert source.defaults == {"status": "approved", "currency": "EUR"}
    conversion = source.to_conversion(
        {"transaction_id": "T", "offer_id": "1", "affiliate_id": "2", "event_id": "9", "goal": "g"}
    )
    assert "goal" not in conversion.fields  # `goal: ~` reads it from no parameter
    assert conversion.extra == {"event_id": "9", "goal": "g"}


def test_secret_references_in_both_spellings(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("auth:\n  token: {param: key, secret: '${secret:a_tok}'}\n")
    (tmp_path / "b.yaml").write_text("auth:\n  hmac: {secrets: [new, '${secret:old}']}\n")
    sources = load_sources(tmp_path)
    assert sources["a"].secrets == {"a_tok"}
    assert sources["b"].secrets == {"new", "old"}


def test_every_preset_loads_and_names_its_documentation(tmp_path: Path) -> None:
    assert preset_names() == ["binom", "cake", "everflow", "keitaro", "tune", "voluum"]
    for name in preset_names():
        (tmp_path / f"{name}.yaml").write_text(f"preset: {name}\n")
        text = (REPO / "daemon" / "presets" / f"{name}.yaml").read_text()
        assert "https://" in text or "http://" in text, name
    sources = load_sources(tmp_path)
    for name in preset_names():
        fields = sources[name].fields
        assert {"conversion_id", "offer", "affiliate", "payout"} <= fields.keys(), name


def test_the_repository_webhooks_validate_and_cover_every_preset() -> None:
    sources = load_sources(REPO / "webhooks")
    assert sorted(sources) == preset_names()


# --- hot reload -------------------------------------------------------------------------------


async def test_a_bad_webhooks_set_fails_the_reload_and_keeps_the_running_set(
    tmp_path: Path,
) -> None:
    hooks = tmp_path / "webhooks"
    hooks.mkdir()
    (hooks / "cake.yaml").write_text("preset: cake\n")
    daemon = await start_daemon(tmp_path, {}, dispatch=False)
    reloader = daemon.services.reloader
    try:
        params = {"leadid": "L1", "oid": "5", "affid": "9"}
        assert (await daemon.client.get("/webhooks/cake", params=params)).status == 200
        (hooks / "cake.yaml").write_text("preset: cake\nresponse: xml\n")
        (hooks / "new.yaml").write_text("preset: tune\n")
        (daemon.rules_dir / "bad.yaml").write_text("offer: 1\ncolour: red\n")
        assert not await reloader.reload("test")
        assert reloader.status.last_error == [
            "bad.yaml:2: unknown key 'colour'",
            "webhooks/cake.yaml:2: response: Input should be 'json' or 'text'",
        ]
        assert (await daemon.client.get("/webhooks/new")).status == 404  # nothing half-loaded
        params["leadid"] = "L2"
        resp = await daemon.client.get("/webhooks/cake", params=params)
        assert resp.status == 200  # the running set still serves
        (hooks / "cake.yaml").write_text("preset: cake\nresponse: text\n")
        assert not await reloader.reload("test")  # the rules are still bad: all or nothing
        (daemon.rules_dir / "bad.yaml").unlink()
        assert await reloader.reload("test")
        params["leadid"] = "L3"
        resp = await daemon.client.get("/webhooks/cake", params=params)
        assert (resp.status, await resp.text()) == (200, "OK")
        new = {"transaction_id": "T1", "offer_id": "1", "affiliate_id": "2"}
        assert (await daemon.client.get("/webhooks/new", params=new)).status == 200
    finally:
        await daemon.client.close()


async def test_a_new_source_file_is_picked_up_by_the_watcher(tmp_path: Path) -> None:
    hooks = tmp_path / "webhooks"
    hooks.mkdir()
    daemon = await start_daemon(tmp_path, {}, dispatch=False, watch=True)
    try:
        (hooks / "binom.yaml").write_text("preset: binom\n")
        params = {"clickid": "c1", "campaign": "3", "trafficsource": "4", "payout": "1"}

        async def served() -> bool:
            return (await daemon.client.get("/webhooks/binom", params=params)).status == 200

        await wait_for(served, deadline=20.0)
    finally:
        await daemon.client.close()


async def test_a_generic_file_replaces_the_built_in_source(tmp_path: Path) -> None:
    hooks = tmp_path / "webhooks"
    hooks.mkdir()
    (hooks / "generic.yaml").write_text("auth:\n  token: {param: key, secret: g}\n")
    daemon = await start_daemon(tmp_path, {}, dispatch=False, environ={"POSTBACKD_SECRET_G": "tok"})
    try:
        assert GENERIC in daemon.services.reloader.runtime.sources
        params = {"conversion_id": "G1", "offer": "1", "affiliate": "2", "status": "pending"}
        assert (await daemon.client.get("/webhooks/generic", params=params)).status == 401
        params["key"] = "tok"
        assert (await daemon.client.get("/webhooks/generic", params=params)).status == 200
    finally:
        await daemon.client.close()


# --- postbackd validate --webhooks ------------------------------------------------------------


def test_validate_checks_the_webhooks_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = REPO / "rules.d"
    good = run_cli(capsys, ["validate", str(rules), "--webhooks", str(REPO / "webhooks")])
    assert good.code == 0, good.err
    assert "ok: 6 sources in" in good.out
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "x.yaml").write_text("preset: cake\nauth:\n  token: {secret: x_token}\n")
    (hooks / "y.yaml").write_text("status_map: {ok: fine}\n")
    bad = run_cli(capsys, ["validate", str(rules), "--webhooks", str(hooks)])
    assert bad.code == 1
    assert bad.out.splitlines() == [
        "hooks/y.yaml:1: status_map.ok: 'fine' is not a status (pending, approved or rejected)"
    ]
    as_json = run_cli(
        capsys, ["validate", str(rules), "--webhooks", str(hooks), "--format", "json"]
    )
    assert as_json.code == 1
    assert '"webhooks_dir": "' in as_json.out
    missing = run_cli(capsys, ["validate", str(rules), "--webhooks", str(tmp_path / "nope")])
    assert missing.code == 1
    assert "--webhooks" in missing.err
