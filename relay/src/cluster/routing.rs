//! The routing middleware: before a request reaches its handler, send it to the node
//! that holds what it is about.
//!
//! - `POST /v1/sessions`: placed by [`place`](super::placement::place); a node that
//!   should not take it answers `307` to the chosen node (with `?redirected=1`).
//! - `POST /v1/join`: the key or link in the body is looked up (after the support-key
//!   throttle allowed the attempt, so the directory is no way around it).
//! - `/v1/sessions/{id}/…` for a session this node does not hold, and
//!   `POST /v1/invitations/{id}/accept|decline`: looked up by id. A session WebSocket is
//!   upgraded and told `redirect` (browsers cannot follow an HTTP redirect there).
//! - `GET /s/{link}`: the support-URL page redirects the browser to the owning node.
//!
//! HTTP redirects are `307 Temporary Redirect` (method and body are kept) with
//! `Location` and the JSON error body `{"error":{"code":"redirect","location":…}}`.
//! A request with the header `Relay-Redirect: manual` gets the same as `421 Misdirected
//! Request` instead: browsers follow a `307` by themselves, cross-origin, where the
//! other node's answer is unreadable to the page, so the pages ask for the answer.
//! A session whose node died is answered `410 session_lost` (`4410` on a WebSocket).
//! Anything the directory does not know is answered here as on a lone node.

use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use relay_codec::wire::{ErrorBody, ErrorCode, ErrorDetail, JoinRequest, ServerMsg};

use super::directory::Claim;
use super::placement::{
    Placement, Route, Target, classify, location, was_redirected, with_redirected_flag, ws_location,
};
use crate::session::{SecretDigest, SessionId};
use crate::signal::AppState;
use crate::signal::http::ApiError;

/// Close code of a session WebSocket answered with `redirect`.
pub const REDIRECT_CLOSE: u16 = 4307;
/// The request header (value `manual`) that asks for `421` instead of `307`.
pub const MANUAL_HEADER: &str = "relay-redirect";
/// How long the one message and the close frame of a redirected WebSocket may take.
const WS_GRACE: Duration = Duration::from_secs(1);

/// The middleware (installed by [`crate::signal::http::router`]); passes everything
/// through on a lone node.
pub async fn route_elsewhere(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(cluster) = state.cluster.clone() else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let manual = req
        .headers()
        .get(MANUAL_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"manual"));
    let redirect = |to: String| redirect(to, manual);
    let path_and_query = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    match classify(req.method().as_str(), &path) {
        Target::Other => next.run(req).await,
        Target::Create => {
            let local = state
                .actor
                .call(|node, _| node.census().sessions)
                .await
                .unwrap_or(0);
            match cluster.placement(local, was_redirected(query.as_deref())) {
                Placement::Here => next.run(req).await,
                Placement::There(node) => {
                    cluster.count_redirect("create");
                    tracing::info!(to = %node.id, "new session placed on another node");
                    redirect(location(
                        &node.url,
                        &with_redirected_flag(&path, query.as_deref()),
                    ))
                }
            }
        }
        Target::Session { id, ws, invites } => {
            let sid = SessionId::from_wire(id);
            let here = state
                .actor
                .call(move |node, _| node.knows_session(&sid))
                .await
                .unwrap_or(true);
            if here {
                let resp = next.run(req).await;
                if invites && resp.status().is_success() {
                    // Publish the invitation before the host hears of it, so that the
                    // invited agent may accept on any node.
                    cluster.sync_now().await;
                }
                return resp;
            }
            match (cluster.route_session(id).await, ws) {
                (Route::Local, _) => next.run(req).await,
                (Route::Redirect(url), true) => {
                    cluster.count_redirect("websocket");
                    let msg = ServerMsg::Redirect {
                        url: ws_location(&url, &path_and_query),
                    };
                    ws_answer(&state, req, msg, REDIRECT_CLOSE, "redirect").await
                }
                (Route::Redirect(url), false) => {
                    cluster.count_redirect("session");
                    redirect(location(&url, &path_and_query))
                }
                (Route::Lost, true) => {
                    let msg = ServerMsg::Error {
                        code: ErrorCode::SessionLost,
                        message: LOST.to_owned(),
                        reference: None,
                    };
                    ws_answer(&state, req, msg, 4410, "session_lost").await
                }
                (Route::Lost, false) => lost(),
            }
        }
        Target::Invitation(iid) => match cluster.route_claim(Claim::Invitation, iid).await {
            Route::Redirect(url) => {
                cluster.count_redirect("invitation");
                redirect(location(&url, &path_and_query))
            }
            Route::Lost => lost(),
            Route::Local => next.run(req).await,
        },
        Target::Link(token) => {
            let hash = SecretDigest::of(token).to_hex();
            match cluster.route_claim(Claim::Link, &hash).await {
                Route::Redirect(url) => {
                    cluster.count_redirect("link");
                    redirect(location(&url, &path_and_query))
                }
                Route::Lost => lost(),
                Route::Local => next.run(req).await,
            }
        }
        Target::Join => join(state, cluster, req, next, manual).await,
    }
}

/// `POST /v1/join`: reads the body (and puts it back for the handler), looks the key or
/// link up if the throttle allows the attempt.
async fn join(
    state: AppState,
    cluster: std::sync::Arc<super::Cluster>,
    req: Request,
    next: Next,
    manual: bool,
) -> Response {
    let limit = state.config.limits.max_message_bytes;
    let deadline = state.config.limits.body_timeout;
    let (parts, body) = req.into_parts();
    // The same body deadline as the handler's (`limits.body_timeout`): this read comes
    // first, so without it a join whose body never arrives would hold its connection.
    let bytes = match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError::new(
                ErrorCode::MessageTooLarge,
                format!("request body is larger than {limit} bytes"),
            )
            .into_response();
        }
        Err(_) => {
            return crate::signal::http::body_timed_out(&state, deadline);
        }
    };
    let parsed: Option<JoinRequest> = serde_json::from_slice(&bytes).ok();
    let peer = parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let headers = parts.headers.clone();
    let req = Request::from_parts(parts, Body::from(bytes));
    // Whatever is malformed is the handler's to refuse, as on a lone node.
    let claim = match parsed.as_ref().map(|j| (&j.support_key, &j.support_link)) {
        Some((Some(key), None)) => relay_codec::wire::normalize_support_key(key)
            .map(|digits| (Claim::Key, SecretDigest::of(&digits).to_hex())),
        Some((None, Some(link))) => Some((Claim::Link, SecretDigest::of(link).to_hex())),
        _ => None,
    };
    let (Some((claim, hash)), Some(peer)) = (claim, peer) else {
        return next.run(req).await;
    };
    let from = crate::signal::http::client_ip(&state, peer, &headers);
    let proof = parsed.as_ref().and_then(|j| j.proof.clone());
    let allowed = state
        .actor
        .call(move |node, now| match claim {
            Claim::Key => node.key_lookup_allowed(now, from, proof.as_ref()),
            Claim::Link | Claim::Invitation => node
                .link_lookup_allowed(now, from)
                .then_some(crate::session::Proof::None),
        })
        .await
        .unwrap_or(None);
    let Some(proof) = allowed else {
        return next.run(req).await;
    };
    match cluster.route_claim(claim, &hash).await {
        Route::Redirect(url) => {
            cluster.count_redirect("join");
            redirect(location(&url, "/v1/join"), manual)
        }
        Route::Lost => lost(),
        Route::Local => {
            let mut req = req;
            if let crate::session::Proof::Redeemed = proof {
                // The proof is spent here: the handler must not ask for it again.
                req.extensions_mut()
                    .insert(crate::signal::http::ProofRedeemed);
            }
            next.run(req).await
        }
    }
}

const LOST: &str =
    "the node that held this session is gone, and the session with it; start a new session";

fn lost() -> Response {
    ApiError::new(ErrorCode::SessionLost, LOST).into_response()
}

/// `307` to `location` (`421` when the client asked to follow by itself), with the
/// JSON error body that names it too.
fn redirect(location: String, manual: bool) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: ErrorCode::Redirect,
            message: format!(
                "another node of the cluster serves this; repeat the request at {location}"
            ),
            retry_after_s: None,
            location: Some(location.clone()),
            challenge: None,
        },
    };
    let status = if manual {
        StatusCode::MISDIRECTED_REQUEST
    } else {
        StatusCode::TEMPORARY_REDIRECT
    };
    let mut resp = (status, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, value);
    }
    resp
}

/// Upgrades a session WebSocket only to send `msg` and close with `code`; a request
/// that is no upgrade gets the matching HTTP answer instead.
async fn ws_answer(
    state: &AppState,
    req: Request,
    msg: ServerMsg,
    code: u16,
    reason: &'static str,
) -> Response {
    let (mut parts, _) = req.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, state).await {
        Ok(upgrade) => upgrade,
        Err(_) => {
            return match msg {
                ServerMsg::Redirect { url } => redirect(url, false),
                _ => lost(),
            };
        }
    };
    upgrade.on_upgrade(move |mut socket| async move {
        let Ok(text) = serde_json::to_string(&msg) else {
            return;
        };
        let send = async {
            socket.send(Message::Text(text.into())).await?;
            socket
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                })))
                .await
        };
        let _ = tokio::time::timeout(WS_GRACE, send).await;
    })
}
