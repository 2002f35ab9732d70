"""Command-line conventions of every CLI: a usage mistake is one `error:` line naming the flag and exit 2,
no traceback (argparse CLIs: `ArgumentParser`; the absl ones, train and plan: `train_config.parse_flags`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn


def report(error: BaseException | str) -> int:
    """Print `error: ...` on stderr; returns 2, the usage-error status of every CLI here."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def fail(message: str) -> NoReturn:
    """`report` the message's first line and exit."""
    sys.exit(report(message.strip().splitlines()[0]))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's own line breaks and shows each flag's default."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the conventions: `prog` is `python -m <module>`, --help shows the defaults, and a
    mistake is one `error:` line (argparse prints its usage first); subcommands' parsers are the same class."""

    def __init__(self, module: str | None = None, **kwargs: Any) -> None:
        if module:
            kwargs.setdefault("prog", f"python -m {module}")
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog.removeprefix('python -m ')}: {message}")
