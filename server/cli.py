"""`knotstream` command line: one entry point, subcommands in their own modules.

Each subcommand module offers `add_arguments(parser)` and `run(args) -> int`; they are
imported only when chosen, so `knotstream --help` stays fast and loads no model.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS = {
    "serve": ("server.serve", "start the HTTP/WebRTC server with the web demo"),
    "render": ("model.render", "render a video offline from a portrait and driving audio/motion"),
    "bench": ("model.bench", "benchmarks that print ratios against a baseline (engine)"),
    "train": ("model.train.trainer", "train the avatar model (VAE, DiT, rollout stages; resumable)"),
    "eval": ("model.train.evaluate", "evaluate a model against ground-truth renders, write a report"),
    "avatar": ("model.personal.cli", "personal avatars from a short video of the person (create)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knotstream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError as exc:  # a module of an optional part that is not installed
            p.set_defaults(_unavailable=f"{name} is unavailable: {exc}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"knotstream: error: {args._unavailable}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input (unreadable image, wrong audio, bad knob...): a message, exit code 2.
        print(f"knotstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
