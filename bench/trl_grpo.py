"""glasslab's GRPO step side by side with TRL's `GRPOTrainer` on CPU, same model size and same workload (issue #6).

Usage (TRL is not a glasslab dependency: it runs from its own venv, which also has glasslab installed editable):
    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0      # first: the CPU wheel, or pip pulls the CUDA build
    /work/trl-venv/bin/pip install trl transformers datasets accelerate
    /work/trl-venv/bin/pip install -e .
    /work/trl-venv/bin/python bench/trl_grpo.py --steps 10

Both sides start from random init at the `tiny` size: glasslab's GPT (4 layers, 4 heads, width 128, ReLU² MLP x4,
tied embeddings) from bench/rollout.py's `models`, and a transformers `LlamaForCausalLM` with the same layers, heads,
width, vocabulary and tied embeddings, intermediate 512 (SwiGLU, so ~25% more parameters than ours: `--intermediate
341` matches the parameter count instead). TRL gets glasslab's own tokenizer (wrapped in PreTrainedTokenizerFast, with
a chat template that renders exactly glasslab's chat prompt: checked), so the prompts are the same token ids.

Workload per step, both sides: 8 arithmetic prompts x G=8 completions, 24 new tokens max at temperature 1, reward =
glasslab's arithmetic scores (correct + 0.1 x format), beta = 0.04 against a frozen reference copy (k3 KL), one
optimizer step per rollout batch, clip 0.2/0.28, DAPO token-mean loss, no truncation masking, grad clip 1.0, AdamW,
bf16 autocast on both sides (glasslab's system.precision, TRL's bf16 flag; --precision float32 turns it off).
A random model almost never says <|end|>, so nearly every completion runs to 24 tokens on both sides. It also
scores 0 everywhere, so the advantages are 0 and (the k3 KL's gradient being 0 at π = π_ref) neither side's
weights move: every forward, backward and optimizer step still runs, so the timing is that of a real step.

Timed after --warmup untimed steps per side (5: after only 2, glasslab's first timed half still ran slower than
its second, after 5 the halves were even), one torch thread each, back to back (glasslab, TRL, glasslab again, to
see drift in the shared machine's load):
  glasslab  next_batch (rollout + reference log-probs) + loss + backward + clip + AdamW step, as bench/rollout.py
  TRL       `GRPOTrainer.train()`: the time between consecutive optimizer steps (callback), after warm-up steps,
            so everything its loop does per step counts and its start-up does not; wandb, vLLM, eval, saving,
            logging and gradient checkpointing are off. Its time is split by wrapping its generation call and
            its reference-model log-prob call.
With --generate-ahead (and --threads 2, so both sides have the same two cores), glasslab samples batch k+1 in a
second process while batch k trains (rl.generate_ahead); its split then shows rollout_wait_s, the time the step
waited for its batch, in place of the overlapped generation time, and reference_scored_ahead the share of batches
the sampling process also scored under the reference (the others the trainer did). TRL has no such mode on CPU.
Writes bench/results/trl_grpo.json (trl_grpo_ahead.json with --generate-ahead): ms/step, steps/s, completion tokens/s per side, the ratio, load averages.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads; the machine's cores are shared
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

try:
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:
    sys.exit(
        f"error: {e.name} is not importable: make the TRL venv (python3 -m venv /work/trl-venv && "
        "/work/trl-venv/bin/pip install torch==2.13.0 && /work/trl-venv/bin/pip install trl transformers datasets "
        "accelerate && /work/trl-venv/bin/pip install -e .) and run this script with /work/trl-venv/bin/python"
    )

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rollout import grpo_steps, models  # noqa: E402  (bench/rollout.py: tiny model, ref copy, tokenizer; timed step)

from glasslab.config import Config, RLConfig, resolve  # noqa: E402
from glasslab.data.tokenizer import Tokenizer  # noqa: E402
from glasslab.envs import get_env  # noqa: E402
from glasslab.envs.base import Environment, Problem  # noqa: E402
from glasslab.objectives.grpo import GRPO  # noqa: E402
from glasslab.train.evaluate import completion_text, prompt_tokens  # noqa: E402
from glasslab.train.optim import build_optimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# glasslab's chat prompt (glasslab.chat.render_prompt) as a Jinja chat template
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def rl_config(generate_ahead: bool = False) -> tuple[Config, RLConfig]:
    """The workload of issue #6. Groups without reward variance are kept and truncated completions trained on,
    as TRL does by default: a random model scores 0 everywhere and never stops, and the step must still train."""
    cfg = resolve("tiny")
    rl = cfg.rl.model_copy(
        update={
            "group_size": 8,
            "prompts_per_step": 8,
            "max_new_tokens": 24,
            "temperature": 1.0,
            "grpo": cfg.rl.grpo.model_copy(
                update={"beta": 0.04, "num_iterations": 1, "drop_zero_std": False, "mask_truncated": False}
            ),
            "generate_ahead": generate_ahead,
        }
    )
    return cfg, rl


def load() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())


def summary(steps: list[dict], parts: tuple[str, ...]) -> dict:
    med = statistics.median
    step_s = [s["step_s"] for s in steps]
    return {
        "steps": len(steps),
        "ms_per_step_median": 1000 * med(step_s),
        "ms_per_step_mean": 1000 * statistics.mean(step_s),
        "steps_per_s": 1 / med(step_s),
        "completion_tokens_per_s": sum(s["tokens"] for s in steps) / sum(step_s),
        "completion_tokens_per_step": statistics.mean(s["tokens"] for s in steps),
        "median_ms": {k: 1000 * med(s[k] for s in steps) for k in parts},
    }


# ---- TRL ----------------------------------------------------------------------------------------------------------


def hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """glasslab's tokenizer as a transformers tokenizer: same vocabulary, same special ids, glasslab's chat format."""
    return PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(tok.hf.to_str()),  # a copy: transformers sets padding on it
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def llama(tok: Tokenizer, intermediate: int, directory: Path) -> LlamaForCausalLM:
    """A random-init Llama of the tiny size, saved and reloaded: TRL builds its reference model from the policy's
    path, so both start from the same weights (as glasslab's reference copy does)."""
    m = resolve("tiny").model
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=m.n_embd,
        intermediate_size=intermediate,
        num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head,
        num_key_value_heads=m.n_head,
        max_position_embeddings=m.block_size,
        rope_theta=m.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.end_id,
        pad_token_id=tok.pad_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return LlamaForCausalLM.from_pretrained(directory, attn_implementation="sdpa")


def dataset(env: Environment, n: int) -> Dataset:
    """n training problems as TRL's conversational prompts, with the columns the reward needs."""
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer, "difficulty": p.difficulty}
            for p in env.problems("train", n, seed=1)
        ]
    )


def reward(env: Environment, tok: Tokenizer, weights: dict[str, float]) -> Callable[..., list[float]]:
    """glasslab's reward, computed as GRPO.scored does: the completion decoded with special tokens kept (TRL's
    own `completions` drop them, and the format score needs the closing <|end|>), scored by the environment."""

    def glasslab_reward(prompts, completions, completion_ids, answer, difficulty, **_) -> list[float]:
        out = []
        for ids, a, d in zip(completion_ids, answer, difficulty):
            s = env.score(Problem("", a, d), completion_text(tok, ids))
            out.append(sum(w * s[name] for name, w in weights.items()))
        return out

    return glasslab_reward


class Timers:
    """Wall time of chosen trainer methods, summed per optimizer step."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable, when: Callable[..., bool] = lambda *a, **k: True) -> Callable:
        def timed(*args, **kwargs):
            if not when(*args, **kwargs):
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.spent = dict(self.spent), defaultdict(float)
        return out


class StepClock(TrainerCallback):
    """One record per optimizer step: the time since the previous step ended (the first step from train start),
    the wrapped methods' share, the part outside TRL's own `training_step` timing (its step_time metric: what
    the Trainer loop adds around it, optimizer step included), and the completion tokens generated
    (TRL's completions/mean_length x batch)."""

    def __init__(self, trainer: GRPOTrainer, timers: Timers, batch: int) -> None:
        self.trainer, self.timers, self.batch = trainer, timers, batch
        self.steps: list[dict] = []
        self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.last = time.perf_counter()
        self.timers.take()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        now = time.perf_counter()
        total, self.last = now - self.last, now
        spent = self.timers.take()
        gen, ref = spent.get("generation_s", 0.0), spent.get("reference_s", 0.0)
        metrics = self.trainer._metrics["train"]
        tokens = metrics["completions/mean_length"][-1] * self.batch
        self.steps.append(
            {
                "step_s": total,
                "generation_s": gen,
                "reference_s": ref,
                "rest_s": total - gen - ref,
                "outside_training_step_s": total - metrics["step_time"][-1],
                "tokens": tokens,
            }
        )


def trl_steps(
    tok: Tokenizer, env: Environment, rl: RLConfig, warmup: int, n: int, intermediate: int, workdir: Path, bf16: bool
) -> tuple[LlamaForCausalLM, list[dict]]:
    """GRPOTrainer.train() for warmup + n steps; the records of the last n."""
    model = llama(tok, intermediate, workdir / "model")
    processing = hf_tokenizer(tok)
    problem = env.problems("train", 1, seed=0)[0]
    ours = prompt_tokens(env, problem, tok)
    message = [{"role": "user", "content": problem.prompt}]
    theirs = processing.apply_chat_template(message, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert theirs == ours, f"TRL's prompt tokens {theirs} differ from glasslab's {ours}"

    batch = rl.prompts_per_step * rl.group_size
    args = GRPOConfig(
        output_dir=str(workdir / "out"),
        use_cpu=True,
        bf16=bf16,
        fp16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=rl.group_size,
        max_completion_length=rl.max_new_tokens,
        temperature=rl.temperature,
        top_p=1.0,
        top_k=0,
        beta=rl.grpo.beta,
        num_iterations=rl.grpo.num_iterations,
        epsilon=rl.grpo.eps_low,
        epsilon_high=rl.grpo.eps_high,
        loss_type=rl.grpo.loss_type,
        scale_rewards=rl.grpo.scale_rewards,
        mask_truncated_completions=rl.grpo.mask_truncated,
        learning_rate=rl.train.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=warmup + n,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        use_vllm=False,
        dataloader_pin_memory=False,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward(env, tok, rl.reward_weights),
        args=args,
        train_dataset=dataset(env, rl.prompts_per_step * (warmup + n + 1)),
        processing_class=processing,
    )
    timers = Timers()
    trainer._generate_single_turn = timers.wrap("generation_s", trainer._generate_single_turn)
    trainer._get_per_token_logps_and_entropies = timers.wrap(
        "reference_s", trainer._get_per_token_logps_and_entropies, when=lambda m, *a, **k: m is trainer.ref_model
    )
    clock = StepClock(trainer, timers, batch)
    trainer.add_callback(clock)
    trainer.remove_callback(PrinterCallback)  # its end-of-training line would break the JSON on stdout
    trainer.train()
    return model, clock.steps[warmup:]


# ---- both ---------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side (glasslab runs this many twice)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed steps per side first (after only 2, glasslab's first timed half still ran slower than its second)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--intermediate", type=int, default=512, help="the Llama's MLP width (341: parameter-matched)")
    ap.add_argument(
        "--precision",
        default="bfloat16",
        choices=["float32", "bfloat16"],
        help="both sides: glasslab's system.precision, TRL's bf16 flag (the CPU autocast either way)",
    )
    ap.add_argument(
        "--generate-ahead",
        action="store_true",
        help="glasslab samples the next batch in a second process while this one trains (rl.generate_ahead);"
        " it then uses two cores, so give both sides --threads 2",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: bench/results/trl_grpo.json, or trl_grpo_ahead.json with --generate-ahead",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames TRL still calls

    model, ref, tok, source = models(None)
    cfg, rl = rl_config(args.generate_ahead)
    env = get_env("arithmetic", cfg.envs.get("arithmetic"))
    objective = GRPO(env, tok, ref, rl, cfg.eval, seed=0, device=torch.device("cpu"))
    optimizer = build_optimizer(model, rl.train)
    parts = ("generation_s", "reference_s", "rest_s")
    ours_parts = (*parts, "rollout_wait_s") if args.generate_ahead else parts

    loads = {"start": load()}
    amp = torch.bfloat16 if args.precision == "bfloat16" else None
    grpo_steps(objective, model, optimizer, args.warmup, amp)
    before = grpo_steps(objective, model, optimizer, args.steps, amp)
    objective.close()  # generating ahead halves torch's threads while it runs: TRL gets them all back
    loads["after_glasslab_1"] = load()
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as tmp:
        bf16 = amp is not None
        llama_model, theirs = trl_steps(tok, env, rl, args.warmup, args.steps, args.intermediate, Path(tmp), bf16)
    loads["after_trl"] = load()
    grpo_steps(objective, model, optimizer, args.warmup, amp)  # generating ahead starts its sampling process again
    after = grpo_steps(objective, model, optimizer, args.steps, amp)
    objective.close()
    loads["after_glasslab_2"] = load()

    ours = summary(before + after, ours_parts)
    ours["ms_per_step_median_first_half"] = 1000 * statistics.median(s["step_s"] for s in before)
    ours["ms_per_step_median_second_half"] = 1000 * statistics.median(s["step_s"] for s in after)
    if args.generate_ahead:  # the share of batches the sampling process scored under the reference (else the trainer)
        ours["reference_scored_ahead"] = statistics.mean(s["reference_scored_ahead"] for s in before + after)
    trl_summary = summary(theirs, (*parts, "outside_training_step_s"))
    result = {
        "workload": {
            "prompts": rl.prompts_per_step,
            "group_size": rl.group_size,
            "max_new_tokens": rl.max_new_tokens,
            "temperature": rl.temperature,
            "beta": rl.grpo.beta,
            "num_iterations": rl.grpo.num_iterations,
            "loss_type": rl.grpo.loss_type,
            "precision": args.precision,
            "generate_ahead": rl.generate_ahead,
        },
        "threads": args.threads,
        "torch": torch.__version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "glasslab": {"model": f"GPT, {source}", "params": model.num_params(), **ours},
        "trl_grpo_trainer": {
            "model": f"LlamaForCausalLM, intermediate {args.intermediate}, random init",
            "params": llama_model.num_parameters(),
            **trl_summary,
        },
        "speedup_steps_per_s": ours["steps_per_s"] / trl_summary["steps_per_s"],
        "speedup_completion_tokens_per_s": ours["completion_tokens_per_s"] / trl_summary["completion_tokens_per_s"],
        "load_average": loads,
    }
    print(json.dumps(result, indent=2))
    out = args.out or RESULTS / ("trl_grpo_ahead.json" if args.generate_ahead else "trl_grpo.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
