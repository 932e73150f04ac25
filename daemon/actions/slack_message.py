"""slack_message: a Slack message through chat.postMessage (bot token) or an incoming webhook."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from daemon.actions.base import (
    MASK,
    ActionSettings,
    Job,
    LiteralUrlStr,
    RequestRecord,
    Resources,
    SecretTemplateStr,
    is_secret_reference,
    origin,
    secret_lookup,
    send_http,
)
from daemon.durations import Duration
from daemon.errors import OutcomeUnknownError, PermanentError, RetryableError
from daemon.httpstatus import HttpResponse, classify_status, parse_retry_after
from daemon.macros import JsonTemplate, Template, TemplateStr, encode_header
from daemon.urltemplate import UrlTemplate

API_BASE = "https://slack.com/api/"
HOOKS_BASE = "https://hooks.slack.com/services/"
MAX_BLOCKS = 50  # https://docs.slack.dev/reference/block-kit/blocks
# https://docs.slack.dev/reference/methods/chat.postMessage#errors : Slack's own transient
# failures; the message was not posted and a later attempt may succeed.
RETRYABLE_ERRORS = frozenset(
    {
        "internal_error",
        "service_unavailable",
        "ratelimited",
        "rate_limited",
        "request_timeout",
        "team_added_to_org",
        "org_login_required",
    }
)
# "It's possible some aspect of the operation succeeded before the error was raised."
UNKNOWN_ERRORS = frozenset({"fatal_error"})
_ERROR_TAG = re.compile(r"^[a-z0-9_]{1,64}$")
# What a webhook URL may add to its base: T.../B.../secret, no dot segments, query or fragment.
_HOOK_PATH = re.compile(r"^[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*$")
_MRKDWN_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def escape_mrkdwn(value: str) -> str:
    """A macro value as plain text in Slack markup: it cannot mention, link or format."""
    return value.translate(_MRKDWN_ESCAPES)


class Settings(ActionSettings):
    type: Literal["slack_message"]
    token: SecretTemplateStr | None = None
    channel: TemplateStr | None = None
    webhook_url: TemplateStr | None = None
    text: TemplateStr | None = None
    blocks: JsonTemplate = None
    base_url: LiteralUrlStr | None = None
    timeout: Duration | None = Field(default=None, gt=0, le=120)

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, list) or not all(isinstance(b, dict) for b in value):
            raise ValueError("must be a list of Block Kit blocks (JSON objects)")
        if not 1 <= len(value) <= MAX_BLOCKS:
            raise ValueError(f"must hold 1 to {MAX_BLOCKS} blocks")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: UrlTemplate | None) -> UrlTemplate | None:
        # A prefix without its final slash would also match https://hooks.slack.com.evil/...
        if value is None or value.source.endswith("/"):
            return value
        return UrlTemplate(value.source + "/")

    @model_validator(mode="after")
    def _mode(self) -> Settings:
        if (self.token is None) == (self.webhook_url is None):
            raise ValueError(
                "give either token (chat.postMessage with a bot token)"
                " or webhook_url (an incoming webhook)"
            )
        if self.text is None and self.blocks is None:
            raise ValueError("give text, blocks or both")
        if self.token is not None and self.channel is None:
            raise ValueError("channel is required with token")
        if self.webhook_url is not None:
            self._check_webhook(self.webhook_url)
        return self

    def _check_webhook(self, url: Template) -> None:
        if self.channel is not None:
            raise ValueError("an incoming webhook posts to its own channel: remove channel")
        if is_secret_reference(url):
            return
        if url.secrets or url.macros:
            raise ValueError(
                "webhook_url must be exactly one ${secret:NAME} or a literal URL, without macros"
            )
        if hook_path(url.source, self.api_base) is None:
            raise ValueError(f"webhook_url must be a URL below {self.api_base}")

    @property
    def api_base(self) -> str:
        if self.base_url is not None:
            return self.base_url.source
        return API_BASE if self.token is not None else HOOKS_BASE


def hook_path(url: str, base: str) -> str | None:
    """The part of a webhook URL after `base`, or None if the URL is not a webhook below it."""
    if not url.startswith(base):
        return None
    rest = url[len(base) :]
    return rest if _HOOK_PATH.match(rest) else None


class SlackMessage:
    idempotent: ClassVar[bool] = False  # a post that timed out may still have landed

    def __init__(self, settings: Settings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources
        self._base = settings.api_base
        self._origin = origin(UrlTemplate(self._base))

    @property
    def destination(self) -> str:
        return self._origin

    def _payload(self, job: Job, secret: Callable[[str], str] | None) -> bytes:
        s = self.settings
        body: dict[str, Any] = {}
        if s.channel is not None:
            body["channel"] = s.channel.render(job.values, secret=secret)
        if s.text is not None:
            body["text"] = s.text.render(job.values, encode=escape_mrkdwn, secret=secret)
        if s.blocks is not None:
            body["blocks"] = _render_blocks(s.blocks, job.values, secret)
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    def _target(
        self, job: Job, secret: Callable[[str], str] | None
    ) -> tuple[str, str, dict[str, str]]:
        """(URL to send to, URL as recorded, headers)."""
        s = self.settings
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if s.token is not None:
            token = s.token.render(job.values, encode=encode_header, secret=secret)
            headers["Authorization"] = f"Bearer {token}"
            url = self._base + "chat.postMessage"
            return url, url, headers
        assert s.webhook_url is not None
        url = s.webhook_url.render(job.values, secret=secret)
        if secret is not None and hook_path(url, self._base) is None:
            # Nothing of the value goes into the message: the whole URL is the credential.
            raise PermanentError("bad_webhook_url", f"the webhook URL is not below {self._base}")
        job.redactor.add(url)  # a literal webhook URL is as secret as a referenced one
        return url, self._base + MASK, headers

    def preview(self, job: Job) -> RequestRecord:
        _, shown, headers = self._target(job, None)
        body = self._payload(job, None).decode()
        return RequestRecord(
            "POST", shown, job.redactor.headers(headers), job.redactor.redact(body)
        )

    async def send(self, job: Job) -> None:
        secret = secret_lookup(job, self.resources)
        url, shown, headers = self._target(job, secret)
        body = self._payload(job, secret)
        response = await send_http(self, job, "POST", url, headers, body, shown_url=shown)
        now = self.resources.clock.now()
        if self.settings.token is not None:
            _api_outcome(response, now)
        else:
            _webhook_outcome(response, now)


def _render_blocks(blocks: Any, values: Mapping[str, str], secret: Any) -> Any:
    if isinstance(blocks, Template):
        return blocks.render(values, encode=escape_mrkdwn, secret=secret)
    if isinstance(blocks, dict):
        return {k: _render_blocks(v, values, secret) for k, v in blocks.items()}
    if isinstance(blocks, list):
        return [_render_blocks(v, values, secret) for v in blocks]
    return blocks


def _api_outcome(response: HttpResponse, now: float) -> None:
    """chat.postMessage answers HTTP 200 with `ok: false` on failure."""
    if response.status != 200:
        classify_status(response, now)
        raise OutcomeUnknownError(f"http_{response.status} without a Slack verdict")
    try:
        answer = json.loads(response.body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise OutcomeUnknownError("HTTP 200 without a readable Slack answer")
    if answer["ok"]:
        return
    error = str(answer.get("error", ""))
    tag = f"slack_{error}" if _ERROR_TAG.match(error) else "slack_error"
    if error in RETRYABLE_ERRORS:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
        raise RetryableError(tag, retry_after=retry_after)
    if error in UNKNOWN_ERRORS:
        raise OutcomeUnknownError(tag)
    raise PermanentError(tag)


def _webhook_outcome(response: HttpResponse, now: float) -> None:
    """Incoming webhooks answer 200 `ok`, or an HTTP error with a plain-text error tag
    (https://api.slack.com/changelog/2016-05-17-changes-to-errors-for-incoming-webhooks)."""
    text = response.text().strip()
    if response.status == 200:
        if text == "ok":
            return
        raise OutcomeUnknownError("HTTP 200 without the webhook's `ok`")
    if 400 <= response.status < 500 and response.status not in (408, 429):
        raise PermanentError(
            f"slack_{text}" if _ERROR_TAG.match(text) else f"http_{response.status}"
        )
    classify_status(response, now)
    raise OutcomeUnknownError(f"http_{response.status} without a Slack verdict")


def build(settings: Settings, resources: Resources) -> SlackMessage:
    return SlackMessage(settings, resources)
