//! Janus's HTTP API, as much of it as the bench needs: a session (`create`, `attach`,
//! `keepalive`, `destroy`), requests to a plugin handle, and the asynchronous events that
//! answer them, read by long polling `GET /janus/<session>?maxev=N`.
//!
//! A plugin request is answered either at once (`success` with the plugin's data: the
//! VideoRoom's `create`) or with `ack`, the answer following as an `event` with the same
//! transaction on the long poll (`joinandconfigure`, `join`, `start`, with their JSEP).
//! [`JanusSession::message`] registers the transaction before sending, so an event that
//! arrives before the `ack` is not missed. Events with no transaction waiting
//! (`webrtcup`, `media`, `slowlink`, `hangup`) are logged.
//!
//! The Admin API's `handle_info` gives a handle's packet counters
//! ([`handle_packets_sent`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::lock;

/// How long a plugin's asynchronous answer may take.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Events one long poll may return.
const MAX_EVENTS: u32 = 16;
/// How often the session is kept alive (Janus drops it after `session_timeout`, 60 s).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(20);

/// What went wrong talking to Janus.
#[derive(Debug, thiserror::Error)]
pub enum JanusError {
    /// The HTTP request failed or its body is not JSON.
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    /// Janus answered `error`.
    #[error("Janus refused {request}: {code}: {reason}")]
    Refused {
        /// The request.
        request: String,
        /// Janus's error code.
        code: i64,
        /// Its explanation.
        reason: String,
    },
    /// The plugin answered with an error.
    #[error("the VideoRoom refused {request}: {code}: {reason}")]
    Plugin {
        /// The request.
        request: String,
        /// The plugin's `error_code`.
        code: i64,
        /// Its `error`.
        reason: String,
    },
    /// No answer in time.
    #[error("no answer to {0} within {EVENT_TIMEOUT:?}")]
    Timeout(String),
    /// An answer of an unexpected shape.
    #[error("unexpected answer to {request}: {answer}")]
    Unexpected {
        /// The request.
        request: String,
        /// What came back.
        answer: String,
    },
}

/// A plugin's answer: its data and, for offers and answers, the JSEP.
#[derive(Debug, Clone)]
pub struct PluginEvent {
    /// `plugindata.data`.
    pub data: Value,
    /// `jsep`, if any.
    pub jsep: Option<Value>,
}

impl PluginEvent {
    /// The SDP of the JSEP, if it is of type `kind` (`offer`, `answer`).
    pub fn sdp(&self, kind: &str) -> Option<String> {
        let jsep = self.jsep.as_ref()?;
        (jsep["type"] == kind)
            .then(|| jsep["sdp"].as_str().map(str::to_owned))
            .flatten()
    }
}

/// Transactions waiting for their event.
type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// A Janus session: its URL, the long poll and keepalive tasks, and the transactions
/// waiting for an event. Dropping it stops the tasks (Janus ends the session after its
/// timeout); [`JanusSession::destroy`] ends it at once.
pub struct JanusSession {
    http: reqwest::Client,
    url: String,
    waiters: Waiters,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for JanusSession {
    fn drop(&mut self) {
        self.stop_events();
    }
}

fn transaction() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// POSTs `body` (with a fresh transaction) to `url` and returns Janus's answer; an
/// `error` answer is an error.
async fn post(http: &reqwest::Client, url: &str, mut body: Value) -> Result<Value, JanusError> {
    if body.get("transaction").is_none() {
        body["transaction"] = json!(transaction());
    }
    let answer: Value = http.post(url).json(&body).send().await?.json().await?;
    if answer["janus"] == "error" {
        return Err(JanusError::Refused {
            request: request_name(&body),
            code: answer["error"]["code"].as_i64().unwrap_or(0),
            reason: answer["error"]["reason"].as_str().unwrap_or("").to_owned(),
        });
    }
    Ok(answer)
}

/// A request's name for errors: the plugin request, else the Janus verb.
fn request_name(body: &Value) -> String {
    body["body"]["request"]
        .as_str()
        .or(body["janus"].as_str())
        .unwrap_or("?")
        .to_owned()
}

/// `data.id` of a `success` answer (`create`, `attach`).
fn created_id(request: &Value, answer: &Value) -> Result<u64, JanusError> {
    answer["data"]["id"]
        .as_u64()
        .ok_or_else(|| JanusError::Unexpected {
            request: request_name(request),
            answer: answer.to_string(),
        })
}

/// The plugin's data of an answer or event; its `error_code`, if any, is an error.
fn plugin_event(request: &Value, answer: &Value) -> Result<PluginEvent, JanusError> {
    let data = &answer["plugindata"]["data"];
    if !data.is_object() {
        return Err(JanusError::Unexpected {
            request: request_name(request),
            answer: answer.to_string(),
        });
    }
    if let Some(code) = data["error_code"].as_i64() {
        return Err(JanusError::Plugin {
            request: request_name(request),
            code,
            reason: data["error"].as_str().unwrap_or("").to_owned(),
        });
    }
    Ok(PluginEvent {
        data: data.clone(),
        jsep: answer.get("jsep").cloned(),
    })
}

impl JanusSession {
    /// Creates a session on the Janus API at `api_url` (`http://host:port/janus`) and
    /// starts its long poll and keepalives.
    pub async fn create(http: &reqwest::Client, api_url: &str) -> Result<Self, JanusError> {
        let request = json!({"janus": "create"});
        let answer = post(http, api_url, request.clone()).await?;
        let id = created_id(&request, &answer)?;
        let url = format!("{api_url}/{id}");
        let waiters = Waiters::default();
        let tasks = vec![
            tokio::spawn(long_poll(http.clone(), url.clone(), Arc::clone(&waiters))),
            tokio::spawn(keep_alive(http.clone(), url.clone())),
        ];
        Ok(JanusSession {
            http: http.clone(),
            url,
            waiters,
            tasks,
        })
    }

    /// The session's id.
    pub fn id(&self) -> &str {
        self.url.rsplit('/').next().unwrap_or("")
    }

    /// Attaches a handle to `plugin` (`janus.plugin.videoroom`); returns its id.
    pub async fn attach(&self, plugin: &str) -> Result<u64, JanusError> {
        let request = json!({"janus": "attach", "plugin": plugin});
        let answer = post(&self.http, &self.url, request.clone()).await?;
        created_id(&request, &answer)
    }

    /// Sends `body` to the plugin through `handle`, with `jsep` if given, and returns its
    /// answer: at once for a synchronous request, else the event with the same
    /// transaction (within [`EVENT_TIMEOUT`]).
    pub async fn message(
        &self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> Result<PluginEvent, JanusError> {
        let tx = transaction();
        let mut request = json!({"janus": "message", "transaction": tx, "body": body});
        if let Some(jsep) = jsep {
            request["jsep"] = jsep;
        }
        let (event_tx, event_rx) = oneshot::channel();
        lock(&self.waiters).insert(tx.clone(), event_tx);
        let answer = post(
            &self.http,
            &format!("{}/{handle}", self.url),
            request.clone(),
        )
        .await;
        let answer = match answer {
            Ok(answer) if answer["janus"] == "ack" => {
                match tokio::time::timeout(EVENT_TIMEOUT, event_rx).await {
                    Ok(Ok(event)) => event,
                    _ => {
                        lock(&self.waiters).remove(&tx);
                        return Err(JanusError::Timeout(request_name(&request)));
                    }
                }
            }
            other => {
                lock(&self.waiters).remove(&tx);
                other?
            }
        };
        plugin_event(&request, &answer)
    }

    /// Stops reading events and sending keepalives (the session lives on until
    /// [`JanusSession::destroy`] or Janus's timeout).
    pub fn stop_events(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Ends the session (its handles hang up and detach).
    pub async fn destroy(&self) -> Result<(), JanusError> {
        post(&self.http, &self.url, json!({"janus": "destroy"})).await?;
        Ok(())
    }
}

/// Reads the session's events until the session is gone, handing each one whose
/// transaction is awaited to its waiter.
async fn long_poll(http: reqwest::Client, url: String, waiters: Waiters) {
    let poll_url = format!("{url}?maxev={MAX_EVENTS}");
    loop {
        let events = match http.get(&poll_url).send().await {
            Ok(response) => match response.json::<Value>().await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %e, "janus: long poll answer");
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "janus: long poll failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let events = match events {
            Value::Array(events) => events,
            one => vec![one],
        };
        for event in events {
            if event["janus"] == "error" && event["error"]["code"] == 458 {
                // No such session: it was destroyed.
                return;
            }
            let waiter = event["transaction"]
                .as_str()
                .and_then(|tx| lock(&waiters).remove(tx));
            match waiter {
                Some(waiter) => {
                    let _ = waiter.send(event);
                }
                None => match event["janus"].as_str() {
                    Some("keepalive") => {}
                    Some("hangup" | "detached") => {
                        tracing::warn!(%event, "janus: a handle hung up")
                    }
                    _ => tracing::debug!(%event, "janus: event"),
                },
            }
        }
    }
}

/// Sends `keepalive` every [`KEEPALIVE_EVERY`].
async fn keep_alive(http: reqwest::Client, url: String) {
    let mut tick = tokio::time::interval(KEEPALIVE_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = post(&http, &url, json!({"janus": "keepalive"})).await {
            tracing::warn!(error = %e, "janus: keepalive");
        }
    }
}

/// RTP packets Janus has sent on `handle` of `session` so far, from the Admin API's
/// `handle_info`: `webrtc.media.<m>.stats.out.packets`, summed over the handle's media.
pub async fn handle_packets_sent(
    http: &reqwest::Client,
    admin_url: &str,
    admin_secret: &str,
    session: &str,
    handle: u64,
) -> Result<u64, JanusError> {
    let request = json!({"janus": "handle_info", "admin_secret": admin_secret});
    let answer = post(
        http,
        &format!("{admin_url}/{session}/{handle}"),
        request.clone(),
    )
    .await?;
    media_packets_out(&answer["info"]).ok_or_else(|| JanusError::Unexpected {
        request: "handle_info".into(),
        answer: answer.to_string(),
    })
}

/// The sum of `webrtc.media.<m>.stats.out.packets` of a `handle_info`; `None` when the
/// handle has no media.
fn media_packets_out(info: &Value) -> Option<u64> {
    let media = info["webrtc"]["media"].as_object()?;
    media
        .values()
        .map(|m| m["stats"]["out"]["packets"].as_u64())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_packets_sent_on_every_medium_and_nothing_else() {
        // The shape of Janus 1.1's handle_info (trimmed).
        let info = json!({
            "session_id": 1,
            "webrtc": {
                "dtls": {"stats": {"in": {"packets": 2}, "out": {"packets": 2}}},
                "media": {
                    "0": {"type": "video", "stats": {
                        "in": {"bytes": 0, "packets": 7},
                        "out": {"bytes": 77559, "nacks": 0, "packets": 81}}},
                    "1": {"type": "audio", "stats": {"out": {"packets": 5}}}
                }
            }
        });
        assert_eq!(media_packets_out(&info), Some(86));
        assert_eq!(media_packets_out(&json!({"webrtc": {}})), None);
    }

    #[test]
    fn plugin_errors_are_errors() {
        let request = json!({"janus": "message", "body": {"request": "join"}});
        let answer = json!({"janus": "event", "plugindata": {"plugin": "janus.plugin.videoroom",
            "data": {"videoroom": "event", "error_code": 426, "error": "No such room"}}});
        match plugin_event(&request, &answer) {
            Err(JanusError::Plugin { request, code, .. }) => {
                assert_eq!((request.as_str(), code), ("join", 426));
            }
            other => panic!("{other:?}"),
        }
        let ok = json!({"janus": "event", "plugindata": {"data": {"videoroom": "attached"}},
            "jsep": {"type": "offer", "sdp": "v=0\r\n"}});
        let event = plugin_event(&request, &ok).unwrap();
        assert_eq!(event.sdp("offer").as_deref(), Some("v=0\r\n"));
        assert_eq!(event.sdp("answer"), None);
    }
}
