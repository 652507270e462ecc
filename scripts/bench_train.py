"""Training speed of `zoo finetune` against mlx-lm's `lora` on the same model and data.

The reference workload of issue 7: the ~24M-parameter float32 llama that
scripts/bench_generate.py makes (hidden 512, 8 layers, 8 heads, 4 KV heads,
intermediate 1408, vocab 256; random weights) with the fixture character
tokenizer, batch 4 x 256 tokens, LoRA rank 8 on q/k/v/o of every layer, AdamW
at 1e-4, the same JSONL lines (printable text cut to 256 tokens, so no
padding). Both report trained tokens per second; the steady-state median of
the reports after the first three steps is compared, and each process's peak
resident memory (GNU time).

mlx-lm must run on the same BLAS: the PyPI mlx-cpu wheel bundles the
reference BLAS (about 6 GFLOP/s here), so point its libmlx at OpenBLAS first:

    patchelf --replace-needed libblas-bd8a282c.so.3.10.0 libopenblas.so.0 \
             --replace-needed liblapack-86b2c207.so.3.10.0 libopenblas.so.0 \
             ~/.venvs/zoo-mlxlm/lib/python3.11/site-packages/mlx/lib/libmlx.so
With --qlora the base is quantized to 4 bits (group 64) first: mlx-lm trains
on a `zoo convert` copy, zoo quantizes at load (the same affine format).

    cargo build --release -p mlx-zoo-cli
    ~/.venvs/zoo-mlxlm/bin/python scripts/bench_train.py [--iters 30] [--qlora] [--grad-checkpoint] [--repeat 3]
"""

import argparse
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import CACHE, ROOT, ZOO, make_model  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer" / "char-128"
SEQ, BATCH, RANK, LR = 256, 4, 8, 1e-4


def make_data(path: Path, lines: int = 200) -> None:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz      .,"
    path.mkdir(parents=True, exist_ok=True)
    for name, count in [("train.jsonl", lines), ("valid.jsonl", 8)]:
        with open(path / name, "w") as f:
            for _ in range(count):
                text = "".join(rng.choice(alphabet) for _ in range(SEQ + 40))
                f.write(json.dumps({"text": text}) + "\n")


def zoo_run(model: Path, data: Path, iters: int, qlora: bool, checkpoint: bool) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        args = [str(ZOO), "-q", "finetune", str(model), "--data", str(data), "--out", out,
                "--iters", str(iters), "--batch-size", str(BATCH), "--max-seq-len", str(SEQ),
                "--lora-rank", str(RANK), "--lora-alpha", str(2 * RANK), "--lr", str(LR),
                "--lora-targets", "q_proj,k_proj,v_proj,o_proj", "--decay", "constant"]
        if qlora:
            args += ["--train-type", "qlora", "--q-bits", "4", "--q-group-size", "64"]
        if checkpoint:
            args.append("--grad-checkpoint")
        result = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M"] + args, check=True, capture_output=True,
                                text=True)
        rows = [json.loads(l) for l in open(Path(out) / "metrics.jsonl") if '"loss"' in l]
    speeds = [r["tokens_per_second"] for r in rows[3:]]
    return statistics.median(speeds), max_rss_mib(result.stderr)


def max_rss_mib(stderr: str) -> float:
    """The child's peak resident memory, from GNU time's last line."""
    match = re.search(r"MAXRSS (\d+)", stderr)
    return int(match.group(1)) / 1024 if match else float("nan")


def mlx_lm_run(model: Path, data: Path, iters: int, checkpoint: bool) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        config = Path(out) / "lora.yaml"
        config.write_text(json.dumps({
            "lora_parameters": {"rank": RANK, "dropout": 0.0, "scale": 2.0,
                                "keys": ["self_attn.q_proj", "self_attn.k_proj",
                                         "self_attn.v_proj", "self_attn.o_proj"]}}))
        result = subprocess.run(
            ["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, "-m", "mlx_lm", "lora", "--model", str(model), "--train",
             "--data", str(data), "--batch-size", str(BATCH), "--iters", str(iters),
             "--max-seq-length", str(SEQ), "--num-layers", "-1", "--learning-rate", str(LR),
             "--steps-per-report", "1", "--steps-per-eval", str(iters + 1),
             "--adapter-path", str(Path(out) / "adapters"), "-c", str(config)]
            + (["--grad-checkpoint"] if checkpoint else []),
            check=True, capture_output=True, text=True)
    # mlx-lm 0.32's report table: "iter  train_loss [arrow]  tok/s  tokens".
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    speeds = [float(m) for m in re.findall(r"^\s*\d+\s+[0-9.]+\s+\S?\s+([0-9.]+)\s+[0-9.]+k?\s*$", plain, re.M)]
    if not speeds:
        raise SystemExit(f"no speed in mlx-lm's output:\n{plain[-2000:]}")
    return statistics.median(speeds[3:]), max_rss_mib(result.stderr)


def prepare_workload() -> tuple[Path, Path] | None:
    """The model (with the fixture tokenizer) and data in the cache; None without a release build."""
    if not ZOO.is_file():
        print(f"build first: cargo build --release -p mlx-zoo-cli ({ZOO} is missing)", file=sys.stderr)
        return None
    model = CACHE / "llama-24m"
    make_model(model)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(TOKENIZER / name, model / name)
    data = CACHE / "train-data"
    make_data(data)
    return model, data


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--qlora", action="store_true")
    parser.add_argument("--grad-checkpoint", action="store_true", help="both sides recompute blocks")
    parser.add_argument("--repeat", type=int, default=1, help="alternating runs per side; medians reported")
    args = parser.parse_args()
    workload = prepare_workload()
    if workload is None:
        return 1
    model, data = workload
    mlx_model = model
    if args.qlora:
        mlx_model = CACHE / "llama-24m-q4"
        if not (mlx_model / "config.json").is_file():
            subprocess.run([str(ZOO), "-q", "convert", str(model), "--out", str(mlx_model), "--q-bits", "4",
                            "--q-group-size", "64"], check=True, capture_output=True)
        for name in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(TOKENIZER / name, mlx_model / name)
    kind = "QLoRA 4-bit" if args.qlora else "LoRA"
    if args.grad_checkpoint:
        kind += " with gradient checkpointing"
    print(f"{kind} rank {RANK} on q/k/v/o, batch {BATCH} x {SEQ}, {args.iters} steps, median after step 3")
    zoos, lms = [], []
    for run in range(args.repeat):
        # Alternating runs, so both sides see the same drift in machine load.
        zoos.append(zoo_run(model, data, args.iters, args.qlora, args.grad_checkpoint))
        lms.append(mlx_lm_run(mlx_model, data, args.iters, args.grad_checkpoint))
        if args.repeat > 1:
            print(f"run {run + 1}: mlx-zoo {zoos[-1][0]:.1f}, mlx-lm {lms[-1][0]:.1f} tokens/s, "
                  f"ratio {zoos[-1][0] / lms[-1][0]:.2f}x")
    zoo = (statistics.median(z[0] for z in zoos), max(z[1] for z in zoos))
    lm = (statistics.median(m[0] for m in lms), max(m[1] for m in lms))
    label = f" (median of {args.repeat})" if args.repeat > 1 else ""
    print(f"mlx-zoo  {zoo[0]:8.1f} tokens/s  max RSS {zoo[1]:7.1f} MiB{label}")
    print(f"mlx-lm   {lm[0]:8.1f} tokens/s  max RSS {lm[1]:7.1f} MiB{label}")
    print(f"ratio    {zoo[0] / lm[0]:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
