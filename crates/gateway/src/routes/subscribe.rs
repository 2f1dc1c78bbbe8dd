//! `GET /ws/{user}?token=&since=`: checks the subscriber, then upgrades and hands the socket to the hub.

use actix_web::{HttpRequest, HttpResponse, web};
use herald_hub::Seq;
use serde::Deserialize;

use super::{AppState, path_user};
use crate::error::ApiError;

#[derive(Deserialize)]
struct SubscribeQuery {
    token: Option<String>,
    since: Option<Seq>,
}

pub async fn upgrade(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let user = path_user(&req)?;
    let query = web::Query::<SubscribeQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::InvalidQuery(e.to_string()))?;
    state.auth.check_subscriber(&user, query.token.as_deref())?;
    if state.is_shutting_down() {
        return Err(ApiError::Unavailable(
            "Herald is shutting down; reconnect to another node or retry".into(),
        ));
    }
    let (response, ws, stream) =
        actix_ws::handle(&req, payload).map_err(|_| ApiError::NotWebSocket)?;
    let cut = crate::socket::cutter(&req);
    let session = state
        .hub
        .open_session(user.clone(), query.since, ws, stream, cut);
    tracing::debug!(user = %user, session = %session, since = ?query.since, "subscribed");
    Ok(response)
}
