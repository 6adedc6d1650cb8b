"""The command line: parse arguments, load the config, call one stage function. No logic lives here.

Commands: `run` (the whole pipeline), `demo` (the offline demo), `traces teacher|student|stats|export`,
`train`, `eval`, `score`, `show-prompt`, `report`, `config show|reference`.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, config_reference, dump_config, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run's YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-5 policy.phi=0")


def cmd_config(args: argparse.Namespace) -> int:
    if args.what == "reference":
        print(config_reference(), end="")
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="orpo-distill", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config (`show`) or the reference of every key")
    p.add_argument("what", choices=["show", "reference"])
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"orpo-distill: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orpo-distill: interrupted; everything written so far is kept, run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

