//! `GET /ws/{user}?token=&since=`: who may subscribe. The upgrade itself is `crate::upgrade`'s.

use actix_web::{HttpRequest, HttpResponse, web};
use herald_hub::{Seq, UserId};
use serde::Deserialize;

use super::AppState;
use crate::error::ApiError;

#[derive(Deserialize)]
struct SubscribeQuery {
    token: Option<String>,
    since: Option<Seq>,
}

/// A subscribe request that passed every check.
pub struct Subscription {
    pub user: UserId,
    pub since: Option<Seq>,
}

/// Checks a subscribe request: the user id (decoded), the query, the token, and that
/// this node still takes sessions. Upgrades and plain GETs answer the same errors.
pub fn check(state: &AppState, user: &str, query: &str) -> Result<Subscription, ApiError> {
    let user = UserId::parse(user)?;
    let query = web::Query::<SubscribeQuery>::from_query(query)
        .map_err(|e| ApiError::InvalidQuery(e.to_string()))?;
    state.auth.check_subscriber(&user, query.token.as_deref())?;
    if state.is_shutting_down() {
        return Err(ApiError::Unavailable(
            "Herald is shutting down; reconnect to another node or retry".into(),
        ));
    }
    Ok(Subscription {
        user,
        since: query.since,
    })
}

/// A GET without the WebSocket upgrade headers (upgrades never reach actix-web's routes):
/// checked like an upgrade, then refused.
pub async fn without_upgrade(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let user = req.match_info().get("user").unwrap_or_default();
    check(&state, user, req.query_string())?;
    Err(ApiError::NotWebSocket)
}
