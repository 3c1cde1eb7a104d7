"""The ``lasp2`` command line: ``lasp2 bench``, ``lasp2 plan``, ``lasp2 train``, ``lasp2 export``, ...

Sub-commands register themselves: every module named in ``SUBCOMMAND_MODULES`` defines
``add_parser(subparsers)``, which adds its parser(s) with ``set_defaults(func=run)``; ``run(args)``
returns an exit code. A new sub-command (e.g. ``train``) only appends its module here, so this
file never grows with their flags.

Errors a user can fix (bad flags, sizes that do not split, a missing optional dependency) are
one line on stderr, ``lasp2 <command>: error: ...``, and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMAND_MODULES = ("lasp2.bench.cli", "lasp2.train.cli", "lasp2.train.prepare", "lasp2.cli",
                      "lasp2.train.generate_cli")


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_parser(subparsers) -> None:
    """``lasp2 export --checkpoint DIR --out HF_DIR``: its parser lives here because its logic,
    ``lasp2.train.export`` / ``lasp2.hf.export``, needs transformers, which ``lasp2 --help`` must not import."""
    p = subparsers.add_parser(
        "export", help="write a lasp2 train --hf-config checkpoint as a transformers directory",
        description="Write the transformers model of a 'lasp2 train --hf-config / --hf-weights' checkpoint "
                    "(single-file or sharded) to HF_DIR with save_pretrained (config.json + safetensors), "
                    "loadable by AutoModelForCausalLM.from_pretrained(HF_DIR) without lasp2.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a run directory (its latest checkpoint) or a checkpoints/step-NNNNNN directory")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="a new (or empty) directory to write")
    p.set_defaults(func=_export)


def _export(args) -> int:
    try:
        from .train.export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.out)
    except (ValueError, ImportError) as e:
        raise UsageError(str(e).strip().splitlines()[0]) from None
    print(f"lasp2 export: wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))}); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="lasp2", description="LASP-2 sequence parallelism for linear and hybrid attention.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # sub-commands record the command line they ran
    if args.command is None:
        parser.error("a command is required: " + ", ".join(parser._subparsers._group_actions[0].choices))
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"lasp2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lasp2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
