"""GPU speed of mlx-zoo against mlx-lm (and PyTorch + PEFT) on one machine.

The workload of issue 13: a ~886M-parameter llama shape (hidden 2048, 16
layers, 16 heads / 8 KV heads, intermediate 5632, vocab 32000) in bfloat16
with random weights, the fixture character tokenizer and random text.

* LoRA rank 8 (alpha 16) on q/k/v/o of every layer, batch 4 x 512 tokens,
  AdamW at 1e-4: `zoo finetune --dtype bf16` against `mlx_lm lora`, and
  PyTorch + PEFT (bfloat16, same shapes) once. Trained tokens/s, median of
  the steps after the third.
* QLoRA: the same on a 4-bit (group 64) base: zoo quantizes at load, mlx-lm
  trains on a `zoo convert` copy (the same affine format).
* Generation: a 64-token prompt and 128 greedy tokens, bfloat16 and 4-bit:
  `zoo generate --json` against mlx-lm's `generate_step`.

Engines alternate over --repeat runs and medians are reported, with model
FLOP utilisation against --peak-tflops (the H200's measured bf16 rate).

    ZOO=path/to/zoo python3 scripts/bench_gpu.py [--repeat 3] [--iters 20] [--out report.json]
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZOO = os.environ.get("ZOO", str(ROOT / "target" / "release" / "zoo"))
WORK = Path(os.environ.get("MLX_ZOO_BENCH", Path(tempfile.gettempdir()) / "zoo-gpu-bench"))
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer" / "char-128"
SHAPE = dict(hidden=2048, inter=5632, layers=16, heads=16, kv=8, vocab=32000)
SEQ, BATCH, RANK, LR = 512, 4, 8, 1e-4
PROMPT_TOKENS, NEW_TOKENS = 64, 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parameters() -> int:
    h, i, n, v = SHAPE["hidden"], SHAPE["inter"], SHAPE["layers"], SHAPE["vocab"]
    head = h // SHAPE["heads"]
    kv = SHAPE["kv"] * head
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h


def make_model(path: Path) -> None:
    """A Hugging Face-layout bfloat16 llama with random weights (torch on the GPU)."""
    if (path / "config.json").is_file():
        return
    import torch
    from safetensors.torch import save_file

    h, i, n, v = SHAPE["hidden"], SHAPE["inter"], SHAPE["layers"], SHAPE["vocab"]
    heads, kv = SHAPE["heads"], SHAPE["kv"]
    head = h // heads
    gen = torch.Generator(device="cuda").manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=gen, device="cuda") / shape[-1] ** 0.5).to(torch.bfloat16).cpu()

    def ones(d):
        return torch.ones(d, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": ones(h), "lm_head.weight": w(v, h)}
    for layer in range(n):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(heads * head, h), p + "self_attn.k_proj.weight": w(kv * head, h),
            p + "self_attn.v_proj.weight": w(kv * head, h), p + "self_attn.o_proj.weight": w(h, heads * head),
            p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
            p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
        })
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": v, "hidden_size": h,
              "intermediate_size": i, "num_hidden_layers": n, "num_attention_heads": heads,
              "num_key_value_heads": kv, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(TOKENIZER / name, path / name)


def make_data(path: Path, lines: int = 400) -> None:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz      .,"
    path.mkdir(parents=True, exist_ok=True)
    for name, count in [("train.jsonl", lines), ("valid.jsonl", 8)]:
        with open(path / name, "w") as f:
            for _ in range(count):
                f.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(SEQ + 40))}) + "\n")


def zoo_train(model: Path, data: Path, iters: int, qlora: bool, env: dict | None = None) -> float:
    with tempfile.TemporaryDirectory() as out:
        args = [ZOO, "-q", "--device", "gpu", "finetune", str(model), "--data", str(data), "--out", out,
                "--iters", str(iters), "--batch-size", str(BATCH), "--max-seq-len", str(SEQ),
                "--lora-rank", str(RANK), "--lora-alpha", str(2 * RANK), "--lr", str(LR),
                "--lora-targets", ",".join(TARGETS), "--decay", "constant", "--dtype", "bf16"]
        if qlora:
            args += ["--train-type", "qlora", "--q-bits", "4", "--q-group-size", "64"]
        run = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
        if run.returncode != 0:
            raise RuntimeError(f"zoo finetune failed: {run.stderr[-1500:]}")
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"loss"' in line]
    return statistics.median(r["tokens_per_second"] for r in rows[3:])


def mlx_lm_train(model: Path, data: Path, iters: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        config = Path(out) / "lora.yaml"
        config.write_text(json.dumps({"lora_parameters": {
            "rank": RANK, "dropout": 0.0, "scale": 2.0, "keys": [f"self_attn.{t}" for t in TARGETS]}}))
        run = subprocess.run(
            [sys.executable, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(data),
             "--batch-size", str(BATCH), "--iters", str(iters), "--max-seq-length", str(SEQ), "--num-layers", "-1",
             "--learning-rate", str(LR), "--steps-per-report", "1", "--steps-per-eval", str(iters + 1),
             "--adapter-path", str(Path(out) / "adapters"), "-c", str(config)],
            capture_output=True, text=True)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout)
    # mlx-lm 0.32's report table: "iter  train_loss [arrow]  tok/s (1,234 style)  tokens".
    speeds = [float(m.replace(",", "")) for m in
              re.findall(r"^\s*\d+\s+[0-9.]+\s+\S?\s+([0-9.,]+)\s+[0-9.]+k?\s*$", plain, re.M)]
    if not speeds:
        # Older report lines: "Iter 5: Train loss ..., Tokens/sec 1234.5, ..."
        speeds = [float(m) for m in re.findall(r"Tokens/sec ([0-9.]+)", plain)]
    if not speeds:
        raise RuntimeError(f"no speed in mlx-lm's output:\n{plain[-1500:]}\n{run.stderr[-1500:]}")
    return statistics.median(speeds[3:] or speeds)


def torch_peft_train(model: Path, iters: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to("cuda")
    net = get_peft_model(net, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR)
    ids = torch.randint(0, 128, (BATCH, SEQ), device="cuda")
    speeds = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        speeds.append(BATCH * SEQ / (time.perf_counter() - start))
    del net, opt
    torch.cuda.empty_cache()
    return statistics.median(speeds[3:])


def zoo_generate(model: Path, prompt: list[int]) -> tuple[float, float]:
    run = subprocess.run([ZOO, "-q", "--device", "gpu", "generate", str(model), "--prompt-ids",
                          ",".join(map(str, prompt)), "--max-tokens", str(NEW_TOKENS), "--stop-ids", "999999",
                          "--json"], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"zoo generate failed: {run.stderr[-1500:]}")
    report = json.loads(run.stdout)
    return report["prompt_tokens_per_second"], report["generation_tokens_per_second"]


def mlx_lm_generate(model: Path, prompt: list[int]) -> tuple[float, float]:
    code = f"""
import json, time, mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model
model, _ = load_model(__import__('pathlib').Path({str(model)!r}))
tokens = mx.array({prompt!r})
start = time.perf_counter(); first = None; count = 0
for token, _ in generate_step(tokens, model, max_tokens={NEW_TOKENS}):
    mx.eval(token)
    if first is None: first = time.perf_counter()
    count += 1
end = time.perf_counter()
print(json.dumps([{len(prompt)} / (first - start), (count - 1) / (end - first)]))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"mlx-lm generate failed: {run.stderr[-1500:]}")
    return tuple(json.loads(run.stdout.strip().splitlines()[-1]))


def alternate(repeat: int, engines: dict) -> dict:
    measured = {name: [] for name in engines}
    for _ in range(repeat):
        for name, run in engines.items():
            try:
                measured[name].append(run())
            except Exception as error:  # noqa: BLE001 - report and go on with the other engine
                print(f"  {name}: {error}", flush=True)
    return measured


def median(values, index=None):
    values = [v if index is None else v[index] for v in values]
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak (H200 measured)")
    parser.add_argument("--skip", default="",
                        help="comma list of: lora, qlora, torch, generate, generate-bf16, generate-4-bit")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    WORK.mkdir(parents=True, exist_ok=True)
    model, data, q4 = WORK / "llama-886m", WORK / "data", WORK / "llama-886m-q4"
    make_model(model)
    make_data(data)
    if not (q4 / "config.json").is_file():
        subprocess.run([ZOO, "-q", "--device", "gpu", "convert", str(model), "--out", str(q4), "--q-bits", "4",
                        "--q-group-size", "64", "--dtype", "bf16"], check=True)
        for name in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(TOKENIZER / name, q4 / name)
    n = parameters()
    flop_per_token = 4 * n  # forward 2N + input gradients 2N (frozen base); adapters negligible
    report = {"parameters": n, "flop_per_trained_token": flop_per_token}
    print(f"llama {n / 1e6:.0f}M bf16, batch {BATCH} x {SEQ}, LoRA rank {RANK} on q/k/v/o, "
          f"{args.iters} steps, medians of {args.repeat} alternating runs", flush=True)

    def mfu(tps):
        return 100 * tps * flop_per_token / (args.peak_tflops * 1e12)

    for kind, base in [("lora", model), ("qlora", q4)]:
        if kind in skip:
            continue
        engines = {
            "mlx-zoo": lambda: zoo_train(model, data, args.iters, kind == "qlora"),
            "mlx-lm": lambda: mlx_lm_train(base, data, args.iters),
        }
        if kind == "qlora":
            # The other path of a quantized layer: MLX's quantized matmul at every size (by
            # default a GPU de-quantizes batches of 512 rows or more, then runs the float matmul).
            engines["mlx-zoo-qmm"] = lambda: zoo_train(model, data, args.iters, True,
                                                       {"ZOO_DEQUANTIZE_ROWS": "never"})
        measured = alternate(args.repeat, engines)
        zoo, lm = median(measured["mlx-zoo"]), median(measured["mlx-lm"])
        report[kind] = {**measured, "ratio": zoo / lm}
        print(f"{kind:<6} mlx-zoo {zoo:9.0f} tok/s (MFU {mfu(zoo):4.1f}%)  mlx-lm {lm:9.0f} tok/s "
              f"(MFU {mfu(lm):4.1f}%)  ratio {zoo / lm:.2f}x", flush=True)
        if "mlx-zoo-qmm" in measured:
            qmm = median(measured["mlx-zoo-qmm"])
            print(f"{kind:<6} mlx-zoo, quantized matmul {qmm:9.0f} tok/s ({qmm / lm:.2f}x mlx-lm)", flush=True)
    if "torch" not in skip:
        try:
            tps = torch_peft_train(model, max(args.iters, 10))
            report["torch_peft"] = tps
            print(f"torch  PyTorch + PEFT {tps:9.0f} tok/s (MFU {mfu(tps):4.1f}%)", flush=True)
        except Exception as error:  # noqa: BLE001
            print(f"torch: {error}", flush=True)
    if "generate" not in skip:
        prompt = [(7 * i + 3) % 128 for i in range(PROMPT_TOKENS)]
        for name, path in [("bf16", model), ("4-bit", q4)]:
            if f"generate-{name}" in skip:
                continue
            measured = alternate(args.repeat, {
                "mlx-zoo": lambda: zoo_generate(path, prompt),
                "mlx-lm": lambda: mlx_lm_generate(path, prompt),
            })
            row = {engine: (median(runs, 0), median(runs, 1)) for engine, runs in measured.items()}
            report[f"generate_{name}"] = row
            (zp, zg), (lp, lg) = row["mlx-zoo"], row["mlx-lm"]
            print(f"generate {name:<6} prompt mlx-zoo {zp:8.0f} mlx-lm {lp:8.0f} ({zp / lp:.2f}x)   "
                  f"decode mlx-zoo {zg:6.1f} mlx-lm {lg:6.1f} ({zg / lg:.2f}x) tokens/s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
