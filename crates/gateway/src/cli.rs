//! The `herald` command line: serve (default) and mint a token.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald_hub::UserId;

use crate::listener::Listener;
use crate::routes::rfc3339;
use crate::secrets::Secrets;
use crate::server;
use crate::settings::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Real-time notification hub: POST a notification, every tab of that user gets it."
)]
pub struct Cli {
    /// TOML settings file (default: config/default.toml when present).
    #[arg(long, env = "HERALD_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub (the default).
    Serve,
    /// Print a subscriber token for a user, signed with the configured secret.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = crate::routes::DEFAULT_TTL_SECS)]
        ttl_secs: u64,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => return fail(&e),
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::Token { user, ttl_secs } => token(&settings, &user, ttl_secs),
    }
}

fn serve(settings: Settings) -> ExitCode {
    let addr = match settings.bind_addr() {
        Ok(addr) => addr,
        Err(e) => return fail(&e),
    };
    let listener = match Listener::bind(addr) {
        Ok(listener) => listener,
        Err(e) => return fail(&format!("cannot listen on {addr} (server.bind): {e}")),
    };
    match actix_web::rt::System::new().block_on(server::run(listener, settings, server::signals()))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn token(settings: &Settings, user: &str, ttl_secs: u64) -> ExitCode {
    let user = match UserId::parse(user) {
        Ok(user) => user,
        Err(e) => return fail(&format!("--user: {e}")),
    };
    if ttl_secs == 0 || ttl_secs > settings.auth.max_token_ttl_secs {
        return fail(&format!(
            "--ttl-secs must be 1 to {} (auth.max_token_ttl_secs)",
            settings.auth.max_token_ttl_secs
        ));
    }
    let secret = match Secrets::resolve(settings) {
        Ok(Secrets::Secure { jwt_secret, .. }) => jwt_secret,
        Ok(Secrets::Insecure) => return fail(&"auth.insecure is on: subscribers need no token"),
        Err(e) => return fail(&e),
    };
    match crate::auth::mint(&secret, &user, ttl_secs) {
        Ok(minted) => {
            tracing::debug!(user = %user, expires_at = %rfc3339(minted.expires_at), "token minted");
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{}", minted.token) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    tracing::error!("{e}");
    ExitCode::FAILURE
}
