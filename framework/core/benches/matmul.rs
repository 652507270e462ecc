//! Float32 matmul throughput of MLX's CPU backend through whichever BLAS
//! the process loaded (see `zoo info`). Run with
//! `cargo bench -p mlx-zoo-core --bench matmul`; build mlx-sys with
//! `MLX_ZOO_BLAS=bundled` to measure the wheel's reference BLAS instead.

use mlx_rs::Array;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let blas = mlx_zoo_core::runtime::blas();
    println!(
        "BLAS: {} ({})",
        blas.name,
        blas.library.as_deref().unwrap_or("?")
    );
    for n in [256, 512, 1024, 2048] {
        let a = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?;
        let b = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?;
        mlx_rs::transforms::eval([&a, &b])?;
        // Warm up, then time enough repetitions for about a second.
        let warm: Array = a.matmul(&b)?;
        warm.eval()?;
        let flops = 2.0 * (n as f64).powi(3);
        let mut reps = 1;
        let elapsed = loop {
            let start = Instant::now();
            for _ in 0..reps {
                a.matmul(&b)?.eval()?;
            }
            let elapsed = start.elapsed().as_secs_f64();
            if elapsed > 1.0 || reps >= 1 << 12 {
                break elapsed / reps as f64;
            }
            reps *= 2;
        };
        println!(
            "matmul {n}x{n} f32: {:8.2} ms  {:7.1} GFLOP/s",
            elapsed * 1e3,
            flops / elapsed / 1e9
        );
    }
    Ok(())
}
