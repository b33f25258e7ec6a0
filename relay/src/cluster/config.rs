//! `[cluster]` in the configuration: the Redis directory this node shares with the
//! other edge nodes, and how it announces itself there. Without `redis` the node runs
//! alone, exactly as it always has.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Longest accepted node id, in bytes.
pub const MAX_NODE_ID: usize = 64;

/// Scale-out settings (`[cluster]`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The shared directory, `redis://[user:password@]host[:port][/db]`; unset: this
    /// node runs alone.
    pub redis: Option<String>,
    /// This node's name in the directory (letters, digits, `.`, `_`, `-`); unset: the
    /// machine's host name. Must differ between the nodes of a cluster.
    pub node_id: Option<String>,
    /// How often the node writes its record and its sessions' records.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How long records live without a heartbeat: a node that stops for this long
    /// counts as dead and its sessions as lost. At least twice `heartbeat`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Sessions this node is sized for (see docs/deployment.md, capacity planning).
    pub capacity: u32,
    /// Above this share of `capacity` (0 < x ≤ 1) new sessions go to the least-loaded
    /// node instead.
    pub load_threshold: f64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis: None,
            node_id: None,
            heartbeat: Duration::from_secs(2),
            ttl: Duration::from_secs(10),
            capacity: 200,
            load_threshold: 0.8,
        }
    }
}

// By hand, so that a Redis password in the URL never reaches a log through `{:?}`.
impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis", &self.redis.as_deref().map(redact_url))
            .field("node_id", &self.node_id)
            .field("heartbeat", &self.heartbeat)
            .field("ttl", &self.ttl)
            .field("capacity", &self.capacity)
            .field("load_threshold", &self.load_threshold)
            .finish()
    }
}

/// `url` with any `user:password@` replaced by `***@`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl ClusterConfig {
    /// Whether the node is part of a cluster.
    pub fn enabled(&self) -> bool {
        self.redis.is_some()
    }

    /// The node id: `node_id`, else the machine's host name.
    pub fn resolved_node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| valid_node_id(h))
                .unwrap_or_else(|| "relay".to_owned())
        })
    }

    /// Checks ranges; `listen_unspecified` and `has_public_url` say whether the node
    /// could tell others a URL to send clients to.
    pub fn validate(
        &self,
        listen_unspecified: bool,
        has_public_url: bool,
    ) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if let Some(url) = &self.redis {
            if !url.starts_with("redis://") {
                return invalid(format!(
                    "cluster.redis must be a redis:// URL (got {:?}; TLS to Redis is not supported, keep Redis on a private network)",
                    redact_url(url)
                ));
            }
            if listen_unspecified && !has_public_url {
                return invalid(
                    "cluster.redis needs public_url when listen is a wildcard address: other nodes send clients to it"
                        .to_owned(),
                );
            }
        }
        if let Some(id) = &self.node_id {
            if !valid_node_id(id) {
                return invalid(format!(
                    "cluster.node_id must be 1 to {MAX_NODE_ID} letters, digits, '.', '_' or '-' (got {id:?})"
                ));
            }
        }
        if self.heartbeat < Duration::from_millis(100) {
            return invalid("cluster.heartbeat must be at least 100ms".to_owned());
        }
        if self.ttl < self.heartbeat * 2 {
            return invalid(format!(
                "cluster.ttl ({}) must be at least twice cluster.heartbeat ({})",
                humantime::format_duration(self.ttl),
                humantime::format_duration(self.heartbeat)
            ));
        }
        if self.capacity == 0 {
            return invalid("cluster.capacity must be at least 1".to_owned());
        }
        if !(self.load_threshold > 0.0 && self.load_threshold <= 1.0) {
            return invalid(format!(
                "cluster.load_threshold must be more than 0 and at most 1 (got {})",
                self.load_threshold
            ));
        }
        Ok(())
    }
}

/// Whether `id` may name a node (it becomes part of Redis key names).
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NODE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(edit: impl FnOnce(&mut ClusterConfig)) -> Result<(), String> {
        let mut c = ClusterConfig {
            redis: Some("redis://127.0.0.1:6379".into()),
            ..ClusterConfig::default()
        };
        edit(&mut c);
        c.validate(false, false).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid_and_alone() {
        let c = ClusterConfig::default();
        assert!(!c.enabled());
        c.validate(true, false).expect("a lone node needs nothing");
        check(|_| {}).expect("redis with defaults");
    }

    #[test]
    fn ranges_are_checked_by_key() {
        let e = check(|c| c.redis = Some("rediss://x".into())).unwrap_err();
        assert!(e.contains("cluster.redis"), "{e}");
        let e = check(|c| c.ttl = c.heartbeat).unwrap_err();
        assert!(e.contains("cluster.ttl"), "{e}");
        let e = check(|c| c.capacity = 0).unwrap_err();
        assert!(e.contains("cluster.capacity"), "{e}");
        for t in [0.0, -1.0, 1.5, f64::NAN] {
            let e = check(|c| c.load_threshold = t).unwrap_err();
            assert!(e.contains("cluster.load_threshold"), "{e}");
        }
        let e = check(|c| c.node_id = Some("a b".into())).unwrap_err();
        assert!(e.contains("cluster.node_id"), "{e}");
        check(|c| c.node_id = Some("edge-fra_1.a".into())).expect("fine id");
    }

    #[test]
    fn a_wildcard_listener_needs_a_public_url() {
        let c = ClusterConfig {
            redis: Some("redis://10.0.0.5".into()),
            ..ClusterConfig::default()
        };
        let e = c.validate(true, false).unwrap_err().to_string();
        assert!(e.contains("public_url"), "{e}");
        c.validate(true, true).expect("with a public URL");
    }

    #[test]
    fn debug_hides_the_redis_password() {
        let c = ClusterConfig {
            redis: Some("redis://relay:s3cret@10.0.0.5:6379/0".into()),
            ..ClusterConfig::default()
        };
        let text = format!("{c:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("redis://***@10.0.0.5:6379/0"), "{text}");
    }
}
