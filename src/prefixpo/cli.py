"""The ``prefixpo`` command: one subcommand per module, each with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "verify": ("prefixpo.verify", "check that the prefix-shared layout equals separate sequences on a model"),
    "prepare": ("prefixpo.prepare", "check and tokenize a preference dataset and print its statistics"),
    "plot": ("prefixpo.plot", "draw the loss and reward curves of a training run to PNG files"),
    "train": ("prefixpo.train", "SFT and preference training from a YAML config"),
    "bench": ("prefixpo.bench.cli", "time preference-training steps: separate vs shared, unpacked vs packed"),
}


def name_mapping(text: str) -> tuple[str, str]:
    """``--column-map chosen=good`` -> ``("chosen", "good")`` (an argparse type)."""
    key, eq, value = text.partition("=")
    if not (key and eq and value):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=COLUMN")
    return key, value


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported, so one subcommand's dependencies never
    stand in the way of another."""
    parser = argparse.ArgumentParser(prog="prefixpo", description="Preference training with prefix sharing.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    module = importlib.import_module(args._module)
    if getattr(module, "ACCEPTS_OVERRIDES", False):  # only such commands read args.overrides
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:  # training saves on SIGINT itself; before or after it, nothing to save
        print(f"prefixpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
