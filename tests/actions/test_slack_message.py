"""slack_message against a fake Slack on loopback: the exact requests of both modes, how every
answer is classified, secrets kept out of errors, records and logs, load-time validation, and
the whole path from a webhook to the fake."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.actions import slack_message
from daemon.actions.base import Resources
from daemon.errors import (
    DeliveryError,
    OutcomeUnknownError,
    PermanentError,
    RetryableError,
)
from daemon.outbound import OutboundHttp
from daemon.store.base import DeliveryState
from tests.actions.fakes_slack import FakeSlack
from tests.actions.kit import (
    FIRST_SETTING_LINE,
    Reply,
    end_to_end,
    expect_outcome,
    leaks,
    make_job,
    make_resources,
    rule_file,
    validate,
)

TOKEN = "xoxb-1111-2222-SeCrEtToKeN"
SECRETS = {"slack_token": TOKEN}
L = FIRST_SETTING_LINE


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack(TOKEN).start()
    yield fake
    await fake.close()


@pytest.fixture
def resources(http: OutboundHttp, slack: FakeSlack) -> Resources:
    return make_resources(http, {**SECRETS, "slack_hook": slack.webhook_url})


def api_action(slack: FakeSlack, resources: Resources, **extra: Any) -> Any:
    settings = slack_message.Settings.model_validate(
        {
            "type": "slack_message",
            "token": "${secret:slack_token}",
            "channel": "#sales",
            "text": "Lead {conversion_id} from {extra.name}: *{payout}*",
            "base_url": slack.api_base,
            **extra,
        }
    )
    return slack_message.build(settings, resources)


def hook_action(slack: FakeSlack, resources: Resources, **extra: Any) -> Any:
    settings = slack_message.Settings.model_validate(
        {
            "type": "slack_message",
            "webhook_url": "${secret:slack_hook}",
            "text": "Lead {conversion_id} from {extra.name}",
            "base_url": slack.hooks_base,
            **extra,
        }
    )
    return slack_message.build(settings, resources)


VALUES = {"payout": "12.50", "extra.name": "<!channel> & <https://evil.example|win>"}


# --- the exact request --------------------------------------------------------------------


async def test_post_message_sends_the_exact_request(slack: FakeSlack, resources: Resources) -> None:
    job = make_job(VALUES)
    await api_action(slack, resources).send(job)
    (got,) = slack.received
    assert got.method == "POST"
    assert got.path_qs == "/api/chat.postMessage"
    assert got.headers["Authorization"] == f"Bearer {TOKEN}"
    assert got.headers["Content-Type"] == "application/json; charset=utf-8"
    # Values cannot mention, link or format: Slack's three control characters are escaped.
    assert got.body.decode() == (
        '{"channel":"#sales","text":"Lead T-1 from &lt;!channel&gt; &amp; '
        '&lt;https://evil.example|win&gt;: *12.50*"}'
    )
    assert job.record.request is not None
    assert job.record.request.url == f"{slack.api_base}chat.postMessage"
    assert job.record.request.headers["Authorization"] == "****"
    assert job.record.response_status == 200
    assert '"ok": true' in (job.record.response_excerpt or "")


async def test_blocks_are_rendered_with_escaped_values(
    slack: FakeSlack, resources: Resources
) -> None:
    blocks = [
        {"type": "section", "text": {"type": "mrkdwn", "text": "*Sold* {extra.name}"}},
        {"type": "context", "elements": [{"type": "plain_text", "text": "{payout} USD"}]},
    ]
    action = api_action(slack, resources, text=None, blocks=blocks)
    await action.send(make_job(VALUES))
    assert slack.json() == {
        "channel": "#sales",
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": "*Sold* &lt;!channel&gt; &amp; &lt;https://evil.example|win&gt;",
                },
            },
            {"type": "context", "elements": [{"type": "plain_text", "text": "12.50 USD"}]},
        ],
    }


async def test_webhook_sends_the_exact_request(slack: FakeSlack, resources: Resources) -> None:
    job = make_job(VALUES)
    await hook_action(slack, resources).send(job)
    (got,) = slack.received
    assert got.method == "POST"
    assert got.path_qs == f"/services/{slack.hook}"
    assert got.headers["Content-Type"] == "application/json; charset=utf-8"
    assert "Authorization" not in got.headers
    assert json.loads(got.body) == {
        "text": "Lead T-1 from &lt;!channel&gt; &amp; &lt;https://evil.example|win&gt;"
    }
    assert job.record.request is not None
    # The whole webhook URL is the credential: the record shows only its public base.
    assert job.record.request.url == f"{slack.hooks_base}****"
    assert job.record.response_excerpt == "ok"


def test_preview_masks_the_token_and_sends_nothing(slack: FakeSlack) -> None:
    settings = slack_message.Settings.model_validate(
        {
            "type": "slack_message",
            "token": "${secret:slack_token}",
            "channel": "C0123",
            "text": "Lead {conversion_id}",
        }
    )
    resources = Resources(http=None, secret=lambda name: TOKEN, clock=None)  # type: ignore[arg-type]
    preview = slack_message.build(settings, resources).preview(make_job())
    assert preview.as_dict() == {
        "method": "POST",
        "url": "https://slack.com/api/chat.postMessage",
        "headers": {"Content-Type": "application/json; charset=utf-8", "Authorization": "****"},
        "body": '{"channel":"C0123","text":"Lead T-1"}',
    }
    assert slack.received == []


def test_destination_is_the_service_origin() -> None:
    resources = Resources(http=None, secret=lambda name: TOKEN, clock=None)  # type: ignore[arg-type]
    api = slack_message.Settings.model_validate(
        {"type": "slack_message", "token": "${secret:t}", "channel": "C1", "text": "x"}
    )
    hook = slack_message.Settings.model_validate(
        {"type": "slack_message", "webhook_url": "${secret:h}", "text": "x"}
    )
    assert slack_message.build(api, resources).destination == "https://slack.com:443"
    assert slack_message.build(hook, resources).destination == "https://hooks.slack.com:443"


# --- what each answer means -----------------------------------------------------------------


def api_json(**body: Any) -> str:
    return json.dumps(body)


API_ANSWERS: list[tuple[str, Reply, type[DeliveryError] | None, str | None, float | None]] = [
    ("ok", (200, api_json(ok=True, ts="1.2"), {}), None, None, None),
    ("channel_not_found", (200, api_json(ok=False, error="channel_not_found"), {}),
     PermanentError, "slack_channel_not_found", None),
    ("invalid_auth", (200, api_json(ok=False, error="invalid_auth"), {}),
     PermanentError, "slack_invalid_auth", None),
    ("token_revoked", (200, api_json(ok=False, error="token_revoked"), {}),
     PermanentError, "slack_token_revoked", None),
    ("is_archived", (200, api_json(ok=False, error="is_archived"), {}),
     PermanentError, "slack_is_archived", None),
    ("msg_too_long", (200, api_json(ok=False, error="msg_too_long"), {}),
     PermanentError, "slack_msg_too_long", None),
    ("odd error tag", (200, api_json(ok=False, error="Bad Thing!"), {}),
     PermanentError, "slack_error", None),
    ("internal_error", (200, api_json(ok=False, error="internal_error"), {}),
     RetryableError, "slack_internal_error", None),
    ("service_unavailable", (200, api_json(ok=False, error="service_unavailable"), {}),
     RetryableError, "slack_service_unavailable", None),
    ("ratelimited in body", (200, api_json(ok=False, error="ratelimited"), {"Retry-After": "30"}),
     RetryableError, "slack_ratelimited", 30.0),
    ("HTTP 429", (429, "", {"Retry-After": "7"}), RetryableError, "http_429", 7.0),
    ("HTTP 500", (500, "", {}), RetryableError, "http_500", None),
    ("HTTP 503", (503, "", {}), RetryableError, "http_503", None),
    ("HTTP 404", (404, "", {}), PermanentError, "http_404", None),
    ("fatal_error", (200, api_json(ok=False, error="fatal_error"), {}),
     OutcomeUnknownError, "outcome_unknown", None),
    ("200 not JSON", (200, "<html>proxy</html>", {}), OutcomeUnknownError, "outcome_unknown", None),
    ("200 without ok", (200, api_json(channel="C1"), {}),
     OutcomeUnknownError, "outcome_unknown", None),
    ("no answer", "hang", OutcomeUnknownError, "outcome_unknown", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "error", "reason", "retry_after"),
    [row[1:] for row in API_ANSWERS],
    ids=[row[0] for row in API_ANSWERS],
)
async def test_post_message_answers(
    slack: FakeSlack,
    resources: Resources,
    reply: Reply,
    error: type[DeliveryError] | None,
    reason: str | None,
    retry_after: float | None,
) -> None:
    slack.script.append(reply)
    action = api_action(slack, resources, timeout=0.3)
    await check_outcome(action, error, reason, retry_after)
    assert len(slack.received) == 1  # never retried inside the action


HOOK_ANSWERS: list[tuple[str, Reply, type[DeliveryError] | None, str | None, float | None]] = [
    ("ok", (200, "ok", {}), None, None, None),
    ("invalid_payload", (400, "invalid_payload", {}),
     PermanentError, "slack_invalid_payload", None),
    ("user_not_found", (400, "user_not_found", {}), PermanentError, "slack_user_not_found", None),
    ("action_prohibited", (403, "action_prohibited", {}),
     PermanentError, "slack_action_prohibited", None),
    ("invalid_token", (403, "invalid_token", {}), PermanentError, "slack_invalid_token", None),
    ("channel_not_found", (404, "channel_not_found", {}),
     PermanentError, "slack_channel_not_found", None),
    ("no_service", (404, "no_service", {}), PermanentError, "slack_no_service", None),
    ("channel_is_archived", (410, "channel_is_archived", {}),
     PermanentError, "slack_channel_is_archived", None),
    ("4xx with an HTML page", (403, "<html>denied</html>", {}), PermanentError, "http_403", None),
    ("rollup_error", (500, "rollup_error", {}), RetryableError, "http_500", None),
    ("HTTP 503", (503, "", {}), RetryableError, "http_503", None),
    ("HTTP 429", (429, "", {"Retry-After": "12"}), RetryableError, "http_429", 12.0),
    ("200 not ok", (200, "<html>captive portal</html>", {}),
     OutcomeUnknownError, "outcome_unknown", None),
    ("no answer", "hang", OutcomeUnknownError, "outcome_unknown", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "error", "reason", "retry_after"),
    [row[1:] for row in HOOK_ANSWERS],
    ids=[row[0] for row in HOOK_ANSWERS],
)
async def test_webhook_answers(
    slack: FakeSlack,
    resources: Resources,
    reply: Reply,
    error: type[DeliveryError] | None,
    reason: str | None,
    retry_after: float | None,
) -> None:
    slack.script.append(reply)
    action = hook_action(slack, resources, timeout=0.3)
    await check_outcome(action, error, reason, retry_after)
    assert len(slack.received) == 1


async def check_outcome(
    action: Any,
    error: type[DeliveryError] | None,
    reason: str | None,
    retry_after: float | None,
) -> None:
    job = make_job(VALUES)
    await expect_outcome(action, job, error, reason, retry_after)
    if error is not None:
        assert job.record.request is not None  # a failed attempt still leaves its record


@pytest.mark.parametrize("mode", ["api", "hook"])
async def test_refused_connection_is_retryable(
    slack: FakeSlack, resources: Resources, mode: str
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    if mode == "api":
        action = api_action(slack, resources, base_url=f"{closed}/api/")
    else:
        hook = f"{closed}/services/"
        res = make_resources(resources.http, {"slack_hook": hook + slack.hook})
        action = hook_action(slack, res, base_url=hook)
    with pytest.raises(RetryableError) as info:
        await action.send(make_job())
    assert info.value.reason == "connect_failed"


async def test_webhook_secret_outside_the_base_is_refused_unsent(
    slack: FakeSlack, http: OutboundHttp
) -> None:
    stray = f"{slack.url}/api/chat.postMessage"
    action = hook_action(slack, make_resources(http, {"slack_hook": stray}))
    job = make_job()
    with capture_logs() as logs, pytest.raises(PermanentError) as info:
        await action.send(job)
    assert info.value.reason == "bad_webhook_url"
    assert slack.received == []
    assert leaks(stray, info.value, job.record.request, logs) == []


# --- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["api", "hook"])
@pytest.mark.parametrize(
    "reply", [(200, api_json(ok=False, error="invalid_auth"), {}), (403, "invalid_token", {})]
)
async def test_no_secret_in_errors_records_or_logs(
    slack: FakeSlack, resources: Resources, mode: str, reply: Reply
) -> None:
    slack.script.append(reply)
    action = api_action(slack, resources) if mode == "api" else hook_action(slack, resources)
    job = make_job(VALUES)
    with capture_logs() as logs, pytest.raises(PermanentError) as info:
        await action.send(job)
    assert slack.received  # the secret really went out...
    texts = (info.value, repr(info.value), info.value.__cause__, job.record, logs)
    for secret in (TOKEN, slack.webhook_url, slack.hook):
        assert leaks(secret, *texts) == []  # ...and nowhere else


# --- validation ---------------------------------------------------------------------------

A = "pb.yaml:{line}: postback 7: {message}"


@pytest.mark.parametrize(
    ("settings", "line", "message"),
    [
        (
            "type: slack_message\ntext: hi",
            L - 1,
            "action: give either token (chat.postMessage with a bot token)"
            " or webhook_url (an incoming webhook)",
        ),
        (
            "type: slack_message\ntoken: ${secret:t}\nwebhook_url: ${secret:h}\n"
            "channel: C1\ntext: hi",
            L - 1,
            "action: give either token (chat.postMessage with a bot token)"
            " or webhook_url (an incoming webhook)",
        ),
        (
            "type: slack_message\ntoken: xoxb-123-abc\nchannel: C1\ntext: hi",
            L + 1,
            "action.token: must be a ${secret:NAME} reference, not literal text",
        ),
        (
            "type: slack_message\ntoken: ${secret:t}\ntext: hi",
            L - 1,
            "action: channel is required with token",
        ),
        (
            "type: slack_message\nwebhook_url: ${secret:h}\nchannel: C1\ntext: hi",
            L - 1,
            "action: an incoming webhook posts to its own channel: remove channel",
        ),
        (
            "type: slack_message\ntoken: ${secret:t}\nchannel: C1",
            L - 1,
            "action: give text, blocks or both",
        ),
        (
            "type: slack_message\ntoken: ${secret:t}\nchannel: C1\nblocks: {type: section}",
            L + 3,
            "action.blocks: must be a list of Block Kit blocks (JSON objects)",
        ),
        (
            "type: slack_message\ntoken: ${secret:t}\nchannel: C1\nblocks: []",
            L + 3,
            "action.blocks: must hold 1 to 50 blocks",
        ),
        (
            "type: slack_message\nwebhook_url: https://hooks.slack.com/services/{sub1}\ntext: hi",
            L - 1,
            "action: webhook_url must be exactly one ${secret:NAME} or a literal URL,"
            " without macros",
        ),
        (
            "type: slack_message\nwebhook_url: https://example.com/services/T1/B1/x\ntext: hi",
            L - 1,
            "action: webhook_url must be a URL below https://hooks.slack.com/services/",
        ),
        (
            "type: slack_message\ntoken: ${secret:t}\nchannel: C1\ntext: hi\n"
            "base_url: https://{sub1}.example.com/",
            L + 4,
            "action.base_url: a macro cannot set the URL's scheme, host or port",
        ),
        (
            "type: slack_message\ntoken: ${secret:t}\nchannel: C1\ntext: hi\n"
            "base_url: https://slack.example.com/{sub1}/",
            L + 4,
            "action.base_url: cannot hold macros or secrets",
        ),
        (
            "type: slack_message\ntoken: ${secret:t}\nchannel: C1\ntext: 'Lead {clickid}'",
            L + 3,
            "action.text: unknown macro {clickid}; did you mean {click_id}?",
        ),
        (
            "type: slack_message\ntoken: ${secret:t}\nchannel: C1\ntext: hi\ntimeout: 5m",
            L + 4,
            "action.timeout: Input should be less than or equal to 120",
        ),
        (
            "type: slack_message\ntoken: ${secret:t}\nchannel: C1\ntext: hi\nusername: bot",
            L + 4,
            "unknown key 'action.username'",
        ),
    ],
    ids=[
        "no mode",
        "both modes",
        "literal token",
        "no channel",
        "channel with webhook",
        "no text",
        "blocks not a list",
        "no blocks",
        "webhook macro",
        "webhook host",
        "base_url host macro",
        "base_url path macro",
        "unknown macro",
        "timeout",
        "unknown key",
    ],
)
def test_validation_errors(tmp_path: Path, settings: str, line: int, message: str) -> None:
    assert validate(tmp_path, settings) == [A.format(line=line, message=message)]


def test_valid_settings_load(tmp_path: Path) -> None:
    literal = "https://hooks.slack.com/services/T1/B1/abc"
    assert validate(tmp_path, f"type: slack_message\nwebhook_url: {literal}\ntext: hi") == []
    assert (
        validate(
            tmp_path, "type: slack_message\ntoken: ${secret:t}\nchannel: '{extra.ch}'\ntext: hi"
        )
        == []
    )


# --- end to end ---------------------------------------------------------------------------


async def test_webhook_to_rule_to_slack(tmp_path: Path, slack: FakeSlack) -> None:
    rules = {
        "slack.yaml": rule_file(
            f"""
            type: slack_message
            token: ${{secret:slack_token}}
            channel: "#sales"
            text: "Sold {{conversion_id}} for {{payout}}"
            base_url: {slack.api_base}
            """,
            offer=9,
            postback_id=31,
        )
    }
    run = await end_to_end(
        tmp_path,
        rules,
        SECRETS,
        lambda: slack.received,
        conversion_id="E1",
        offer=9,
        affiliate=5,
        status="approved",
        payout=3,
    )
    assert slack.json() == {"channel": "#sales", "text": "Sold E1 for 3"}
    assert run.state == DeliveryState.SUCCEEDED
    (attempt,) = run.attempts
    assert attempt.outcome == "succeeded"
    assert attempt.request is not None
    assert attempt.request["headers"]["Authorization"] == "****"
    assert leaks(TOKEN, attempt, run.logs) == []
