"""A fake Google OAuth token endpoint and Sheets API on 127.0.0.1.

`POST /token` verifies the JWT-bearer assertion with pyjwt against the service account's public
key (signature, kid, iss, scope, aud, iat/exp on the injected clock) and issues access tokens;
`POST /v4/spreadsheets/{id}/values/{range}:append` checks the bearer token, the spreadsheet,
the sheet and the options, and appends the row. Scripts override either answer."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from tests.actions.kit import FakeServer, Reply
from tests.harness import Received

# In a scripted body, ECHO becomes what the request carried.
SCOPE = "https://www.googleapis.com/auth/spreadsheets"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def google_error(code: int, status: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message, "status": status}})


@dataclass
class Account:
    client_email: str
    key_id: str
    public_key: Any  # cryptography RSAPublicKey


@dataclass
class FakeGoogle(FakeServer):
    accounts: dict[str, Account] = field(default_factory=dict)  # by client_email
    # spreadsheet id -> sheet name -> rows; `shared` lists the emails allowed to write.
    sheets: dict[str, dict[str, list[list[str]]]] = field(default_factory=dict)
    shared: dict[str, set[str]] = field(default_factory=dict)
    now: Callable[[], float] = time.time
    token_requests: list[Received] = field(default_factory=list)
    appends: list[Received] = field(default_factory=list)
    token_script: list[Reply] = field(default_factory=list)
    append_script: list[Reply] = field(default_factory=list)
    issued: dict[str, str] = field(default_factory=dict)  # access token -> client_email
    claims: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, Any]] = field(default_factory=list)

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/token", self._token)
        router.add_post("/v4/spreadsheets/{id}/values/{tail:.*}", self._append)

    async def _scripted(
        self, request: web.Request, script: list[Reply], got: Received
    ) -> web.StreamResponse | None:
        if script and isinstance(script[0], tuple):
            status, text, *headers = script.pop(0)  # type: ignore[misc]
            text = text.replace("ECHO", f"{got.text} {got.headers}")
            return self.reply(status, text, *headers)
        return await self.scripted(request, script)

    async def _token(self, request: web.Request) -> web.Response:
        got = await self.record(request, self.token_requests)
        scripted = await self._scripted(request, self.token_script, got)
        if scripted is not None:
            return scripted
        form = await request.post()
        if form.get("grant_type") != GRANT:
            return self._grant_error("unsupported_grant_type", "Invalid grant_type")
        assertion = str(form.get("assertion", ""))
        try:
            header = jwt.get_unverified_header(assertion)
            email = jwt.decode(assertion, options={"verify_signature": False}).get("iss", "")
            account = self.accounts[email]
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=f"{self.url}/token",
                options={"verify_exp": False, "verify_iat": False, "require": ["exp", "iat"]},
            )
        except (jwt.PyJWTError, KeyError):
            return self._grant_error("invalid_grant", "Invalid JWT Signature.")
        now = self.now()
        if header.get("kid") != account.key_id:
            return self._grant_error("invalid_grant", "Invalid JWT Signature.")
        if claims.get("scope") != SCOPE:
            return self._grant_error("invalid_scope", "Invalid OAuth scope.")
        if not (claims["iat"] <= now + 60 and now < claims["exp"] <= claims["iat"] + 3600):
            return self._grant_error("invalid_grant", "Invalid JWT: Token must be a short-lived")
        self.claims.append(claims)
        self.headers.append(header)
        token = "ya29." + secrets.token_urlsafe(24)
        self.issued[token] = email
        return web.json_response(
            {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}
        )

    def _grant_error(self, error: str, description: str) -> web.Response:
        body = {"error": error, "error_description": description}
        return web.json_response(body, status=400)

    async def _append(self, request: web.Request) -> web.Response:
        got = await self.record(request, self.appends)
        scripted = await self._scripted(request, self.append_script, got)
        if scripted is not None:
            return scripted

        def fail(code: int, status: str, message: str) -> web.Response:
            text = google_error(code, status, message)
            return web.Response(status=code, text=text, content_type="application/json")

        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        email = self.issued.get(token)
        if email is None:
            return fail(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        spreadsheet = self.sheets.get(request.match_info["id"])
        if spreadsheet is None:
            return fail(404, "NOT_FOUND", "Requested entity was not found.")
        if email not in self.shared.get(request.match_info["id"], set()):
            return fail(403, "PERMISSION_DENIED", "The caller does not have permission")
        tail = request.match_info["tail"]
        if not tail.endswith(":append") or request.query.get("valueInputOption") != "RAW":
            return fail(400, "INVALID_ARGUMENT", "Invalid valueInputOption")
        cell_range = tail.removesuffix(":append")
        sheet = cell_range.split("!")[0].strip("'")
        if sheet not in spreadsheet:
            return fail(400, "INVALID_ARGUMENT", f"Unable to parse range: {cell_range}")
        body = json.loads(got.body)
        rows = body.get("values")
        if body.get("range") != cell_range or not isinstance(rows, list) or len(rows) != 1:
            return fail(400, "INVALID_ARGUMENT", "Invalid values")
        spreadsheet[sheet].extend(rows)
        n = len(spreadsheet[sheet])
        cells = len(rows[0])
        return web.json_response(
            {
                "spreadsheetId": request.match_info["id"],
                "tableRange": f"{sheet}!A1:Z{n - 1}",
                "updates": {
                    "spreadsheetId": request.match_info["id"],
                    "updatedRange": f"{sheet}!A{n}:Z{n}",
                    "updatedRows": 1,
                    "updatedColumns": cells,
                    "updatedCells": cells,
                },
            }
        )
