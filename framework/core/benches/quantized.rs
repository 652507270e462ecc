//! Quantized linear layers on the CPU: the quantized product (the project's
//! kernel up to `nn::MATVEC_MAX_ROWS` rows, MLX's quantized matmul above)
//! against de-quantizing the weight and using the float (BLAS) matmul, for
//! token-sized and prompt-sized inputs, next to the float layer. The
//! crossover decides `nn::set_dequantize_rows`. Run with
//! `cargo bench -p mlx-zoo-core --bench quantized`.

use mlx_rs::Array;
use mlx_zoo_core::nn::{linear, set_dequantize_rows, Linear};
use mlx_zoo_core::quantize::QuantSettings;
use std::time::Instant;

fn time(layer: &Linear, x: &Array) -> Result<f64, Box<dyn std::error::Error>> {
    layer.forward(x)?.eval()?;
    let mut reps = 1;
    loop {
        let start = Instant::now();
        for _ in 0..reps {
            layer.forward(x)?.eval()?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed > 0.3 || reps >= 1 << 14 {
            return Ok(elapsed / reps as f64);
        }
        reps *= 2;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("BLAS: {}", mlx_zoo_core::runtime::blas().name);
    let settings = QuantSettings::affine(4, 64);
    for (out, inp) in [(2048usize, 2048usize), (1408, 512)] {
        let key = mlx_rs::random::key(1)?;
        let w = mlx_rs::random::normal::<f32>(&[out as i32, inp as i32], None, None, &key)?;
        let mut float = linear(inp, out, false)?;
        float.weight = mlx_rs::module::Param::new(w.clone());
        let (q, s, b) = mlx_rs::ops::quantize(&w, 64, 4)?;
        let mut quant = linear(inp, out, false)?;
        quant.set_quantized(q, s, Some(b), settings);
        println!("\n[{out} x {inp}] 4-bit, group 64   (GFLOP/s; ms per call)");
        println!(
            "{:>6} {:>16} {:>16} {:>16}",
            "rows", "float", "quantized", "dequant+mm"
        );
        for rows in [1usize, 2, 4, 8, 32, 128, 512] {
            let x = mlx_rs::random::normal::<f32>(&[rows as i32, inp as i32], None, None, &key)?;
            let flops = 2.0 * (rows * out * inp) as f64;
            let t_float = time(&float, &x)?;
            set_dequantize_rows(usize::MAX);
            let t_qmm = time(&quant, &x)?;
            set_dequantize_rows(0);
            let t_deq = time(&quant, &x)?;
            let cell = |t: f64| format!("{:6.1}; {:7.3}", flops / t / 1e9, t * 1e3);
            println!(
                "{rows:>6} {:>16} {:>16} {:>16}",
                cell(t_float),
                cell(t_qmm),
                cell(t_deq)
            );
        }
    }
    Ok(())
}
