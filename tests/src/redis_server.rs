//! A throwaway `redis-server` for one test: a free loopback port, a temporary directory,
//! no persistence (a restart starts empty, as a crashed Redis without a disk would); and
//! [`cluster_node`], a relay configured as a node of a test cluster on it. Used by the
//! `cluster` and `browser` targets.
//!
//! [`RedisServer::find`] looks for the binary (`REDIS_SERVER`, else `redis-server` on
//! `$PATH`); when it is missing the tests print a loud SKIPPED line and pass, except
//! under CI (`CI` set), where that is an error.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use redis::aio::MultiplexedConnection;

use crate::RelayBuilder;

/// A node of a test cluster on the Redis at `redis`: plain HTTP on loopback (so that
/// one client trusts every node), the shared token secret `secret`, fast heartbeats and
/// a short TTL, room for one session.
pub fn cluster_node(redis: &str, id: &str, secret: &str) -> RelayBuilder {
    RelayBuilder::new().extra_toml(&format!(
        r#"
        [auth]
        hs256_secret = "{secret}"
        [tls]
        mode = "off"
        [cluster]
        redis = "{redis}"
        node_id = "{id}"
        heartbeat = "200ms"
        ttl = "1s"
        capacity = 1
        load_threshold = 0.8
        "#
    ))
}

/// How long a fresh `redis-server` may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `redis-server`; killed on drop.
pub struct RedisServer {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// The `redis-server` binary, or `None` (after the SKIPPED line) outside CI.
    pub fn find() -> Result<Option<PathBuf>> {
        let found = std::env::var_os("REDIS_SERVER")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("PATH").and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|p| p.join("redis-server"))
                        .find(|p| p.is_file())
                })
            });
        if found.is_none() {
            if std::env::var_os("CI").is_some() {
                bail!("the cluster tests need redis-server, and CI is set: they must run");
            }
            eprintln!(
                "\n==========================================================================\n\
                 SKIPPED: cluster tests (and the browser ones on a cluster):\n\
                 redis-server not found.\n\
                 Install it (apt-get install redis-server) to run these tests; under CI\n\
                 (CI set) they fail instead.\n\
                 ==========================================================================\n"
            );
        }
        Ok(found)
    }

    /// Starts `bin` on a free loopback port and waits until it answers.
    pub async fn start(bin: PathBuf) -> Result<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::Builder::new()
            .prefix("relay-e2e-redis-")
            .tempdir()?;
        let mut server = RedisServer {
            bin,
            port,
            dir,
            child: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))?;
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(mut conn) = self.conn().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}; its log:\n{}",
                    self.port,
                    std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A fresh connection (for the test's own looks into the directory).
    pub async fn conn(&self) -> Result<MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        let conn = tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .context("connecting to redis-server timed out")??;
        Ok(conn)
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        let mut conn = self.conn().await?;
        let n: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await?;
        Ok(n == 1)
    }

    /// The value of `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<String>> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("GET").arg(key).query_async(&mut conn).await?)
    }

    /// Kills the server (its data is gone: there is no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts an empty one on the same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
