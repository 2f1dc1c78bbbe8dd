//! Publishing: to one user, to many users, and live broadcast to everyone.

use std::collections::HashSet;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use herald_hub::{Publish, Published, Seq, UserId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use super::{AppState, path_user};
use crate::body::read_json;
use crate::error::ApiError;

/// The most users one `POST /v1/notifications` may name.
pub const MAX_USERS_PER_PUBLISH: usize = 1000;
const MAX_EVENT_BYTES: usize = 128;
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// One user's part of a publish answer. Typed rather than `json!`: this is built for
/// every publish, and a `Value` map allocates per field.
#[derive(Serialize)]
struct UserReceipt<'a> {
    id: &'a str,
    user: &'a UserId,
    seq: Seq,
    delivered: usize,
}

impl<'a> From<&'a Published> for UserReceipt<'a> {
    fn from(p: &'a Published) -> Self {
        Self {
            id: &p.receipt.id,
            user: &p.user,
            seq: p.receipt.seq,
            delivered: p.receipt.delivered,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToUser {
    event: Option<String>,
    data: Box<RawValue>,
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToUsers {
    users: Vec<String>,
    event: Option<String>,
    data: Box<RawValue>,
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToEveryone {
    event: Option<String>,
    data: Box<RawValue>,
}

fn check_event(event: &Option<String>) -> Result<(), ApiError> {
    match event {
        Some(e) if e.len() > MAX_EVENT_BYTES => Err(ApiError::InvalidField {
            field: "event",
            reason: format!("is longer than {MAX_EVENT_BYTES} bytes"),
        }),
        _ => Ok(()),
    }
}

fn check_key(key: &Option<String>) -> Result<(), ApiError> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES => {
            Err(ApiError::InvalidField {
                field: "idempotency_key",
                reason: format!("must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
            })
        }
        _ => Ok(()),
    }
}

/// `POST /v1/users/{user}/notifications`: 202 when new, 200 when the idempotency key was seen.
pub async fn to_user(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.check_publisher(&req)?;
    let user = path_user(&req)?;
    let body: ToUser = read_json(&req, payload, state.max_payload_bytes).await?;
    check_event(&body.event)?;
    check_key(&body.idempotency_key)?;
    let publish = Publish {
        event: body.event,
        data: body.data,
        idempotency_key: body.idempotency_key,
    };
    let published = state.hub.publish(user, publish).await?;
    let status = if published.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(HttpResponse::build(status).json(UserReceipt::from(&published)))
}

/// `POST /v1/notifications`: the same notification to up to 1,000 users, each in its own stream.
pub async fn to_users(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.check_publisher(&req)?;
    let body: ToUsers = read_json(&req, payload, state.max_payload_bytes).await?;
    check_event(&body.event)?;
    check_key(&body.idempotency_key)?;
    if body.users.is_empty() || body.users.len() > MAX_USERS_PER_PUBLISH {
        return Err(ApiError::InvalidField {
            field: "users",
            reason: format!("must list 1 to {MAX_USERS_PER_PUBLISH} users"),
        });
    }
    let mut seen = HashSet::new();
    let mut users = Vec::with_capacity(body.users.len());
    for raw in &body.users {
        let user = UserId::parse(raw).map_err(|e| ApiError::InvalidField {
            field: "users",
            reason: format!("holds `{}`: {e}", raw.escape_debug()),
        })?;
        if seen.insert(user.clone()) {
            users.push(user);
        }
    }
    let publish = Publish {
        event: body.event,
        data: body.data,
        idempotency_key: body.idempotency_key,
    };
    let published = state.hub.publish_many(users, publish).await?;
    let id = published
        .iter()
        .find(|p| !p.duplicate)
        .or(published.first())
        .map(|p| p.receipt.id.clone());
    let results: Vec<_> = published.iter().map(UserReceipt::from).collect();
    Ok(HttpResponse::Accepted().json(json!({"id": id, "results": results})))
}

/// `POST /v1/broadcast`: every connected session, live only.
pub async fn broadcast(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.check_publisher(&req)?;
    let body: ToEveryone = read_json(&req, payload, state.max_payload_bytes).await?;
    check_event(&body.event)?;
    let sent = state.hub.broadcast(body.event, body.data).await?;
    Ok(HttpResponse::Accepted().json(json!({"id": sent.id, "delivered": sent.delivered})))
}
