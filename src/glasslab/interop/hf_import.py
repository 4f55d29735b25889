"""A Hugging Face checkpoint directory -> a glasslab run whose model is glasslab's GPT.

The run holds the config (model options mapped from config.json, [tokenizer] kind "hf" with the chat template and
the special tokens glasslab needs), the model's tokenizer.json as it is, and the weights as the `pretrain` stage's
step-0 checkpoint: `sft`, `rl`, `eval`, `chat` and the probes then start from it like from any pretrained run.
Everything is read and checked before the run directory is created.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from glasslab.chat.format import Message
from glasslab.config import Config, ModelConfig, TokenizerConfig, build_config
from glasslab.errors import GlasslabError
from glasslab.interop.hf_config import DEFAULT_BLOCK_SIZE, model_config_from_hf
from glasslab.interop.hf_weights import read_safetensors, to_glasslab
from glasslab.track.rundir import RunDir

STAGE = "pretrain"  # an imported model is a pretrained base: the stage every fine-tuning command starts from
_PROBE = [Message("user", "x"), Message("assistant", "y")]  # a conversation that shows where a turn ends


@dataclass
class Imported:
    config: Config
    state: dict[str, Any]  # glasslab state dict, float32


def read_checkpoint(directory: Path, block_size: int = DEFAULT_BLOCK_SIZE) -> Imported:
    """Config, tokenizer settings and weights of a checkpoint directory, all validated."""
    if not (directory / "config.json").is_file():
        raise GlasslabError(f"{directory} has no config.json: pass a Hugging Face checkpoint directory")
    model = model_config_from_hf(json.loads((directory / "config.json").read_text()), block_size)
    tokenizer = tokenizer_config(directory, model)
    state = to_glasslab(read_safetensors(directory), model)
    rows = state["wte.weight"].shape[0]
    if rows != model.vocab_size:
        raise GlasslabError(f"embed_tokens has {rows} rows but config.json says vocab_size {model.vocab_size}")
    return Imported(build_config({"model": model.model_dump(), "tokenizer": tokenizer.model_dump()}), state)


def tokenizer_config(directory: Path, model: ModelConfig) -> TokenizerConfig:
    """The [tokenizer] section: the chat template, the document-start, end-of-turn and padding tokens."""
    if not (directory / "tokenizer.json").is_file():
        raise GlasslabError(f"{directory} has no tokenizer.json: save the model's fast tokenizer with it")
    settings = _tokenizer_settings(directory)
    template = settings.get("chat_template")
    if isinstance(template, list):  # a list of named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise GlasslabError(f"{directory} has no chat template: import a model whose tokenizer_config has one")
    hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    if hf.get_vocab_size(with_added_tokens=True) > model.vocab_size:
        raise GlasslabError("the tokenizer has more ids than the model's vocab_size: pass a matching tokenizer")
    specials = {k: _token_text(v) for k, v in settings.items() if k.endswith("_token") and _token_text(v)}
    eos = specials.get("eos_token")
    bos = specials.get("bos_token") or eos  # no BOS (Qwen): documents are separated by the end-of-text token
    if not bos:
        raise GlasslabError("tokenizer_config.json names neither bos_token nor eos_token: add one")
    draft = TokenizerConfig(
        kind="hf", vocab_size=model.vocab_size, chat_template=template, bos_token=bos, end_token=eos or bos,
        pad_token=bos, template_vars=specials,
    )  # fmt: skip
    end = _end_of_turn(hf, draft)
    return draft.model_copy(update={"end_token": end, "pad_token": _pad_token(hf, specials, template, bos, end)})


def _tokenizer_settings(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    if (directory / "chat_template.jinja").is_file():  # transformers >= 4.47 saves the template on its own
        settings["chat_template"] = (directory / "chat_template.jinja").read_text()
    elif (directory / "chat_template.json").is_file():
        settings["chat_template"] = json.loads((directory / "chat_template.json").read_text())["chat_template"]
    return settings


def _token_text(v: Any) -> str | None:
    """tokenizer_config writes a special token as its text, or as an AddedToken dict with `content`."""
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def _end_of_turn(hf: HFTokenizer, draft: TokenizerConfig) -> str:
    """The first special token after an assistant turn's content: where the template ends a turn."""
    from glasslab.interop.chat_template import ChatTemplate

    template = ChatTemplate(draft.chat_template, draft.template_vars)
    before, turn = template.text(_PROBE[:1], True), template.text(_PROBE, False)
    after = turn[len(before) :].split("y", 1)[-1] if turn.startswith(before) else ""
    specials = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    for token in hf.encode(after, add_special_tokens=False).tokens:
        if token in specials:
            return token
    raise GlasslabError("the chat template ends an assistant turn with no special token: glasslab cannot stop there")


def _pad_token(hf: HFTokenizer, specials: dict[str, str], template: str, bos: str, end: str) -> str:
    """A padding id that never occurs in rendered text, so padding masks never hide a real token: the model's
    pad_token when it is not also the start or end token, else a special token the template never writes."""
    pad = specials.get("pad_token")
    if pad and pad not in (bos, end):
        return pad
    for t in hf.get_added_tokens_decoder().values():
        if t.special and t.content not in (bos, end, *specials.values()) and t.content not in template:
            return t.content
    raise GlasslabError("no special token is free for padding: add a pad_token to tokenizer_config.json")


def import_checkpoint(directory: Path, run: RunDir, imported: Imported) -> Path:
    """Write an already-read checkpoint into a freshly created run; returns the checkpoint path."""
    from glasslab.track.atomic import write_text_atomic
    from glasslab.track.checkpoint import save_checkpoint

    cfg = imported.config
    write_text_atomic(run.config_path, cfg.to_toml())
    shutil.copyfile(directory / "tokenizer.json", run.tokenizer_path)
    path = save_checkpoint(
        run.checkpoints_dir, STAGE, 0, model=imported.state, optimizer={},
        extra={"arch": cfg.model.model_dump()}, rng={}, keep_last=1,
    )  # fmt: skip
    run.update_manifest(command="import-hf", source=str(directory.resolve()), pipeline=[], stage=STAGE)
    run.mark_stage_done(STAGE)
    run.set_status("completed")
    return path
