//! The HTTP surface: which path and method reach which handler, and what unknown ones answer.

mod assets;
mod ops;
mod publish;
mod state;
pub mod subscribe;
mod tokens;

pub use tokens::{DEFAULT_TTL_SECS, rfc3339};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::{HttpRequest, HttpResponse, Resource, web};
use herald_hub::{Hub, UserId};

use crate::auth::Auth;
use crate::error::ApiError;

/// What every handler shares.
pub struct AppState {
    pub hub: Hub,
    pub auth: Auth,
    pub max_payload_bytes: usize,
    pub max_token_ttl_secs: u64,
    /// Set once shutdown begins: new sessions are refused with 503.
    pub shutting_down: Arc<AtomicBool>,
}

impl AppState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// A user id segment may be empty or junk; either is `400 invalid_user_id`, not 404.
const USER: &str = "{user:[^/]*}";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource(format!("/v1/users/{USER}/notifications"), "GET, POST")
            .route(web::post().to(publish::to_user))
            .route(web::get().to(state::history)),
    )
    .service(resource("/v1/notifications", "POST").route(web::post().to(publish::to_users)))
    .service(resource("/v1/broadcast", "POST").route(web::post().to(publish::broadcast)))
    .service(
        resource(format!("/v1/users/{USER}/presence"), "GET").route(web::get().to(state::presence)),
    )
    .service(resource("/v1/tokens", "POST").route(web::post().to(tokens::mint)))
    // WebSocket upgrades never come here: `crate::upgrade` takes them from the dispatcher.
    .service(
        resource(format!("/ws/{USER}"), "GET").route(web::get().to(subscribe::without_upgrade)),
    )
    .service(resource("/healthz", "GET").route(web::get().to(ops::healthz)))
    .service(resource("/metrics", "GET").route(web::get().to(ops::metrics)))
    .service(resource("/herald.js", "GET").route(web::get().to(assets::herald_js)))
    .service(resource("/herald.d.ts", "GET").route(web::get().to(assets::herald_d_ts)))
    .service(resource("/", "GET").route(web::get().to(assets::demo)))
    .service(resource("/demo", "GET").route(web::get().to(assets::demo)))
    .service(resource("/demo/config", "GET").route(web::get().to(assets::demo_config)))
    .default_service(web::to(not_found));
}

/// A path whose other methods answer `405` with an `Allow` header listing `allow`.
fn resource(path: impl Into<String>, allow: &'static str) -> Resource {
    web::resource(path.into()).default_service(web::to(move || async move {
        Err::<HttpResponse, _>(ApiError::MethodNotAllowed { allow })
    }))
}

/// The `{user}` path segment, validated.
fn path_user(req: &HttpRequest) -> Result<UserId, ApiError> {
    Ok(UserId::parse(
        req.match_info().get("user").unwrap_or_default(),
    )?)
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}
