//! The session directory in Redis: key names, the few Lua scripts that make claims
//! atomic, and one async function per thing the cluster reads or writes. No decisions
//! live here (they are in [`placement`](super::placement)); every call is bounded by
//! [`REDIS_TIMEOUT`].
//!
//! Layout (every record but the node set expires unless refreshed):
//!
//! | key | value | expiry |
//! |---|---|---|
//! | `relay:nodes` | set of node ids | — (dead members are swept) |
//! | `relay:node:{id}` | [`NodeRecord`] JSON | `cluster.ttl` |
//! | `relay:node:{id}:sessions` | JSON list of its [`SessionRecord`]s | [`SNAPSHOT_TTL`] |
//! | `relay:session:{sid}` | [`SessionRecord`] JSON | `cluster.ttl` |
//! | `relay:key:{sha256}` / `relay:link:{sha256}` | session id, or `lost:{sid}` | `cluster.ttl` / [`LOST_TTL`] |
//! | `relay:invitation:{iid}` | session id | `cluster.ttl` |
//! | `relay:lost:{sid}` | id of the node that died | [`LOST_TTL`] |

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisResult, Script};

use super::placement::{Lookup, NodeRecord, SessionRecord};

/// Longest wait for one Redis round trip; past it the caller acts as if Redis were down.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a node's list of sessions outlives its heartbeat, so that the other nodes
/// can still tell which sessions a dead node took with it.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(3600);
/// How long a lost session is remembered, so that its clients get `session_lost`.
pub const LOST_TTL: Duration = Duration::from_secs(3600);

const NODES: &str = "relay:nodes";

fn node_key(id: &str) -> String {
    format!("relay:node:{id}")
}
fn snapshot_key(id: &str) -> String {
    format!("relay:node:{id}:sessions")
}
fn session_key(sid: &str) -> String {
    format!("relay:session:{sid}")
}
fn key_claim(hash: &str) -> String {
    format!("relay:key:{hash}")
}
fn link_claim(hash: &str) -> String {
    format!("relay:link:{hash}")
}
fn invitation_key(iid: &str) -> String {
    format!("relay:invitation:{iid}")
}
fn lost_key(sid: &str) -> String {
    format!("relay:lost:{sid}")
}

/// Claims `KEYS[1]` for `ARGV[1]` for `ARGV[2]` ms, or refreshes our own claim;
/// 1 if it is ours, 0 if someone else holds it.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

/// Deletes `KEYS[1]` if it still holds `ARGV[1]`.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Sets `KEYS[1]` to `ARGV[2]` for `ARGV[3]` ms if it still holds `ARGV[1]` or has
/// expired meanwhile (a dead node's claims expire with its record), but never over
/// another session's claim.
const MARK_LOST: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 0";

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Which claim a credential is looked up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A support key (by the SHA-256 of its 9 digits).
    Key,
    /// A support link (by the SHA-256 of its token).
    Link,
    /// An invitation (by its id).
    Invitation,
}

/// The cluster's view of Redis: a connection manager (it reconnects by itself after
/// Redis restarts) and this node's TTL.
#[derive(Clone)]
pub struct Directory {
    conn: ConnectionManager,
}

impl Directory {
    /// Connects to `url` within [`REDIS_TIMEOUT`].
    pub async fn connect(url: &str) -> RedisResult<Directory> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1);
        let conn = bounded(ConnectionManager::new_with_config(client, config)).await?;
        Ok(Directory { conn })
    }

    /// One heartbeat: writes this node's record and its sessions' records (claiming
    /// their keys and links), and removes the records of sessions that ended since the
    /// last one. Everything is rewritten each time, so a Redis that restarted empty is
    /// whole again after one heartbeat. Returns the sessions whose key or link another
    /// session holds (only possible after Redis lost its data).
    pub async fn publish(
        &self,
        me: &NodeRecord,
        sessions: &[SessionRecord],
        ended: &[SessionRecord],
        ttl: Duration,
    ) -> RedisResult<Vec<String>> {
        let ttl_ms = ms(ttl);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(node_key(&me.id))
            .arg(json(me))
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .sadd(NODES, &me.id)
            .ignore();
        for s in sessions {
            pipe.cmd("SET")
                .arg(session_key(&s.session_id))
                .arg(json(s))
                .arg("PX")
                .arg(ttl_ms)
                .ignore();
            for claim in [key_claim(&s.key), link_claim(&s.link)] {
                pipe.cmd("EVAL")
                    .arg(CLAIM)
                    .arg(1)
                    .arg(claim)
                    .arg(&s.session_id)
                    .arg(ttl_ms);
            }
            for iid in &s.invitations {
                pipe.cmd("SET")
                    .arg(invitation_key(iid))
                    .arg(&s.session_id)
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore();
            }
        }
        pipe.cmd("SET")
            .arg(snapshot_key(&me.id))
            .arg(json(&sessions))
            .arg("PX")
            .arg(ms(SNAPSHOT_TTL.max(ttl * 10)))
            .ignore();
        for s in ended {
            pipe.del(session_key(&s.session_id)).ignore();
            for claim in [key_claim(&s.key), link_claim(&s.link)] {
                pipe.cmd("EVAL")
                    .arg(RELEASE)
                    .arg(1)
                    .arg(claim)
                    .arg(&s.session_id)
                    .ignore();
            }
            for iid in &s.invitations {
                pipe.del(invitation_key(iid)).ignore();
            }
        }
        let mut conn = self.conn.clone();
        let claimed: Vec<i64> = bounded(pipe.query_async(&mut conn)).await?;
        Ok(sessions
            .iter()
            .zip(claimed.chunks(2))
            .filter(|(_, c)| c.contains(&0))
            .map(|(s, _)| s.session_id.clone())
            .collect())
    }

    /// Claims a new support key (by hash) for `sid`; `false` if another session holds it.
    pub async fn claim_key(&self, hash: &str, sid: &str, ttl: Duration) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let got: i64 = bounded(
            Script::new(CLAIM)
                .key(key_claim(hash))
                .arg(sid)
                .arg(ms(ttl))
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(got == 1)
    }

    /// The members of the node set and the records of the live ones.
    pub async fn nodes(&self) -> RedisResult<(Vec<String>, Vec<NodeRecord>)> {
        let mut conn = self.conn.clone();
        let mut members: Vec<String> = bounded(conn.smembers(NODES)).await?;
        members.sort();
        if members.is_empty() {
            return Ok((members, Vec::new()));
        }
        let keys: Vec<String> = members.iter().map(|m| node_key(m)).collect();
        let values: Vec<Option<String>> = bounded(conn.mget(keys)).await?;
        let live = values
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_str(&v).ok())
            .collect();
        Ok((members, live))
    }

    /// One node's record, if it is alive.
    pub async fn node(&self, id: &str) -> RedisResult<Option<NodeRecord>> {
        let mut conn = self.conn.clone();
        let v: Option<String> = bounded(conn.get(node_key(id))).await?;
        Ok(v.and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// The sessions a node last recorded (also after it died, for [`SNAPSHOT_TTL`]).
    pub async fn sessions_of(&self, ids: &[String]) -> RedisResult<Vec<SessionRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let keys: Vec<String> = ids.iter().map(|id| snapshot_key(id)).collect();
        let values: Vec<Option<String>> = bounded(conn.mget(keys)).await?;
        Ok(values
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_str::<Vec<SessionRecord>>(&v).ok())
            .flatten()
            .collect())
    }

    /// Removes a dead node: each of its sessions gets a lost tombstone, its key and link
    /// answer `session_lost`, its records go, and the node leaves the set. Several nodes
    /// may sweep the same dead node at once; every step is idempotent. Returns how many
    /// sessions were lost.
    pub async fn sweep(&self, dead: &str) -> RedisResult<usize> {
        let lost = self.sessions_of(&[dead.to_owned()]).await?;
        let lost_ms = ms(LOST_TTL);
        let mut pipe = redis::pipe();
        for s in &lost {
            let marker = format!("lost:{}", s.session_id);
            pipe.cmd("SET")
                .arg(lost_key(&s.session_id))
                .arg(dead)
                .arg("PX")
                .arg(lost_ms)
                .ignore()
                .del(session_key(&s.session_id))
                .ignore();
            for claim in [key_claim(&s.key), link_claim(&s.link)] {
                pipe.cmd("EVAL")
                    .arg(MARK_LOST)
                    .arg(1)
                    .arg(claim)
                    .arg(&s.session_id)
                    .arg(&marker)
                    .arg(lost_ms)
                    .ignore();
            }
            for iid in &s.invitations {
                pipe.del(invitation_key(iid)).ignore();
            }
        }
        pipe.del(snapshot_key(dead))
            .ignore()
            .srem(NODES, dead)
            .ignore();
        let mut conn = self.conn.clone();
        bounded(pipe.query_async::<()>(&mut conn)).await?;
        Ok(lost.len())
    }

    /// This node leaves the cluster (after its drain): its record and list go at once
    /// rather than after a TTL.
    pub async fn leave(&self, id: &str) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.del(node_key(id))
            .ignore()
            .del(snapshot_key(id))
            .ignore()
            .srem(NODES, id)
            .ignore();
        let mut conn = self.conn.clone();
        bounded(pipe.query_async::<()>(&mut conn)).await
    }

    /// What the directory says of a session id.
    pub async fn session(&self, sid: &str) -> RedisResult<Lookup> {
        let mut conn = self.conn.clone();
        let (record, lost): (Option<String>, Option<String>) = bounded(
            redis::pipe()
                .get(session_key(sid))
                .get(lost_key(sid))
                .query_async(&mut conn),
        )
        .await?;
        Ok(
            match record.and_then(|r| serde_json::from_str::<SessionRecord>(&r).ok()) {
                Some(r) => Lookup::Owner {
                    node: r.node,
                    url: r.url,
                },
                None if lost.is_some() => Lookup::Lost,
                None => Lookup::Unknown,
            },
        )
    }

    /// What the directory says of a key, link or invitation.
    pub async fn resolve(&self, claim: Claim, id: &str) -> RedisResult<Lookup> {
        let key = match claim {
            Claim::Key => key_claim(id),
            Claim::Link => link_claim(id),
            Claim::Invitation => invitation_key(id),
        };
        let mut conn = self.conn.clone();
        let sid: Option<String> = bounded(conn.get(key)).await?;
        match sid {
            None => Ok(Lookup::Unknown),
            Some(v) if v.starts_with("lost:") => Ok(Lookup::Lost),
            Some(sid) => self.session(&sid).await,
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Runs a Redis call within [`REDIS_TIMEOUT`]; a timeout is an IO error like any other.
async fn bounded<T>(call: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
    match tokio::time::timeout(REDIS_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "Redis did not answer in time",
        ))),
    }
}
