"""`glasslab sft`, `glasslab eval` and `glasslab chat`: fine-tune a run into a chat model, measure it on a task,
talk to it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from glasslab.commands.options import (
    ConfigFile,
    Json,
    Name,
    Overwrite,
    Preset,
    Resume,
    RunArg,
    RunsDir,
    Seed,
    Sets,
)
from glasslab.errors import GlasslabError
from glasslab.ui import console, emit_json

if TYPE_CHECKING:
    import torch

    from glasslab.config import Config
    from glasslab.data.tokenizer import Tokenizer
    from glasslab.model.gpt import GPT
    from glasslab.track.rundir import RunDir


def sft(
    base: Annotated[Path, typer.Argument(help="the run to fine-tune (its newest checkpoint), e.g. runs/base")],
    tasks: Annotated[str | None, typer.Option(help="task environments, comma-separated: arithmetic,countdown")] = None,
    data: Annotated[Path | None, typer.Option(help="a JSONL file of conversations (alone unless --tasks too)")] = None,
    show_example: Annotated[
        bool, typer.Option(help="print rendered examples, trained tokens highlighted, and exit")
    ] = False,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    set_: Sets = None,
    name: Name = None,
    runs_dir: RunsDir = Path("runs"),
    seed: Seed = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    json_: Json = False,
) -> None:
    """Fine-tune a pretrained run on chat conversations from task environments or your own file."""
    import shutil

    from glasslab.commands.common import (
        config_from_options,
        finish,
        new_run,
        resume_run,
    )
    from glasslab.config import build_config
    from glasslab.stages.common import load_run_config
    from glasslab.track.checkpoint import latest_checkpoint
    from glasslab.track.rundir import RunDir
    from glasslab.ui import progress

    base_run = RunDir.open(base)
    init = latest_checkpoint(base_run.checkpoints_dir)
    if init is None or not base_run.tokenizer_path.exists():
        raise GlasslabError(f"run {base_run.path} has no checkpoint (or tokenizer) to fine-tune: train it first")
    cfg = config_from_options(preset, config, set_, seed)
    base_cfg = load_run_config(base_run)
    tree = cfg.model_dump()
    tree["model"], tree["tokenizer"] = base_cfg.model.model_dump(), base_cfg.tokenizer.model_dump()
    if tasks is not None or data is not None:  # the command line's data replaces the config's
        tree["sft"].update(
            tasks=[t.strip() for t in (tasks or "").split(",") if t.strip()], data=str(data) if data else None
        )
    cfg = build_config(tree)
    if show_example:
        _show_examples(cfg, base_run.tokenizer_path, json_)
        return
    run, resumed = new_run(runs_dir, name, f"sft-{base_run.name}", overwrite, resume)
    if resumed:
        resume_run(run, json_)
        return
    shutil.copyfile(base_run.tokenizer_path, run.tokenizer_path)
    run.update_manifest(pipeline=["sft"], preset=preset, init=str(init.resolve()), parent=str(base_run.path.resolve()))
    from glasslab.stages.sft import sft as run_sft

    with progress() as bar:
        run_sft(cfg, run, init=init, progress=bar)
    run.set_status("completed")
    finish(run, json_)


def _show_examples(cfg: Config, tokenizer_path: Path, as_json: bool) -> None:
    """One rendered conversation per task (and from the data file): trained tokens bold green, given ones dim."""
    from rich.text import Text

    from glasslab.data.tokenizer import Tokenizer
    from glasslab.envs import get_env
    from glasslab.stages.sft import file_data
    from glasslab.train.sft import env_conversations, to_example

    tok = Tokenizer.load(tokenizer_path)
    envs = [get_env(task, cfg.envs.get(task, {})) for task in cfg.sft.tasks]
    examples = [to_example(env_conversations(env, "train", 1, cfg.seed)[0], tok) for env in envs]
    examples += file_data(cfg, tok)[0][:1]
    if as_json:
        emit_json([{"tokens": [tok.decode([i]) for i in e.ids], "trained": e.trained} for e in examples])
        return
    for e in examples:
        text = Text()
        for i, trained in zip(e.ids, e.trained):
            text.append(tok.decode([i]), style="bold green" if trained else "dim")
        console.print(text)
    console.print(
        f"[bold green]trained[/] / [dim]given[/]: the loss covers assistant tokens only ({len(examples)} example(s))"
    )


def eval_(
    run_dir: RunArg,
    task: Annotated[str, typer.Option(help="task environment: arithmetic, countdown, calculator or module:Class")],
    n: Annotated[int | None, typer.Option(help="held-out problems (default: the run's eval.n)")] = None,
    seed: Annotated[
        int | None, typer.Option(help="which held-out set (default: the run's seed, as in training)")
    ] = None,
    k: Annotated[str | None, typer.Option(help="pass@k values, comma-separated (default: eval.pass_k)")] = None,
    samples: Annotated[
        int | None, typer.Option(help="sampled answers per problem for pass@k (default: eval.samples)")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="sampling temperature for pass@k")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens per answer (default: eval.max_new_tokens)")] = None,
    text: Annotated[
        bool, typer.Option("--text", help="also loss and bits per byte on the pretraining's held-out text")
    ] = False,
    set_: Sets = None,
    json_: Json = False,
) -> None:
    """Accuracy, pass@k and per-difficulty accuracy of a run's newest checkpoint on held-out problems."""
    import json

    from rich.table import Table

    from glasslab.config import resolve
    from glasslab.envs import get_env
    from glasslab.evaluate import evaluate_env
    from glasslab.stages.common import load_model, load_run_config, setup_runtime
    from glasslab.track.atomic import write_text_atomic
    from glasslab.track.checkpoint import latest_checkpoint
    from glasslab.track.metrics import MetricStore
    from glasslab.track.rundir import RunDir

    run = RunDir.open(run_dir)
    cfg = resolve(None, None, set_, base=load_run_config(run).model_dump())
    try:
        pass_k = [int(x) for x in k.split(",")] if k else cfg.eval.pass_k
    except ValueError:
        raise GlasslabError(f"--k '{k}' is not a list of integers: write it like --k 1,4") from None
    env = get_env(task, cfg.envs.get(task, {}))
    seed = cfg.seed if seed is None else seed
    device = setup_runtime(cfg.system, seed)
    model, tok, _ = load_model(run, device)
    ckpt = latest_checkpoint(run.checkpoints_dir)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    result = evaluate_env(
        model,
        tok,
        env,
        n=n or cfg.eval.n,
        seed=seed,
        pass_k=pass_k,
        samples=cfg.eval.samples if samples is None else samples,
        temperature=cfg.eval.temperature if temperature is None else temperature,
        max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens,
        task=task,
    )
    text_metrics = _held_out_text(run, model, tok, device) if text else {}
    with MetricStore(run.metrics_db_path) as store:
        store.log(step, "eval", result.metrics() | {f"eval/text/{name}": v for name, v in text_metrics.items()})
        store.compact(run.metrics_parquet_path)
    table_path = run.path / "eval" / f"{task.replace(':', '-').replace('/', '-')}-seed{seed}.jsonl"
    table_path.parent.mkdir(exist_ok=True)
    write_text_atomic(table_path, "".join(json.dumps(r) + "\n" for r in result.records))

    if json_:
        emit_json(result.as_dict() | ({"text": text_metrics} if text else {}))
        return
    table = Table(title=f"{task} on {result.n} held-out problems (seed {seed}), {ckpt.parent.name} step {step}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("accuracy (greedy)", f"{result.accuracy:.1%}")
    for kk, v in result.pass_at_k.items():
        table.add_row(f"pass@{kk}", f"{v:.1%}")
    for name, v in result.rewards.items():
        table.add_row(f"reward {name}", f"{v:.3f}")
    for d, v in result.by_difficulty.items():
        table.add_row(f"accuracy, difficulty {d}", f"{v:.1%}")
    for name, v in result.diagnostics.items():
        table.add_row(name, f"{v:.1%}")
    for name, v in text_metrics.items():
        table.add_row(f"held-out text {name}", f"{v:.4f}")
    console.print(table)
    console.print(f"answers saved to {table_path}")


def _held_out_text(run: RunDir, model: GPT, tok: Tokenizer, device: torch.device) -> dict[str, float]:
    """loss, bpb and ppl on the held-out text of the run that pretrained this model (this run or an
    ancestor), with that run's own split, so fine-tuning's cost to language modelling shows."""
    from glasslab.data.tokens import build_token_splits
    from glasslab.stages.common import cache_dir, documents, load_run_config
    from glasslab.track.rundir import RunDir
    from glasslab.train.lm import LanguageModeling

    source = run
    while "pretrain" not in source.read_manifest().get("stages_done", []):
        parent = source.read_manifest().get("parent")
        if not parent:
            raise GlasslabError(
                f"neither run {run.path} nor its parents were pretrained here: --text needs that run's data"
            )
        source = RunDir.open(Path(parent))
    cfg = load_run_config(source)
    splits = build_token_splits(documents(cfg), tok, cache_dir(source), cfg.data.val_fraction, cfg.seed)
    lm = LanguageModeling(
        splits,
        tok,
        batch_size=cfg.train.batch_size,
        block_size=cfg.model.block_size,
        eval_batches_n=cfg.train.eval_batches,
        z_loss=0.0,
        seed=cfg.seed,
        device=device,
    )
    return {name.removeprefix("val/"): v for name, v in lm.evaluate(model).items()}


def chat(
    run_dir: RunArg,
    prompt: Annotated[str | None, typer.Option(help="answer this one message and exit")] = None,
    system: Annotated[str | None, typer.Option(help='a system prompt, e.g. "Use the calculator."')] = None,
    temperature: Annotated[float, typer.Option(help="0 for greedy")] = 0.8,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass")] = 0.95,
    top_k: Annotated[int | None, typer.Option(help="keep the k most likely tokens")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer")] = 64,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    json_: Json = False,
) -> None:
    """Talk to a run's newest checkpoint: streamed answers, multi-turn, calculator tool calls shown."""
    import sys

    from rich.console import Console

    from glasslab.chat import Message
    from glasslab.chatrepl import final_text, repl, reply
    from glasslab.stages.common import load_model
    from glasslab.track.rundir import RunDir

    if json_ and prompt is None:
        raise GlasslabError("--json needs --prompt: the interactive chat has no JSON form")
    model, tok, _ = load_model(RunDir.open(run_dir))
    out = Console(file=sys.stdout, highlight=False)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if prompt is None:
        repl(model, tok, system=system, seed=seed, out=out, ui=console, **sampling)
        return
    history = [*([Message("system", system)] if system else []), Message("user", prompt)]
    turns, _ = reply(model, tok, history, seed=seed, console=None if json_ else out, **sampling)
    if json_:
        emit_json({"prompt": prompt, "reply": final_text(turns)})
    else:
        out.print()
