"""Plumbing of the `ptqseg` command line: argument types, help format, and how results, remarks,
warnings and errors reach the user (text or JSON on stdout, one-line messages on stderr, bars cleared first).

Standard library and PTQLogic's light modules only: the CLI must answer `--help` at once.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any, Callable

from ..core.errors import InputWarning
from ..core.progress import Monitor, TqdmProgress, line_monitor


class UsageError(Exception):
    """A command line argparse refuses; main() prints it (and a JSON error with --json)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", self.format_usage())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" where there is a real default (not for flags, required or unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or any(action.default is unset for unset in (None, False, argparse.SUPPRESS)):
            return action.help or ""
        return super()._get_help_string(action) or ""


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def make_monitor(args: argparse.Namespace) -> Monitor:
    """Progress as machine lines (--progress-lines), tqdm bars (a terminal) or nothing; an estimate before long
    work (e.g. "Expected: 5 parts, ...") as a machine line, else as one line on stderr."""
    if args.progress_lines:
        return line_monitor(sys.stderr)
    bars = None if args.json or not sys.stderr.isatty() else TqdmProgress(sys.stderr)

    def show_estimate(summary: dict) -> None:
        if bars is not None:
            bars.close()  # never printed over a live bar
        print(summary["text"], file=sys.stderr, flush=True)

    return Monitor(on_progress=bars, on_estimate=show_estimate)


def note(args: argparse.Namespace, message: str) -> None:
    """A one-line remark on stderr (kept in the JSON result under "notes")."""
    args.notes = [*getattr(args, "notes", []), message]
    close_bars(args)
    print(f"note: {message}", file=sys.stderr)


def emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    close_bars(args)
    notes = getattr(args, "notes", [])
    if args.json:
        print(json.dumps({**data, "notes": notes} if notes else data, default=str))
    else:
        print(text)


def close_bars(args: argparse.Namespace) -> None:
    """Clear live progress bars, so a message is never printed over one."""
    monitor = getattr(args, "monitor", None)
    if monitor is not None:
        monitor.end_loading()
    close = getattr(getattr(monitor, "on_progress", None), "close", None)
    if close is not None:
        close()


def fail(args: argparse.Namespace | None, wants_json: bool, message: str, exit_code: int) -> int:
    """One ``error: ...`` line on stderr (and a JSON error object on stdout with --json)."""
    if args is not None:
        close_bars(args)
    message = message.replace("\n", " ")
    print(f"error: {message}", file=sys.stderr)
    if wants_json:
        print(json.dumps({"error": message, "exit_code": exit_code}))
    return exit_code


def route_warnings(args: argparse.Namespace) -> None:
    """Our InputWarnings become ``warning: ...`` lines (and JSON "notes"); libraries' warnings only with --debug."""
    if not args.debug:
        warnings.simplefilter("ignore")
    warnings.simplefilter("always", InputWarning)

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, InputWarning):
            args.notes = [*getattr(args, "notes", []), f"warning: {message}"]
            close_bars(args)
            print(f"warning: {message}", file=sys.stderr)
        else:
            print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")

    warnings.showwarning = show
