//! The browser client (`/herald.js`, `/herald.d.ts`) and the demo page (`/`, `/demo`), built into the binary.

use actix_web::http::header::{self, CacheControl, CacheDirective};
use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;

/// Kept in `clients/js/` where a front-end developer finds them; no build step.
const HERALD_JS: &str = include_str!("../../../../clients/js/herald.js");
const HERALD_D_TS: &str = include_str!("../../../../clients/js/herald.d.ts");
const DEMO_HTML: &str = include_str!("../../../../clients/js/demo.html");

pub async fn herald_js() -> HttpResponse {
    asset("application/javascript; charset=utf-8", HERALD_JS)
}

pub async fn herald_d_ts() -> HttpResponse {
    asset("application/typescript; charset=utf-8", HERALD_D_TS)
}

pub async fn demo() -> HttpResponse {
    asset("text/html; charset=utf-8", DEMO_HTML)
}

/// What the demo page may offer: sending test notifications needs no key only in insecure mode.
pub async fn demo_config(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"insecure": state.auth.is_insecure()}))
}

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        // Revalidate every time: a new Herald must not run next to an old cached client.
        .insert_header(CacheControl(vec![CacheDirective::NoCache]))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        // Module scripts load in CORS mode: let any app's page import the client.
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .body(body)
}
