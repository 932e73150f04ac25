"""Red team (issue 15): an affiliate reading an ops secret through an admin's send-test.

A store postback's `${affiliate_secret:NAME}` was built into the rule set as `${secret:NAME}`,
resolved by the dispatcher with the affiliate's own secrets only. But anything else that builds
the action with the ops resolver (the console's and the CLI's send-test, `send_once`) resolved
it as the OPS secret of the same name, and sent it to the affiliate's destination. An affiliate
had only to set a secret of its own named like an ops one and ask ops to "send a test".
"""

from __future__ import annotations

from pathlib import Path

from daemon.models import conversion_from_mapping
from daemon.sendtest import send_once
from tests.affiliates.kit import AFF_A, SETTINGS, Api, ping, rules
from tests.harness import Sink, start_daemon, wait_for

OPS_VALUE = "ops-db-password-31337"
ENVIRON = {"POSTBACKD_SECRET_DB_PASSWORD": OPS_VALUE}


async def test_send_test_of_an_affiliate_postback_never_sends_an_ops_secret(
    tmp_path: Path, sink: Sink
) -> None:
    daemon = await start_daemon(
        tmp_path, rules(sink), settings=SETTINGS, dispatch=False, environ=ENVIRON
    )
    try:
        api = Api(daemon)
        status, _ = await api("PUT", "/api/v1/affiliate/secrets/db_password", AFF_A, {"value": "x"})
        assert status == 200
        body = ping(sink, path="exfil")
        body["action"]["url"] = f"{sink.url}/exfil?k=${{affiliate_secret:db_password}}"
        made = await api.create(AFF_A, body)
        # What the console's send-test (an admin, admin=True) runs for this postback.
        lp = daemon.services.reloader.runtime.rules.postbacks[made["id"]]
        conversion, _ = conversion_from_mapping(
            {"conversion_id": "t1", "offer": "7", "affiliate": "42", "status": "approved"}
        )
        result = await send_once(
            daemon.settings, lp, conversion, ENVIRON, resolver=daemon.services.http.resolver
        )
        assert all(OPS_VALUE not in r.path_qs for r in sink.received)
        assert result.error is not None
        assert result.error.reason == "secret_unresolved"
        assert OPS_VALUE not in str(result.error.detail)
        # The dispatcher still resolves the affiliate's own value.
        await daemon.post(conversion_id="c1", offer=7, affiliate=42, status="approved")
        await daemon.services.dispatcher.dispatch_once()
        await daemon.services.dispatcher.drain()
        await wait_for(lambda: any(r.path_qs == "/exfil?k=x" for r in sink.received))
        assert all(OPS_VALUE not in r.path_qs for r in sink.received)
    finally:
        await daemon.client.close()
