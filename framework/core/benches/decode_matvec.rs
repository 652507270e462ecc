//! The matrix-vector products of one decoding step of issue 7's ~24M llama
//! (8 blocks of q/k/v/o 512-wide, 4 KV heads, MLP 1408; 94 MB of float32
//! weights), evaluated one layer after the other as decoding does: the
//! project's kernels (`nn::matvec`) against MLX's matmul (float, through
//! BLAS) and quantized matmul (4-bit, group 64), with the weight bytes
//! streamed per second. Run with
//! `cargo bench -p mlx-zoo-core --bench decode_matvec`.

use mlx_rs::Array;
use mlx_zoo_core::nn::{matvec, QuantizedWeight};
use std::time::Instant;

type Step<'a> = dyn FnMut(&Array) -> Result<Array, Box<dyn std::error::Error>> + 'a;

/// Runs `layer` on every layer's input, evaluating each output before the
/// next layer starts (as a decoding step's dependencies force).
fn each_layer(
    inputs: &[Array],
    layer: impl Fn(usize, &Array) -> Result<Array, Box<dyn std::error::Error>>,
) -> Result<Array, Box<dyn std::error::Error>> {
    let mut last = None;
    for (index, x) in inputs.iter().enumerate() {
        let y = layer(index, x)?;
        y.eval()?;
        last = Some(y);
    }
    Ok(last.ok_or("no layers")?)
}

/// Milliseconds per pass over every layer (median of 7 passes).
fn time_step(x: &Array, step: &mut Step<'_>) -> Result<f64, Box<dyn std::error::Error>> {
    step(x)?;
    let mut times = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        step(x)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[3])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key = mlx_rs::random::key(3)?;
    let mut shapes = Vec::new();
    for _ in 0..8 {
        shapes.extend([(512, 512), (256, 512), (256, 512), (512, 512)]);
        shapes.extend([(1408, 512), (1408, 512), (512, 1408)]);
    }
    let weights: Vec<Array> = shapes
        .iter()
        .map(|&(o, i)| mlx_rs::random::normal::<f32>(&[o, i], None, None, &key))
        .collect::<Result<_, _>>()?;
    let quantized: Vec<(Array, Array, Array)> = weights
        .iter()
        .map(|w| mlx_rs::ops::quantize(w, 64, 4))
        .collect::<Result<_, _>>()?;
    mlx_rs::transforms::eval(weights.iter())?;
    for (q, s, b) in &quantized {
        mlx_rs::transforms::eval([q, s, b])?;
    }
    let float_bytes: usize = weights.iter().map(Array::nbytes).sum();
    let quant_bytes: usize = quantized
        .iter()
        .map(|(q, s, b)| q.nbytes() + s.nbytes() + b.nbytes())
        .sum();
    // Each layer's input is a fresh row of its input width; outputs are
    // evaluated per layer, as a decoding step's dependencies force.
    let inputs: Vec<Array> = shapes
        .iter()
        .map(|&(_, i)| mlx_rs::random::normal::<f32>(&[1, i], None, None, &key))
        .collect::<Result<_, _>>()?;
    mlx_rs::transforms::eval(inputs.iter())?;
    let x = &inputs[0];
    let mut ours_float = |_: &Array| each_layer(&inputs, |i, x| Ok(matvec(x, &weights[i], None)?));
    let mut mlx_float =
        |_: &Array| each_layer(&inputs, |i, x| Ok(mlx_rs::ops::matmul(x, weights[i].t())?));
    let mut ours_quant = |_: &Array| {
        each_layer(&inputs, |i, x| {
            let (q, s, b) = &quantized[i];
            let weight = QuantizedWeight {
                scales: s,
                biases: Some(b),
                bits: 4,
                group_size: 64,
            };
            Ok(matvec(x, q, Some(weight))?)
        })
    };
    let mut mlx_quant = |_: &Array| {
        each_layer(&inputs, |i, x| {
            let (q, s, b) = &quantized[i];
            Ok(mlx_rs::ops::quantized_matmul(x, q, s, b, true, 64, 4)?)
        })
    };
    let mut overhead = |_: &Array| each_layer(&inputs, |_, x| Ok(x.add(Array::from_f32(1.0))?));
    println!(
        "one decoding step: {} layers, {:.1} MB float32, {:.1} MB 4-bit; kernels {}",
        shapes.len(),
        float_bytes as f64 / 1e6,
        quant_bytes as f64 / 1e6,
        mlx_zoo_core::nn::kernels_isa()
    );
    println!("{:<26} {:>10} {:>10}", "", "ms/step", "GB/s");
    let ms = time_step(x, &mut overhead)?;
    println!("{:<26} {ms:>10.2}", "(an add per layer instead)");
    let rows: [(&str, &mut Step<'_>, usize); 4] = [
        ("float32, mlx-zoo kernel", &mut ours_float, float_bytes),
        ("float32, MLX matmul", &mut mlx_float, float_bytes),
        ("4-bit, mlx-zoo kernel", &mut ours_quant, quant_bytes),
        ("4-bit, MLX quantized_matmul", &mut mlx_quant, quant_bytes),
    ];
    for (name, step, bytes) in rows {
        let ms = time_step(x, step)?;
        println!(
            "{name:<26} {ms:>10.2} {:>10.1}",
            bytes as f64 / (ms / 1e3) / 1e9
        );
    }
    Ok(())
}
