"""schemathesis over the OpenAPI spec: generated requests for every operation of the live
app (uvicorn in a thread, tiny engine) must never get a server error. Each operation runs
a bounded number of examples; for the session routes about half of the examples use a real
session's id and token, so generated bodies reach the handlers behind the auth check.

Allowed 5xx are the documented, intended ones only: 503 too_many_sessions (every slot
taken by sessions that earlier examples created) and 501 tts_unavailable (no TTS engine on
this machine). Anything else -- 500 internal_error above all -- fails the test."""

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from model.engine import Engine  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.testing import LiveServer  # noqa: E402
from tests.test_cluster import cluster  # noqa: E402,F401  (a fixture: worker processes on a fresh Redis)

EXAMPLES = 60
ALLOWED_5XX = {(503, "too_many_sessions"), (501, "tts_unavailable")}
STREAMING = {("GET", "/v1/sessions/{session_id}/events")}    # never ends while the session lives
DESTRUCTIVE = {("DELETE", "/v1/sessions/{session_id}")}       # would end the shared session


@pytest.fixture(scope="module")
def live():
    engine = Engine.from_pretrained("tiny")
    s = Settings(max_sessions=3, offer_timeout_s=300, audio_rate_per_s=1000, audio_burst=1000)
    with LiveServer(s, engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(live):
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json")


@pytest.fixture(scope="module")
def real_session(live):
    r = httpx.post(f"{live.url}/v1/sessions", json={"avatar": "ada"}, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


def _operations(api):
    return [result.ok() for result in api.get_all_operations()]


def test_spec_lists_the_session_routes(api):
    paths = {(op.method.upper(), op.path) for op in _operations(api)}
    assert ("POST", "/v1/sessions") in paths and ("POST", "/v1/sessions/{session_id}/audio") in paths


def fuzz(base_url: str, api, real_session: dict) -> tuple[list[str], dict]:
    """Run every operation's examples against `base_url`: (server errors, statuses per operation)."""
    failures, statuses = [], {}
    for op in _operations(api):
        key = (op.method.upper(), op.path)
        if key in STREAMING:
            continue
        use_real = "{session_id}" in op.path and key not in DESTRUCTIVE

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=op.as_strategy(), real=st.booleans() if use_real else st.just(False))
        def run(case, real):
            if real:
                case.path_parameters = {**(case.path_parameters or {}), "session_id": real_session["id"]}
                case.headers = {**(case.headers or {}), "authorization": f"Bearer {real_session['token']}"}
            response = case.call(base_url=base_url, timeout=60)
            codes = statuses.setdefault(key, {})
            codes[response.status_code] = codes.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                try:
                    code = response.json()["error"]["code"]
                except Exception:
                    code = None
                if (response.status_code, code) not in ALLOWED_5XX:
                    failures.append(f"{key} -> {response.status_code} {response.text[:300]}\n"
                                    f"  reproduce: {case.as_curl_command()}")

        run()
    return failures, statuses


def test_no_server_errors(live, api, real_session):
    failures, statuses = fuzz(live.url, api, real_session)
    assert not failures, "server errors:\n" + "\n".join(failures[:10])
    assert len(statuses) >= 10, statuses
    assert sum(statuses[("POST", "/v1/sessions")].values()) >= EXAMPLES // 2, statuses
    # The real session was reached: generated bodies got past the auth check (to 2xx or 400s
    # of the handler itself, not only 401/404).
    assert set(statuses[("POST", "/v1/sessions/{session_id}/audio")]) - {401, 404}, statuses


@pytest.mark.redis
def test_no_server_errors_through_another_worker(api, cluster):
    """The same against node a of two workers while the real session runs on b: every session
    route is proxied (or, for driving input, forwarded through b's stream), creates are placed."""
    a, b = cluster(2, max_sessions=2, audio_rate_per_s=1000, audio_burst=1000)
    r = httpx.post(f"{b.url}/v1/sessions", json={"avatar": "ada"}, timeout=120)
    assert r.status_code == 201, r.text
    real = r.json()
    failures, statuses = fuzz(a.url, api, real)
    assert not failures, "server errors:\n" + "\n".join(failures[:10])
    assert 200 in statuses[("GET", "/v1/sessions/{session_id}")], statuses      # proxied to b
    assert set(statuses[("POST", "/v1/sessions/{session_id}/audio")]) - {401, 404}, statuses
    assert 200 in statuses[("POST", "/v1/sessions/{session_id}/interrupt")], statuses  # through b's stream
    st_b = httpx.get(f"{b.url}{real['location']}", headers={"Authorization": f"Bearer {real['token']}"}).json()
    assert st_b["state"] != "closed" and st_b["driving"]["interrupts"] > 0   # forwarded input reached b
