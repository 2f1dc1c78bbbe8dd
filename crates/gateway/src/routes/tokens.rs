//! `POST /v1/tokens`: publishers mint subscriber tokens for their users.

use actix_web::{HttpRequest, HttpResponse, web};
use herald_hub::UserId;
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::AppState;
use crate::body::read_json;
use crate::error::ApiError;

/// A token's lifetime when the request names none.
pub const DEFAULT_TTL_SECS: u64 = 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintRequest {
    user: String,
    ttl_secs: Option<u64>,
}

pub async fn mint(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.check_publisher(&req)?;
    let body: MintRequest = read_json(&req, payload, state.max_payload_bytes).await?;
    let user = UserId::parse(&body.user)?;
    let ttl = body.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=state.max_token_ttl_secs).contains(&ttl) {
        return Err(ApiError::InvalidField {
            field: "ttl_secs",
            reason: format!("must be 1 to {}", state.max_token_ttl_secs),
        });
    }
    let minted = state.auth.mint(&user, ttl)?;
    Ok(HttpResponse::Ok()
        .json(json!({"token": minted.token, "expires_at": rfc3339(minted.expires_at)})))
}

pub fn rfc3339(unix_secs: u64) -> String {
    OffsetDateTime::from_unix_timestamp(unix_secs as i64)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}
