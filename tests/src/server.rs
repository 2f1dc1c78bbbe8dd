//! A real Herald in this process: `herald_gateway::run` on its own thread and actix system, bound to port 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use herald_gateway::Settings;
use tokio::sync::oneshot;

use crate::client::{Publisher, Subscriber};

/// How long a starting Herald may take to answer `/healthz`.
const STARTUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

pub const API_KEY: &str = "test-publisher-key-0123456789";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef0123456789";

/// Settings for tests: loopback port 0, the given store folder, known secrets,
/// a heartbeat slow enough that a busy CI machine never evicts a healthy client.
pub fn test_settings(store: &Path) -> Settings {
    let mut s = Settings::default();
    s.server.bind = "127.0.0.1:0".into();
    s.server.workers = 2;
    s.server.shutdown_grace_ms = 3000;
    s.store.path = store.to_path_buf();
    s.auth.api_keys = vec![API_KEY.into()];
    s.auth.jwt_secret = JWT_SECRET.into();
    s.heartbeat.interval_ms = 1000;
    s.heartbeat.timeout_ms = 5000;
    s
}

/// The WebSocket URL of `user` on the Herald at `addr`.
pub fn ws_url(addr: SocketAddr, user: &str, token: Option<&str>, since: Option<u64>) -> String {
    let mut url = format!("ws://{addr}/ws/{user}");
    let mut sep = '?';
    if let Some(token) = token {
        url.push_str(&format!("{sep}token={token}"));
        sep = '&';
    }
    if let Some(since) = since {
        url.push_str(&format!("{sep}since={since}"));
    }
    url
}

/// A subscriber of `user` with a valid token on the Herald at `addr`, resuming after `since` if given.
pub async fn subscribe_at(addr: SocketAddr, user: &str, since: Option<u64>) -> Subscriber {
    Subscriber::connect(&ws_url(addr, user, Some(&token(user)), since))
        .await
        .expect("subscribe")
}

/// A subscriber token for `user`, valid for an hour.
pub fn token(user: &str) -> String {
    let user = herald_gateway::settings::user_id(user).expect("valid test user");
    herald_gateway::mint_token(JWT_SECRET, &user, 3600)
        .expect("mint")
        .token
}

pub struct Herald {
    pub addr: SocketAddr,
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
    /// Keeps a temp store alive as long as the server when the test did not pass its own folder.
    _dir: Option<tempfile::TempDir>,
}

impl Herald {
    /// A fresh Herald with test settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A fresh Herald with test settings changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut herald = Self::start_in(dir.path().to_path_buf(), tweak).await;
        herald._dir = Some(dir);
        herald
    }

    /// A Herald whose store lives in `store` (reuse it to test restarts).
    pub async fn start_in(store: PathBuf, tweak: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = test_settings(&store);
        tweak(&mut settings);
        let listener =
            herald_gateway::Listener::bind(settings.bind_addr().expect("bind addr")).expect("bind");
        let addr = listener.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let run_settings = settings.clone();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new()
                .block_on(herald_gateway::run(listener, run_settings, async move {
                    let _ = stopped.await;
                }))
                .map_err(|e| e.to_string())
        });
        let mut herald = Self {
            addr,
            settings,
            stop: Some(stop),
            thread: Some(thread),
            _dir: None,
        };
        herald.wait_healthy().await;
        herald
    }

    /// Waits until `/healthz` answers. Generous: opening the store fsyncs, and on a machine
    /// busy with other builds one fsync can take seconds.
    async fn wait_healthy(&mut self) {
        let publisher = self.publisher();
        let deadline = tokio::time::Instant::now() + STARTUP_LIMIT;
        while tokio::time::Instant::now() < deadline {
            if let Ok((200, _)) = publisher.try_get("/healthz").await {
                return;
            }
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let ended = self.stop_now().await;
                panic!("Herald at {} stopped while starting: {ended:?}", self.addr);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!(
            "Herald at {} did not become healthy within {STARTUP_LIMIT:?}",
            self.addr
        );
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An HTTP client with the test API key.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.base_url(), Some(API_KEY.into()))
    }

    /// A subscriber of `user` with a valid token, live only.
    pub async fn subscribe(&self, user: &str) -> Subscriber {
        subscribe_at(self.addr, user, None).await
    }

    /// A subscriber of `user` resuming after `since`.
    pub async fn subscribe_since(&self, user: &str, since: u64) -> Subscriber {
        subscribe_at(self.addr, user, Some(since)).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let res = reqwest::get(format!("{}/metrics", self.base_url()))
            .await
            .expect("GET /metrics");
        assert_eq!(res.status().as_u16(), 200);
        res.text().await.expect("metrics body")
    }

    /// One series of `/metrics`, named exactly as exposed (labels included), e.g.
    /// `herald_sessions_evicted_total{reason="heartbeat"}`. Panics when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, series).unwrap_or_else(|| panic!("{series} missing from\n{text}"))
    }

    /// How many sessions `user` holds, from `GET /v1/users/{user}/presence`.
    pub async fn presence(&self, user: &str) -> u64 {
        let (status, body) = self
            .publisher()
            .get(&format!("/v1/users/{user}/presence"))
            .await;
        assert_eq!(status, 200, "presence of {user}: {body}");
        assert_eq!(
            body["online"].as_bool(),
            Some(body["sessions"].as_u64() > Some(0)),
            "online agrees with sessions: {body}"
        );
        body["sessions"].as_u64().expect("sessions")
    }

    pub fn ws_url(&self, user: &str, token: Option<&str>, since: Option<u64>) -> String {
        ws_url(self.addr, user, token, since)
    }

    /// Graceful shutdown, as on SIGTERM; answers what `run` returned.
    pub async fn shutdown(mut self) -> Result<(), String> {
        self.stop_now().await
    }

    async fn stop_now(&mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            thread
                .join()
                .map_err(|_| "server thread panicked".to_string())?
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// The value of `series` in a Prometheus text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

impl Drop for Herald {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
