//! The browser clients the node serves: the customer portal (`/`, and `/s/{link}` for a
//! support URL), the agent console (`/agent`) and their static assets (`/web/...`).
//!
//! The files live in `relay/web/` and are embedded into the binary at build time
//! (`rust-embed` with `debug-embed`, so debug builds embed them too), so `relay serve`
//! needs nothing beside it. Pages are answered `no-store` with a strict
//! Content-Security-Policy and `Referrer-Policy: no-referrer` (a support URL's token
//! must not leak through a referrer); assets carry an `ETag` and `no-cache`, so a
//! browser revalidates them and an unchanged file costs a `304`.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use relay_codec::wire::ErrorCode;
use rust_embed::RustEmbed;

use super::AppState;
use super::http::ApiError;

/// The files of `relay/web/`.
#[derive(RustEmbed)]
#[folder = "web/"]
struct Assets;

/// What pages allow: their own scripts, styles and images, fetch and WebSockets to this
/// node, media from blobs (received files) and captured streams.
const PAGE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; media-src 'self' blob: mediastream:; \
     connect-src 'self' wss: ws: blob:; object-src 'none'; base-uri 'none'; \
     frame-ancestors 'none'; form-action 'self'";

/// The routes of the browser clients, merged into the API router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { page("index.html") }))
        .route("/s/{link}", get(join_page))
        .route("/agent", get(|| async { page("agent.html") }))
        .route("/web/{*path}", get(asset))
}

/// The page a support URL opens: the portal, which reads the link's token from the
/// address bar (it is never echoed into the HTML) and asks only for the name.
async fn join_page(Path(_link): Path<String>) -> Response {
    page("index.html")
}

/// The content type of a file, by its extension.
fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

fn page(name: &str) -> Response {
    let Some(file) = Assets::get(name) else {
        return not_found();
    };
    (
        [
            (header::CONTENT_TYPE, content_type(name)),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        file.data.into_owned(),
    )
        .into_response()
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    // Pages are served at their own routes only; everything else under `/web/`.
    if path.ends_with(".html") {
        return not_found();
    }
    let Some(file) = Assets::get(&path) else {
        return not_found();
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let etag = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, etag),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, content_type(&path))],
        file.data.into_owned(),
    )
        .into_response()
}

fn not_found() -> Response {
    ApiError::new(ErrorCode::NotFound, "no such page").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_pages_and_their_assets_are_embedded() {
        for page in ["index.html", "agent.html"] {
            let html = Assets::get(page).expect("page embedded");
            let html = std::str::from_utf8(&html.data).expect("UTF-8");
            // Every local script and stylesheet a page names is embedded too.
            for part in html.split("\"/web/").skip(1) {
                let path = part.split('"').next().unwrap_or_default();
                assert!(
                    Assets::get(path).is_some(),
                    "{page} names missing /web/{path}"
                );
            }
        }
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(
            content_type("js/common.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("css/app.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("blob"), "application/octet-stream");
    }
}
