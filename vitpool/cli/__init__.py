"""The `vitpool` command line: each command parses, calls the library, and prints (rich, or `--json` to stdout).

One module per command group (`convert`, `measure`, `search`, `visualize`, `finetune`, `push`), the options
they share in `options`, the app and what every command needs in `common`. torch and timm are imported inside
the commands, so `vitpool --help` answers at once.
"""

from __future__ import annotations

import sys

import typer

from vitpool.cli import convert, measure, search, visualize, finetune, push  # noqa: F401, I001  (they register the commands, in --help's order)
from vitpool.cli.common import app, err
from vitpool.cli.finetune import without_option

__all__ = ["app", "main", "without_option"]


def main() -> None:
    """The console script: typer's app, with click's usage errors (a value that does not parse or is out of
    range, a missing or unknown option) as the one `error:` line and exit code 2 every other error gets."""
    click = sys.modules[typer.BadParameter.__module__]  # the click typer runs on (its own copy in typer 0.2x)
    help_only = getattr(click, "NoArgsIsHelpError", ())
    try:
        code = app(standalone_mode=False)
    except help_only as error:
        error.show()
        code = error.exit_code
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx is not None else "vitpool"
        err.print(f"[bold red]error:[/] {error.format_message()} (see {command} --help)", highlight=False, soft_wrap=True)
        code = 2
    except typer.Abort:
        err.print("Aborted!")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
