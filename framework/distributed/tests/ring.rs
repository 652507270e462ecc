//! Two ranks over MLX's ring backend on the loopback interface: the test
//! starts two copies of its own executable as ranks (the environment a
//! launcher sets: `MLX_RANK`, `MLX_HOSTFILE`) and checks every collective's
//! result in each; and a peer that dies makes the survivor fail, not hang.

use mlx_rs::{Array, Dtype};
use mlx_zoo_distributed::hostfile::RingHostfile;
use mlx_zoo_distributed::{fused, group, Backend, Group};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the ranks' environment: which scenario the rank plays.
const ROLE: &str = "ZOO_RING_TEST_ROLE";

/// Starts `size` ranks running the test `name` with `role`.
fn spawn_ranks(name: &str, role: &str, size: usize) -> (tempfile::TempDir, Vec<Child>) {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts.json");
    RingHostfile::loopback(size)
        .unwrap()
        .write(&hostfile)
        .unwrap();
    let exe = std::env::current_exe().unwrap();
    let children = (0..size)
        .map(|rank| {
            Command::new(&exe)
                .args([name, "--exact", "--nocapture", "--test-threads", "1"])
                .env(ROLE, role)
                .env("MLX_RANK", rank.to_string())
                .env("MLX_HOSTFILE", &hostfile)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    (dir, children)
}

/// Waits for `child` at most `limit`; its exit status and output.
fn wait(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&output.stdout).to_string()
                + &String::from_utf8_lossy(&output.stderr);
            return (status.code(), text);
        }
        if started.elapsed() > limit {
            child.kill().ok();
            let output = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&output.stderr).to_string();
            return (None, format!("timed out after {limit:?}\n{text}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each rank's part of [`collectives_agree_on_both_ranks`].
fn collectives_rank() {
    let group = Group::init(Backend::Any).unwrap();
    assert_eq!(group.size(), 2);
    assert_eq!(group.backend(), Some(Backend::Ring));
    let rank = group.rank();
    let mine = Array::from_slice(&[rank as f32 + 1.0, 10.0 * (rank as f32 + 1.0)], &[2]);
    let sum = group.all_sum(&mine).unwrap();
    let max = group.all_max(&mine).unwrap();
    let gathered = group.all_gather(&mine).unwrap();
    group::eval(&[&sum, &max, &gathered]).unwrap();
    assert_eq!(sum.as_slice::<f32>(), &[3.0, 30.0]);
    assert_eq!(max.as_slice::<f32>(), &[2.0, 20.0]);
    assert_eq!(gathered.as_slice::<f32>(), &[1.0, 10.0, 2.0, 20.0]);
    // Point to point: rank 0 sends, rank 1 receives.
    if rank == 0 {
        let sent = group
            .send(&Array::from_slice(&[7i32, 8, 9], &[3]), 1)
            .unwrap();
        group::eval(&[&sent]).unwrap();
    } else {
        let got = group.recv(&[3], Dtype::Int32, 0).unwrap();
        group::eval(&[&got]).unwrap();
        assert_eq!(got.as_slice::<i32>(), &[7, 8, 9]);
    }
    // Many arrays of two dtypes in small buckets: every one summed.
    let arrays: Vec<Array> = (0..5)
        .map(|i| {
            let a = Array::from_slice(&[(rank * 10 + i) as f32; 6], &[2, 3]);
            if i % 2 == 0 {
                a
            } else {
                a.as_dtype(Dtype::Bfloat16).unwrap()
            }
        })
        .collect();
    let (sums, stats) = fused::all_sum(&group, &arrays, 48).unwrap();
    assert_eq!(stats.collectives, 3, "{stats:?}"); // f32: [0, 2], [4]; bf16: [1, 3]
    for (i, s) in sums.iter().enumerate() {
        assert_eq!(s.shape(), &[2, 3]);
        assert_eq!(s.dtype(), arrays[i].dtype());
        let values = s.as_dtype(Dtype::Float32).unwrap();
        group::eval(&[&values]).unwrap();
        assert!(values
            .as_slice::<f32>()
            .iter()
            .all(|&v| v == (2 * i + 10) as f32));
    }
    println!("rank {rank} ok");
}

#[test]
fn collectives_agree_on_both_ranks() {
    if std::env::var(ROLE).as_deref() == Ok("collectives") {
        return collectives_rank();
    }
    let (_dir, children) = spawn_ranks("collectives_agree_on_both_ranks", "collectives", 2);
    for (rank, child) in children.into_iter().enumerate() {
        let (code, output) = wait(child, Duration::from_secs(60));
        assert_eq!(code, Some(0), "rank {rank}:\n{output}");
        assert!(output.contains(&format!("rank {rank} ok")), "{output}");
    }
}

/// Rank 1 leaves right after joining; rank 0's all-sum must fail.
fn dying_peer_rank() {
    let group = Group::init(Backend::Any).unwrap();
    if group.rank() == 1 {
        std::process::exit(3);
    }
    std::thread::sleep(Duration::from_millis(300));
    let sum = group
        .all_sum(&Array::from_slice(&[1f32; 1024], &[1024]))
        .unwrap();
    match group::eval(&[&sum]) {
        Ok(()) => println!("survivor: no error"),
        Err(error) => println!("survivor: {error}"),
    }
}

#[test]
fn a_dead_peer_does_not_hang_the_survivor() {
    if std::env::var(ROLE).as_deref() == Ok("dying") {
        return dying_peer_rank();
    }
    let (_dir, children) = spawn_ranks("a_dead_peer_does_not_hang_the_survivor", "dying", 2);
    let mut children = children.into_iter();
    let survivor = children.next().unwrap();
    let (code, _) = wait(children.next().unwrap(), Duration::from_secs(30));
    assert_eq!(code, Some(3));
    let started = Instant::now();
    let (code, output) = wait(survivor, Duration::from_secs(30));
    assert!(code.is_some(), "the survivor hung:\n{output}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        output.contains("survivor: evaluating a collective") && output.contains("peer was lost"),
        "the survivor saw no error:\n{output}"
    );
}
