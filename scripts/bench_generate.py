"""Generation speed of mlx-zoo against mlx-lm on the same model and prompt.

Makes (once) the reference ~24M-parameter float32 llama of the training issue
(hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1408, vocab 256) with
random weights in a cache directory, optionally a 4-bit copy with
`zoo convert`, then runs a 64-token prompt and 128 greedy new tokens through
`zoo generate --json` and through mlx-lm's `stream_generate`, three times
each, and prints prompt and generation tokens/s and the ratios.

The PyPI mlx-cpu wheel bundles the reference BLAS; point its libmlx at
OpenBLAS for a fair comparison (see scripts/bench_train.py and
docs/BENCHMARKS.md).

    cargo build --release -p mlx-zoo-cli
    python -m venv ~/.venvs/zoo-mlxlm && ~/.venvs/zoo-mlxlm/bin/pip install -r tests/fixtures/requirements-mlx.txt
    ~/.venvs/zoo-mlxlm/bin/python scripts/bench_generate.py
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "target" / "release" / "zoo"
CACHE = Path(os.environ.get("MLX_ZOO_BENCH", Path.home() / ".cache" / "mlx-zoo" / "bench"))
PROMPT_TOKENS, NEW_TOKENS, RUNS = 64, 128, 5


def make_model(path: Path) -> None:
    """A Hugging Face-layout llama with random weights (NumPy; no torch needed)."""
    if (path / "config.json").is_file():
        return
    import numpy as np
    from safetensors.numpy import save_file

    hidden, inter, layers, heads, kv, vocab = 512, 1408, 8, 8, 4, 256
    head = hidden // heads
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32),
               "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(heads * head, hidden),
            p + "self_attn.k_proj.weight": w(kv * head, hidden),
            p + "self_attn.v_proj.weight": w(kv * head, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head),
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        })
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 1024,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def zoo_run(model: Path, prompt: list[int]) -> tuple[float, float]:
    out = subprocess.run(
        [str(ZOO), "-q", "generate", str(model), "--prompt-ids", ",".join(map(str, prompt)),
         "--max-tokens", str(NEW_TOKENS), "--stop-ids", "999", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    report = json.loads(out)
    return report["prompt_tokens_per_second"], report["generation_tokens_per_second"]


def mlx_lm_run(model_dir: Path, prompt: list[int]) -> tuple[float, float]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir, model_config={"rope_theta": 10000.0})
    tokens = mx.array(prompt)
    start = time.perf_counter()
    first = None
    count = 0
    for token, _ in generate_step(tokens, model, max_tokens=NEW_TOKENS):
        mx.eval(token)
        if first is None:
            first = time.perf_counter()
        count += 1
    end = time.perf_counter()
    prompt_tps = len(prompt) / (first - start)
    gen_tps = (count - 1) / (end - first)
    return prompt_tps, gen_tps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=RUNS, help="alternating runs per engine; medians reported")
    runs_wanted = parser.parse_args().runs
    if not ZOO.is_file():
        print(f"build first: cargo build --release -p mlx-zoo-cli ({ZOO} is missing)", file=sys.stderr)
        return 1
    float_dir = CACHE / "llama-24m"
    make_model(float_dir)
    q4_dir = CACHE / "llama-24m-q4"
    if not (q4_dir / "config.json").is_file():
        subprocess.run([str(ZOO), "-q", "convert", str(float_dir), "--out", str(q4_dir), "--q-bits", "4",
                        "--q-group-size", "64"], check=True, capture_output=True)
    prompt = [(7 * i + 3) % 256 for i in range(PROMPT_TOKENS)]
    print(f"{PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, median of {runs_wanted} alternating runs")
    print(f"{'model':<10} {'engine':<8} {'prompt tok/s':>13} {'gen tok/s':>10}")
    for name, path in [("float32", float_dir), ("4-bit", q4_dir)]:
        engines = [("mlx-zoo", zoo_run), ("mlx-lm", mlx_lm_run)]
        measured = {engine: [] for engine, _ in engines}
        # Alternate the engines so that both see the machine's slow phases.
        for _ in range(runs_wanted):
            for engine, run in engines:
                measured[engine].append(run(path, prompt))
        results = {}
        for engine, runs in measured.items():
            results[engine] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            print(f"{name:<10} {engine:<8} {results[engine][0]:>13.1f} {results[engine][1]:>10.1f}")
        ratio_p = results["mlx-zoo"][0] / results["mlx-lm"][0]
        ratio_g = results["mlx-zoo"][1] / results["mlx-lm"][1]
        print(f"{name:<10} {'ratio':<8} {ratio_p:>12.2f}x {ratio_g:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
