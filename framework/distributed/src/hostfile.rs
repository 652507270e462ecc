//! The two hostfile formats of MLX's distributed layer: the ring backend's
//! (`MLX_HOSTFILE`: for each rank, the `ip:port` addresses it listens on)
//! and the launcher's (`mlx.launch --hostfile`: for each host, how to reach
//! it over ssh and the addresses its peers use).

use crate::error::{DistributedError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The ring backend's hostfile: rank `i` listens on `ranks[i]` (one
/// address per connection; MLX opens as many connections between
/// neighbours as each rank lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RingHostfile {
    /// Each rank's `ip:port` addresses.
    pub ranks: Vec<Vec<String>>,
}

impl RingHostfile {
    /// `size` ranks on the loopback interface, each on a port the system
    /// reports free now.
    pub fn loopback(size: usize) -> std::io::Result<Self> {
        // Hold every socket until all are chosen so no two ranks share a port.
        let sockets: Vec<std::net::TcpListener> = (0..size)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let ranks = sockets
            .iter()
            .map(|s| Ok(vec![s.local_addr()?.to_string()]))
            .collect::<std::io::Result<_>>()?;
        Ok(Self { ranks })
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    /// Reads and checks a hostfile: a JSON list with one non-empty list of
    /// `host:port` strings per rank.
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |problem: String| DistributedError::Hostfile {
            path: path.to_path_buf(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let hosts: RingHostfile = serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "expected a JSON list of each rank's [\"ip:port\", ...] addresses: {e}"
            ))
        })?;
        hosts.check().map_err(bad)?;
        Ok(hosts)
    }

    /// Fails on an empty list, a rank without addresses or an address
    /// that is not `host:port`.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.ranks.is_empty() {
            return Err("it lists no ranks".into());
        }
        for (rank, addresses) in self.ranks.iter().enumerate() {
            if addresses.is_empty() {
                return Err(format!("rank {rank} has no address"));
            }
            for address in addresses {
                let port = address.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
                if !matches!(port, Some(Ok(_))) {
                    return Err(format!("rank {rank}: `{address}` is not host:port"));
                }
            }
        }
        Ok(())
    }

    /// Writes the hostfile through a temporary file renamed into place.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("strings serialize");
        mlx_zoo_core::atomic::write_bytes(path, text.as_bytes()).map_err(|e| {
            DistributedError::Hostfile {
                path: path.to_path_buf(),
                problem: format!("cannot write: {e}"),
            }
        })
    }
}

/// One host of the launcher's hostfile (`mlx.launch --hostfile`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchHost {
    /// How ssh reaches it (`user@host`, an alias of `~/.ssh/config`).
    pub ssh: String,
    /// The addresses its peers reach it at (the ssh name when empty).
    #[serde(default)]
    pub ips: Vec<String>,
}

impl LaunchHost {
    /// The address peers connect to.
    pub fn address(&self) -> &str {
        self.ips.first().map_or_else(
            || self.ssh.rsplit('@').next().unwrap_or(&self.ssh),
            String::as_str,
        )
    }
}

/// Reads the launcher's hostfile: a JSON list of `{"ssh": ..., "ips": [...]}`.
pub fn read_launch_hosts(path: &Path) -> Result<Vec<LaunchHost>> {
    let bad = |problem: String| DistributedError::Hostfile {
        path: path.to_path_buf(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let hosts: Vec<LaunchHost> = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "expected MLX's launcher format, a JSON list of {{\"ssh\": \"host\", \"ips\": [\"ip\"]}}: {e}"
        ))
    })?;
    if hosts.is_empty() {
        return Err(bad("it lists no hosts".into()));
    }
    if let Some(index) = hosts.iter().position(|h| h.ssh.trim().is_empty()) {
        return Err(bad(format!("host {index} has an empty \"ssh\"")));
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_ring_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ring.json");
        let hosts = RingHostfile::loopback(3).unwrap();
        assert_eq!(hosts.size(), 3);
        let mut ports: Vec<&String> = hosts.ranks.iter().flatten().collect();
        ports.dedup();
        assert_eq!(ports.len(), 3);
        hosts.write(&path).unwrap();
        assert_eq!(RingHostfile::read(&path).unwrap(), hosts);
    }

    #[test]
    fn bad_ring_hostfiles_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ring.json");
        for (text, expected) in [
            ("[]", "no ranks"),
            (r#"[["127.0.0.1:1"], []]"#, "rank 1 has no address"),
            (r#"[["127.0.0.1"]]"#, "not host:port"),
            (r#"{"a": 1}"#, "expected a JSON list"),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = RingHostfile::read(&path).unwrap_err().to_string();
            assert!(
                error.contains(expected) && error.contains("ring.json"),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn launcher_hostfiles_read_as_mlx_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts.json");
        std::fs::write(
            &path,
            r#"[{"ssh": "me@mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2"}]"#,
        )
        .unwrap();
        let hosts = read_launch_hosts(&path).unwrap();
        assert_eq!(hosts[0].address(), "10.0.0.1");
        assert_eq!(hosts[1].address(), "mac2");
        std::fs::write(&path, r#"[{"ssh": ""}]"#).unwrap();
        assert!(read_launch_hosts(&path)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }
}
