"""The typed "destination unwell" fact of each action's own status mapping (it feeds the
circuit breaker; daemon.breaker): 5xx, 429 and 408 say the host is unwell, other answers not."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from daemon.actions.facebook_conversion import check_answer
from daemon.actions.google_sheets import check_append
from daemon.actions.twilio_sms import _outcome as twilio_outcome
from daemon.errors import DeliveryError
from daemon.httpstatus import HttpResponse

NOW = 1_790_000_000.0
Check = Callable[[HttpResponse, float], None]


def answer(status: int, body: object) -> HttpResponse:
    return HttpResponse(status, {"Content-Type": "application/json"}, json.dumps(body).encode(), "")


FB_ERROR = {"error": {"code": 1, "message": "unknown"}}
CASES = [
    ("facebook 500", check_answer, answer(500, FB_ERROR), True),
    ("facebook 503", check_answer, answer(503, FB_ERROR), True),
    ("facebook 400", check_answer, answer(400, {"error": {"code": 100}}), False),
    ("sheets 503", check_append, answer(503, {}), True),
    ("sheets 500 (outcome unknown)", check_append, answer(500, {}), True),
    ("sheets 429", check_append, answer(429, {}), True),
    ("sheets 403", check_append, answer(403, {}), False),
    ("twilio 503", twilio_outcome, answer(503, {}), True),
    ("twilio 429", twilio_outcome, answer(429, {"code": 20429}), True),
    ("twilio 400", twilio_outcome, answer(400, {"code": 21211}), False),
]


@pytest.mark.parametrize(
    ("check", "response", "unwell"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_unwell(check: Check, response: HttpResponse, unwell: bool) -> None:
    with pytest.raises(DeliveryError) as caught:
        check(response, NOW)
    assert caught.value.unwell is unwell
