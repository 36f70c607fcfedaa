"""server/auth.py: API keys for creating sessions, per-session tokens for everything else,
one 404 for unknown ids, forged ids and other sessions' tokens (no existence leak), the
auth default (off only on loopback, said in a log line), CORS allow-list."""

import logging

import httpx
import pytest

from model.engine import Engine
from server import auth
from server.app import create_app
from server.settings import Settings
from server.testing import LiveServer

KEY = "k-0123456789abcdef"
KEY2 = "k-fedcba9876543210"


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny")


@pytest.fixture(scope="module")
def server(engine):
    s = Settings(max_sessions=4, api_keys=[KEY, KEY2], cors_origins=["http://app.example"], offer_timeout_s=120)
    with LiveServer(s, engine) as srv:
        yield srv


def err(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert "Traceback" not in r.text
    return body["error"]


def new_session(http, key=KEY):
    r = http.post("/v1/sessions", json={"avatar": "ada"}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201, r.text
    return r.json()


# ----- the auth mode ----------------------------------------------------------------------

@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                           ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                           ("10.1.2.3", False), ("::", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    assert auth.is_loopback(host) is loopback


def test_resolve_mode():
    assert auth.resolve_mode(Settings())[0] is False                       # the local demo works as is
    assert "loopback" in auth.resolve_mode(Settings())[1]
    assert auth.resolve_mode(Settings(api_keys=[KEY]))[0] is True          # keys on loopback: required
    assert auth.resolve_mode(Settings(host="0.0.0.0", api_keys=[KEY]))[0] is True
    assert auth.resolve_mode(Settings(host="0.0.0.0", auth_disabled=True))[0] is False
    with pytest.raises(ValueError, match="KNOTSTREAM_API_KEYS"):
        auth.resolve_mode(Settings(host="0.0.0.0"))                        # public bind, no keys: refuse
    with pytest.raises(ValueError, match="no API keys"):
        auth.resolve_mode(Settings(auth_disabled=False))
    with pytest.raises(ValueError, match="at least 16"):
        auth.resolve_mode(Settings(api_keys=["short"]))


def test_public_bind_without_keys_refuses_to_start(capsys, monkeypatch):
    from server import cli

    with pytest.raises(ValueError):
        create_app(Settings(host="0.0.0.0"))
    monkeypatch.delenv("KNOTSTREAM_API_KEYS", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "KNOTSTREAM_API_KEYS" in capsys.readouterr().err


def test_keys_from_env_comma_separated(monkeypatch):
    monkeypatch.setenv("KNOTSTREAM_API_KEYS", f"{KEY}, {KEY2}")
    monkeypatch.setenv("KNOTSTREAM_HOST", "0.0.0.0")
    s = Settings()
    assert s.api_keys == [KEY, KEY2] and auth.resolve_mode(s)[0] is True


def test_api_key_check_unit():
    keys = auth.ApiKeys(Settings(api_keys=[KEY, KEY2]))
    keys.check(f"Bearer {KEY2}", None)            # any configured key, not only the first
    keys.check(None, KEY)
    keys.check(f"bearer   {KEY}", None)
    for a, x in [(None, None), ("Bearer ", None), (f"Basic {KEY}", None), (f"Bearer {KEY}x", None),
                 (None, KEY[:-1]), ("Bearer " + KEY.upper(), None)]:
        with pytest.raises(auth.ApiError) as e:
            keys.check(a, x)
        assert (e.value.status, e.value.code) == (401, "unauthorized")
    open_ = auth.ApiKeys(Settings())
    open_.check(None, None)                       # off: anything goes


def test_default_loopback_server_says_auth_is_off(engine, caplog):
    caplog.set_level(logging.INFO, logger="knotstream.auth")
    with LiveServer(Settings(), engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/sessions", json={"avatar": "ada"})
        assert r.status_code == 201, r.text
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "knotstream.auth"]
    assert any("API keys OFF" in m and "loopback" in m for m in lines), lines


# ----- API keys on session creation -------------------------------------------------------------

def test_create_needs_a_valid_api_key(http, server):
    e = err(http.post("/v1/sessions", json={"avatar": "ada"}), 401, "unauthorized")
    assert "API key" in e["message"]
    err(http.post("/v1/sessions", json={"avatar": "ada"}, headers={"Authorization": "Bearer wrong-key-000000000"}),
        401, "unauthorized")
    err(http.post("/v1/sessions", json={"avatar": "ada"}, headers={"X-API-Key": KEY + "0"}), 401, "unauthorized")
    assert server.manager.sessions == {}
    r = http.post("/v1/sessions", json={"avatar": "ada"}, headers={"X-API-Key": KEY2})
    assert r.status_code == 201, r.text
    assert new_session(http)["token"] not in (KEY, KEY2)
    # A multipart upload is refused before its body is read: no 413, no decode.
    big = {"image": ("big.png", b"\0" * 12_000_000, "image/png")}
    r = http.post("/v1/sessions", files=big)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_a_session_token_is_not_an_api_key_and_an_api_key_is_not_a_session_token(http):
    s = new_session(http)
    err(http.post("/v1/sessions", json={"avatar": "ada"}, headers={"Authorization": f"Bearer {s['token']}"}),
        401, "unauthorized")
    err(http.get(s["location"], headers={"Authorization": f"Bearer {KEY}"}), 404, "session_not_found")


# ----- session tokens ------------------------------------------------------------------------

ROUTES = [("GET", ""), ("DELETE", ""), ("POST", "/interrupt"), ("POST", "/audio"), ("POST", "/speak"),
          ("POST", "/offer")]


def call(http, method, path, headers):
    body = {"text": "hi"} if path.endswith("/speak") else ({"sdp": "v=0", "type": "offer"}
                                                            if path.endswith("/offer") else None)
    if path.endswith("/audio"):
        return http.request(method, path, content=b"\0\0" * 1600, headers={**headers, "Content-Type": "audio/pcm"})
    return http.request(method, path, json=body, headers=headers)


def test_another_sessions_token_is_the_same_404_as_an_unknown_session(http, server):
    victim, attacker = new_session(http), new_session(http)
    bad = {"Authorization": f"Bearer {attacker['token']}"}
    for method, suffix in ROUTES:
        own = err(call(http, method, f"/v1/sessions/{victim['id']}{suffix}", bad), 404, "session_not_found")
        ghost_id = "0123456789abcdef"
        ghost = err(call(http, method, f"/v1/sessions/{ghost_id}{suffix}", bad), 404, "session_not_found")
        # Same body but for the id itself: nothing tells the two apart.
        assert own["message"].replace(victim["id"], "ID") == ghost["message"].replace(ghost_id, "ID")
    # The victim is untouched (not deleted, not interrupted, nothing queued) and still answers its owner.
    live = server.manager.sessions[victim["id"]]
    assert live.state == "new" and live.driving.segments() == []
    st = http.get(victim["location"], headers={"Authorization": f"Bearer {victim['token']}"})
    assert st.status_code == 200 and st.json()["state"] == "new"


@pytest.mark.parametrize("forged", ["0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "x" * 5000,
                                    "..%2F..%2Fetc%2Fpasswd", "%00", "0123456789abcde%27"])
def test_forged_ids_are_404_without_echo(http, forged):
    s = new_session(http)
    e = err(http.get(f"/v1/sessions/{forged}", headers={"Authorization": f"Bearer {s['token']}"}),
            404, "session_not_found") if forged != "..%2F..%2Fetc%2Fpasswd" else None
    if e is not None:
        assert len(e["message"]) < 100 and "x" * 50 not in e["message"]
    else:  # the router decodes %2F into a path: some 404 in the JSON format, never a file
        r = http.get(f"/v1/sessions/{forged}", headers={"Authorization": f"Bearer {s['token']}"})
        assert r.status_code == 404 and r.json()["error"]["code"] in ("not_found", "session_not_found")


def test_no_token_is_401_whether_or_not_the_session_exists(http):
    s = new_session(http)
    for sid in (s["id"], "0123456789abcdef", "nonsense"):
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {s['token']}"},
                        {"Authorization": s["token"]}):
            e = err(http.get(f"/v1/sessions/{sid}", headers=headers), 401, "unauthorized")
            assert sid not in e["message"]


def test_token_hashes_only(http, server):
    s = new_session(http)
    rec = server.manager.records[s["id"]]
    assert rec.token_hash == auth.digest(s["token"]) and s["token"] not in repr(rec)
    assert auth.token_matches(s["token"], rec.token_hash)
    assert not auth.token_matches(s["token"] + "x", rec.token_hash)
    assert not auth.token_matches(s["token"], None)


# ----- CORS ---------------------------------------------------------------------------------

def preflight(http, origin):
    return http.options("/v1/sessions", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_allow_list(http):
    ok = preflight(http, "http://app.example")
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    evil = preflight(http, "http://evil.example")
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    r = http.get("/v1/avatars", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_no_cors_by_default(engine):
    app = create_app(Settings(), engine=engine)
    assert not any("CORS" in m.cls.__name__ for m in app.user_middleware)
