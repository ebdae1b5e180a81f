"""argparse helpers shared by the `strata` dispatcher (strata.cli) and the subcommand modules it loads
(strata.engine.cli, strata.router.cli): the help formatter that shows defaults and the parser whose errors name an
unknown flag. Standard library only: the router and `strata plan` import it without torch."""
from __future__ import annotations

import argparse
import difflib
import sys


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default, unless its help already speaks of one or there is nothing to show."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        if ("default" in help_ or not action.option_strings or action.default is None or action.default is False
                or action.default == [] or action.default is argparse.SUPPRESS):
            return help_
        return help_ + " (default: %(default)s)"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for a in parser._actions:  # noqa: SLF001 - argparse has no public listing
        if isinstance(a, argparse._SubParsersAction):
            return a
    return None


def _known(parser: argparse.ArgumentParser, flag: str) -> bool:
    opts = parser._option_string_actions  # noqa: SLF001
    return flag in opts or (parser.allow_abbrev and any(o.startswith(flag) for o in opts))


def unknown_flag(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, str] | None:
    """The first `--flag` in argv that the (sub)command it belongs to does not have: (that parser, the flag).
    A flag belongs to the innermost subcommand named before it."""
    for tok in argv:
        if tok == "--":
            return None
        sub = _subparsers(parser)
        if sub is not None and tok in sub.choices:
            parser = sub.choices[tok]
        elif tok.startswith("--") and " " not in tok:
            flag = tok.split("=", 1)[0]
            if not _known(parser, flag):
                return parser, flag
    return None


class Parser(argparse.ArgumentParser):
    """argparse with errors that fit on a screen: a short usage line (the full one lists every flag), and an
    unknown flag named, with the closest known one, before argparse mistakes its value for a subcommand."""

    def short_usage(self) -> str:
        usage = self.format_usage()
        if usage.count("\n") <= 3:
            return usage
        return f"usage: {self.prog} [options] ...  (see {self.prog} --help)\n"

    def error(self, message: str):
        self.exit(2, f"{self.short_usage()}{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        bad = unknown_flag(self, argv)
        if bad is not None:
            parser, flag = bad
            flags = [o for o in parser._option_string_actions if o.startswith("--")]  # noqa: SLF001
            close = difflib.get_close_matches(flag, flags, n=1)
            parser.error(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        return super().parse_known_args(argv, namespace)
