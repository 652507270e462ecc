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
