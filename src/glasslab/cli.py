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
)
from glasslab.errors import GlasslabError
from glasslab.ui import console, errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="glasslab: a small-LLM lab you can see through.")


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
    "sft": sft.sft,
    "rl": rl.rl,
    "resume": resume.resume,
    "eval": eval_.eval_,
    "sample": sample.sample,
    "chat": chat.chat,
    "serve": serve.serve,
    "runs": runs.runs,
    "report": report.report,
    "compare": compare.compare,
    "plot": plot.plot,
    "probes": probes.probes,
    "study": study.study,
}
for _name, _command in COMMANDS.items():
    app.command(name=_name)(_command)


def main() -> None:
    """Entry point: user-fixable errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except GlasslabError as e:
        errors.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: continue with `glasslab resume RUN`")
        sys.exit(130)
    except Exception as e:  # a stop request (the loop checkpointed), or click's usage errors
        import click

        from glasslab.train.loop import Interrupted

        if isinstance(e, Interrupted):
            console.print(f"[yellow]interrupted[/]: {e}; continue with `glasslab resume RUN`")
            sys.exit(130)
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise
