//! Authentication: publisher API keys, subscriber tokens (401 before the upgrade,
//! 403 for another user's), minting tokens, insecure mode, and secrets never leaking.

use herald_tests::{API_KEY, Herald, JWT_SECRET, SOON, Subscriber, token};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(alg: Algorithm, secret: &str, sub: &str, exp: Option<u64>) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &Claims { sub, exp },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Asserts the contract's error shape and answers its code.
fn error_code(status: u16, body: &Value, want: u16) -> String {
    assert_eq!(status, want, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "error has a message: {body}");
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("error has a code: {body}"))
        .to_owned()
}

/// Nothing a client sees may hold a secret.
fn assert_no_secret(text: &str) {
    assert!(!text.contains(API_KEY), "API key leaked: {text}");
    assert!(!text.contains(JWT_SECRET), "JWT secret leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_needs_a_known_api_key() {
    let herald = Herald::start().await;
    let publisher = herald.publisher();
    let mut alice = herald.subscribe("alice").await;
    let publish = |req: reqwest::RequestBuilder| req.json(&json!({"data": "should not arrive"}));
    let url = publisher.url("/v1/users/alice/notifications");
    let http = reqwest::Client::new();
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("no header", publish(http.post(&url))),
        (
            "unknown key",
            publish(http.post(&url).bearer_auth("not-the-key-0123456789")),
        ),
        (
            "key with a suffix",
            publish(http.post(&url).bearer_auth(format!("{API_KEY}x"))),
        ),
        (
            "key prefix",
            publish(http.post(&url).bearer_auth(&API_KEY[..10])),
        ),
        (
            "empty bearer",
            publish(http.post(&url).header("authorization", "Bearer ")),
        ),
        (
            "no scheme",
            publish(http.post(&url).header("authorization", API_KEY)),
        ),
        (
            "basic",
            publish(http.post(&url).basic_auth("herald", Some(API_KEY))),
        ),
        (
            "not UTF-8",
            publish(
                http.post(&url)
                    .header("authorization", &b"Bearer \xff\xfe"[..]),
            ),
        ),
    ];
    for (what, req) in cases {
        let (status, body) = publisher.send(req).await;
        let code = error_code(status, &body, 401);
        assert_eq!(code, "unauthorized", "{what}: {body}");
        assert_no_secret(&body.to_string());
    }
    // Every /v1/ endpoint is behind the key.
    let anonymous = publisher.with_key(None);
    for (status, body) in [
        anonymous.get("/v1/users/alice/presence").await,
        anonymous.get("/v1/users/alice/notifications").await,
        anonymous.post("/v1/broadcast", &json!({"data": 1})).await,
        anonymous
            .post("/v1/notifications", &json!({"users": ["alice"], "data": 1}))
            .await,
        anonymous
            .post("/v1/tokens", &json!({"user": "alice"}))
            .await,
    ] {
        error_code(status, &body, 401);
    }
    let res = http
        .post(&url)
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(
        res.headers().get("www-authenticate").is_some(),
        "401 names the scheme"
    );
    alice
        .expect_silence(std::time::Duration::from_millis(300))
        .await;

    // The right key works, and nothing refused was stored.
    let seq = publisher.publish_ok("alice", json!("hello")).await;
    assert_eq!(seq, 1, "refused publishes took no seq");
    assert_eq!(alice.notifications(1, SOON).await[0]["data"], "hello");
    // The scheme is case-insensitive (RFC 9110 §11.1), as curl users type it either way.
    let (status, body) = publisher
        .send(
            http.post(&url)
                .header("authorization", format!("bearer {API_KEY}"))
                .json(&json!({"data": "lower"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(alice.notifications(1, SOON).await[0]["data"], "lower");
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_needs_a_valid_token_for_that_user() {
    let herald = Herald::start().await;
    let alice_token = token("alice");
    let expired = sign(Algorithm::HS256, JWT_SECRET, "alice", Some(now() - 120));
    let other_secret = sign(
        Algorithm::HS256,
        "another-secret-0123456789abcdef0123456789",
        "alice",
        Some(now() + 600),
    );
    let no_exp = sign(Algorithm::HS256, JWT_SECRET, "alice", None);
    let wrong_alg = sign(Algorithm::HS512, JWT_SECRET, "alice", Some(now() + 600));
    let alg_none =
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
    let tampered = {
        // Alice's valid signature on a payload naming bob.
        let parts: Vec<&str> = alice_token.split('.').collect();
        let bob_payload = token("bob").split('.').nth(1).unwrap().to_owned();
        format!("{}.{}.{}", parts[0], bob_payload, parts[2])
    };
    let cases: Vec<(&str, Option<&str>, u16)> = vec![
        ("missing", None, 401),
        ("empty", Some(""), 401),
        ("malformed", Some("not-a-jwt"), 401),
        ("three junk parts", Some("a.b.c"), 401),
        ("badly signed", Some(&other_secret), 401),
        ("expired", Some(&expired), 401),
        ("without exp", Some(&no_exp), 401),
        ("HS512", Some(&wrong_alg), 401),
        ("alg none", Some(alg_none), 401),
        ("payload swapped", Some(&tampered), 401),
        ("bob's token", None, 403),
    ];
    let bob_token = token("bob");
    let http = reqwest::Client::new();
    for (what, tok, want) in cases {
        let tok = if what == "bob's token" {
            Some(bob_token.as_str())
        } else {
            tok
        };
        let url = herald.ws_url("alice", tok, None);
        // Refused before the upgrade: a WebSocket client sees the HTTP status ...
        match Subscriber::connect(&url).await {
            Err(status) => assert_eq!(status, want, "{what}"),
            Ok(_) => panic!("{what}: the upgrade was accepted"),
        }
        // ... and the body is the JSON error.
        let res = http
            .get(url.replacen("ws://", "http://", 1))
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        let code = error_code(status, &body, want);
        assert_eq!(
            code,
            if want == 401 {
                "unauthorized"
            } else {
                "forbidden"
            },
            "{what}"
        );
        assert_no_secret(&body.to_string());
    }
    assert_eq!(
        herald.presence("alice").await,
        0,
        "no refused session joined"
    );

    // The real token still works after all that.
    let mut alice = herald.subscribe("alice").await;
    herald.publisher().publish_ok("alice", json!(1)).await;
    assert_eq!(alice.notifications(1, SOON).await[0]["data"], 1);
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_tokens_subscribe_their_user_only() {
    let herald = Herald::start().await;
    let publisher = herald.publisher();
    let before = now();
    let (status, body) = publisher
        .post("/v1/tokens", &json!({"user": "alice", "ttl_secs": 600}))
        .await;
    assert_eq!(status, 200, "{body}");
    let minted = body["token"].as_str().expect("token").to_owned();
    let expires_at = body["expires_at"].as_str().expect("expires_at");
    let expires = time_of(expires_at);
    assert!(
        (before + 600..=now() + 600).contains(&expires),
        "expires_at {expires_at} is now + 600 s"
    );

    let mut alice = Subscriber::connect(&herald.ws_url("alice", Some(&minted), None))
        .await
        .expect("the minted token subscribes alice");
    assert_eq!(alice.hello["user"], "alice");
    assert_eq!(
        Subscriber::connect(&herald.ws_url("bob", Some(&minted), None))
            .await
            .err(),
        Some(403)
    );
    publisher.publish_ok("alice", json!("minted")).await;
    assert_eq!(alice.notifications(1, SOON).await[0]["data"], "minted");

    // Without ttl_secs: the default lifetime.
    let (status, body) = publisher.post("/v1/tokens", &json!({"user": "bob"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(time_of(body["expires_at"].as_str().unwrap()) > now());

    // Bad requests.
    for (req, want) in [
        (json!({"user": "bad user"}), 400),
        (json!({"user": "alice", "ttl_secs": 0}), 400),
        (json!({"user": "alice", "ttl_secs": 100_000_000}), 400),
        (json!({"user": "alice", "ttl_secs": -1}), 422),
        (json!({"ttl_secs": 60}), 422),
        (json!({"user": "alice", "admin": true}), 422),
    ] {
        let (status, body) = publisher.post("/v1/tokens", &req).await;
        error_code(status, &body, want);
        assert_no_secret(&body.to_string());
    }
    herald.shutdown().await.unwrap();
}

/// Seconds since the epoch of an RFC 3339 time, e.g. `2026-11-25T17:00:00Z`.
fn time_of(rfc3339: &str) -> u64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339} is not RFC 3339: {e}"))
        .unix_timestamp() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_mode_checks_nothing() {
    let herald = Herald::start_with(|s| {
        s.auth.insecure = true;
        s.auth.api_keys.clear();
        s.auth.jwt_secret.clear();
    })
    .await;
    let anonymous = herald.publisher().with_key(None);
    let mut no_token = Subscriber::connect(&herald.ws_url("alice", None, None))
        .await
        .expect("no token needed");
    let mut junk_token = Subscriber::connect(&herald.ws_url("alice", Some("junk"), None))
        .await
        .expect("a junk token is not even looked at");
    let mut bobs_token = Subscriber::connect(&herald.ws_url("alice", Some(&token("bob")), None))
        .await
        .expect("another user's token is not looked at");
    let (status, body) = anonymous.publish("alice", json!("open")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["delivered"], 3);
    for sub in [&mut no_token, &mut junk_token, &mut bobs_token] {
        assert_eq!(sub.notifications(1, SOON).await[0]["data"], "open");
    }
    let (status, _) = anonymous.get("/v1/users/alice/presence").await;
    assert_eq!(status, 200);
    let (status, _) = herald
        .publisher()
        .with_key(Some("whatever"))
        .post("/v1/broadcast", &json!({"data": 1}))
        .await;
    assert_eq!(status, 202, "a wrong key is not looked at either");
    // User ids are still validated.
    let (status, _) = anonymous.publish("bad%20user", json!(1)).await;
    assert_eq!(status, 400);
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_secrets_work_and_never_show() {
    // No secrets configured: Herald generates them under the store folder on first start.
    let herald = Herald::start_with(|s| {
        s.auth.api_keys.clear();
        s.auth.jwt_secret.clear();
    })
    .await;
    let dir = &herald.settings.store.path;
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let (api_key, jwt_secret) = (read("api-key"), read("jwt-secret"));
    assert!(api_key.len() >= 32 && jwt_secret.len() >= 32);
    #[cfg(unix)]
    for name in ["api-key", "jwt-secret"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{name} is owner-only");
    }

    let publisher = herald.publisher().with_key(Some(&api_key));
    let (status, body) = publisher
        .post("/v1/tokens", &json!({"user": "alice"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut alice =
        Subscriber::connect(&herald.ws_url("alice", Some(body["token"].as_str().unwrap()), None))
            .await
            .expect("a token minted with the generated secret");
    publisher.publish_ok("alice", json!(1)).await;
    alice.notifications(1, SOON).await;
    // The test constants are not accepted when they are not configured.
    let (status, _) = herald.publisher().publish("alice", json!(1)).await;
    assert_eq!(status, 401);
    assert_eq!(
        Subscriber::connect(&herald.ws_url("alice", Some(&token("alice")), None))
            .await
            .err(),
        Some(401)
    );

    let mut seen = vec![herald.metrics().await];
    for (status, body) in [
        publisher
            .with_key(Some("wrong-key-0123456789"))
            .publish("alice", json!(1))
            .await,
        publisher
            .with_key(None)
            .get("/v1/users/alice/presence")
            .await,
        publisher
            .post("/v1/tokens", &json!({"user": "alice", "ttl_secs": 0}))
            .await,
        publisher.get("/nope").await,
    ] {
        assert!(status >= 400);
        seen.push(body.to_string());
    }
    for text in seen {
        assert!(!text.contains(&api_key), "API key leaked: {text}");
        assert!(!text.contains(&jwt_secret), "JWT secret leaked: {text}");
    }
    herald.shutdown().await.unwrap();
}
