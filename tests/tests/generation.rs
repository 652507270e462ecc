//! Generation against transformers' `generate` (greedy, 10 new tokens) on
//! every float family fixture (make_generation_fixtures.py): the same tokens,
//! and the same logits at every step within 1e-4, with a KV cache (and, for
//! LongRoPE, the cache rebuilt where transformers rebuilds it).

use mlx_zoo::generate::{generate, GenerateOptions, Sampling};
use mlx_zoo_tests::{load, max_abs_diff, TOLERANCE};

const CASES: &[&str] = &[
    "llama-gqa",
    "llama-tied",
    "llama3-rope",
    "mistral-sliding",
    "mixtral-moe",
    "phi2",
    "phi3",
    "phi3-longrope",
    "qwen2",
];

fn fixtures() -> std::collections::HashMap<String, mlx_rs::Array> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/generation.safetensors");
    mlx_rs::Array::load_safetensors(path).unwrap()
}

fn ids(array: &mlx_rs::Array) -> Vec<u32> {
    array
        .as_dtype(mlx_rs::Dtype::Int32)
        .unwrap()
        .as_slice::<i32>()
        .iter()
        .map(|&t| t as u32)
        .collect()
}

#[test]
fn greedy_generation_matches_transformers_token_by_token() {
    let fixtures = fixtures();
    for case in CASES {
        let prompt = ids(&fixtures[&format!("{case}.prompt")]);
        let expected = ids(&fixtures[&format!("{case}.generated")]);
        let logits = &fixtures[&format!("{case}.logits")];
        let vocab = logits.shape()[1] as usize;
        let expected_logits = logits.as_slice::<f32>();
        let mut loaded = load(case);
        let options = GenerateOptions {
            max_tokens: expected.len(),
            ..Default::default()
        };
        let mut generation = generate(loaded.model.as_mut(), &prompt, options).unwrap();
        let mut tokens = Vec::new();
        let mut worst = 0.0f32;
        for step in 0..expected.len() {
            let row = generation
                .next_logits()
                .expect("logits for the next token")
                .to_vec();
            let diff = max_abs_diff(&row, &expected_logits[step * vocab..(step + 1) * vocab]);
            worst = worst.max(diff);
            assert!(
                diff < TOLERANCE,
                "{case}: step {step} logits differ by {diff}"
            );
            tokens.push(generation.next().unwrap().unwrap());
        }
        assert_eq!(tokens, expected, "{case}");
        assert!(
            generation.next().is_none(),
            "{case}: generated past max_tokens"
        );
        // Without reading logits in between, greedy decoding chooses on the
        // device and runs a forward pass ahead: the same tokens.
        let options = GenerateOptions {
            max_tokens: expected.len(),
            ..Default::default()
        };
        let ahead: Vec<u32> = generate(loaded.model.as_mut(), &prompt, options)
            .unwrap()
            .map(|t| t.unwrap())
            .collect();
        assert_eq!(ahead, expected, "{case}: run-ahead greedy decoding");
        eprintln!("{case}: 10 greedy tokens as transformers, step logits within {worst:e}");
    }
}

#[test]
fn sampling_is_reproducible_and_top_k_one_is_greedy() {
    let fixtures = fixtures();
    let prompt = ids(&fixtures["llama-gqa.prompt"]);
    let greedy = ids(&fixtures["llama-gqa.generated"]);
    let run = |sampling: Sampling| {
        let mut loaded = load("llama-gqa");
        let options = GenerateOptions {
            max_tokens: 10,
            sampling,
            ..Default::default()
        };
        generate(loaded.model.as_mut(), &prompt, options)
            .unwrap()
            .collect::<mlx_zoo::Result<Vec<u32>>>()
            .unwrap()
    };
    let hot = Sampling {
        temperature: 1.5,
        seed: 7,
        ..Default::default()
    };
    assert_eq!(run(hot.clone()), run(hot.clone()));
    assert_ne!(
        run(hot.clone()),
        run(Sampling {
            seed: 8,
            ..hot.clone()
        })
    );
    assert_ne!(
        run(hot.clone()),
        greedy,
        "temperature 1.5 should leave the greedy path"
    );
    assert_eq!(
        run(Sampling {
            top_k: 1,
            ..hot.clone()
        }),
        greedy
    );
    assert_eq!(
        run(Sampling {
            top_p: 1e-6,
            ..hot.clone()
        }),
        greedy
    );
    assert_eq!(run(Sampling { min_p: 1.0, ..hot }), greedy);
}

#[test]
fn stop_tokens_end_generation_and_bad_prompts_are_refused() {
    let fixtures = fixtures();
    let prompt = ids(&fixtures["llama-gqa.prompt"]);
    let greedy = ids(&fixtures["llama-gqa.generated"]);
    let mut loaded = load("llama-gqa");
    let options = GenerateOptions {
        max_tokens: 10,
        stop_tokens: vec![greedy[3]],
        ..Default::default()
    };
    let tokens: Vec<u32> = generate(loaded.model.as_mut(), &prompt, options)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(tokens, greedy[..3]);
    let err = generate(loaded.model.as_mut(), &[5000], GenerateOptions::default()).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let err = generate(loaded.model.as_mut(), &[], GenerateOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no tokens"), "{err}");
}

/// A random llama whose heads are 32 wide (the fixtures' are 16, below
/// MLX's smallest quantization group), saved in `dir`.
fn random_llama(dir: &std::path::Path, sliding_window: Option<usize>) {
    mlx_zoo_tests::random_model::RandomLlama {
        hidden: 64,
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
        intermediate: 96,
        vocab: 64,
        layers: 2,
        sliding_window,
    }
    .write(dir);
}

/// Logits of every step decoding `ids` one token at a time with `cache`.
fn stepwise_logits(
    model: &mut dyn mlx_zoo::CausalLm,
    cache: &mut mlx_zoo::KvCache,
    ids: &[i32],
) -> Vec<Vec<f32>> {
    ids.iter()
        .map(|&id| {
            let input = mlx_rs::Array::from_slice(&[id], &[1, 1]);
            let logits = model.forward(&input, Some(cache)).unwrap();
            logits.as_slice::<f32>().to_vec()
        })
        .collect()
}

#[test]
fn a_quantized_kv_cache_tracks_the_float_cache_in_a_quarter_of_the_memory() {
    use mlx_zoo::quantize::QuantSettings;
    let dir = tempfile::tempdir().unwrap();
    random_llama(dir.path(), None);
    let registry = mlx_zoo::registry().unwrap();
    let mut loaded = mlx_zoo::loader::load(&registry, dir.path(), &Default::default()).unwrap();
    let model = loaded.model.as_mut();
    let ids: Vec<i32> = (0..48).map(|i| (i * 37 + 5) % 64).collect();
    let mut float_cache = model.new_cache();
    let float = stepwise_logits(model, &mut float_cache, &ids);
    let scale = float.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let argmax = |row: &[f32]| (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]));
    let mut errors = Vec::new();
    // Measured: 8 bits 1.2% of the largest logit, 4 bits 17%.
    for (bits, tolerance) in [(8, 0.02), (4, 0.25)] {
        let settings = QuantSettings::affine(bits, 32);
        let mut cache = model.new_cache();
        cache.set_quantized(settings).unwrap();
        let quantized = stepwise_logits(model, &mut cache, &ids);
        let worst = float
            .iter()
            .zip(&quantized)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0f32, f32::max);
        assert!(
            worst / scale < tolerance,
            "{bits} bits: max diff {worst} against logits up to {scale}"
        );
        assert!(worst > 0.0, "{bits} bits: the cache was not quantized");
        errors.push(worst);
        if bits == 8 {
            let same = float
                .iter()
                .zip(&quantized)
                .filter(|(a, b)| argmax(a) == argmax(b))
                .count();
            assert!(
                same * 10 >= ids.len() * 9,
                "8 bits: the greedy choice changed at {} of {} steps",
                ids.len() - same,
                ids.len()
            );
        }
        // Per position and head: 32 values as `bits`-bit codes plus one f32
        // scale and bias, against 32 f32 (the float cache's stored
        // positions; its buffers hold a whole growth step).
        let expected = (32 * bits as usize / 8 + 8) as f64 / (32 * 4) as f64;
        let dims = model.dims();
        let float_bytes = ids.len() * dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim * 4;
        let stored: usize = float_cache.layers().iter().map(|l| l.stored()).sum();
        assert_eq!(stored, ids.len() * dims.num_layers);
        assert_eq!(
            float_cache.nbytes(),
            float_bytes / ids.len() * mlx_zoo::cache::GROWTH_STEP as usize
        );
        let ratio = cache.nbytes() as f64 / float_bytes as f64;
        assert!(
            (ratio - expected).abs() < 1e-9,
            "{bits} bits: {ratio} of the float cache's bytes, expected {expected}"
        );
    }
    assert!(
        errors[1] > 4.0 * errors[0],
        "4 bits should err well above 8 bits: {errors:?}"
    );
    // Generation takes the option; a group wider than the heads is refused.
    let options = GenerateOptions {
        max_tokens: 8,
        kv_quantization: Some(QuantSettings::affine(8, 32)),
        ..Default::default()
    };
    let tokens: Vec<u32> = generate(model, &[1, 2, 3], options)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tokens.len(), 8);
    let options = GenerateOptions {
        kv_quantization: Some(QuantSettings::affine(8, 64)),
        ..Default::default()
    };
    let Err(error) = generate(model, &[1, 2, 3], options) else {
        panic!("group 64 on 32-wide heads was accepted");
    };
    let error = error.to_string();
    assert!(
        error.contains("head dimension 32") && error.contains("groups of 64"),
        "{error}"
    );
}

#[test]
fn a_quantized_sliding_window_cache_stays_bounded() {
    use mlx_zoo::quantize::QuantSettings;
    let dir = tempfile::tempdir().unwrap();
    random_llama(dir.path(), Some(8));
    let registry = mlx_zoo::registry().unwrap();
    let mut loaded = mlx_zoo::loader::load(&registry, dir.path(), &Default::default()).unwrap();
    let model = loaded.model.as_mut();
    let ids: Vec<i32> = (0..40).map(|i| (i * 11 + 3) % 64).collect();
    let mut float_cache = model.new_cache();
    let float = stepwise_logits(model, &mut float_cache, &ids);
    let mut cache = model.new_cache();
    cache.set_quantized(QuantSettings::affine(8, 32)).unwrap();
    let quantized = stepwise_logits(model, &mut cache, &ids);
    assert!(
        cache.layers().iter().all(|l| l.stored() == 7),
        "window 8 keeps 7 past positions"
    );
    let scale = float.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let worst = float
        .iter()
        .zip(&quantized)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0f32, f32::max);
    assert!(
        worst / scale < 0.01,
        "max diff {worst} against logits up to {scale}"
    );
}
