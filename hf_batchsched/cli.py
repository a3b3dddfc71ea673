"""The ``hf-batchsched`` command.

Each subcommand lives in ``hf_batchsched/commands/<name>.py`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Bad input (a ``ValueError``, including
``ConfigError``, or a missing file) is printed on one line and the command exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "COMMANDS"]

# name -> module under hf_batchsched.commands; the order is the order shown by --help.
COMMANDS = {
    "demo": "demo",
    "finetune": "finetune",
    "plot": "plot",
    "lrbench": "lrbench",
    "range-test": "range_test",
    "reproduce": "reproduce",
    "critical-batch": "critical_batch",
}


def _available_commands() -> dict:
    return {name: importlib.import_module(f"hf_batchsched.commands.{module}") for name, module in COMMANDS.items()}


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``prog: error: ...``, exit code 2), no usage dump.

    Options must be spelled in full (``allow_abbrev=False``: ``--learning_rat`` is not ``--learning_rate``). A
    command may set ``parser.epilog_factory`` (a callable returning the epilog) for help text that is costly to build
    (it is built only when the help is shown).
    """

    epilog_factory = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="hf-batchsched",
        description="Batch-size ramps, LR policies, sharpness probes and stability statistics for the HF Trainer.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, module in _available_commands().items():
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run_command=module.run, passes_unknown=getattr(module, "PASSES_UNKNOWN_ARGS", False))
    return parser


class _OptionalKernelNotice(logging.Filter):
    """Drops bitsandbytes' notice that the optional ``kernels`` package is absent on AVX512-BF16 CPUs.

    It is printed on import (peft imports bitsandbytes), whatever the command, and its fallback is used silently
    anyway; every other bitsandbytes message passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())
    parser = build_parser()
    # A command with PASSES_UNKNOWN_ARGS = True (e.g. finetune: config overrides) gets the unknown args as args.extra.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passes_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.run_command(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"hf-batchsched {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
