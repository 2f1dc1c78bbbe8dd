//! Every HTTP error Herald answers, and its one mapping to status and JSON body.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpResponse, ResponseError};
use herald_hub::{HubError, InvalidUserId};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("`{field}` {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("invalid user id: {0}")]
    InvalidUserId(#[from] InvalidUserId),
    #[error("invalid query string: {0}")]
    InvalidQuery(String),
    #[error("this endpoint only accepts WebSocket upgrades")]
    NotWebSocket,
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("this token is for another user")]
    Forbidden,
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed here; allowed: {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    #[error("request body has the wrong shape: {0}")]
    WrongShape(String),
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidField { .. } => "invalid_field",
            Self::InvalidUserId(_) => "invalid_user_id",
            Self::InvalidQuery(_) => "invalid_query",
            Self::NotWebSocket => "websocket_required",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::WrongShape(_) => "invalid_shape",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        tracing::warn!(error = %e, "request failed in the hub");
        Self::Unavailable("Herald cannot serve this right now; retry shortly".into())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_)
            | Self::InvalidField { .. }
            | Self::InvalidUserId(_)
            | Self::InvalidQuery(_)
            | Self::NotWebSocket => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::WrongShape(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        match self {
            Self::Unauthorized(_) => {
                res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            Self::MethodNotAllowed { allow } => {
                res.insert_header((header::ALLOW, *allow));
            }
            _ => {}
        }
        res.json(json!({"error": {"code": self.code(), "message": self.to_string()}}))
    }
}
