"""Checks a GPU build of `zoo` against the fixtures' transformers references.

Runs on a machine with a GPU (no cargo needed: a `zoo` binary from
`scripts/cuda_bundle`), with numpy and safetensors, and optionally torch +
transformers for bfloat16 references:

1. logits: every fixture of tests/fixtures/models through `zoo logits` on the
   GPU, in float32 (max abs diff against transformers' float32 logits under
   1e-4, as the CPU tests) and in bfloat16. For bfloat16 the tolerance is
   transformers' own bfloat16 error on the same fixture (run here on the GPU
   when torch and transformers are importable) times 2, plus 1e-2: two
   bfloat16 implementations round at different places, so each may be as
   far from float32 as the other; where transformers cannot load a fixture
   (remote code, Meta layout, pre-quantized) the bound is 2% of the largest
   logit plus 0.05, about eight bfloat16 rounding steps.
2. greedy generation: the fixtures of tests/fixtures/generation.safetensors
   through `zoo generate --prompt-ids` on the GPU, in float32: the same tokens
   as transformers.
3. training: `zoo finetune` with LoRA, DoRA, QLoRA and full fine-tuning on
   the llama fixture for 30 steps: the training loss must fall to under 60%
   of its first value.

    ZOO=path/to/zoo python3 scripts/gpu_check.py [--only PREFIX,...] [--skip logits,generation,training] [--out report.json]

(`ZOO_CHECK_DEVICE=cpu` runs the same checks on the CPU, to try the script.)

Exit status 0 when every check passes; the report lists each figure.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
ZOO = os.environ.get("ZOO", str(ROOT / "target" / "release" / "zoo"))
F32_TOLERANCE = 1e-4
# Fixtures that zoo refuses by design on every device (tests/tests assert the
# refusal): act-order GPTQ cannot be repacked into consecutive groups.
REFUSED = {"llama-gqa-gptq-actorder"}


DEVICE = os.environ.get("ZOO_CHECK_DEVICE", "gpu")
# GPU_CHECK_TRANSFORMERS=0 skips transformers' bfloat16 references (loading
# each fixture in torch takes seconds); the fallback bound applies then.
USE_TRANSFORMERS = os.environ.get("GPU_CHECK_TRANSFORMERS", "1") != "0"


def zoo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ZOO, "-q", "--device", DEVICE, *args], capture_output=True, text=True)


def hf_bf16_logits(model_dir: Path, ids: np.ndarray):
    """transformers' bfloat16 logits on the GPU, or None when it cannot load the fixture."""
    try:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, trust_remote_code=False).to("cuda")
        with torch.no_grad():
            out = model(torch.from_numpy(ids.astype(np.int64)).to("cuda")).logits
        return out.float().cpu().numpy()
    except Exception as error:  # noqa: BLE001 - any failure means "no reference"
        return f"{type(error).__name__}: {str(error)[:120]}"


def check_logits(report: dict, only: list[str]) -> bool:
    ok = True
    rows = []
    for case in sorted(p.name for p in (FIXTURES / "models").iterdir()):
        if only and not any(case.startswith(prefix) for prefix in only):
            continue
        ref_file = FIXTURES / "models" / case / "reference.safetensors"
        if not ref_file.is_file() or case in REFUSED:
            continue
        ref = load_file(str(ref_file))
        ids, expected = ref["input_ids"], ref["logits"]
        row = {"case": case}
        with tempfile.TemporaryDirectory() as tmp:
            tokens = Path(tmp) / "ids.json"
            tokens.write_text(json.dumps(ids.tolist()))
            for dtype in ["f32", "bf16"]:
                out = Path(tmp) / f"{dtype}.npy"
                run = zoo("logits", str(FIXTURES / "models" / case), "--tokens", str(tokens), "--out", str(out),
                          "--dtype", dtype)
                if run.returncode != 0:
                    row[dtype] = f"failed: {run.stderr.strip()[-300:]}"
                    row[f"{dtype}_error"] = run.stderr.strip()[-3000:]
                    ok = False
                    continue
                row[dtype] = float(np.abs(np.load(out) - expected).max())
        scale = float(np.abs(expected).max())
        hf = hf_bf16_logits(FIXTURES / "models" / case, ids) if USE_TRANSFORMERS else "not run"
        if isinstance(hf, np.ndarray):
            row["transformers_bf16"] = float(np.abs(hf - expected).max())
            row["bf16_bound"] = 2 * row["transformers_bf16"] + 1e-2
        else:
            row["transformers_bf16"] = hf
            row["bf16_bound"] = 0.02 * scale + 0.05
        row["f32_ok"] = isinstance(row["f32"], float) and row["f32"] < F32_TOLERANCE
        row["bf16_ok"] = isinstance(row["bf16"], float) and row["bf16"] <= row["bf16_bound"]
        ok &= row["f32_ok"] and row["bf16_ok"]
        rows.append(row)
        hf_text = row["transformers_bf16"] if isinstance(row["transformers_bf16"], float) else "n/a"
        print(f"logits {case:<26} f32 {row['f32'] if isinstance(row['f32'], str) else format(row['f32'], '.2e')}"
              f"  bf16 {row['bf16'] if isinstance(row['bf16'], str) else format(row['bf16'], '.2e')}"
              f" (bound {row['bf16_bound']:.2e}, transformers bf16 {hf_text})"
              f"  {'ok' if row['f32_ok'] and row['bf16_ok'] else 'FAIL'}", flush=True)
    report["logits"] = rows
    return ok


def check_generation(report: dict) -> bool:
    fixtures = load_file(str(FIXTURES / "generation.safetensors"))
    cases = sorted({k.rsplit(".", 1)[0] for k in fixtures if k.endswith(".prompt")})
    ok = True
    rows = []
    for case in cases:
        prompt = fixtures[f"{case}.prompt"].astype(np.int64).ravel().tolist()
        expected = fixtures[f"{case}.generated"].astype(np.int64).ravel().tolist()
        run = zoo("generate", str(FIXTURES / "models" / case), "--prompt-ids", ",".join(map(str, prompt)),
                  "--max-tokens", str(len(expected)), "--json")
        if run.returncode != 0:
            rows.append({"case": case, "error": run.stderr.strip()[-300:]})
            ok = False
            print(f"generate {case}: FAILED {run.stderr.strip()[-300:]}", flush=True)
            continue
        got = json.loads(run.stdout)["generated_ids"]
        same = got == expected
        ok &= same
        rows.append({"case": case, "same_tokens": same, "tokens": len(expected)})
        print(f"generate {case:<20} {len(expected)} greedy tokens {'equal transformers' if same else 'DIFFER'}"
              f"{'' if same else f': {got} vs {expected}'}", flush=True)
    report["generation"] = rows
    return ok


def check_training(report: dict) -> bool:
    ok = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("\n".join(
            json.dumps({"prompt": f"{i % 7}+{i % 5}=", "completion": str(i % 7 + i % 5)}) for i in range(24)))
        for train_type in ["lora", "dora", "qlora", "full"]:
            out = Path(tmp) / train_type
            run = zoo("finetune", str(FIXTURES / "models" / "llama-gqa"), "--tokenizer",
                      str(FIXTURES / "tokenizer" / "char-128"), "--data", str(data), "--out", str(out),
                      "--iters", "30", "--lr", "5e-3", "--batch-size", "4", "--train-type", train_type,
                      "--lora-rank", "4")
            if run.returncode != 0:
                rows.append({"train_type": train_type, "error": run.stderr.strip()[-300:]})
                print(f"finetune {train_type}: FAILED {run.stderr.strip()[-300:]}", flush=True)
                ok = False
                continue
            losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
            fell = losses[-1] < 0.6 * losses[0]
            ok &= fell
            rows.append({"train_type": train_type, "first_loss": losses[0], "last_loss": losses[-1], "fell": fell})
            print(f"finetune {train_type:<6} loss {losses[0]:.3f} -> {losses[-1]:.3f} {'ok' if fell else 'FAIL'}",
                  flush=True)
    report["training"] = rows
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the report as JSON")
    parser.add_argument("--only", default="", help="comma list of fixture name prefixes for the logits check")
    parser.add_argument("--skip", default="", help="comma list of: logits, generation, training")
    args = parser.parse_args()
    only = list(filter(None, args.only.split(",")))
    skip = set(filter(None, args.skip.split(",")))
    info = zoo("info", "--json")
    report = {"info": json.loads(info.stdout) if info.returncode == 0 else info.stderr}
    print(json.dumps(report["info"], indent=1) if info.returncode == 0 else info.stderr, flush=True)
    ok = True
    if "logits" not in skip:
        ok &= check_logits(report, only)
    if "generation" not in skip:
        ok &= check_generation(report)
    if "training" not in skip:
        ok &= check_training(report)
    report["ok"] = ok
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print("all GPU checks passed" if ok else "some GPU checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
