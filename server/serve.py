"""`knotstream serve`: the HTTP/WebRTC server (uvicorn) with the web demo at `/`.

Flags override `KNOTSTREAM_*` environment variables, which override the defaults
(server/settings.py).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (default 127.0.0.1, env KNOTSTREAM_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8000, env KNOTSTREAM_PORT)")
    parser.add_argument("--model", help="preset name or local safetensors path (default tiny)")
    parser.add_argument("--device", help="torch device (default cpu)")
    parser.add_argument("--max-sessions", type=int, help="concurrent sessions (default 4)")
    parser.add_argument("--codec", choices=["vp8", "h264"], help="video codec preference (default vp8)")
    parser.add_argument("--ice-server", action="append", metavar="URL",
                        help="STUN/TURN URL handed to peers (repeatable; default none)")
    parser.add_argument("--loopback-ice", action="store_true", default=None,
                        help="offer 127.0.0.1 ICE candidates (hosts with only a loopback interface)")


def settings_from_args(args: argparse.Namespace):
    from server.settings import Settings

    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "model": args.model, "device": args.device,
        "max_sessions": args.max_sessions, "codec": args.codec, "loopback_ice": args.loopback_ice,
        "ice_servers": [{"urls": [u]} for u in args.ice_server] if args.ice_server else None,
    }.items() if v is not None}
    return Settings(**overrides)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    settings = settings_from_args(args)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
