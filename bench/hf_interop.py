"""Import and export time of a SmolLM2-135M-shaped model (random weights, built with transformers; the public
config: width 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocabulary 49152, tied embeddings, rope_theta 1e5).

Usage:
    python bench/hf_interop.py [--repeats 3] [--out bench/results/hf_interop.json]

Times `glasslab import-hf` and `glasslab export` as subprocesses (start-up included, as a user sees them), and
checks the round trip: the exported model's logits against the source's on one batch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import hf_models  # noqa: E402

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True,
)  # fmt: skip


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "glasslab", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "smollm2-135m"
        hf_models.save_tokenizer(source, "chatml")  # a small tokenizer: the model's vocabulary is what counts
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
        model.save_pretrained(source)
        params = sum(p.numel() for p in model.parameters())
        imports, exports = [], []
        for i in range(opts.repeats):
            imports.append(timed(["import-hf", str(source), "--name", f"smol{i}", "--runs-dir", str(tmp / "runs")]))
            exports.append(timed(["export", str(tmp / "runs" / f"smol{i}"), "--out", str(tmp / f"export{i}")]))
            if i:
                shutil.rmtree(tmp / f"export{i}")
        ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, 64))
        with torch.no_grad():
            back = AutoModelForCausalLM.from_pretrained(tmp / "export0", dtype=torch.float32).eval()
            difference = float((back(ids).logits - model(ids).logits).abs().max())
    result = {
        "parameters": params,
        "import_s": {"median": statistics.median(imports), "min": min(imports), "max": max(imports)},
        "export_s": {"median": statistics.median(exports), "min": min(exports), "max": max(exports)},
        "round_trip_max_abs_logit_difference": difference,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
