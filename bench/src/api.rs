//! The relay's HTTP API as the bench (and the end-to-end harness) drives it: agent
//! tokens, sessions, invitations, joins and the metrics endpoint.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_codec::wire::{
    CreateSessionRequest, CreateSessionResponse, ErrorBody, InviteRequest, InviteResponse,
    InviteTarget, JoinRequest, KeyChallenge, ParticipantCredentials, Permission, Visibility,
};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Timeout of every request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// JWT claims the relay expects from the account backend.
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    /// Account id.
    pub sub: String,
    /// Display name.
    pub name: String,
    /// Portals the agent belongs to.
    pub portals: Vec<String>,
    /// Extra rights (`["monitor"]`), absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grants: Option<Vec<String>>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

impl Claims {
    /// Claims for `agent` valid for an hour.
    pub fn new(agent: &str, name: &str, portals: &[&str], monitor: bool) -> Self {
        Claims {
            sub: agent.to_owned(),
            name: name.to_owned(),
            portals: portals.iter().map(|p| (*p).to_owned()).collect(),
            grants: monitor.then(|| vec!["monitor".to_owned()]),
            exp: unix_now() + 3600,
        }
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs `claims` with HS256 and `secret` (the bytes of the configured secret string).
pub fn mint_token(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing of plain claims cannot fail")
}

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request did not get a response.
    #[error("{request}: {source}")]
    Transport {
        /// What was asked, e.g. `POST /v1/sessions`.
        request: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The relay answered with an unexpected status.
    #[error("{request}: HTTP {status}: {body}")]
    Status {
        /// What was asked.
        request: String,
        /// The status received.
        status: StatusCode,
        /// The start of the response body (the relay's `{"error":{...}}`).
        body: String,
    },
    /// The response body is not what the protocol documents.
    #[error("{request}: unexpected response body: {message}")]
    Body {
        /// What was asked.
        request: String,
        /// What is wrong with it.
        message: String,
    },
    /// The HTTP client could not be built (e.g. a bad certificate).
    #[error("HTTP client: {0}")]
    Client(String),
}

/// Where a relay's operations listener (`/metrics`) is unless told otherwise: the
/// relay's default `ops.listen`, on this machine.
pub const DEFAULT_OPS_URL: &str = "http://127.0.0.1:9464";

/// A relay's HTTP API, with the HS256 secret to mint agent tokens for it.
#[derive(Clone)]
pub struct RelayApi {
    base: String,
    /// The operations listener's base URL (`/metrics`), and the bearer token it needs.
    ops: String,
    ops_token: Option<String>,
    secret: Vec<u8>,
    client: reqwest::Client,
}

impl std::fmt::Debug for RelayApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayApi")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl RelayApi {
    /// The API at `base` (`https://host:port`), trusting the PEM certificates in
    /// `trusted_pem` (none: the system roots are not used either, so HTTPS needs one),
    /// or any certificate when `insecure`.
    pub fn new(
        base: &str,
        secret: &[u8],
        trusted_pem: Option<&[u8]>,
        insecure: bool,
    ) -> Result<Self, ApiError> {
        let mut builder = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .danger_accept_invalid_certs(insecure);
        if let Some(pem) = trusted_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| ApiError::Client(format!("relay certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder
            .build()
            .map_err(|e| ApiError::Client(e.to_string()))?;
        Ok(RelayApi {
            base: base.trim_end_matches('/').to_owned(),
            ops: DEFAULT_OPS_URL.to_owned(),
            ops_token: None,
            secret: secret.to_vec(),
            client,
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Scrapes `/metrics` at the operations listener `ops` (`http://host:port`; default
    /// [`DEFAULT_OPS_URL`]) instead, sending `token` as a bearer token if given.
    pub fn with_ops(mut self, ops: &str, token: Option<String>) -> Self {
        self.ops = ops.trim_end_matches('/').to_owned();
        self.ops_token = token;
        self
    }

    /// A token for `agent` in `portals`, valid for an hour.
    pub fn token(&self, agent: &str, name: &str, portals: &[&str]) -> String {
        mint_token(&self.secret, &Claims::new(agent, name, portals, false))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ApiError> {
        let request = format!("{method} {path}");
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|source| ApiError::Transport {
            request: request.clone(),
            source,
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| ApiError::Transport {
            request: request.clone(),
            source,
        })?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            return Err(ApiError::Status {
                request,
                status,
                body,
            });
        }
        // An empty answer (204) reads as JSON `null`: `()` for calls that expect none.
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| ApiError::Body {
            request,
            message: e.to_string(),
        })
    }

    /// `DELETE /v1/sessions/{sid}`: the host ends its session.
    pub async fn end_session(&self, host_token: &str, sid: &str) -> Result<(), ApiError> {
        let path = format!("/v1/sessions/{sid}");
        self.call(Method::DELETE, &path, Some(host_token), None::<&()>)
            .await
    }

    /// `POST /v1/sessions`: `token`'s agent opens a session in `portal`.
    pub async fn create_session(
        &self,
        token: &str,
        portal: &str,
    ) -> Result<CreateSessionResponse, ApiError> {
        let req = CreateSessionRequest {
            portal: portal.to_owned(),
            visibility: Visibility::Visible,
        };
        self.call(Method::POST, "/v1/sessions", Some(token), Some(&req))
            .await
    }

    /// `POST /v1/sessions/{sid}/invitations` for one agent.
    pub async fn invite_agent(
        &self,
        host_token: &str,
        sid: &str,
        agent: &str,
        visibility: Visibility,
        permission: Permission,
    ) -> Result<InviteResponse, ApiError> {
        let req = InviteRequest {
            target: InviteTarget::Agent(agent.to_owned()),
            visibility,
            permission,
            comment: None,
        };
        let path = format!("/v1/sessions/{sid}/invitations");
        self.call(Method::POST, &path, Some(host_token), Some(&req))
            .await
    }

    /// `POST /v1/invitations/{iid}/accept`.
    pub async fn accept(&self, token: &str, iid: &str) -> Result<ParticipantCredentials, ApiError> {
        let path = format!("/v1/invitations/{iid}/accept");
        self.call(Method::POST, &path, Some(token), None::<&()>)
            .await
    }

    /// `POST /v1/join`: a customer joins with a support key. Answered
    /// `challenge_required` (the relay's key budget is spent), it solves the challenge
    /// and repeats the join once, as the customer portal does.
    pub async fn join(&self, name: &str, key: &str) -> Result<ParticipantCredentials, ApiError> {
        let mut req = JoinRequest {
            name: name.to_owned(),
            support_key: Some(key.to_owned()),
            support_link: None,
            proof: None,
        };
        let first = self.call(Method::POST, "/v1/join", None, Some(&req)).await;
        let challenge = match &first {
            Err(ApiError::Status { body, .. }) => challenge_of(body),
            _ => None,
        };
        let Some(c) = challenge else {
            return first;
        };
        req.proof = Some(c.solve());
        self.call(Method::POST, "/v1/join", None, Some(&req)).await
    }

    /// `GET /metrics` of the operations listener: the Prometheus text (see
    /// [`crate::prom::metric_value`]).
    pub async fn metrics(&self) -> Result<String, ApiError> {
        let request = format!("GET {}/metrics", self.ops);
        let mut get = self.client.get(format!("{}/metrics", self.ops));
        if let Some(token) = &self.ops_token {
            get = get.bearer_auth(token);
        }
        let resp = get.send().await.map_err(|source| ApiError::Transport {
            request: request.clone(),
            source,
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|source| ApiError::Transport {
            request: request.clone(),
            source,
        })?;
        if !status.is_success() {
            return Err(ApiError::Status {
                request,
                status,
                body: text.chars().take(300).collect(),
            });
        }
        Ok(text)
    }
}

/// The challenge of a `challenge_required` error body, if that is what `body` is.
fn challenge_of(body: &str) -> Option<KeyChallenge> {
    serde_json::from_str::<ErrorBody>(body)
        .ok()?
        .error
        .challenge
}
