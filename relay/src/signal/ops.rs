//! The operations listener (`[ops]`): `GET /metrics`, `/healthz` and `/readyz` over plain
//! HTTP on an address of their own (loopback by default).
//!
//! The metrics count masked agents and supervisors (`relay_participants_active{role}`),
//! which the customer must never learn, so they are not served on the public port at
//! all; with `ops.token_file` set, `/metrics` also needs `Authorization: Bearer <token>`
//! (required when the listener is not on loopback). The health endpoints answer on both
//! listeners, without a token, for load balancers and orchestrators.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use super::AppState;
use super::http::{bearer, readyz};

/// What the operations routes need.
#[derive(Clone)]
struct Ops {
    state: AppState,
    /// SHA-256 of the bearer token `/metrics` requires, if any (compared as digests, so
    /// the comparison's time says nothing about the token).
    token: Option<Arc<[u8; 32]>>,
}

/// The routes of the operations listener; `token`: what `/metrics` requires, if anything.
pub fn router(state: AppState, token: Option<&str>) -> Router {
    let token = token.map(|t| Arc::new(Sha256::digest(t.as_bytes()).into()));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(ops): State<Ops>| async move { readyz(State(ops.state)).await }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "the operations listener serves /metrics, /healthz and /readyz\n",
            )
        })
        .with_state(Ops { state, token })
}

async fn metrics(State(ops): State<Ops>, headers: HeaderMap) -> Response {
    if let Some(want) = &ops.token {
        let given = bearer(&headers).map(|t| <[u8; 32]>::from(Sha256::digest(t.as_bytes())));
        if given.as_ref() != Some(&**want) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "/metrics needs `Authorization: Bearer <the token of ops.token_file>`\n",
            )
                .into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.state.metrics.encode(),
    )
        .into_response()
}
