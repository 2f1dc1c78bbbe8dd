//! Herald's allocator, and handing back to the OS the memory that closed sessions freed.

use std::time::Duration;

use actix_rt::ArbiterHandle;
use herald_hub::Hub;

/// mimalloc instead of glibc's malloc, for the `herald` binary and every test that links
/// this crate. Opening, serving and closing sessions and answering publishes make many
/// small, short-lived allocations on the worker thread that owns them, which mimalloc
/// serves from that thread's own free lists (bench/analysis.md: less CPU per durable
/// publish and per churned session, about the same memory per connection).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often the count of closed sessions is checked.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Sessions that must have closed since the last release before another is worth its cost.
const CLOSED_BEFORE_RELEASE: u64 = 500;

/// Runs until aborted: after many sessions closed, asks the allocator on every HTTP
/// worker (where sessions live, and are freed) to give its free pages back to the OS, so
/// a node's RSS follows its connection count. mimalloc would otherwise keep a quiet
/// thread's emptied pages until that thread allocates again.
pub async fn release_after_closes(hub: Hub, workers: Vec<ArbiterHandle>) {
    let mut released_at = hub.sessions_closed();
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    loop {
        ticks.tick().await;
        let closed = hub.sessions_closed();
        if closed - released_at >= CLOSED_BEFORE_RELEASE {
            for worker in &workers {
                worker.spawn_fn(release_free_memory);
            }
            released_at = closed;
        }
    }
}

/// Frees the calling thread's empty allocator pages and purges what the process freed.
fn release_free_memory() {
    // SAFETY: `mi_collect` only walks the calling thread's own heap and the allocator's
    // shared arenas, under the allocator's own synchronisation.
    unsafe { libmimalloc_sys::mi_collect(true) };
    tracing::debug!("returned free memory to the OS");
}
