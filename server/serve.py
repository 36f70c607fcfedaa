"""`knotstream serve`: the HTTP/WebRTC server (uvicorn) with the web demo at `/`.

Flags override `KNOTSTREAM_*` environment variables, which override the defaults
(server/settings.py).

SIGTERM (or Ctrl-C) drains: readyz answers 503 draining, new sessions are refused (503 +
Retry-After) or placed on other workers, running sessions get `drain_timeout_s` less a
shutdown reserve to end and are then closed ("server shutting down"); then uvicorn stops
and the worker unregisters. The process is gone `drain_timeout_s` after the signal at the
latest: whatever still runs then (a request computing in a thread, a hung close) is left
behind by a hard exit, logged. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading

from streaming.codecs import CODECS

log = logging.getLogger("knotstream.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (default 127.0.0.1, env KNOTSTREAM_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8000, env KNOTSTREAM_PORT)")
    parser.add_argument("--model", help="preset name, local safetensors path, or a photoreal family: livetalk:DIR, "
                                        "flashhead:DIR, livetalk-random (default tiny; docs/models.md)")
    parser.add_argument("--device", help="torch device (default cpu)")
    parser.add_argument("--max-sessions", type=int, help="concurrent sessions (default 4)")
    parser.add_argument("--codec", choices=CODECS, help="video codec preference (default vp8)")
    parser.add_argument("--ice-server", action="append", metavar="URL",
                        help="STUN/TURN URL handed to peers (repeatable; default none)")
    parser.add_argument("--loopback-ice", action="store_true", default=None,
                        help="offer 127.0.0.1 ICE candidates (hosts with only a loopback interface)")
    parser.add_argument("--redis-url", help="shared session store of several workers (env KNOTSTREAM_REDIS_URL)")
    parser.add_argument("--public-url", help="this worker's address as other workers reach it "
                                             "(default http://<host>:<port>)")
    parser.add_argument("--drain-timeout", type=float, help="seconds running sessions get on SIGTERM (default 30)")
    parser.add_argument("--avatar", action="append", metavar="FILE",
                        help="a personal avatar to serve (`knotstream avatar create`; repeatable)")


def settings_from_args(args: argparse.Namespace):
    from server.settings import Settings

    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "model": args.model, "device": args.device,
        "max_sessions": args.max_sessions, "codec": args.codec, "loopback_ice": args.loopback_ice,
        "redis_url": args.redis_url, "public_url": args.public_url, "drain_timeout_s": args.drain_timeout,
        "ice_servers": [{"urls": [u]} for u in args.ice_server] if args.ice_server else None,
        "avatars": args.avatar,
    }.items() if v is not None}
    return Settings(**overrides)


def check_model_source(name: str) -> None:
    """Refuse a model that cannot load before the server starts: a message naming each missing
    file (the CLI prints it, exit code 2), not a failed startup's traceback."""
    from model.sources import check_model

    try:
        check_model(name)
    except ImportError as exc:  # an optional part (transformers for the photoreal families)
        raise ValueError(str(exc)) from None


# How long an idle HTTP connection stays open. Longer than the idle timeout of common load
# balancers (60 s) and of HTTP clients' pools (httpx: 5 s, uvicorn's own default), so the client
# side always closes first: with equal timeouts a request sent as the server closes the
# connection is lost ("server disconnected without sending a response").
KEEP_ALIVE_S = 65


def shutdown_reserve(drain_timeout_s: float) -> float:
    """Of the drain timeout, the part kept for stopping after the sessions' time is up (closing
    peers, finishing requests, unregistering from the store)."""
    return min(10.0, drain_timeout_s / 2)


def exit_deadline(seconds: float) -> threading.Timer:
    """A daemon timer that ends the process `seconds` from now, whatever still runs."""
    def force_exit():
        log.error("still running %.0f s after the stop signal (a request or close that does not end); "
                  "exiting now", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, force_exit)
    timer.daemon = True
    timer.start()
    return timer


def draining_server(config, app, drain_timeout_s: float):
    """A uvicorn Server whose first SIGTERM/SIGINT drains the app's sessions before stopping,
    and that is gone `drain_timeout_s` after that signal at the latest."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        _loop = None
        _drain = None
        _deadline = None

        async def serve(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):
            if self._deadline is None:
                self._deadline = exit_deadline(drain_timeout_s)
            manager = getattr(app.state, "manager", None)
            if self._drain is None and manager is not None and self._loop is not None and not self.should_exit:
                self._captured_signals.append(sig)   # uvicorn re-raises it once stopped
                self._drain = True
                self._loop.call_soon_threadsafe(self._start_drain, manager)
                return
            super().handle_exit(sig, frame)          # second signal (or not started): stop now

        def _start_drain(self, manager):
            self._drain = asyncio.ensure_future(self._drain_then_exit(manager))

        async def _drain_then_exit(self, manager):
            try:
                await manager.drain(drain_timeout_s - shutdown_reserve(drain_timeout_s))
            except Exception:
                log.exception("drain failed; stopping anyway")
            self.should_exit = True

    return DrainingServer(config)


def check_avatars(settings) -> None:
    """The personal avatars asked for exist, are avatars and fit the server's model: a clear
    error (exit 2) before the server starts, not a failed startup."""
    from model.config import PRESETS, from_name
    from model.personal.avatar_file import read
    from model.weights import read_metadata
    from server.personal import check_compatible

    if not settings.avatars:
        return
    base = from_name(settings.model) if settings.model in PRESETS else read_metadata(settings.model)["config"]
    names = {}
    for path in settings.avatars:
        avatar = read(path)
        check_compatible(read_metadata(path)["config"], base)
        if avatar.name in names:
            raise ValueError(f"{path} and {names[avatar.name]} are both avatar {avatar.name!r}")
        names[avatar.name] = path


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.logs import redact_access_log

    settings = settings_from_args(args)
    check_model_source(settings.model)
    check_avatars(settings)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=shutdown_reserve(settings.drain_timeout_s) / 2)
    redact_access_log()  # after uvicorn.Config, which sets up its loggers
    draining_server(config, app, settings.drain_timeout_s).run()
    return 0
