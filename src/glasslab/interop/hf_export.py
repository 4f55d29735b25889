"""A glasslab run's checkpoint -> a standard Hugging Face checkpoint directory, loadable with no custom code by
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` (and so by tools that read those
architectures: lm-evaluation-harness, vLLM, llama.cpp's converter).

The architecture is the one that expresses the config (hf_config.export_architecture); a config none expresses,
such as the ReLU² MLP of glasslab's own presets, is refused by name rather than exported with custom code. The
tokenizer is written as it is, with a chat template: glasslab's chat format for glasslab's tokenizer, the original
template for an imported model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from glasslab.config import Config
from glasslab.data.tokenizer import Tokenizer, load_tokenizer
from glasslab.errors import GlasslabError
from glasslab.interop.hf_config import export_architecture, hf_config_from_model
from glasslab.interop.hf_weights import to_hf, write_safetensors
from glasslab.track.rundir import RunDir

# glasslab's chat format (chat/format.py) as a Jinja chat template: `<|bos|>`, then `<|role|>content<|end|>` per
# message, and `<|assistant|>` when the answer is to be generated.
GLASSLAB_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('glasslab chat roles are system, user, assistant and tool') }}{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def export_run(run: RunDir, stage: str | None, out: Path) -> Path:
    """Write the run's newest checkpoint (of `stage`, if given) to `out`; returns the checkpoint exported."""
    from glasslab.stages.common import load_run_config
    from glasslab.track.checkpoint import latest_checkpoint, load_checkpoint

    cfg = load_run_config(run)
    export_architecture(cfg.model)  # refuse before touching the disk
    path = latest_checkpoint(run.checkpoints_dir, stage)
    if path is None:
        raise GlasslabError(f"run {run.path} has no checkpoint{f' for {stage}' if stage else ''}: train it first")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GlasslabError(f"{out} exists and is not empty: pass a new --out directory")
    tok = load_tokenizer(run.tokenizer_path, cfg.tokenizer)
    state = to_hf(load_checkpoint(path).model, cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out / "model.safetensors")
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.end_id, "pad_token_id": tok.pad_id}
    config = hf_config_from_model(cfg.model, tok.bos_id, tok.end_id, tok.pad_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    _write_tokenizer(tok, cfg, run, out)
    return path


def _write_tokenizer(tok: Tokenizer, cfg: Config, run: RunDir, out: Path) -> None:
    shutil.copyfile(run.tokenizer_path, out / "tokenizer.json")
    if cfg.tokenizer.kind == "hf":
        t = cfg.tokenizer
        names = {**t.template_vars, "bos_token": t.bos_token, "eos_token": t.end_token, "pad_token": t.pad_token}
        template = t.chat_template
    else:
        names = {"bos_token": "<|bos|>", "eos_token": "<|end|>", "pad_token": "<|pad|>"}
        template = GLASSLAB_TEMPLATE
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "chat_template": template,
        "model_max_length": cfg.model.block_size,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
