"""Data-parallel cost and scaling of `zoo finetune` on one machine.

The training workload of scripts/bench_train.py (the ~24M-parameter float32
llama, LoRA rank 8 on q/k/v/o, 256-token lines) with a global batch of
--batch (default 8): one process against `zoo launch -n 2` (MLX's ring
backend over loopback), and, when mlx-lm is importable, mlx-lm's `lora`
under `mlx.launch -n 2 --backend ring` on the same data. Reports trained
tokens/s (global, median after step 3), per-step communication seconds and
bytes (zoo's metrics.jsonl), and the losses' agreement between 1 and 2
ranks.

    cargo build --release -p mlx-zoo-cli
    ~/.venvs/zoo-mlxlm/bin/python scripts/bench_distributed.py [--iters 20] [--batch 8] [--full]
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import ZOO  # noqa: E402
from bench_train import RANK, SEQ, prepare_workload  # noqa: E402

LR = 1e-4


def zoo_run(model: Path, data: Path, iters: int, batch: int, ranks: int, full: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = ["finetune", str(model), "--data", str(data), "--out", out, "--iters", str(iters),
                "--batch-size", str(batch), "--max-seq-len", str(SEQ), "--lr", str(LR), "--decay", "constant"]
        args += ["--train-type", "full"] if full else [
            "--lora-rank", str(RANK), "--lora-alpha", str(2 * RANK), "--lora-targets",
            "q_proj,k_proj,v_proj,o_proj"]
        command = [str(ZOO), "-q"] + args if ranks == 1 else [str(ZOO), "launch", "-n", str(ranks), "--", "-q"] + args
        subprocess.run(command, check=True, capture_output=True, text=True)
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"loss"' in line]
    steady = rows[3:] or rows
    return {
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        "comm_seconds": statistics.median(r.get("comm_seconds", 0.0) for r in steady),
        "comm_bytes": steady[0].get("comm_bytes", 0),
        "step_seconds": statistics.median(r["tokens"] / r["tokens_per_second"] for r in steady),
        "losses": [r["loss"] for r in rows],
    }


def mlx_lm_run(model: Path, data: Path, iters: int, batch: int, ranks: int) -> float | None:
    launcher = Path(sys.executable).with_name("mlx.launch")
    with tempfile.TemporaryDirectory() as out:
        config = Path(out) / "lora.yaml"
        config.write_text(json.dumps({"lora_parameters": {
            "rank": RANK, "dropout": 0.0, "scale": 2.0,
            "keys": [f"self_attn.{t}" for t in ["q_proj", "k_proj", "v_proj", "o_proj"]]}}))
        lora = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(data),
                "--batch-size", str(batch), "--iters", str(iters), "--max-seq-length", str(SEQ),
                "--num-layers", "-1", "--learning-rate", str(LR), "--steps-per-report", "1",
                "--steps-per-eval", str(iters + 1), "--adapter-path", str(Path(out) / "a"), "-c", str(config)]
        command = lora if ranks == 1 else [str(launcher), "--backend", "ring", "-n", str(ranks), "--"] + lora
        run = subprocess.run(command, capture_output=True, text=True)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout)
    speeds = [float(m.replace(",", "")) for m in
              re.findall(r"^\s*\d+\s+[0-9.]+\s+\S?\s+([0-9.,]+)\s+[0-9.]+k?\s*$", plain, re.M)]
    speeds += [float(m) for m in re.findall(r"Tokens/sec ([0-9.]+)", plain)]
    if run.returncode != 0 or not speeds:
        print(f"  mlx-lm with {ranks} rank(s) failed: {run.stderr[-600:]}", file=sys.stderr)
        return None
    return statistics.median(speeds[3:] or speeds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (divisible by 2)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    args = parser.parse_args()
    workload = prepare_workload()
    if workload is None:
        return 1
    model, data = workload
    kind = "full fine-tuning" if args.full else f"LoRA rank {RANK} on q/k/v/o"
    print(f"llama-24m float32, {kind}, global batch {args.batch} x {SEQ}, {args.iters} steps")
    one = zoo_run(model, data, args.iters, args.batch, 1, args.full)
    two = zoo_run(model, data, args.iters, args.batch, 2, args.full)
    drift = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
    for name, r in [("1 process", one), ("2 ranks (ring)", two)]:
        print(f"mlx-zoo {name:<15} {r['tokens_per_second']:8.0f} tok/s  step {r['step_seconds']:.3f} s  "
              f"comm {r['comm_seconds'] * 1000:6.1f} ms / {r['comm_bytes'] / 2**20:6.2f} MiB per step")
    print(f"mlx-zoo scaling 2 ranks / 1 process: {two['tokens_per_second'] / one['tokens_per_second']:.2f}x; "
          f"largest loss difference over {len(one['losses'])} steps: {drift:.2e}")
    if not args.skip_mlx_lm and not args.full:
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            print("mlx-lm is not importable here: its side skipped")
            return 0
        lm_one = mlx_lm_run(model, data, args.iters, args.batch, 1)
        lm_two = mlx_lm_run(model, data, args.iters, args.batch, 2)
        if lm_one and lm_two:
            print(f"mlx-lm  1 process {lm_one:8.0f} tok/s; 2 ranks (mlx.launch ring) {lm_two:8.0f} tok/s "
                  f"({lm_two / lm_one:.2f}x)")
            print(f"ratio mlx-zoo / mlx-lm: 1 process {one['tokens_per_second'] / lm_one:.2f}x, "
                  f"2 ranks {two['tokens_per_second'] / lm_two:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
