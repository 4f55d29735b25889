"""The `glasslab` command. Thin: parse, resolve the config, call one function per command."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from glasslab import __version__
from glasslab.commands import (
    chat,
    compare,
    eval_,
    experiment,
    export,
    import_hf,
    ledger,
    mcp,
    plot,
    pretrain,
    probes,
    report,
    resume,
    rl,
    run,
    runs,
    sample,
    serve,
    sft,
    study,
    tune,
)
from glasslab.errors import GlasslabError
from glasslab.ui import console, errors

try:  # typer from 0.2x vendors click: its usage errors derive from TyperException
    from typer import TyperException as UsageErrors
except ImportError:  # earlier typer raises click's own
    from click import ClickException as UsageErrors

# Plain (click-style) help: typer's rich panels print a type such as <bool> beside every flag, --help included.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="glasslab: a small-LLM lab you can see through.",
)


def _version(value: bool) -> None:
    if value:
        print(f"glasslab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """Train a GPT from scratch through tokenizer -> pretraining -> SFT -> RL, and see inside every step."""


# One module per command under glasslab/commands/, registered in pipeline order (the order `glasslab --help` lists).
COMMANDS = {
    "run": run.run,
    "pretrain": pretrain.pretrain,
    "import-hf": import_hf.import_hf,
    "sft": sft.sft,
    "rl": rl.rl,
    "resume": resume.resume,
    "eval": eval_.eval_,
    "sample": sample.sample,
    "chat": chat.chat,
    "export": export.export,
    "serve": serve.serve,
    "runs": runs.runs,
    "report": report.report,
    "compare": compare.compare,
    "plot": plot.plot,
    "probes": probes.probes,
    "study": study.study,
    "experiment": experiment.experiment,
    "ledger": ledger.ledger,
    "mcp": mcp.mcp,
    "tune": tune.tune,
}
for _name, _command in COMMANDS.items():
    app.command(name=_name)(_command)


def main() -> None:
    """Entry point: user-fixable errors become one line on stderr and exit code 2, never a traceback."""
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(code) comes back as its code
    except GlasslabError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: continue with `glasslab resume RUN`")
        sys.exit(130)
    except typer.Abort:
        sys.exit(130)
    except UsageErrors as e:
        _fail(usage_error(e))
    except Exception as e:  # a stop request: the loop checkpointed
        from glasslab.train.loop import Interrupted

        if isinstance(e, Interrupted):
            console.print(f"[yellow]interrupted[/]: {e}; continue with `glasslab resume RUN`")
            sys.exit(130)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str) -> None:
    """One line on stderr, exit 2: the message's own line breaks and wrapping never split it."""
    from rich.markup import escape

    errors.print(f"[red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    sys.exit(2)


def usage_error(e: Exception) -> str:
    """click's message (which names the option and the bad value) with the fix: the command's --help."""
    from pydantic import ValidationError

    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "glasslab"
    text = e.format_message().rstrip(".").replace("Value error, ", "")
    if isinstance(e.__cause__, ValidationError):  # typer's type coercion: its message may omit the value given
        value = repr(e.__cause__.errors()[0].get("input"))
        text += "" if value in text else f" (got {value})"
    return f"{text}: see `{command} --help`"
