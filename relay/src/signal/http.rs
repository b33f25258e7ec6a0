//! The HTTP API: JSON requests in, JSON answers or JSON errors out (docs/protocol.md).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use relay_codec::wire::{
    CreateSessionRequest, CreateSessionResponse, ErrorBody, ErrorCode, ErrorDetail, InviteRequest,
    InviteResponse, JoinRequest, ParticipantCredentials, SessionList, UpdateParticipantRequest,
};
use serde::de::DeserializeOwned;

use super::AppState;
use super::actor::ActorGone;
use crate::auth::AuthError;
use crate::identity::AgentIdentity;
use crate::session::{
    Credentials, InvitationId, JoinCredential, ParticipantId, Proof, SessionError, SessionId,
};

/// The routes of the node.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/origins", get(origins))
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{sid}", delete(end_session))
        .route("/v1/join", post(join))
        .route("/v1/sessions/{sid}/invitations", post(invite))
        .route(
            "/v1/sessions/{sid}/invitations/{iid}",
            delete(cancel_invitation),
        )
        .route("/v1/invitations", get(list_invitations))
        .route("/v1/invitations/{iid}/accept", post(accept_invitation))
        .route("/v1/invitations/{iid}/decline", post(decline_invitation))
        .route(
            "/v1/sessions/{sid}/participants/{pid}",
            patch(update_participant),
        )
        .route("/v1/monitor/sessions", get(monitor_list))
        .route("/v1/sessions/{sid}/monitor", post(monitor))
        .route("/v1/agent/ws", get(super::ws::console))
        .route("/v1/sessions/{sid}/ws", get(super::ws::session))
        .merge(super::web::routes())
        .fallback(|| async {
            ApiError::new(
                ErrorCode::NotFound,
                "no such endpoint; see docs/protocol.md",
            )
        })
        // In a cluster, requests for what another node holds are redirected there.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::cluster::routing::route_elsewhere,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}

/// An error answer: the status that matches its code and a JSON body.
#[derive(Debug)]
pub struct ApiError {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
    /// For `throttled`: seconds until a retry may succeed.
    pub retry_after_s: Option<u64>,
    /// For `challenge_required`: the puzzle.
    pub challenge: Option<relay_codec::wire::KeyChallenge>,
}

impl ApiError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after_s: None,
            challenge: None,
        }
    }
}

/// The HTTP status of each error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::InvalidField | ErrorCode::UnknownMessageType => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound | ErrorCode::WrongKey => StatusCode::NOT_FOUND,
        ErrorCode::KeyExpired
        | ErrorCode::KeyUsed
        | ErrorCode::InvitationClosed
        | ErrorCode::SessionEnded
        | ErrorCode::SessionLost => StatusCode::GONE,
        ErrorCode::Redirect => StatusCode::TEMPORARY_REDIRECT,
        ErrorCode::Throttled | ErrorCode::ChallengeRequired | ErrorCode::RateLimited => {
            StatusCode::TOO_MANY_REQUESTS
        }
        ErrorCode::SessionFull
        | ErrorCode::AgentSessionLimit
        | ErrorCode::MonitorLimit
        | ErrorCode::AlreadyInSession
        | ErrorCode::Replaced
        | ErrorCode::ShareBusy => StatusCode::CONFLICT,
        ErrorCode::Draining => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(self.code);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                retry_after_s: self.retry_after_s,
                location: None,
                challenge: self.challenge,
            },
        };
        let closes = self.code == ErrorCode::RequestTimeout;
        let mut resp = (status, axum::Json(body)).into_response();
        if closes {
            // The rest of the body is not read: the connection cannot carry on.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let challenge = match &e {
            SessionError::ChallengeRequired(c) => Some(c.clone()),
            _ => None,
        };
        ApiError {
            code: e.code(),
            message: e.to_string(),
            retry_after_s: e
                .retry_after()
                .map(|d| d.as_secs_f64().ceil().max(1.0) as u64),
            challenge,
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let message = match e {
            AuthError::Missing => {
                "an agent token is required: `Authorization: Bearer <jwt>`".into()
            }
            AuthError::Config(_) => "token verification is not configured".into(),
            other => other.to_string(),
        };
        ApiError::new(ErrorCode::Unauthorized, message)
    }
}

impl From<ActorGone> for ApiError {
    fn from(_: ActorGone) -> Self {
        ApiError::new(ErrorCode::Internal, "the node is shutting down")
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// An agent or supervisor authenticated by `Authorization: Bearer <jwt>`.
pub struct Agent(pub AgentIdentity);

impl FromRequestParts<AppState> for Agent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let token = bearer(&parts.headers).ok_or(AuthError::Missing)?;
        Ok(Agent(state.verifier.verify(token)?))
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Reads and parses a JSON body of at most `limits.max_message_bytes`. The content type
/// is not checked, so `curl -d` works as documented. A refusal is counted in
/// `relay_messages_rejected_total{code}`, like a bad WebSocket message.
///
/// The whole body must arrive within `limits.body_timeout` of the handler's start (just
/// after the head); otherwise the answer is `408 request_timeout` with
/// `Connection: close`, the unread rest is not waited for, and the closure is counted in
/// `relay_connections_closed_total{reason="body_timeout"}`.
async fn json<T: DeserializeOwned>(state: &AppState, body: Body) -> ApiResult<T> {
    let limits = &state.config.limits;
    let parsed = parse_json_within(body, limits.max_message_bytes, limits.body_timeout).await;
    if let Err(e) = &parsed {
        count_refusal(state, e.code);
    }
    parsed
}

/// [`parse_json`] with a deadline for the whole body.
pub(crate) async fn parse_json_within<T: DeserializeOwned>(
    body: Body,
    limit: usize,
    deadline: std::time::Duration,
) -> ApiResult<T> {
    match tokio::time::timeout(deadline, parse_json(body, limit)).await {
        Ok(parsed) => parsed,
        Err(_) => Err(body_timeout_error(deadline)),
    }
}

fn body_timeout_error(deadline: std::time::Duration) -> ApiError {
    ApiError::new(
        ErrorCode::RequestTimeout,
        format!(
            "the request body did not arrive within {} (limits.body_timeout)",
            humantime::format_duration(deadline)
        ),
    )
}

/// The answer to a body that did not arrive within `deadline`, for a reader of bodies
/// other than [`json`] (the cluster router's join), counted as [`json`] counts it.
pub(crate) fn body_timed_out(state: &AppState, deadline: std::time::Duration) -> Response {
    count_refusal(state, ErrorCode::RequestTimeout);
    body_timeout_error(deadline).into_response()
}

/// Counts a refused request body (and a body deadline's closure).
fn count_refusal(state: &AppState, code: ErrorCode) {
    state
        .metrics
        .messages_rejected_total
        .with_label_values(&[code.as_str()])
        .inc();
    if code == ErrorCode::RequestTimeout {
        super::listener::CloseReason::BodyTimeout.count(&state.metrics);
    }
}

async fn parse_json<T: DeserializeOwned>(body: Body, limit: usize) -> ApiResult<T> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            ErrorCode::MessageTooLarge,
            format!("request body is larger than {limit} bytes"),
        )
    })?;
    if bytes.is_empty() {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "a JSON body is required",
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("invalid JSON body: {e}")))
}

/// The customer's address: the peer, or the last `X-Forwarded-For` hop when the
/// node sits behind a trusted proxy.
pub(crate) fn client_ip(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    if state.config.limits.trust_forwarded_for {
        // The rightmost hop is the one our proxy added; anything left of it is what
        // the client claimed and cannot be trusted.
        let last_hop = headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|s| s.trim().parse::<IpAddr>().ok());
        if let Some(ip) = last_hop {
            return ip;
        }
    }
    peer.ip()
}

/// `ws://` or `wss://` form of the base URL.
fn ws_base(state: &AppState) -> String {
    let base = &*state.base_url;
    if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_owned()
    }
}

fn credentials(state: &AppState, c: &Credentials) -> ParticipantCredentials {
    ParticipantCredentials {
        session_id: c.session_id.as_str().to_owned(),
        participant_id: c.participant_id.as_str().to_owned(),
        participant_token: c.token.reveal().to_owned(),
        ws_url: format!(
            "{}/v1/sessions/{}/ws?token={}",
            ws_base(state),
            c.session_id,
            c.token.reveal()
        ),
    }
}

async fn count_responses(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    state
        .metrics
        .http_requests_total
        .with_label_values(&[resp.status().as_str()])
        .inc();
    resp
}

/// `GET /readyz`: `200 ready`, or `503 draining` once a drain has started.
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

/// `GET /v1/origins`: the origins the browser pages may treat as the node a person
/// first reached (`home=`): this node's public URL and, in a cluster, every live
/// node's. Unauthenticated; it says only what redirects say anyway.
async fn origins(State(state): State<AppState>) -> Response {
    let mut origins = vec![state.base_url.trim_end_matches('/').to_owned()];
    if let Some(cluster) = &state.cluster {
        for url in cluster.node_urls() {
            if !origins.contains(&url) {
                origins.push(url);
            }
        }
    }
    axum::Json(serde_json::json!({ "origins": origins })).into_response()
}

async fn create_session(
    State(state): State<AppState>,
    Agent(agent): Agent,
    body: Body,
) -> ApiResult<Response> {
    let req: CreateSessionRequest = json(&state, body).await?;
    let (created, expires_at) = state
        .actor
        .call(move |node, now| {
            node.create_session(now, &agent, &req).map(|c| {
                let at = node.clock().rfc3339(c.expires_at);
                (c, at)
            })
        })
        .await??;
    let created = match &state.cluster {
        Some(cluster) => cluster.claim_new_session(&state.actor, created).await,
        None => created,
    };
    let resp = CreateSessionResponse {
        session_id: created.host.session_id.as_str().to_owned(),
        support_key: created.support_key.reveal().to_owned(),
        support_url: format!("{}/s/{}", state.base_url, created.link.reveal()),
        expires_at,
        host: credentials(&state, &created.host),
    };
    tracing::info!(session = %created.host.session_id, "session opened");
    Ok((StatusCode::CREATED, axum::Json(resp)).into_response())
}

async fn end_session(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Path(sid): Path<String>,
) -> ApiResult<StatusCode> {
    let sid = SessionId::from_wire(&sid);
    state
        .actor
        .call(move |node, now| node.end_session(now, &agent, &sid))
        .await??;
    Ok(StatusCode::NO_CONTENT)
}

/// Set by the cluster router on a join whose proof it redeemed before routing it here.
#[derive(Debug, Clone, Copy)]
pub struct ProofRedeemed;

async fn join(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    redeemed: Option<axum::Extension<ProofRedeemed>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let req: JoinRequest = json(&state, body).await?;
    let credential = match (req.support_key, req.support_link) {
        (Some(key), None) => JoinCredential::Key(key),
        (None, Some(link)) => JoinCredential::Link(link),
        _ => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "give exactly one of `support_key` and `support_link`",
            ));
        }
    };
    let from = client_ip(&state, peer, &headers);
    let name = req.name;
    let proof = match (redeemed, req.proof) {
        (Some(_), _) => Proof::Redeemed,
        (None, Some(p)) => Proof::Solution(p),
        (None, None) => Proof::None,
    };
    let creds = state
        .actor
        .call(move |node, now| node.join(now, from, &name, &credential, proof))
        .await??;
    Ok(axum::Json(credentials(&state, &creds)).into_response())
}

async fn invite(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Path(sid): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    let req: InviteRequest = json(&state, body).await?;
    let sid = SessionId::from_wire(&sid);
    let (created, expires_at) = state
        .actor
        .call(move |node, now| {
            node.invite(now, &agent, &sid, &req).map(|c| {
                let at = node.clock().rfc3339(c.expires_at);
                (c, at)
            })
        })
        .await??;
    let resp = InviteResponse {
        invitation_id: created.invitation_id.as_str().to_owned(),
        delivered_to: created.delivered_to,
        expires_at,
    };
    Ok((StatusCode::CREATED, axum::Json(resp)).into_response())
}

async fn cancel_invitation(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Path((sid, iid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let (sid, iid) = (SessionId::from_wire(&sid), InvitationId::from_wire(&iid));
    state
        .actor
        .call(move |node, now| node.cancel_invitation(now, &agent, &sid, &iid))
        .await??;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_invitations(
    State(state): State<AppState>,
    Agent(agent): Agent,
) -> ApiResult<Response> {
    let list = state
        .actor
        .call(move |node, now| node.pending_invitations(now, &agent))
        .await?;
    Ok(axum::Json(serde_json::json!({ "invitations": list })).into_response())
}

async fn accept_invitation(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Path(iid): Path<String>,
) -> ApiResult<Response> {
    let iid = InvitationId::from_wire(&iid);
    let creds = state
        .actor
        .call(move |node, now| node.accept_invitation(now, &agent, &iid))
        .await??;
    Ok(axum::Json(credentials(&state, &creds)).into_response())
}

async fn decline_invitation(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Path(iid): Path<String>,
) -> ApiResult<StatusCode> {
    let iid = InvitationId::from_wire(&iid);
    state
        .actor
        .call(move |node, now| node.decline_invitation(now, &agent, &iid))
        .await??;
    Ok(StatusCode::NO_CONTENT)
}

async fn update_participant(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Path((sid, pid)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Response> {
    let req: UpdateParticipantRequest = json(&state, body).await?;
    let (sid, pid) = (SessionId::from_wire(&sid), ParticipantId::from_wire(&pid));
    let entry = state
        .actor
        .call(move |node, now| node.update_participant(now, &agent, &sid, &pid, &req))
        .await??;
    Ok(axum::Json(entry).into_response())
}

async fn monitor_list(State(state): State<AppState>, Agent(agent): Agent) -> ApiResult<Response> {
    let who = agent.clone();
    let mut sessions = state
        .actor
        .call(move |node, now| node.list_sessions(now, &agent))
        .await??;
    if let Some(cluster) = &state.cluster {
        sessions = cluster.listing(&who, sessions).await;
    }
    Ok(axum::Json(SessionList { sessions }).into_response())
}

async fn monitor(
    State(state): State<AppState>,
    Agent(agent): Agent,
    Path(sid): Path<String>,
) -> ApiResult<Response> {
    let sid = SessionId::from_wire(&sid);
    let creds = state
        .actor
        .call(move |node, now| node.monitor(now, &agent, &sid))
        .await??;
    Ok(axum::Json(credentials(&state, &creds)).into_response())
}
