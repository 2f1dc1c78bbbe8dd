//! Bad input: every malformed request and frame gets the contract's answer, and
//! none of them crashes or stalls the server or affects another user.

use std::time::Duration;

use herald_tests::{
    API_KEY, Herald, RawWebSocket, SOON, Subscriber, client_fragment, client_frame, raw_http, token,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Proves the server still serves someone else normally: a publish to the
/// witness arrives with the next seq.
struct Witness {
    sub: Subscriber,
    seq: u64,
}

impl Witness {
    async fn new(herald: &Herald) -> Self {
        Self {
            sub: herald.subscribe("witness").await,
            seq: 0,
        }
    }

    async fn still_served(&mut self, herald: &Herald, after: &str) {
        self.seq += 1;
        let seq = herald
            .publisher()
            .publish_ok("witness", json!({"after": after}))
            .await;
        assert_eq!(seq, self.seq, "after {after}");
        let got = self.sub.notifications(1, SOON).await;
        assert_eq!(got[0]["seq"], self.seq, "after {after}");
        assert_eq!(got[0]["data"]["after"], after);
    }
}

/// Asserts the contract's JSON error with `status` and `code`.
fn assert_error(what: &str, status: u16, body: &Value, want: u16, code: &str) {
    assert_eq!(status, want, "{what}: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

/// What is wrong, content type, body, expected status and error code.
type BodyCase<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);

/// A raw HTTP/1.1 request with the API key and `Connection: close`.
fn raw_request(method: &str, target: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {API_KEY}\r\n\
         Connection: close\r\n{headers}\r\n"
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// A JSON POST whose body travels in 8 KiB chunks (no Content-Length).
fn chunked_json_post(target: &str, body: &[u8]) -> Vec<u8> {
    let mut chunked = Vec::new();
    for chunk in body.chunks(8192) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let headers = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n";
    raw_request("POST", target, headers, &chunked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_bodies_get_400_413_415_or_422() {
    let herald = Herald::start().await;
    let mut witness = Witness::new(&herald).await;
    let mut alice = herald.subscribe("alice").await;
    let publisher = herald.publisher();
    let path = "/v1/users/alice/notifications";
    let limit = herald.settings.limits.max_payload_bytes;
    let nested = format!("{{\"data\":{}", "[".repeat(limit - 100));
    let long_event = json!({"event": "e".repeat(129), "data": 1}).to_string();
    let huge = json!({"data": "x".repeat(limit)}).to_string();

    let cases: Vec<BodyCase> = vec![
        (
            "truncated JSON",
            Some("application/json"),
            b"{\"data\":".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "unquoted key",
            Some("application/json"),
            b"{data: 1}".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "empty body",
            Some("application/json"),
            Vec::new(),
            400,
            "malformed_json",
        ),
        (
            "trailing junk",
            Some("application/json"),
            b"{\"data\":1} x".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "not UTF-8",
            Some("application/json"),
            b"{\"data\":\"\xff\xfe\"}".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "nested too deep",
            Some("application/json"),
            nested.into_bytes(),
            400,
            "malformed_json",
        ),
        (
            "event of 129 bytes",
            Some("application/json"),
            long_event.into_bytes(),
            400,
            "invalid_field",
        ),
        (
            "event not a string",
            Some("application/json"),
            br#"{"event":5,"data":1}"#.to_vec(),
            422,
            "invalid_shape",
        ),
        (
            "key not a string",
            Some("application/json"),
            br#"{"idempotency_key":[],"data":1}"#.to_vec(),
            422,
            "invalid_shape",
        ),
        (
            "an array",
            Some("application/json"),
            b"[1,2]".to_vec(),
            422,
            "invalid_shape",
        ),
        (
            "a string",
            Some("application/json"),
            b"\"hi\"".to_vec(),
            422,
            "invalid_shape",
        ),
        (
            "null",
            Some("application/json"),
            b"null".to_vec(),
            422,
            "invalid_shape",
        ),
        (
            "no data",
            Some("application/json"),
            br#"{"event":"x"}"#.to_vec(),
            422,
            "invalid_shape",
        ),
        (
            "empty object",
            Some("application/json"),
            b"{}".to_vec(),
            422,
            "invalid_shape",
        ),
        (
            "unknown field",
            Some("application/json"),
            br#"{"data":1,"priority":"high"}"#.to_vec(),
            422,
            "invalid_shape",
        ),
        (
            "over the limit",
            Some("application/json"),
            huge.into_bytes(),
            413,
            "payload_too_large",
        ),
        (
            "no content type",
            None,
            br#"{"data":1}"#.to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "text/plain",
            Some("text/plain"),
            br#"{"data":1}"#.to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "form",
            Some("application/x-www-form-urlencoded"),
            b"data=1".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "json lookalike",
            Some("application/jsonx"),
            br#"{"data":1}"#.to_vec(),
            415,
            "unsupported_media_type",
        ),
    ];
    for (what, content_type, body, want, code) in cases {
        let mut req = publisher.request(reqwest::Method::POST, path).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let (status, answer) = publisher.send(req).await;
        assert_error(what, status, &answer, want, code);
        witness.still_served(&herald, what).await;
    }
    alice.expect_silence(Duration::from_millis(300)).await;

    // The same bad bodies on the other publish endpoints.
    for path in ["/v1/notifications", "/v1/broadcast", "/v1/tokens"] {
        for (body, want) in [
            (&b"{"[..], 400),
            (&b"[]"[..], 422),
            (&b"{\"x\":1}"[..], 422),
        ] {
            let req = publisher
                .request(reqwest::Method::POST, path)
                .header("content-type", "application/json")
                .body(body.to_vec());
            let (status, answer) = publisher.send(req).await;
            assert_eq!(
                status,
                want,
                "{path} {:?}: {answer}",
                String::from_utf8_lossy(body)
            );
        }
        let (status, answer) = publisher
            .send(publisher.request(reqwest::Method::POST, path).body("{}"))
            .await;
        assert_error(path, status, &answer, 415, "unsupported_media_type");
    }

    // What the contract allows: any JSON value as data, a charset, a +json type.
    for (content_type, body) in [
        ("application/json", r#"{"data":null}"#),
        (
            "application/json; charset=utf-8",
            r#"{"data":[1,{"a":"é"}],"event":"x"}"#,
        ),
        ("Application/JSON", r#"{"data":"case"}"#),
        ("application/vnd.herald+json", r#"{"data":0}"#),
    ] {
        let req = publisher
            .request(reqwest::Method::POST, path)
            .header("content-type", content_type)
            .body(body);
        let (status, answer) = publisher.send(req).await;
        assert_eq!(status, 202, "{content_type} {body}: {answer}");
    }
    assert_eq!(alice.notifications(4, SOON).await[3]["data"], 0);
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_with_or_without_content_length() {
    let herald = Herald::start().await;
    let mut witness = Witness::new(&herald).await;
    let limit = herald.settings.limits.max_payload_bytes;
    let body = json!({"data": "x".repeat(limit)}).to_string();
    let path = "/v1/users/alice/notifications";

    // Declared too big: refused from the header alone.
    let res = raw_http(
        herald.addr,
        &raw_request(
            "POST",
            path,
            &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ),
            body.as_bytes(),
        ),
    )
    .await;
    assert_error(
        "content-length",
        res.status,
        &res.json(),
        413,
        "payload_too_large",
    );
    witness.still_served(&herald, "content-length").await;

    // Chunked, so the size is only known while reading.
    let res = raw_http(herald.addr, &chunked_json_post(path, body.as_bytes())).await;
    assert_error("chunked", res.status, &res.json(), 413, "payload_too_large");
    witness.still_served(&herald, "chunked").await;

    // Chunked and within the limit is fine.
    let small = br#"{"data":"chunked ok"}"#;
    let res = raw_http(herald.addr, &chunked_json_post(path, small)).await;
    assert_eq!(res.status, 202, "{}", res.json());

    // Exactly at the limit is accepted.
    let filler = limit - r#"{"data":""}"#.len();
    let exact = json!({"data": "y".repeat(filler)}).to_string();
    assert_eq!(exact.len(), limit);
    let (status, answer) = herald
        .publisher()
        .send(
            herald
                .publisher()
                .request(reqwest::Method::POST, path)
                .header("content-type", "application/json")
                .body(exact),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_user_ids_are_400_everywhere() {
    let herald = Herald::start().await;
    let mut witness = Witness::new(&herald).await;
    let long = "x".repeat(129);
    // As a client library would send them (already percent-encoded where needed).
    let encoded = [
        long.as_str(),
        "%2F",
        "a%2Fb",
        "%C3%A9",
        "caf%C3%A9",
        "%ZZ",
        "%00",
        "%FF",
        "a%20b",
        "a+b",
        "a%3Fb",
        "%2E%2E%2Fetc",
        "a!",
        "a~b",
    ];
    for user in encoded {
        let publisher = herald.publisher();
        for (what, (status, body)) in [
            ("publish", publisher.publish(user, json!(1)).await),
            (
                "presence",
                publisher.get(&format!("/v1/users/{user}/presence")).await,
            ),
            (
                "history",
                publisher
                    .get(&format!("/v1/users/{user}/notifications"))
                    .await,
            ),
        ] {
            assert_error(
                &format!("{what} {user}"),
                status,
                &body,
                400,
                "invalid_user_id",
            );
        }
        let ws = reqwest::get(
            herald
                .ws_url(user, Some(&token("alice")), None)
                .replacen("ws", "http", 1),
        )
        .await
        .unwrap();
        let status = ws.status().as_u16();
        assert_error(
            &format!("ws {user}"),
            status,
            &ws.json().await.unwrap(),
            400,
            "invalid_user_id",
        );
        witness.still_served(&herald, user).await;
    }
    // 128 bytes is the longest valid id.
    herald
        .publisher()
        .publish_ok(&"x".repeat(128), json!(1))
        .await;

    // What clients rewrite or refuse to send: dot segments, an empty segment, raw bytes.
    let raw_targets: [&[u8]; 6] = [
        b"/v1/users/./notifications",
        b"/v1/users/../notifications",
        b"/v1/users/%2E/notifications",
        b"/v1/users/%2e%2e/notifications",
        b"/v1/users//notifications",
        b"/v1/users/a%/notifications",
    ];
    for target in raw_targets {
        let what = String::from_utf8_lossy(target).into_owned();
        let mut req = b"POST ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(
            format!(
                " HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\
                 Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{{\"data\":1}}"
            )
            .as_bytes(),
        );
        let res = raw_http(herald.addr, &req).await;
        assert_error(&what, res.status, &res.json(), 400, "invalid_user_id");
        witness.still_served(&herald, &what).await;
    }
    // Raw non-ASCII bytes are not HTTP (RFC 9112 §3.2: the target is ASCII): the HTTP
    // parser refuses them before any route runs, so the answer is a bare 400, not JSON.
    let mut req = b"POST /v1/users/caf\xc3\xa9/notifications HTTP/1.1\r\nHost: h\r\n".to_vec();
    req.extend_from_slice(b"Connection: close\r\nContent-Length: 0\r\n\r\n");
    let res = raw_http(herald.addr, &req).await;
    assert_eq!(res.status, 400, "raw UTF-8 in the path");
    witness.still_served(&herald, "raw UTF-8 in the path").await;

    for target in [
        "/ws/",
        "/ws/.",
        "/ws/..",
        "/v1/users/./presence",
        "/v1/users/../presence",
    ] {
        let res = raw_http(
            herald.addr,
            &raw_request(
                "GET",
                &format!("{target}?token={}", token("alice")),
                "",
                b"",
            ),
        )
        .await;
        assert_error(target, res.status, &res.json(), 400, "invalid_user_id");
    }
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_wrong_methods_and_bad_queries() {
    let herald = Herald::start().await;
    let mut witness = Witness::new(&herald).await;
    let publisher = herald.publisher();
    for path in [
        "/nope",
        "/demo/nope",
        "/v1",
        "/v1/users/alice",
        "/v1/users/alice/other",
        "/v2/broadcast",
        "/ws",
        "/ws/alice/extra",
    ] {
        let (status, body) = publisher.get(path).await;
        assert_error(path, status, &body, 404, "not_found");
    }
    for (method, path, allow) in [
        ("DELETE", "/v1/users/alice/notifications", "GET, POST"),
        ("PUT", "/v1/users/alice/notifications", "GET, POST"),
        ("GET", "/v1/notifications", "POST"),
        ("GET", "/v1/broadcast", "POST"),
        ("GET", "/v1/tokens", "POST"),
        ("POST", "/v1/users/alice/presence", "GET"),
        ("POST", "/healthz", "GET"),
        ("DELETE", "/metrics", "GET"),
        ("POST", "/ws/alice", "GET"),
    ] {
        let req = publisher.request(method.parse().unwrap(), path);
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        // HTTP requires a 405 to say which methods the resource does take.
        let allowed = res
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(allowed.as_deref(), Some(allow), "{method} {path}");
        let body = res.json().await.unwrap_or(serde_json::Value::Null);
        assert_error(
            &format!("{method} {path}"),
            status,
            &body,
            405,
            "method_not_allowed",
        );
    }
    for query in ["limit=0", "limit=1001", "limit=x", "since=-1", "since=abc"] {
        let (status, body) = publisher
            .get(&format!("/v1/users/alice/notifications?{query}"))
            .await;
        assert_error(query, status, &body, 400, "invalid_query");
    }
    let (status, body) = publisher
        .get(&format!("/ws/alice?token={}&since=x", token("alice")))
        .await;
    assert_eq!(status, 400, "since=x: {body}");
    // A plain GET on the subscribe endpoint, without the upgrade.
    let (status, body) = publisher
        .get(&format!("/ws/alice?token={}", token("alice")))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    witness.still_served(&herald, "routes").await;
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_websocket_frames() {
    let herald = Herald::start().await;
    let mut witness = Witness::new(&herald).await;
    let mut alice = herald.subscribe("alice").await;

    // The app-level heartbeat.
    alice.send_text(r#"{"type":"ping"}"#);
    assert_eq!(alice.frame(SOON).await, json!({"type": "pong"}));

    // Frames not understood get an error frame; the session stays open.
    for (what, msg) in [
        ("binary", Message::Binary(vec![1, 2, 3].into())),
        ("not JSON", Message::Text("hello".into())),
        (
            "unknown type",
            Message::Text(r#"{"type":"subscribe"}"#.into()),
        ),
        ("no type", Message::Text(r#"{"ping":true}"#.into())),
        ("type not a string", Message::Text(r#"{"type":1}"#.into())),
        ("empty", Message::Text("".into())),
    ] {
        alice.send(msg);
        let frame = alice.frame(SOON).await;
        assert_eq!(frame["type"], "error", "{what}: {frame}");
        assert_eq!(frame["code"], "bad_frame", "{what}: {frame}");
        assert!(frame["message"].is_string(), "{what}: {frame}");
        alice.send_text(r#"{"type":"ping"}"#);
        assert_eq!(alice.frame(SOON).await["type"], "pong", "open after {what}");
        witness.still_served(&herald, what).await;
    }
    herald
        .publisher()
        .publish_ok("alice", json!("still here"))
        .await;
    assert_eq!(alice.notifications(1, SOON).await[0]["data"], "still here");
    assert_eq!(herald.presence("alice").await, 1);

    // A frame over max_frame_bytes closes with 1009.
    let max = herald.settings.limits.max_frame_bytes;
    alice.send_text(&"x".repeat(max + 1));
    assert_eq!(alice.closed(SOON).await, Some(1009));
    witness.still_served(&herald, "oversized frame").await;

    // So does a message whose fragments add up to more than the limit.
    let url = format!("/ws/bob?token={}", token("bob"));
    let mut bob = RawWebSocket::connect(herald.addr, &url)
        .await
        .expect("upgrade");
    let part = vec![b'y'; max / 2 + 1];
    let mut frames = client_fragment(false, 0x1, &part);
    frames.extend(client_fragment(false, 0x0, &part));
    frames.extend(client_fragment(true, 0x0, &part));
    bob.send_raw(&frames).await.unwrap();
    assert_eq!(bob.close_code(SOON).await, Some(1009));
    witness.still_served(&herald, "oversized fragments").await;

    // A message within the limit in fragments is fine: a ping in three parts.
    let mut carol =
        RawWebSocket::connect(herald.addr, &format!("/ws/carol?token={}", token("carol")))
            .await
            .expect("upgrade");
    let mut ping = client_fragment(false, 0x1, br#"{"type""#);
    ping.extend(client_fragment(false, 0x0, br#":"pi"#));
    ping.extend(client_fragment(true, 0x0, br#"ng"}"#));
    ping.extend(client_frame(0x8, &1000u16.to_be_bytes()));
    carol.send_raw(&ping).await.unwrap();
    assert_eq!(
        carol.close_code(SOON).await,
        Some(1000),
        "pong, then the close echoed"
    );

    // An unmasked client frame breaks the protocol: the session ends, the server stays.
    let mut dave = RawWebSocket::connect(herald.addr, &format!("/ws/dave?token={}", token("dave")))
        .await
        .expect("upgrade");
    dave.send_raw(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert!(
        dave.closed_within(SOON).await,
        "an unmasked frame ends the session"
    );
    witness.still_served(&herald, "unmasked frame").await;

    herald.shutdown().await.unwrap();
}

/// A WebSocket upgrade request as browsers send it, without the API key.
fn upgrade_request(method: &str, target: &str, key: Option<&str>) -> Vec<u8> {
    let key = key.map_or(String::new(), |k| format!("Sec-WebSocket-Key: {k}\r\n"));
    format!(
        "{method} {target} HTTP/1.1\r\nHost: herald\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n{key}\r\n"
    )
    .into_bytes()
}

/// Upgrades are answered by the gateway's upgrade service, not the routes: it must give
/// the same JSON errors for every kind of bad upgrade, and close the connection after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrades_answer_the_contracts_errors() {
    let herald = Herald::start().await;
    let mut witness = Witness::new(&herald).await;
    let key = Some("dGhlIHNhbXBsZSBub25jZQ==");
    let alice = token("alice");
    for (what, request, status, code) in [
        (
            "no such path",
            upgrade_request("GET", "/v1/broadcast", key),
            404,
            "not_found",
        ),
        (
            "extra segment",
            upgrade_request("GET", &format!("/ws/alice/x?token={alice}"), key),
            404,
            "not_found",
        ),
        (
            "not GET",
            upgrade_request("POST", &format!("/ws/alice?token={alice}"), key),
            405,
            "method_not_allowed",
        ),
        (
            "bad user id",
            upgrade_request("GET", &format!("/ws/a%2Fb?token={alice}"), key),
            400,
            "invalid_user_id",
        ),
        (
            "non-UTF-8 user id",
            upgrade_request("GET", &format!("/ws/%FF?token={alice}"), key),
            400,
            "invalid_user_id",
        ),
        (
            "dot segment",
            upgrade_request("GET", &format!("/ws/%2E%2E?token={alice}"), key),
            400,
            "invalid_user_id",
        ),
        (
            "bad since",
            upgrade_request("GET", &format!("/ws/alice?token={alice}&since=x"), key),
            400,
            "invalid_query",
        ),
        (
            "no token",
            upgrade_request("GET", "/ws/alice", key),
            401,
            "unauthorized",
        ),
        (
            "another user's token",
            upgrade_request("GET", &format!("/ws/bob?token={alice}"), key),
            403,
            "forbidden",
        ),
        (
            "no Sec-WebSocket-Key",
            upgrade_request("GET", &format!("/ws/alice?token={alice}"), None),
            400,
            "websocket_required",
        ),
    ] {
        let res = raw_http(herald.addr, &request).await;
        assert_error(what, res.status, &res.json(), status, code);
        assert_eq!(res.header("connection"), Some("close"), "{what}");
        if status == 405 {
            assert_eq!(res.header("allow"), Some("GET"), "{what}");
        }
        witness.still_served(&herald, what).await;
    }
    // A percent-encoded id that decodes to a valid one is that user.
    let url = herald.ws_url("al%69ce", Some(&alice), None);
    let mut encoded = Subscriber::connect(&url).await.expect("upgrade");
    assert_eq!(encoded.hello["user"], "alice");
    herald
        .publisher()
        .publish_ok("alice", json!("for alice"))
        .await;
    assert_eq!(encoded.notifications(1, SOON).await[0]["data"], "for alice");
    herald.shutdown().await.unwrap();
}
