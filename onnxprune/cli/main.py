"""The ``onnxprune`` command: a group whose default subcommand is ``prune``.

``onnxprune MODEL --channels 0.3`` is the same as ``onnxprune prune MODEL --channels 0.3``. Every expected failure
is an :class:`~onnxprune.errors.OnnxPruneError`, printed as one line with its documented exit code; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from onnxprune.errors import OnnxPruneError

EXIT_CODES = """Exit codes: 0 ok; 1 internal error; 2 bad option or argument; 3 input model unreadable;
4 output not writable; 5 validation threshold exceeded; 6 execution provider not installed; 7 data does not match
the model."""


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


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: maps OnnxPruneError to one line on stderr and its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="onnxprune", standalone_mode=False)
    except OnnxPruneError as exc:
        if debug:
            raise
        click.echo(f"onnxprune: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("onnxprune: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # an unexpected failure is still one line unless --debug
        if debug:
            raise
        click.echo(f"onnxprune: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
