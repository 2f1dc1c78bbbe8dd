//! Hands memory that closed sessions freed back to the OS (glibc keeps it otherwise).

use std::time::Duration;

use herald_hub::Hub;

/// How often the session count is checked.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Sessions that must have closed since the last trim before another is worth its cost.
const CLOSED_BEFORE_TRIM: usize = 500;

/// Runs until the hub stops answering: after many sessions closed, asks glibc to
/// release the free pages it holds, so a node's RSS follows its connection count.
pub async fn trim_after_closes(hub: Hub) {
    let mut high_water = 0usize;
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    loop {
        ticks.tick().await;
        let Ok(stats) = hub.stats().await else { return };
        high_water = high_water.max(stats.sessions);
        if high_water - stats.sessions >= CLOSED_BEFORE_TRIM {
            release_free_memory();
            high_water = stats.sessions;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is thread-safe.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released = released == 1, "returned free memory to the OS");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
