//! Real clients: an HTTP publisher (reqwest) and a WebSocket subscriber (tokio-tungstenite) that keeps reading.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::SOON;

/// An HTTP client for the publisher API.
#[derive(Clone)]
pub struct Publisher {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Publisher {
    pub fn new(base: String, key: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base,
            key,
        }
    }

    /// The same client with another (or no) API key.
    pub fn with_key(&self, key: Option<&str>) -> Self {
        Self {
            key: key.map(str::to_owned),
            ..self.clone()
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request builder with the API key set.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, self.url(path));
        match &self.key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    /// Sends a request; answers the status and the JSON body (`Value::Null` when not JSON).
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        self.try_send(req).await.expect("request")
    }

    /// Like [`Publisher::send`], but a connection that fails (a killed server) is an `Err`.
    pub async fn try_send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, Value), reqwest::Error> {
        let res = req.send().await?;
        let status = res.status().as_u16();
        let body = res.bytes().await?;
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn try_get(&self, path: &str) -> Result<(u16, Value), reqwest::Error> {
        let res = self.request(reqwest::Method::GET, path).send().await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// Publishes `data` to `user`; answers status and body.
    pub async fn publish(&self, user: &str, data: Value) -> (u16, Value) {
        self.post(
            &format!("/v1/users/{user}/notifications"),
            &serde_json::json!({"event": "test", "data": data}),
        )
        .await
    }

    /// Publishes `data` with an idempotency key; answers status and body.
    pub async fn publish_keyed(&self, user: &str, data: Value, key: &str) -> (u16, Value) {
        self.post(
            &format!("/v1/users/{user}/notifications"),
            &serde_json::json!({"event": "test", "data": data, "idempotency_key": key}),
        )
        .await
    }

    /// Publishes `data` to `user`; a connection failure is an `Err` instead of a panic.
    pub async fn try_publish(
        &self,
        user: &str,
        data: Value,
    ) -> Result<(u16, Value), reqwest::Error> {
        let req = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/users/{user}/notifications"),
            )
            .json(&serde_json::json!({"event": "test", "data": data}));
        self.try_send(req).await
    }

    /// Every notification stored for `user`, oldest first, paged through the history endpoint.
    pub async fn history(&self, user: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut since = 0;
        loop {
            let path = format!("/v1/users/{user}/notifications?since={since}&limit=1000");
            let (status, body) = self.get(&path).await;
            assert_eq!(status, 200, "GET {path}: {body}");
            let page = body["notifications"].as_array().expect("notifications");
            let Some(last) = page.last() else {
                return all;
            };
            since = last["seq"].as_u64().expect("seq");
            all.extend(page.iter().cloned());
        }
    }

    /// Publishes and insists on 202; answers the seq.
    pub async fn publish_ok(&self, user: &str, data: Value) -> u64 {
        let (status, body) = self.publish(user, data).await;
        assert_eq!(status, 202, "publish to {user}: {body}");
        body["seq"].as_u64().expect("seq")
    }
}

/// The `seq` of each frame.
pub fn seqs(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["seq"].as_u64().expect("frame has a seq"))
        .collect()
}

/// What a subscriber saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A text frame, parsed as JSON.
    Frame(Value),
    /// The server closed with this code (None: no close frame, the socket just ended).
    Closed(Option<u16>),
}

/// A WebSocket subscriber. A background task reads continuously (so Pings are
/// answered, as a browser would) and queues what arrives.
pub struct Subscriber {
    events: mpsc::UnboundedReceiver<Event>,
    outgoing: mpsc::UnboundedSender<Message>,
    pub hello: Value,
}

impl Subscriber {
    /// Connects and waits for `hello`. An HTTP refusal answers `Err(status)`.
    pub async fn connect(url: &str) -> Result<Self, u16> {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(res) => res.status().as_u16(),
                other => panic!("connect {url}: {other}"),
            })?;
        let (mut sink, mut stream) = ws.split();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (outgoing, mut outgoing_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(Ok(Message::Text(text))) => {
                            let value = serde_json::from_str(&text).unwrap_or(Value::String(text.to_string()));
                            let _ = events_tx.send(Event::Frame(value));
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let _ = events_tx.send(Event::Closed(frame.map(|f: CloseFrame| u16::from(f.code))));
                            return;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            let _ = events_tx.send(Event::Closed(None));
                            return;
                        }
                    },
                    out = outgoing_rx.recv() => match out {
                        Some(msg) => { let _ = sink.send(msg).await; }
                        None => { let _ = sink.close().await; return; }
                    },
                }
            }
        });
        let mut sub = Self {
            events,
            outgoing,
            hello: Value::Null,
        };
        match sub.next(SOON).await {
            Some(Event::Frame(hello)) if hello["type"] == "hello" => sub.hello = hello,
            other => panic!("expected hello first, got {other:?}"),
        }
        Ok(sub)
    }

    /// The next event within `wait`, or None.
    pub async fn next(&mut self, wait: Duration) -> Option<Event> {
        tokio::time::timeout(wait, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next text frame within `wait`; panics on close or timeout.
    pub async fn frame(&mut self, wait: Duration) -> Value {
        match self.next(wait).await {
            Some(Event::Frame(v)) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Exactly `n` notification frames (other frame types are skipped), in arrival order.
    pub async fn notifications(&mut self, n: usize, wait: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Event::Frame(v)) if v["type"] == "notification" => out.push(v),
                Some(Event::Frame(_)) => {}
                other => panic!("after {} of {n} notifications: {other:?}", out.len()),
            }
        }
        out
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(event) = self.next(wait).await {
            panic!("expected silence, got {event:?}");
        }
    }

    /// Waits for the close, skipping frames; answers its code.
    pub async fn closed(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Event::Closed(code)) => return code,
                Some(Event::Frame(_)) => {}
                None => panic!("not closed within {wait:?}"),
            }
        }
    }

    pub fn send(&self, msg: Message) {
        let _ = self.outgoing.send(msg);
    }

    pub fn send_text(&self, text: &str) {
        self.send(Message::Text(text.into()));
    }
}
