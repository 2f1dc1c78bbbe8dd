//! Reading state: a user's stored history and presence.

use actix_web::{HttpRequest, HttpResponse, web};
use herald_hub::Seq;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::{AppState, path_user};
use crate::error::ApiError;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    since: Seq,
    limit: Option<usize>,
}

/// `GET /v1/users/{user}/notifications?since=&limit=`: oldest first.
pub async fn history(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.check_publisher(&req)?;
    let user = path_user(&req)?;
    let query = web::Query::<HistoryQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::InvalidQuery(e.to_string()))?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::InvalidQuery(format!(
            "limit must be 1 to {MAX_LIMIT}"
        )));
    }
    let history = state.hub.history(&user, query.since, limit).await?;
    let frames: Vec<Box<RawValue>> = history
        .notifications
        .into_iter()
        .filter_map(|n| RawValue::from_string(n.frame.to_string()).ok())
        .collect();
    Ok(HttpResponse::Ok()
        .json(json!({"user": user, "last_seq": history.last_seq, "notifications": frames})))
}

/// `GET /v1/users/{user}/presence`.
pub async fn presence(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.check_publisher(&req)?;
    let user = path_user(&req)?;
    let sessions = state.hub.presence(&user).await?;
    Ok(
        HttpResponse::Ok()
            .json(json!({"user": user, "online": sessions > 0, "sessions": sessions})),
    )
}
