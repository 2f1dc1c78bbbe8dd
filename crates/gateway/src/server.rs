//! Runs Herald on a bound listener until `shutdown` resolves, then stops in order.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_http::{HttpService, Protocol};
use actix_service::{IntoServiceFactory, ServiceFactoryExt, fn_service, map_config};
use actix_web::dev::AppConfig;
use actix_web::{App, web};
use herald_hub::Hub;
use herald_hub::broker::{Broker, BrokerError, RedisBroker};
use herald_hub::cluster::generate_node_id;
use herald_hub::store::{MemoryStore, RedisStore, SqliteStore, StoreError};

use crate::auth::Auth;
use crate::listener::Listener;
use crate::memory;
use crate::routes::{self, AppState};
use crate::secrets::{Secrets, SecretsError};
use crate::settings::{EngineKind, Settings};
use crate::socket;
use crate::upgrade;
use crate::workers::Workers;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("redis engine: {0}")]
    Broker(#[from] BrokerError),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP server: a worker stopped by itself")]
    WorkerStopped,
}

/// Serves on `listener` until `shutdown` resolves. Then: stop accepting, close
/// sessions with 1001, let in-flight requests finish, flush the store.
/// Must run inside an actix system (`actix_web::rt::System`).
pub async fn run(
    listener: Listener,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    // The store first: a start it refuses must leave the store folder as it found it,
    // without freshly generated secret files beside the refused store.
    let hub = start_hub(&settings)?;
    let secrets = Secrets::resolve(&settings)?;
    let auth = Auth::new(secrets);
    if auth.is_insecure() {
        tracing::warn!(
            "auth.insecure = true: anyone can publish and subscribe as anyone. Development only."
        );
    }
    let shutting_down = Arc::new(AtomicBool::new(false));
    let state = web::Data::new(AppState {
        hub: hub.clone(),
        auth,
        max_payload_bytes: settings.limits.max_payload_bytes,
        max_token_ttl_secs: settings.auth.max_token_ttl_secs,
        shutting_down: Arc::clone(&shutting_down),
    });
    let grace = Duration::from_millis(settings.server.shutdown_grace_ms);
    let addr = listener.local_addr();
    let stalled_peer_limit = Duration::from_millis(settings.heartbeat.timeout_ms);
    let workers = match settings.server.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    // actix-web's `HttpServer` builds the same service, but has no way to take upgrades.
    let http_service = move || {
        // No `NormalizePath`: it merges `//`, which turned the empty user id of
        // `/v1/users//notifications` into a 404 where API.md wants `400 invalid_user_id`.
        let app = App::new()
            .app_data(state.clone())
            .configure(routes::configure)
            .into_factory()
            .map_err(|e: actix_web::Error| e.error_response());
        let http = HttpService::build()
            // A client that stopped reading must not hold a finished response's socket.
            .client_disconnect_timeout(Duration::from_secs(1))
            .upgrade(upgrade::service(state.clone()))
            .finish(map_config(app, |_| AppConfig::default()));
        // What actix-http's `tcp()` does, with the peer's address that accept already
        // gave instead of asking the kernel again (`getpeername`) for every connection.
        fn_service(|(io, peer)| async move { Ok((io, Protocol::Http1, Some(peer))) }).and_then(http)
    };
    let sockets = listener.for_workers(workers)?;
    for socket in &sockets {
        // Refinements: the heartbeat evicts a vanished peer without them too.
        if let Err(e) = socket::tune(socket, stalled_peer_limit) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY, TCP_USER_TIMEOUT or TCP_DEFER_ACCEPT; connections go without");
        }
    }
    let mut workers = Workers::start(
        sockets,
        settings.server.max_connections_per_worker,
        http_service,
    )
    .await?;
    tracing::info!(%addr, workers = workers.count(), "listening on {addr}");
    let releasing = actix_rt::spawn(memory::release_after_closes(
        hub.clone(),
        workers.arbiters(),
    ));

    let mut stopped_by_itself = false;
    tokio::select! {
        () = shutdown => {}
        () = workers.stopped_by_itself() => {
            tracing::error!("an HTTP worker stopped by itself");
            stopped_by_itself = true;
        }
    }
    tracing::info!("shutting down");
    shutting_down.store(true, Ordering::Relaxed);
    workers.stop_accepting().await;
    hub.close_sessions(grace).await;
    workers.finish(grace).await;
    releasing.abort();
    hub.close_store()
        .await
        .map_err(|e| RunError::Io(std::io::Error::other(e)))?;
    if stopped_by_itself {
        return Err(RunError::WorkerStopped);
    }
    tracing::info!("stopped");
    Ok(())
}

/// The hub on the configured engine: the embedded store, memory alone, or Redis shared with other nodes.
fn start_hub(settings: &Settings) -> Result<Hub, RunError> {
    match settings.engine.kind {
        EngineKind::Embedded => {
            let store = SqliteStore::open(
                &settings.store.path,
                settings.retention(),
                settings.store.fsync,
            )?;
            Ok(Hub::start(settings.hub_config(), Arc::new(store)))
        }
        EngineKind::Memory => {
            tracing::warn!("engine: memory; history is lost when Herald stops");
            let store = MemoryStore::new(settings.retention());
            Ok(Hub::start(settings.hub_config(), Arc::new(store)))
        }
        EngineKind::Redis => {
            let redis = settings.redis_config();
            let store = RedisStore::open(&redis, settings.retention())?;
            let node = generate_node_id();
            tracing::info!(%node, url = %redis.url, "engine: redis");
            let conn = store.connection();
            let hub = Hub::start_with(settings.hub_config(), Arc::new(store), |registry| {
                let broker = RedisBroker::start(&redis, conn, node, registry)?;
                Ok::<Arc<dyn Broker>, BrokerError>(Arc::new(broker))
            })?;
            Ok(hub)
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn signals() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
