//! Secrets for a secure first start: use the configured ones, or generate them once under `store.path`.

use std::io::Write;
use std::path::Path;

use rand::RngCore;

use crate::settings::Settings;

pub const API_KEY_FILE: &str = "api-key";
pub const JWT_SECRET_FILE: &str = "jwt-secret";

#[derive(Debug, thiserror::Error)]
#[error("secret file {path}: {reason}")]
pub struct SecretsError {
    path: String,
    reason: String,
}

/// What authentication runs with. `Debug` never shows the values.
#[derive(Clone)]
pub enum Secrets {
    Insecure,
    Secure {
        api_keys: Vec<String>,
        jwt_secret: String,
    },
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Insecure => f.write_str("Insecure"),
            Self::Secure { api_keys, .. } => write!(
                f,
                "Secure {{ {} api keys, jwt secret: <redacted> }}",
                api_keys.len()
            ),
        }
    }
}

impl Secrets {
    /// Configured values win; missing ones are read from (or first written to)
    /// owner-only files under `store.path`. Logs where, never what.
    pub fn resolve(settings: &Settings) -> Result<Self, SecretsError> {
        let auth = &settings.auth;
        if auth.insecure {
            return Ok(Self::Insecure);
        }
        let api_keys = if auth.api_keys.is_empty() {
            let path = settings.store.path.join(API_KEY_FILE);
            let hint = format!(
                "publishers send it as `Authorization: Bearer $(cat {})`",
                path.display()
            );
            vec![load_or_create(&path, "a publisher API key", &hint)?]
        } else {
            auth.api_keys.clone()
        };
        let jwt_secret = if auth.jwt_secret.is_empty() {
            let hint = "mint subscriber tokens with `herald token --user <id>` or POST /v1/tokens";
            load_or_create(
                &settings.store.path.join(JWT_SECRET_FILE),
                "the subscriber token secret",
                hint,
            )?
        } else {
            auth.jwt_secret.clone()
        };
        Ok(Self::Secure {
            api_keys,
            jwt_secret,
        })
    }
}

fn load_or_create(path: &Path, what: &str, hint: &str) -> Result<String, SecretsError> {
    let err = |reason: String| SecretsError {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim().to_owned();
            if secret.len() < 32 {
                return Err(err(
                    "holds fewer than 32 characters; delete it to generate a new one".into(),
                ));
            }
            return Ok(secret);
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e.to_string())),
        Err(_) => {}
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, &secret).map_err(|e| err(e.to_string()))?;
    tracing::warn!(path = %path.display(), "generated {what} into an owner-only file; {hint}");
    Ok(secret)
}

fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    writeln!(file, "{secret}")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where generated secrets live for these settings.
    fn secret_paths(settings: &Settings) -> [std::path::PathBuf; 2] {
        [
            settings.store.path.join(API_KEY_FILE),
            settings.store.path.join(JWT_SECRET_FILE),
        ]
    }

    #[test]
    fn generates_once_with_owner_only_permissions_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.store.path = dir.path().join("data");
        let Secrets::Secure {
            api_keys,
            jwt_secret,
        } = Secrets::resolve(&settings).unwrap()
        else {
            panic!()
        };
        let Secrets::Secure {
            api_keys: again,
            jwt_secret: again_secret,
        } = Secrets::resolve(&settings).unwrap()
        else {
            panic!()
        };
        assert_eq!((api_keys, jwt_secret), (again, again_secret));
        #[cfg(unix)]
        for path in secret_paths(&settings) {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let s = Secrets::Secure {
            api_keys: vec!["publisher-key-123456".into()],
            jwt_secret: "s".repeat(40),
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("publisher-key") && !shown.contains("ssss"),
            "{shown}"
        );
    }
}
