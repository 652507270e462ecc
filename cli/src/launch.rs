//! `zoo launch`: starts the ranks of a data-parallel run without Python or
//! MPI. `-n N` starts N ranks on this machine over MLX's ring backend on
//! the loopback interface (or NCCL with `--backend nccl`, one GPU per
//! rank); `--hostfile` starts one rank per host of MLX's launcher format
//! over ssh. Each rank gets the environment MLX reads (`MLX_RANK`,
//! `MLX_HOSTFILE`, ...), its output lines are prefixed with its rank, and
//! when one rank fails the others are stopped and the first failure is
//! what `zoo launch` exits with.

use anyhow::{bail, Context, Result};
use mlx_zoo::distributed::hostfile::{read_launch_hosts, LaunchHost, RingHostfile};
use mlx_zoo::distributed::Backend;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Arguments of `zoo launch`.
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// Ranks to start on this machine.
    #[arg(short = 'n', long = "ranks")]
    pub ranks: Option<usize>,
    /// MLX's launcher hostfile (a JSON list of {"ssh": "host", "ips": ["ip"]}):
    /// one rank per host, started over ssh in the same directory with the
    /// same `zoo` path.
    #[arg(long, conflicts_with = "ranks")]
    pub hostfile: Option<PathBuf>,
    /// The backend: ring (TCP, the default) or nccl (NVIDIA GPUs, one per
    /// rank on this machine).
    #[arg(long, default_value = "ring")]
    pub backend: String,
    /// First port of the ring on remote hosts (rank i listens on
    /// port + i); local ranks take free ports.
    #[arg(long, default_value_t = 32323)]
    pub port: u16,
    /// The ssh program for --hostfile (given the host, then the command).
    #[arg(long, default_value = "ssh", env = "ZOO_SSH")]
    pub ssh: String,
    /// Seconds the other ranks get to exit after one failed, before they
    /// are killed.
    #[arg(long, default_value_t = 5)]
    pub grace: u64,
    /// The zoo command each rank runs, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// One started rank.
struct Rank {
    child: Child,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// `zoo launch`: runs the ranks to completion.
pub fn launch(args: &LaunchArgs) -> Result<ExitCode> {
    let backend: Backend = args.backend.parse().context("--backend")?;
    if !matches!(backend, Backend::Ring | Backend::Nccl) {
        bail!("--backend {backend}: zoo launch starts ring or nccl ranks (start MPI runs with mpirun)");
    }
    let exe = std::env::current_exe().context("finding the zoo executable")?;
    let dir = tempfile::Builder::new()
        .prefix("zoo-launch-")
        .tempdir()
        .context("creating the launch folder")?;
    let mut ranks = Vec::new();
    match (&args.hostfile, args.ranks) {
        (Some(path), _) => {
            if backend != Backend::Ring {
                bail!("--hostfile starts ring ranks over ssh; NCCL across hosts is not supported by zoo launch");
            }
            let hosts = read_launch_hosts(path)?;
            let ring = remote_ring(&hosts, args.port);
            let json = serde_json::to_string(&ring).context("writing the ring hostfile")?;
            let cwd = std::env::current_dir().context("reading the current directory")?;
            eprintln!(
                "zoo launch: {} ranks over ring on {}",
                hosts.len(),
                hosts
                    .iter()
                    .map(|h| h.ssh.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for (rank, host) in hosts.iter().enumerate() {
                let script = remote_script(rank, hosts.len(), &json, &cwd, &exe, &args.command);
                let mut command = Command::new(&args.ssh);
                command.arg(&host.ssh).arg(script);
                ranks.push(start(rank, command)?);
            }
        }
        (None, Some(size)) if size >= 1 => {
            eprintln!("zoo launch: {size} ranks over {backend} on this machine");
            let hostfile = dir.path().join("ring.json");
            let nccl_port = match backend {
                Backend::Ring => {
                    RingHostfile::loopback(size)
                        .context("choosing ports on the loopback interface")?
                        .write(&hostfile)?;
                    None
                }
                _ => Some(
                    std::net::TcpListener::bind("127.0.0.1:0")
                        .and_then(|s| s.local_addr())
                        .context("choosing NCCL's port")?
                        .port(),
                ),
            };
            for rank in 0..size {
                let mut command = Command::new(&exe);
                command
                    .args(&args.command)
                    .env("MLX_RANK", rank.to_string())
                    .env("MLX_WORLD_SIZE", size.to_string())
                    .env("ZOO_DISTRIBUTED", backend.name());
                match nccl_port {
                    None => {
                        command.env("MLX_HOSTFILE", &hostfile);
                    }
                    Some(port) => {
                        command
                            .env("NCCL_HOST_IP", "127.0.0.1")
                            .env("NCCL_PORT", port.to_string())
                            .env("CUDA_VISIBLE_DEVICES", rank.to_string());
                        // NVLink multicast (NVLS) off unless asked for: it needs
                        // fabric support that shared and virtualised GPU hosts
                        // often lack, and NCCL then fails at start.
                        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
                            command.env("NCCL_NVLS_ENABLE", "0");
                        }
                    }
                }
                ranks.push(start(rank, command)?);
            }
        }
        _ => bail!("give -n N (ranks on this machine, at least 1) or --hostfile FILE"),
    }
    let pids: Vec<String> = ranks
        .iter()
        .enumerate()
        .map(|(rank, r)| format!("rank {rank} pid {}", r.child.id()))
        .collect();
    eprintln!("zoo launch: {}", pids.join(", "));
    supervise(ranks, Duration::from_secs(args.grace))
}

/// The ring of remote hosts: rank i listens on its first address at
/// `port + i`.
fn remote_ring(hosts: &[LaunchHost], port: u16) -> RingHostfile {
    RingHostfile {
        ranks: hosts
            .iter()
            .enumerate()
            .map(|(i, h)| vec![format!("{}:{}", h.address(), port as usize + i)])
            .collect(),
    }
}

/// Quotes `text` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The shell command a remote rank runs: the ring hostfile written to a
/// temporary file, then zoo in the same directory with MLX's variables.
fn remote_script(
    rank: usize,
    size: usize,
    ring_json: &str,
    cwd: &std::path::Path,
    exe: &std::path::Path,
    command: &[String],
) -> String {
    let args: Vec<String> = command.iter().map(|a| shell_quote(a)).collect();
    format!(
        "f=$(mktemp) && printf %s {json} > \"$f\" && cd {cwd} && \
         MLX_RANK={rank} MLX_WORLD_SIZE={size} MLX_HOSTFILE=\"$f\" ZOO_DISTRIBUTED=ring {exe} {args}; \
         status=$?; rm -f \"$f\"; exit $status",
        json = shell_quote(ring_json),
        cwd = shell_quote(&cwd.to_string_lossy()),
        exe = shell_quote(&exe.to_string_lossy()),
        args = args.join(" "),
    )
}

/// Starts one rank with its output piped through rank-prefixing readers.
fn start(rank: usize, mut command: Command) -> Result<Rank> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting rank {rank} ({:?})", command.get_program()))?;
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(std::thread::spawn(move || {
            forward(rank, out, std::io::stdout())
        }));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(std::thread::spawn(move || {
            forward(rank, err, std::io::stderr())
        }));
    }
    Ok(Rank { child, readers })
}

/// Copies `from` line by line to `to`, each line prefixed `[rank N] `.
fn forward(rank: usize, from: impl std::io::Read, to: impl Write) {
    let mut to = to;
    for line in BufReader::new(from).split(b'\n') {
        let Ok(line) = line else { break };
        let mut out = format!("[rank {rank}] ").into_bytes();
        out.extend_from_slice(&line);
        out.push(b'\n');
        if to.write_all(&out).and_then(|()| to.flush()).is_err() {
            break;
        }
    }
}

/// How long after a first failure other exits still count as part of it:
/// a rank killed by a signal makes its peers fail within milliseconds, and
/// the one killed is the cause to report.
const SETTLE: Duration = Duration::from_millis(500);

/// Waits for every rank. When one fails, failures of the next
/// [`SETTLE`] are gathered, the cause is named (a rank killed by a signal
/// before one that exited with an error, then the earliest), and the others
/// get SIGTERM, then SIGKILL after `grace`; the exit status is the cause's.
fn supervise(mut ranks: Vec<Rank>, grace: Duration) -> Result<ExitCode> {
    let mut statuses: Vec<Option<i32>> = vec![None; ranks.len()];
    let mut failures: Vec<(usize, i32)> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    let mut cause: Option<(usize, i32)> = None;
    let mut stopping_since: Option<Instant> = None;
    while statuses.iter().any(Option::is_none) {
        for (rank, state) in ranks.iter_mut().enumerate() {
            if statuses[rank].is_some() {
                continue;
            }
            if let Some(status) = state.child.try_wait().context("waiting for a rank")? {
                let code = exit_code_of(status);
                statuses[rank] = Some(code);
                if code != 0 && cause.is_none() {
                    failures.push((rank, code));
                    first_failure.get_or_insert_with(Instant::now);
                }
            }
        }
        let settled = first_failure.is_some_and(|t| t.elapsed() >= SETTLE)
            || (first_failure.is_some() && statuses.iter().all(Option::is_some));
        if cause.is_none() && settled {
            let killed = failures.iter().find(|(_, code)| *code > 128);
            let chosen = *killed.unwrap_or(&failures[0]);
            let others: Vec<String> = failures
                .iter()
                .filter(|f| **f != chosen)
                .map(|(rank, code)| format!("rank {rank} then exited with status {code}"))
                .collect();
            eprintln!(
                "zoo launch: rank {} exited with status {}{}; stopping the other ranks{}",
                chosen.0,
                chosen.1,
                if chosen.1 > 128 {
                    format!(" (signal {})", chosen.1 - 128)
                } else {
                    String::new()
                },
                if others.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", others.join(", "))
                }
            );
            cause = Some(chosen);
        }
        if cause.is_some() {
            let since = *stopping_since.get_or_insert_with(|| {
                for (rank, state) in ranks.iter().enumerate() {
                    if statuses[rank].is_none() {
                        signal(&state.child, libc::SIGTERM);
                    }
                }
                Instant::now()
            });
            if since.elapsed() > grace {
                for (rank, state) in ranks.iter_mut().enumerate() {
                    if statuses[rank].is_none() {
                        let _ = state.child.kill();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for rank in ranks {
        for reader in rank.readers {
            let _ = reader.join();
        }
    }
    Ok(match cause {
        Some((_, code)) => ExitCode::from(code.clamp(1, 255) as u8),
        None => ExitCode::SUCCESS,
    })
}

fn exit_code_of(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: signalling a child process we started and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_scripts_quote_everything() {
        let script = remote_script(
            1,
            2,
            r#"[["a:1"],["b:2"]]"#,
            "/work/it's here".as_ref(),
            "/opt/zoo".as_ref(),
            &["finetune".into(), "my model".into()],
        );
        assert!(script.contains(r#"'/work/it'\''s here'"#), "{script}");
        assert!(script.contains("MLX_RANK=1 MLX_WORLD_SIZE=2"), "{script}");
        assert!(script.contains("'finetune' 'my model'"), "{script}");
        assert!(
            script.contains(r#"printf %s '[["a:1"],["b:2"]]'"#),
            "{script}"
        );
    }

    #[test]
    fn remote_rings_count_ports_up_from_the_base() {
        let hosts = vec![
            LaunchHost {
                ssh: "a".into(),
                ips: vec!["10.0.0.1".into()],
            },
            LaunchHost {
                ssh: "u@b".into(),
                ips: vec![],
            },
        ];
        assert_eq!(
            remote_ring(&hosts, 5000).ranks,
            vec![
                vec!["10.0.0.1:5000".to_string()],
                vec!["b:5001".to_string()]
            ]
        );
    }
}
