"""The ``onnxprune`` command: a group whose default subcommand is ``prune``.

``onnxprune MODEL --channels 0.3`` is the same as ``onnxprune prune MODEL --channels 0.3``. Every expected failure
is an :class:`~onnxprune.errors.OnnxPruneError`, printed as one line with its documented exit code; ``--debug``
shows the traceback instead. click's usage errors are one line too (exit 2), and SIGTERM unwinds like Ctrl-C so that
temporary files are removed, then exits 143.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import click

from onnxprune.errors import OnnxPruneError, Terminated

EXIT_CODES = """Exit codes: 0 ok; 1 internal error; 2 bad option or argument; 3 input model unreadable or invalid;
4 output not writable (or failed its check, or --verify); 5 validation threshold exceeded; 6 execution provider not
installed; 7 data does not match the model or is not finite; 130 Ctrl-C; 143 SIGTERM."""


class DefaultGroup(click.Group):
    """A click group that runs ``prune`` when the first argument is not a subcommand name."""

    default_command = "prune"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="onnxprune")
def cli() -> None:
    """Prune ONNX models from any framework: unstructured sparsity and exact structured channel removal.

    Run `onnxprune MODEL --channels 0.3` (structured) or `onnxprune MODEL --sparsity 0.5` (unstructured).
    """


def _register() -> None:
    from onnxprune.cli.inspect_cmd import inspect_command
    from onnxprune.cli.prune_cmd import prune_command

    cli.add_command(prune_command, "prune")
    cli.add_command(inspect_command, "inspect")
    try:
        from onnxprune.cli.validate_cmd import validate_command
    except ImportError:
        return
    cli.add_command(validate_command, "validate")
    from onnxprune.cli.sensitivity_cmd import sensitivity_command

    cli.add_command(sensitivity_command, "sensitivity")


_register()


def _one_line(text: str) -> str:
    """Every message is one line on stderr: collapse the newlines some messages carry."""
    return " ".join(str(text).split())


def _usage_message(exc: click.UsageError) -> str:
    """click's usage error as one line: its message and where help is, instead of its usage block."""
    command = exc.ctx.command_path if exc.ctx is not None else "onnxprune"
    return f"{_one_line(exc.format_message())} (try '{command} --help')"


def _raise_terminated(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT handler: unwind so cleanup runs; further signals during cleanup are ignored."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _terminate_by_exception():
    """Install the SIGTERM/SIGINT handler for one run and restore the previous ones after it (only the main thread
    may)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every failure is one line on stderr with its documented exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        with _terminate_by_exception():
            cli.main(args=args, prog_name="onnxprune", standalone_mode=False)
    except OnnxPruneError as exc:
        if debug:
            raise
        click.echo(f"onnxprune: error: {_one_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    except Terminated as exc:
        click.echo(f"onnxprune: {'aborted' if exc.signum == signal.SIGINT else 'terminated'}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("onnxprune: aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `onnxprune`: the help is the answer
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        click.echo(f"onnxprune: error: {_usage_message(exc)}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"onnxprune: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # an unexpected failure is still one line unless --debug
        if debug:
            raise
        click.echo(f"onnxprune: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for "
                   "details)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
