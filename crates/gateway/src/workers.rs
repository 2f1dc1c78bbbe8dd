//! The HTTP workers: one thread (actix arbiter) each, with its own listening socket, HTTP service and accept loop.
//!
//! A worker accepts a connection and serves it on the same thread: no acceptor thread
//! that hands sockets over, so a connect costs no thread switch (actix-server's
//! `Server` accepts on one thread for all workers). Sessions started from an upgrade
//! live on the worker that accepted them.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use actix_rt::net::TcpStream;
use actix_rt::{Arbiter, ArbiterHandle};
use actix_service::{Service, ServiceFactory};
use futures_util::future::join_all;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};

/// How long a worker stops accepting after an accept error that is not about one
/// connection (out of file descriptors, EMFILE/ENFILE, out of memory): retrying at once
/// would spin on the same error. actix-server waits the same.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(500);

/// A connection as accept gave it: the socket and the peer's address.
pub type Accepted = (TcpStream, SocketAddr);

/// The running workers.
pub struct Workers {
    workers: Vec<Worker>,
    stop_accepting: watch::Sender<bool>,
}

struct Worker {
    arbiter: Arbiter,
    /// Resolves once the worker closed its listener (or its task ended); taken once it did.
    paused: Option<oneshot::Receiver<()>>,
    /// Resolves once the worker's last connection finished after it stopped accepting.
    drained: oneshot::Receiver<()>,
}

impl Workers {
    /// Starts one worker per listener, each serving up to `max_connections` connections at
    /// once with a service from `make_service` (called on the worker's thread, since an
    /// actix-web app is not `Send`). Answers once every worker built its service.
    /// Must run inside an actix system.
    pub async fn start<F, S>(
        listeners: Vec<std::net::TcpListener>,
        max_connections: usize,
        make_service: F,
    ) -> io::Result<Self>
    where
        F: Fn() -> S + Clone + Send + 'static,
        S: ServiceFactory<Accepted, Config = (), Response = (), InitError = ()> + 'static,
        S::Service: 'static,
    {
        let (stop_accepting, accepting) = watch::channel(false);
        let mut workers = Self {
            workers: Vec::with_capacity(listeners.len()),
            stop_accepting,
        };
        let mut startups = Vec::with_capacity(listeners.len());
        for (index, listener) in listeners.into_iter().enumerate() {
            let arbiter = match Arbiter::try_new() {
                Ok(arbiter) => arbiter,
                Err(e) => {
                    workers.stop_now().await;
                    return Err(e);
                }
            };
            let (started, startup) = oneshot::channel();
            let (paused_tx, paused) = oneshot::channel();
            let (drained_tx, drained) = oneshot::channel();
            let worker = Serve {
                index,
                max_connections,
                accepting: accepting.clone(),
                paused: paused_tx,
                drained: drained_tx,
            };
            let make_service = make_service.clone();
            arbiter.spawn_fn(move || {
                actix_rt::spawn(worker.run(listener, make_service(), started));
            });
            workers.workers.push(Worker {
                arbiter,
                paused: Some(paused),
                drained,
            });
            startups.push(startup);
        }
        for startup in join_all(startups).await {
            let started = startup.unwrap_or_else(|_| Err(io::Error::other("worker died starting")));
            if let Err(e) = started {
                workers.stop_now().await;
                return Err(e);
            }
        }
        Ok(workers)
    }

    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// Each worker's thread, to run something there.
    pub fn arbiters(&self) -> Vec<ArbiterHandle> {
        self.workers.iter().map(|w| w.arbiter.handle()).collect()
    }

    /// Resolves if a worker stops before it was told to (its task panicked).
    pub async fn stopped_by_itself(&mut self) {
        poll_fn(|cx| {
            for worker in &mut self.workers {
                let Some(paused) = &mut worker.paused else {
                    continue;
                };
                if Pin::new(paused).poll(cx).is_ready() {
                    worker.paused = None;
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        })
        .await;
    }

    /// Every worker closes its listener; answers once all have. Connections already
    /// accepted carry on.
    pub async fn stop_accepting(&mut self) {
        self.stop_accepting.send_replace(true);
        join_all(self.workers.iter_mut().filter_map(|w| w.paused.take())).await;
    }

    /// Waits up to `grace` for the connections still being served (requests in flight,
    /// idle keep-alive connections until their keep-alive ends), then stops every worker,
    /// dropping what is left, and waits until their threads ended. Call after
    /// [`Workers::stop_accepting`].
    pub async fn finish(mut self, grace: Duration) {
        let drained = join_all(self.workers.iter_mut().map(|w| &mut w.drained));
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::info!("connections still open after the grace period; closing them");
        }
        self.stop_now().await;
    }

    /// Stops every worker's thread at once and waits until they ended.
    async fn stop_now(self) {
        self.stop_accepting.send_replace(true);
        for worker in &self.workers {
            worker.arbiter.stop();
        }
        let arbiters: Vec<Arbiter> = self.workers.into_iter().map(|w| w.arbiter).collect();
        let joined = tokio::task::spawn_blocking(move || {
            arbiters
                .into_iter()
                .filter_map(|arbiter| arbiter.join().err())
                .count()
        })
        .await;
        match joined {
            Ok(0) => {}
            Ok(panicked) => tracing::error!(workers = panicked, "HTTP worker thread panicked"),
            Err(e) => tracing::error!(error = %e, "could not wait for the HTTP workers"),
        }
    }
}

/// One worker's task, on its own thread.
struct Serve {
    index: usize,
    max_connections: usize,
    accepting: watch::Receiver<bool>,
    paused: oneshot::Sender<()>,
    drained: oneshot::Sender<()>,
}

impl Serve {
    async fn run<S>(
        mut self,
        listener: std::net::TcpListener,
        factory: S,
        started: oneshot::Sender<io::Result<()>>,
    ) where
        S: ServiceFactory<Accepted, Config = (), Response = (), InitError = ()>,
        S::Service: 'static,
    {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        };
        let Ok(service) = factory.new_service(()).await else {
            let _ = started.send(Err(io::Error::other("could not build the HTTP service")));
            return;
        };
        let service = Rc::new(service);
        if started.send(Ok(())).is_err() {
            return;
        }
        // One permit per connection being served: at the bound, the worker stops accepting
        // and new connections wait in the kernel's backlog.
        let slots = Arc::new(Semaphore::new(self.max_connections));
        while let Some(slot) = self.next_slot(&slots).await {
            let Some(accepted) = self.accept(&listener).await else {
                break;
            };
            let service = Rc::clone(&service);
            actix_rt::spawn(async move {
                if poll_fn(|cx| service.poll_ready(cx)).await.is_ok() {
                    let _ = service.call(accepted).await;
                }
                drop(slot);
            });
        }
        drop(listener);
        tracing::debug!(worker = self.index, "stopped accepting");
        let _ = self.paused.send(());
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        let _ = slots.acquire_many(all).await;
        let _ = self.drained.send(());
    }

    /// A free connection slot, or `None` once the worker is to stop accepting.
    async fn next_slot(
        &mut self,
        slots: &Arc<Semaphore>,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::select! {
            biased;
            _ = self.accepting.wait_for(|stop| *stop) => None,
            slot = Arc::clone(slots).acquire_owned() => slot.ok(),
        }
    }

    /// The next connection, or `None` once the worker is to stop accepting.
    async fn accept(&mut self, listener: &TcpListener) -> Option<Accepted> {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.accepting.wait_for(|stop| *stop) => return None,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok(accepted) => return Some(accepted),
                // The peer gave up before the accept: the next connection may be fine.
                Err(e) if is_about_one_connection(&e) => {}
                Err(e) => {
                    tracing::error!(worker = self.index, error = %e,
                        "accept failed; retrying in {ACCEPT_ERROR_BACKOFF:?}");
                    tokio::select! {
                        biased;
                        _ = self.accepting.wait_for(|stop| *stop) => return None,
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    }
                }
            }
        }
    }
}

/// Accept errors that concern only the connection being accepted (actix-server's list).
fn is_about_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use actix_service::fn_service;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::listener::Listener;

    /// How long a test waits for something that should happen at once.
    const SOON: Duration = Duration::from_secs(5);

    /// Workers whose service answers each connection with the name of the thread that
    /// serves it, once the client sent one byte, then hangs up.
    async fn start(count: usize, max_connections: usize) -> (Workers, SocketAddr) {
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        let service = || {
            fn_service(|(mut stream, _): Accepted| async move {
                let mut go = [0u8; 1];
                let _ = stream.read_exact(&mut go).await;
                let name = std::thread::current().name().unwrap_or_default().to_owned();
                let _ = stream.write_all(name.as_bytes()).await;
                Ok::<(), ()>(())
            })
        };
        let workers = Workers::start(
            listener.for_workers(count).unwrap(),
            max_connections,
            service,
        )
        .await
        .unwrap();
        (workers, addr)
    }

    /// Sends the byte that lets the service answer, and reads its answer to the end.
    async fn answer(stream: &mut tokio::net::TcpStream) -> String {
        stream.write_all(b"!").await.unwrap();
        let mut name = String::new();
        tokio::time::timeout(SOON, stream.read_to_string(&mut name))
            .await
            .expect("answered")
            .unwrap();
        name
    }

    #[actix_web::test]
    async fn every_worker_accepts_on_its_own_thread() {
        let (mut workers, addr) = start(2, 100).await;
        let mut threads = HashSet::new();
        // The kernel spreads connections by their ports: 40 all landing on one worker
        // would be a chance of 1 in 2^39.
        for _ in 0..40 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            threads.insert(answer(&mut stream).await);
        }
        assert_eq!(threads.len(), 2, "threads that served: {threads:?}");
        assert!(
            threads.iter().all(|t| t.starts_with("actix-rt|")),
            "{threads:?}"
        );
        workers.stop_accepting().await;
        workers.finish(SOON).await;
    }

    #[actix_web::test]
    async fn at_its_bound_a_worker_accepts_no_more_until_a_connection_ends() {
        let (mut workers, addr) = start(1, 1).await;
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Served: the service waits for its byte.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The kernel completes the handshake, but the worker does not take it yet.
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        second.write_all(b"!").await.unwrap();
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut byte)).await;
        assert!(early.is_err(), "served beyond the bound: {early:?}");
        assert!(!answer(&mut first).await.is_empty());
        let mut name = String::new();
        tokio::time::timeout(SOON, second.read_to_string(&mut name))
            .await
            .expect("served once the first ended")
            .unwrap();
        assert!(!name.is_empty());
        workers.stop_accepting().await;
        workers.finish(SOON).await;
    }

    #[actix_web::test]
    async fn stopping_refuses_new_connections_and_lets_served_ones_finish() {
        let (mut workers, addr) = start(2, 100).await;
        let mut served = Vec::new();
        for _ in 0..4 {
            served.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        workers.stop_accepting().await;
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(
            refused.is_err(),
            "connected after the workers stopped accepting"
        );

        let finishing = actix_rt::spawn(workers.finish(SOON));
        for stream in &mut served {
            assert!(!answer(stream).await.is_empty(), "finished after the stop");
        }
        let started = std::time::Instant::now();
        finishing.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "waited for nothing"
        );
    }

    #[actix_web::test]
    async fn what_outlasts_the_grace_is_closed() {
        let (mut workers, addr) = start(1, 100).await;
        let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        workers.stop_accepting().await;
        let started = std::time::Instant::now();
        workers.finish(Duration::from_millis(200)).await;
        assert!(started.elapsed() < SOON);
        // The worker's thread ended and dropped the connection: end of stream, no answer.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(SOON, stuck.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?} {rest:?}");
    }
}
