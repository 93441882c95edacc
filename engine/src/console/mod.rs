//! The operations console: pages in the browser, served by the `cairn` binary (feature
//! `console`).
//!
//! The command line and SQL suit scripts; the operator who must find the 200 suspended orders
//! among a million instances, see where each stopped and resume them wants a page. The console is
//! that page: server-rendered HTML (maud), a stylesheet and a few lines of script, all in the
//! binary. `cairn console --http ADDR` serves it against `--database`; `cairn host --console
//! ADDR` serves it from a running host ([`serve`]).
//!
//! It reads through [`ConsoleReads`](crate::store::console::ConsoleReads) (each page a few
//! indexed queries) and acts through [`OperatorVerbs`](crate::store::OperatorVerbs), the very
//! verbs of `cairn suspend`, `resume`, `terminate`, `dead-letters` and `outbox`, so an action
//! leaves the same records whichever door it came through. Reading needs nothing; acting needs
//! the console token ([`auth`]).
//!
//! ```no_run
//! # async fn run(store: std::sync::Arc<dyn cairn::store::Store>) -> std::io::Result<()> {
//! use cairn::console::{serve, ConsoleSettings, ConsoleToken};
//! let settings = ConsoleSettings { token: Some(ConsoleToken::new("s3cret")) };
//! let stop = tokio_util::sync::CancellationToken::new();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! serve(listener, store, cairn::Registry::new(), settings, stop).await
//! # }
//! ```

mod actions;
pub mod auth;
pub mod bench;
mod counts;
mod map;
mod pages;
mod view;

pub use auth::ConsoleToken;

use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::html;
use tokio_util::sync::CancellationToken;

use crate::store::console::ConsoleReads;
use crate::store::{Store, StoreError};
use crate::Registry;
use auth::Sessions;
use view::Viewer;

/// How the console is served.
#[derive(Debug, Clone, Default)]
pub struct ConsoleSettings {
    /// The token actions need; without one the console is read-only.
    pub token: Option<ConsoleToken>,
}

/// What every page handler holds.
struct Console {
    store: Arc<dyn Store>,
    registry: Registry,
    sessions: Sessions,
    counts: Arc<counts::CountCache>,
}

type Shared = Arc<Console>;

impl Console {
    fn viewer(&self, headers: &HeaderMap) -> Viewer {
        Viewer {
            csrf: self.sessions.csrf(headers),
            has_token: self.sessions.has_token(),
        }
    }

    /// The store's console queries, or the page that says it has none.
    #[allow(clippy::result_large_err)]
    fn reads(&self) -> Result<&dyn ConsoleReads, Response> {
        self.store.console().ok_or_else(|| {
            (
                StatusCode::NOT_IMPLEMENTED,
                "this store has no console queries",
            )
                .into_response()
        })
    }
}

/// The console's routes over `store`; `registry` gives the maps their declared steps.
pub fn router(store: Arc<dyn Store>, registry: Registry, settings: ConsoleSettings) -> Router {
    let counts = Arc::new(counts::CountCache::default());
    // The overview's first view need not wait for the count of every instance.
    counts.refresh_in_background(store.clone());
    let console = Arc::new(Console {
        store,
        registry,
        sessions: Sessions::new(settings.token),
        counts,
    });
    Router::new()
        .route("/", get(pages::overview))
        .route("/instances", get(pages::instances))
        .route("/instances/{id}", get(pages::instance))
        .route("/suspended", get(pages::suspended))
        .route("/maps", get(pages::maps))
        .route("/maps/{name}/{version}", get(pages::map_page))
        .route("/dead-letters", get(pages::dead_letters))
        .route("/messages", get(pages::messages))
        .route("/held", get(pages::held))
        .route("/hosts", get(pages::hosts))
        .route("/login", get(actions::login_form).post(actions::login))
        .route("/logout", post(actions::logout))
        .route("/actions/instances", post(actions::instances))
        .route("/actions/dead-letters", post(actions::dead_letters))
        .route("/actions/sends", post(actions::sends))
        .route("/console.css", get(|| asset("text/css", view::CSS)))
        .route("/console.js", get(|| asset("text/javascript", view::JS)))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(console)
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Headers on every answer: no framing (clickjacking), no inline script, no sniffing, no cache
/// of pages that show live data.
async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// Serves the console on `listener` until `stop` is cancelled.
///
/// # Errors
/// The listener failed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    registry: Registry,
    settings: ConsoleSettings,
    stop: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            actions = settings.token.is_some(),
            "console: serving http://{addr}/"
        );
    }
    let app = router(store, registry, settings);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// A page saying what went wrong, with its status.
fn problem(viewer: &Viewer, code: StatusCode, title: &str, text: &str) -> Response {
    let body = html! { div.refused { (text) } p { a href="/" { "Overview" } } };
    (code, view::page("", title, viewer, body)).into_response()
}

/// A store error as a page: 503 when worth retrying, else 500.
fn failed(viewer: &Viewer, e: StoreError) -> Response {
    tracing::warn!(error = %e, "console: a page's query failed");
    let code = if e.is_retryable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    problem(
        viewer,
        code,
        "The database answered with an error",
        &format!("{e}. Reload the page; if it persists, check the database and the console's log."),
    )
}

fn bad_request(viewer: &Viewer, text: &str) -> Response {
    problem(viewer, StatusCode::BAD_REQUEST, "Not understood", text)
}

fn not_found(viewer: &Viewer, text: &str) -> Response {
    problem(viewer, StatusCode::NOT_FOUND, "Not found", text)
}
