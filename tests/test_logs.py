"""server/logs.py: session tokens never reach the access log."""

import logging

from server.logs import REDACTED, RedactTokens, redact, redact_access_log


def test_redact_hides_token_values_and_keeps_the_rest():
    assert redact("/v1/sessions/ab12/events?token=s3cr3t-_x") == f"/v1/sessions/ab12/events?token={REDACTED}"
    assert redact("/x?a=1&token=abc&b=2") == f"/x?a=1&token={REDACTED}&b=2"
    assert redact("/x?access_token=abc") == f"/x?access_token={REDACTED}"
    assert redact("/x?mytoken=abc&tokens=1") == "/x?mytoken=abc&tokens=1"  # other parameters stay


def test_uvicorn_access_lines_are_redacted_once_installed():
    import uvicorn

    uvicorn.Config(app=None, log_level="info")  # configures uvicorn's loggers as `knotstream serve` does
    redact_access_log()
    redact_access_log()  # idempotent
    for name in ("uvicorn.access", "uvicorn.error"):
        assert sum(isinstance(f, RedactTokens) for f in logging.getLogger(name).filters) == 1
    logger = logging.getLogger("uvicorn.access")
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Keep()
    logger.addHandler(handler)
    try:
        # The call uvicorn's h11/httptools protocols make for each response.
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                    "/v1/sessions/ab12/events?token=live-session-token", "1.1", 200)
    finally:
        logger.removeHandler(handler)
    assert lines and "live-session-token" not in lines[0] and f"token={REDACTED}" in lines[0]
