//! Settings: built-in defaults, then the TOML file, then `HERALD_<SECTION>__<KEY>` variables; validated as a whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_hub::cluster::RedisConfig;
use herald_hub::{Heartbeat, HubConfig, Retention};
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// The file read when neither `--config` nor `HERALD_CONFIG` names one.
pub const DEFAULT_FILE: &str = "config/default.toml";
const ENV_PREFIX: &str = "HERALD_";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("config key `{key}`: {reason}")]
    Key { key: String, reason: String },
}

fn key_error(key: impl Into<String>, reason: impl Into<String>) -> SettingsError {
    SettingsError::Key {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub heartbeat: HeartbeatSettings,
    pub auth: AuthSettings,
    pub store: StoreSettings,
    pub limits: LimitSettings,
    pub engine: EngineSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address to listen on; port 0 picks a free one.
    pub bind: String,
    /// HTTP worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// HTTP connections one worker serves at once; at the bound it stops accepting and
    /// new connections wait in the kernel's backlog. A WebSocket counts until its 101.
    pub max_connections_per_worker: usize,
    /// On SIGINT/SIGTERM: how long sessions and in-flight requests get to finish.
    pub shutdown_grace_ms: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            workers: 0,
            max_connections_per_worker: 25_600,
            shutdown_grace_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatSettings {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        Self {
            interval_ms: 20_000,
            timeout_ms: 45_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Publisher keys. Empty: a key is generated on first start under `store.path`.
    pub api_keys: Vec<String>,
    /// HS256 secret for subscriber tokens. Empty: generated on first start under `store.path`.
    pub jwt_secret: String,
    /// No authentication at all. Development only.
    pub insecure: bool,
    /// The longest `ttl_secs` a minted token may have.
    pub max_token_ttl_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Folder of the embedded store (and of generated secrets).
    pub path: PathBuf,
    pub retention_per_user: u64,
    pub retention_secs: u64,
    /// fsync every group commit. `false` survives a crash of Herald but not of the machine.
    pub fsync: bool,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data"),
            retention_per_user: 1000,
            retention_secs: 86_400,
            fsync: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// The largest publish body accepted.
    pub max_payload_bytes: usize,
    /// The largest frame a client may send over the WebSocket.
    pub max_frame_bytes: usize,
    /// Frames queued for one session before it is closed as a slow consumer (4001).
    pub session_queue: usize,
    /// How long a session waits for an out-of-order seq before reading it from the store.
    pub gap_wait_ms: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_payload_bytes: 65_536,
            max_frame_bytes: 4_096,
            session_queue: 256,
            gap_wait_ms: 200,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Embedded,
    /// One node, history in memory only: it survives reconnects, not restarts.
    Memory,
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    pub kind: EngineKind,
    pub redis_url: String,
    /// Prefix of every Redis key and channel; nodes of one cluster share it.
    pub redis_prefix: String,
    /// The longest one Redis call may take; past it a publish answers 503.
    pub redis_timeout_ms: u64,
    /// A node's sessions stop counting in presence this long after its last heartbeat.
    pub presence_ttl_ms: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            kind: EngineKind::Embedded,
            redis_url: "redis://127.0.0.1:6379/0".into(),
            redis_prefix: "herald".into(),
            redis_timeout_ms: 2_000,
            presence_ttl_ms: 15_000,
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            jwt_secret: String::new(),
            insecure: false,
            max_token_ttl_secs: 7 * 86_400,
        }
    }
}

impl Settings {
    /// Loads from `file` (or the default file when it exists) and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment, for tests.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut tree = Value::try_from(Settings::default())
            .map_err(|e| key_error("(defaults)", e.to_string()))?;
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.exists()));
        if let Some(path) = file {
            let file_err = |reason: String| SettingsError::File {
                path: path.display().to_string(),
                reason,
            };
            let text = std::fs::read_to_string(&path).map_err(|e| file_err(e.to_string()))?;
            let table: Table = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
            merge(&mut tree, Value::Table(table));
        }
        for (name, raw) in env {
            apply_env(&mut tree, &name, &raw)?;
        }
        let settings: Settings = serde_path_to_error::deserialize(tree).map_err(|e| {
            let key = e.path().to_string();
            key_error(
                if key == "." { "(root)".into() } else { key },
                e.into_inner().to_string(),
            )
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Rejects values that parse but cannot work together.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.bind_addr()?;
        let hb = &self.heartbeat;
        if hb.interval_ms < 10 {
            return Err(key_error("heartbeat.interval_ms", "must be at least 10"));
        }
        if hb.timeout_ms < 2 * hb.interval_ms {
            return Err(key_error(
                "heartbeat.timeout_ms",
                format!(
                    "must be at least 2 × heartbeat.interval_ms ({})",
                    2 * hb.interval_ms
                ),
            ));
        }
        if !self.auth.jwt_secret.is_empty() && self.auth.jwt_secret.len() < 32 {
            return Err(key_error("auth.jwt_secret", "must be at least 32 bytes"));
        }
        if let Some(i) = self.auth.api_keys.iter().position(|k| k.len() < 16) {
            return Err(key_error(
                "auth.api_keys",
                format!("key #{} is shorter than 16 bytes", i + 1),
            ));
        }
        if self.auth.max_token_ttl_secs == 0 {
            return Err(key_error("auth.max_token_ttl_secs", "must be at least 1"));
        }
        let positive = [
            ("store.retention_per_user", self.store.retention_per_user),
            ("store.retention_secs", self.store.retention_secs),
            (
                "limits.max_payload_bytes",
                self.limits.max_payload_bytes as u64,
            ),
            ("limits.max_frame_bytes", self.limits.max_frame_bytes as u64),
            ("limits.session_queue", self.limits.session_queue as u64),
            ("limits.gap_wait_ms", self.limits.gap_wait_ms),
            ("server.shutdown_grace_ms", self.server.shutdown_grace_ms),
            (
                "server.max_connections_per_worker",
                self.server.max_connections_per_worker as u64,
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(key_error(*key, "must be at least 1"));
        }
        if self.server.max_connections_per_worker > 1_000_000 {
            return Err(key_error(
                "server.max_connections_per_worker",
                "must be between 1 and 1000000",
            ));
        }
        if self.store.path.as_os_str().is_empty() {
            return Err(key_error("store.path", "must not be empty"));
        }
        if self.engine.kind == EngineKind::Redis && !self.engine.redis_url.starts_with("redis://") {
            return Err(key_error("engine.redis_url", "must start with redis://"));
        }
        if self.engine.redis_prefix.is_empty() || self.engine.redis_prefix.contains(['{', '}', ' '])
        {
            return Err(key_error(
                "engine.redis_prefix",
                "must be non-empty, without braces or spaces",
            ));
        }
        if !(100..=60_000).contains(&self.engine.redis_timeout_ms) {
            return Err(key_error(
                "engine.redis_timeout_ms",
                "must be between 100 and 60000",
            ));
        }
        if !(1_000..=60_000).contains(&self.engine.presence_ttl_ms) {
            return Err(key_error(
                "engine.presence_ttl_ms",
                "must be between 1000 and 60000",
            ));
        }
        Ok(())
    }

    pub fn bind_addr(&self) -> Result<SocketAddr, SettingsError> {
        self.server.bind.parse().map_err(|_| {
            key_error(
                "server.bind",
                format!(
                    "`{}` is not an address like 127.0.0.1:8080",
                    self.server.bind
                ),
            )
        })
    }

    pub fn hub_config(&self) -> HubConfig {
        HubConfig {
            heartbeat: Heartbeat {
                interval: Duration::from_millis(self.heartbeat.interval_ms),
                timeout: Duration::from_millis(self.heartbeat.timeout_ms),
            },
            session_queue: self.limits.session_queue,
            max_frame_bytes: self.limits.max_frame_bytes,
            gap_wait: Duration::from_millis(self.limits.gap_wait_ms),
        }
    }

    pub fn redis_config(&self) -> RedisConfig {
        RedisConfig {
            url: self.engine.redis_url.clone(),
            prefix: self.engine.redis_prefix.clone(),
            timeout: Duration::from_millis(self.engine.redis_timeout_ms),
            presence_ttl: Duration::from_millis(self.engine.presence_ttl_ms),
        }
    }

    pub fn retention(&self) -> Retention {
        Retention {
            per_user: self.store.retention_per_user,
            max_age: Duration::from_secs(self.store.retention_secs),
        }
    }
}

/// Parses a user id the way every endpoint does (for tools and tests).
pub fn user_id(raw: &str) -> Result<herald_hub::UserId, herald_hub::InvalidUserId> {
    herald_hub::UserId::parse(raw)
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Table(base), Value::Table(over)) => {
            for (k, v) in over {
                match base.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Applies one `HERALD_<SECTION>__<KEY>` variable, typed after the default it replaces.
fn apply_env(tree: &mut Value, name: &str, raw: &str) -> Result<(), SettingsError> {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return Ok(());
    };
    if !rest.contains("__") {
        return Ok(()); // HERALD_CONFIG and friends are not settings keys.
    }
    let key = rest.to_ascii_lowercase().replace("__", ".");
    let mut slot = &mut *tree;
    for part in key.split('.') {
        slot = match slot.as_table_mut().and_then(|t| t.get_mut(part)) {
            Some(next) => next,
            None => return Err(key_error(&key, format!("unknown key (from {name})"))),
        };
    }
    let bad = |what: &str| key_error(&key, format!("`{raw}` from {name} is not {what}"));
    *slot = match slot {
        Value::Integer(_) => Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?),
        Value::Boolean(_) => Value::Boolean(raw.trim().parse().map_err(|_| bad("true or false"))?),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ),
        Value::Table(_) => {
            return Err(key_error(
                &key,
                format!("is a section, not a key (from {name})"),
            ));
        }
        _ => Value::String(raw.to_owned()),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Loads `file` (TOML text, if any) plus `pairs` as the environment.
    fn load(file: Option<&str>, pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = file.map(|text| {
            let path = dir.path().join("herald.toml");
            std::fs::write(&path, text).unwrap();
            path
        });
        Settings::load_from(path.as_deref(), env(pairs))
    }

    #[test]
    fn env_overrides_file_and_lists_split_on_commas() {
        let s = load(
            Some("[server]\nbind = \"127.0.0.1:9\"\n[heartbeat]\ninterval_ms = 1000\ntimeout_ms = 5000\n"),
            &[("HERALD_SERVER__BIND", "127.0.0.1:0"), ("HERALD_AUTH__API_KEYS", "k1-0123456789abcdef, k2-0123456789abcdef")],
        )
        .unwrap();
        assert_eq!(s.server.bind, "127.0.0.1:0");
        assert_eq!(s.heartbeat.interval_ms, 1000);
        assert_eq!(
            s.auth.api_keys,
            vec!["k1-0123456789abcdef", "k2-0123456789abcdef"]
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = load(Some("[server]\nbindd = \"x\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bindd"), "{e}");
        let e = load(None, &[("HERALD_SERVER__NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.nope") && e.contains("HERALD_SERVER__NOPE"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let e = load(None, &[("HERALD_HEARTBEAT__INTERVAL_MS", "soon")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat.interval_ms"), "{e}");
        let e = load(Some("[heartbeat]\ninterval_ms = \"x\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat.interval_ms"), "{e}");
        let e = load(None, &[("HERALD_ENGINE__KIND", "zookeeper")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("engine.kind"), "{e}");
    }

    #[test]
    fn timeout_must_be_twice_the_interval() {
        let e = load(
            None,
            &[
                ("HERALD_HEARTBEAT__INTERVAL_MS", "1000"),
                ("HERALD_HEARTBEAT__TIMEOUT_MS", "1999"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("heartbeat.timeout_ms"), "{e}");
    }

    #[test]
    fn redis_engine_limits_are_checked() {
        for (key, env_key, value) in [
            (
                "engine.presence_ttl_ms",
                "HERALD_ENGINE__PRESENCE_TTL_MS",
                "60001",
            ),
            (
                "engine.redis_timeout_ms",
                "HERALD_ENGINE__REDIS_TIMEOUT_MS",
                "0",
            ),
            ("engine.redis_prefix", "HERALD_ENGINE__REDIS_PREFIX", "a{b}"),
        ] {
            let e = load(None, &[(env_key, value)]).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        let s = load(
            None,
            &[
                ("HERALD_ENGINE__KIND", "redis"),
                ("HERALD_ENGINE__PRESENCE_TTL_MS", "6000"),
            ],
        )
        .unwrap();
        assert_eq!(s.engine.kind, EngineKind::Redis);
        assert_eq!(
            s.redis_config().presence_heartbeat(),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn unreadable_files_are_named() {
        let e = Settings::load_from(Some(Path::new("/nonexistent/herald.toml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/herald.toml"), "{e}");
        let e = load(Some("this is = = not toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("herald.toml"), "{e}");
    }

    #[test]
    fn the_shipped_default_file_matches_the_built_in_defaults() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
        let from_file = Settings::load_from(Some(&shipped), env(&[])).unwrap();
        let built_in = Settings::default();
        assert_eq!(
            toml::to_string(&from_file).unwrap(),
            toml::to_string(&built_in).unwrap()
        );
    }
}
