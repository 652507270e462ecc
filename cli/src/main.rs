//! `zoo`: the mlx-zoo command line with the built-in plugins (see the
//! library, `mlx_zoo_cli`, for a `zoo` with plugins of your own).

fn main() -> std::process::ExitCode {
    mlx_zoo_cli::run()
}
