//! Who may publish (API keys) and who may subscribe as whom (HS256 tokens).

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::HttpRequest;
use actix_web::http::header;
use herald_hub::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::secrets::Secrets;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: u64,
}

/// A freshly minted subscriber token.
pub struct Minted {
    pub token: String,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}

#[derive(Clone)]
pub struct Auth {
    secrets: Secrets,
}

impl Auth {
    pub fn new(secrets: Secrets) -> Self {
        Self { secrets }
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self.secrets, Secrets::Insecure)
    }

    /// Checks `Authorization: Bearer <api key>` on publisher endpoints.
    pub fn check_publisher(&self, req: &HttpRequest) -> Result<(), ApiError> {
        let Secrets::Secure { api_keys, .. } = &self.secrets else {
            return Ok(());
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .ok_or(ApiError::Unauthorized(
                "missing Authorization: Bearer <api key>",
            ))?
            .to_str()
            .ok()
            // The scheme is case-insensitive (RFC 9110 §11.1): `bearer <key>` is the same
            // credential, and refusing it would send a correct key back as 401.
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
            .map(|(_, key)| key)
            .ok_or(ApiError::Unauthorized(
                "Authorization must be `Bearer <api key>`",
            ))?;
        // Compare against every key without stopping early, so timing says nothing.
        let known = api_keys.iter().fold(false, |hit, key| {
            hit | constant_time_eq(key.as_bytes(), presented.trim().as_bytes())
        });
        if known {
            Ok(())
        } else {
            Err(ApiError::Unauthorized("unknown api key"))
        }
    }

    /// Checks a subscriber token for `user`: 401 when it is not valid, 403 when it is someone else's.
    pub fn check_subscriber(&self, user: &UserId, token: Option<&str>) -> Result<(), ApiError> {
        let Secrets::Secure { jwt_secret, .. } = &self.secrets else {
            return Ok(());
        };
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized("missing ?token="))?;
        let mut validation = Validation::new(Algorithm::HS256);
        // Tokens are minted by Herald itself; no clock-skew allowance is needed on one host.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_secret(jwt_secret.as_bytes()),
            &validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => ApiError::Unauthorized("token expired"),
            ErrorKind::InvalidSignature => ApiError::Unauthorized("token signature is not valid"),
            _ => ApiError::Unauthorized("token is not valid"),
        })?
        .claims;
        if claims.sub != user.as_str() {
            return Err(ApiError::Forbidden);
        }
        Ok(())
    }

    /// Mints a token for `user` valid for `ttl_secs`.
    pub fn mint(&self, user: &UserId, ttl_secs: u64) -> Result<Minted, ApiError> {
        let Secrets::Secure { jwt_secret, .. } = &self.secrets else {
            return Err(ApiError::Unavailable(
                "auth.insecure is on: there is no secret to sign tokens with".into(),
            ));
        };
        mint(jwt_secret, user, ttl_secs)
    }
}

/// Signs a token with `secret`; also used by `herald token`.
pub fn mint(secret: &str, user: &UserId, ttl_secs: u64) -> Result<Minted, ApiError> {
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        sub: user.as_str().to_owned(),
        exp: iat + ttl_secs,
        iat,
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| ApiError::Unavailable(format!("could not sign a token: {e}")))?;
    Ok(Minted {
        token,
        expires_at: claims.exp,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(Secrets::Secure {
            api_keys: vec!["k".repeat(20)],
            jwt_secret: "s".repeat(32),
        })
    }

    #[test]
    fn tokens_check_user_and_signature() {
        let (alice, bob) = (
            UserId::parse("alice").unwrap(),
            UserId::parse("bob").unwrap(),
        );
        let minted = auth().mint(&alice, 60).unwrap();
        assert!(auth().check_subscriber(&alice, Some(&minted.token)).is_ok());
        assert!(matches!(
            auth().check_subscriber(&bob, Some(&minted.token)),
            Err(ApiError::Forbidden)
        ));
        let other = mint(&"x".repeat(32), &alice, 60).unwrap();
        assert!(matches!(
            auth().check_subscriber(&alice, Some(&other.token)),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            auth().check_subscriber(&alice, None),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            auth().check_subscriber(&alice, Some("a.b.c")),
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let alice = UserId::parse("alice").unwrap();
        let claims = Claims {
            sub: "alice".into(),
            exp: 1,
            iat: 0,
        };
        let token = jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(&[b's'; 32]),
        )
        .unwrap();
        assert!(matches!(
            auth().check_subscriber(&alice, Some(&token)),
            Err(ApiError::Unauthorized("token expired"))
        ));
    }
}
