//! Runnable examples of embedding mlx-zoo; see the `examples` targets.
