"""The server does not relay or connect where clients point it:

- its own peer connection uses only the server's ICE servers; a client's `ice_servers` are
  handed back to that client, never contacted by the server;
- TURN credentials are minted per session (coturn `use-auth-secret`) and work end to end;
- the compose coturn, run here with the very flags of docker/compose.yaml, relays to no
  private, loopback, link-local, CGNAT or Docker address, relays no TCP, and refuses
  expired or made-up credentials.
"""

import asyncio
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from model.engine import Engine
from server.settings import Settings
from server.testing import AvatarClient, LiveServer
from tests.test_server import offer_sdp

ROOT = Path(__file__).resolve().parent.parent
SECRET = "turn-test-secret-0123456789"


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny")


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- the server's peer uses only the server's ICE servers ----------------------------------

def test_client_ice_servers_are_never_contacted_by_the_server(engine):
    """A client names a STUN and a TURN server (here: a UDP socket we listen on, standing for an
    internal address). The answer is made (gathering done) without a single packet to it."""
    trap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    trap.bind(("127.0.0.1", 0))
    trap.settimeout(0.1)
    port = trap.getsockname()[1]
    mine = [{"urls": [f"stun:127.0.0.1:{port}"]},
            {"urls": [f"turn:127.0.0.1:{port}?transport=udp"], "username": "u", "credential": "p"}]
    try:
        with LiveServer(Settings(ice_connect_timeout_s=60), engine) as srv, httpx.Client(base_url=srv.url) as http:
            r = http.post("/v1/sessions", json={"avatar": "ada", "options": {"ice_servers": mine},
                                                "offer": offer_sdp()}, timeout=60)
            assert r.status_code == 201, r.text
            assert r.json()["ice_servers"] == mine            # echoed to the client
            assert r.json()["answer"]["sdp"].startswith("v=0")
            got = []
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                try:
                    got.append(trap.recvfrom(2048))
                except socket.timeout:
                    pass
            assert got == [], f"the server sent {len(got)} packets to a client-named ICE server"
            session = srv.manager.sessions[r.json()["id"]]
            assert session.options.ice_servers == []          # the server's own list (none configured)
    finally:
        trap.close()


# ----- coturn -----------------------------------------------------------------------------

def compose_turn_args() -> list[str]:
    """turnserver's arguments exactly as docker/compose.yaml passes them (shell variables filled)."""
    cmd = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())["services"]["coturn"]["command"][0]
    line = cmd.split("exec turnserver", 1)[1].split(";", 1)[0]
    line = (line.replace("$$TURN_SECRET", SECRET).replace("$$TURN_REALM", "knotstream")
            .replace("$$TURN_EXTERNAL_IP", "127.0.0.1"))
    return shlex.split(line)


class Coturn:
    def __init__(self, args: list[str], tmp: Path):
        exe = shutil.which("turnserver")
        if exe is None:
            pytest.skip("coturn is not installed (scripts/setup.sh installs it: apt-get install coturn)")
        self.port = udp_port()
        args = [a for a in args if not a.startswith(("--listening-port", "--min-port", "--max-port",
                                                     "--external-ip"))]
        self.proc = subprocess.Popen(
            [exe, *args, f"--listening-port={self.port}", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
             "--min-port=49152", "--max-port=65535", f"--pidfile={tmp}/turn.pid", "--log-file=stdout",
             "--simple-log"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        from tests.test_realtime import stun_answers
        if not stun_answers(self.port, timeout_s=20.0):
            self.stop()
            pytest.fail(f"turnserver did not answer on port {self.port}: {self.proc.stdout.read().decode()[-2000:]}")
        self.url = f"turn:127.0.0.1:{self.port}?transport=udp"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture()
def compose_coturn(tmp_path):
    turn = Coturn(compose_turn_args(), tmp_path)
    yield turn
    turn.stop()


async def turn_client(port: int, username: str, password: str):
    from aioice.turn import TurnClientUdpProtocol

    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: TurnClientUdpProtocol(("127.0.0.1", port), username=username, password=password, lifetime=60,
                                      channel_refresh_time=500), remote_addr=("127.0.0.1", port))
    return proto


async def error_of(coro) -> int | None:
    from aioice import stun

    try:
        await asyncio.wait_for(coro, 10)
    except stun.TransactionFailed as exc:
        return exc.response.error_code
    return None


def test_compose_coturn_relays_to_public_peers_only(compose_coturn):
    from server.turn import mint

    async def run():
        creds = mint(SECRET, [compose_coturn.url], "0123456789abcdef", ttl_s=600)
        proto = await turn_client(compose_coturn.port, creds["username"], creds["credential"])
        await asyncio.wait_for(proto.connect(), 10)                # the minted credentials are accepted
        channel = 0x4000
        denied = {}
        for peer in ("127.0.0.1", "10.1.2.3", "172.17.0.2", "192.168.1.10", "169.254.169.254", "100.64.0.1",
                     "0.0.0.1", "224.0.0.251"):
            denied[peer] = await error_of(proto.channel_bind(channel, (peer, 9)))
            channel += 1
        assert denied == dict.fromkeys(denied, 403), denied
        assert await error_of(proto.channel_bind(channel, ("203.0.113.7", 9))) is None   # a public address

        from aioice import stun
        tcp = stun.Message(message_method=stun.Method.ALLOCATE, message_class=stun.Class.REQUEST)
        tcp.attributes["REQUESTED-TRANSPORT"] = 6 << 24                   # RFC 6062: a TCP relay
        tcp_client = await turn_client(compose_coturn.port, creds["username"], creds["credential"])
        assert await error_of(tcp_client.request_with_retry(tcp)) == 442   # unsupported transport

        stale = mint(SECRET, [compose_coturn.url], "0123456789abcdef", ttl_s=600, now=time.time() - 1200)
        forged = dict(creds, credential="bm90IHRoZSByaWdodCBwYXNzd29yZA==")
        for bad in (stale, forged):
            c = await turn_client(compose_coturn.port, bad["username"], bad["credential"])
            assert await error_of(c.connect()) == 401, bad
        for p in (proto, tcp_client):
            p.transport.close()

    asyncio.run(run())


@pytest.fixture()
def loopback_coturn(tmp_path):
    """The compose flags with loopback peers allowed: this test machine has only loopback."""
    args = [a for a in compose_turn_args() if a != "--denied-peer-ip=127.0.0.0-127.255.255.255"
            and a != "--denied-peer-ip=::1"]
    turn = Coturn([*args, "--allow-loopback-peers"], tmp_path)
    yield turn
    turn.stop()


async def test_minted_turn_credentials_carry_a_relay_only_session(engine, loopback_coturn):
    settings = Settings(turn_secret=SECRET, turn_urls=[loopback_coturn.url], turn_ttl_s=300)
    with LiveServer(settings, engine) as srv:
        client = AvatarClient(srv.url)
        # The client's ICE servers come from a first create that only asks for them.
        async with httpx.AsyncClient(base_url=srv.url) as http:
            r = await http.post("/v1/sessions", json={"avatar": "ada"})
            ice = r.json()["ice_servers"]
            await http.delete(r.json()["location"], headers={"Authorization": f"Bearer {r.json()['token']}"})
        (turn,) = ice
        expiry, sid = turn["username"].split(":")
        assert sid == r.json()["id"] and 290 <= int(expiry) - time.time() <= 301
        assert re.fullmatch(r"[A-Za-z0-9+/]{27}=", turn["credential"])
        assert 'credential-type="password"' in r.headers["link"]
        try:
            session = await client.connect("ada", ice_servers=ice, relay_only=True)
            own = session["ice_servers"][0]
            assert own["username"].endswith(session["id"]) and own["credential"] != turn["credential"]
            end = time.monotonic() + 60
            while len(client.got.video) < 25 and time.monotonic() < end:
                await asyncio.sleep(0.1)
            assert len(client.got.video) >= 25
            local = client.pc.getTransceivers()[0].receiver.transport.transport.iceGatherer.getLocalCandidates()
            assert local and all(c.type == "relay" for c in local)
        finally:
            await client.close()
