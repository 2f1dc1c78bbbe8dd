//! Command-line arguments: the scenario, the hub's URL and body templates, sizes and rates.

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Hold the sessions with heartbeats on; measures memory and idle CPU.
    Idle,
    /// Each publish goes to one random user.
    Unicast,
    /// Each publish names `--multicast-size` random users.
    Multicast,
    /// Each publish goes to every session.
    Broadcast,
    /// Sessions open and close at `--rate` per second.
    Churn,
    /// Broadcast while `--stalled` sessions stop reading; they must be evicted.
    Stalled,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Unicast => "unicast",
            Scenario::Multicast => "multicast",
            Scenario::Broadcast => "broadcast",
            Scenario::Churn => "churn",
            Scenario::Stalled => "stalled",
        }
    }
}

/// Load generator for Herald and its peers. Templates take {user}, {users} (a JSON array),
/// {ts} (send time, µs since the epoch) and {id} (message id); deliveries are recognised
/// by the `"hb_t":` and `"hb_n":` numbers anywhere in a frame.
///
/// Every URL option may be given several times, one per node of a cluster: sessions go
/// round-robin over the subscriber URLs (a user's sessions on consecutive nodes), publisher
/// connection k sends to the (k mod n)-th publish URL.
#[derive(Debug, Clone, Parser)]
#[command(name = "herald-bench", version)]
pub struct Args {
    pub scenario: Scenario,

    /// WebSocket URL of one subscriber (repeatable: sessions go round-robin over them).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws/{user}")]
    pub sub_url: Vec<String>,
    /// Subscriber URL for `broadcast` and `stalled` (for hubs whose broadcast is a shared channel).
    #[arg(long)]
    pub broadcast_sub_url: Vec<String>,
    /// Publish URL for `unicast` (repeatable: publisher connections go round-robin over them).
    #[arg(
        long,
        default_value = "http://127.0.0.1:8080/v1/users/{user}/notifications"
    )]
    pub pub_url: Vec<String>,
    #[arg(long, default_value = r#"{"data":{"hb_t":{ts},"hb_n":{id}}}"#)]
    pub body: String,
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/notifications")]
    pub multicast_url: Vec<String>,
    #[arg(
        long,
        default_value = r#"{"users":{users},"data":{"hb_t":{ts},"hb_n":{id}}}"#
    )]
    pub multicast_body: String,
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/broadcast")]
    pub broadcast_url: Vec<String>,
    #[arg(long, default_value = r#"{"data":{"hb_t":{ts},"hb_n":{id}}}"#)]
    pub broadcast_body: String,
    /// Extra publish header, `Name: value` (repeatable), e.g. `Authorization: Bearer KEY`.
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Count a session connected only after the hub's first frame (Herald's hello).
    #[arg(long)]
    pub greeting: bool,

    /// Subscriber sessions (churn: sessions open at once).
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Users the sessions are spread over; default: one per session.
    #[arg(long)]
    pub users: Option<usize>,
    #[arg(long, default_value = "u")]
    pub user_prefix: String,
    /// Measured phase, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Publishes per second (churn: connects per second); 0 means as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Keep-alive publisher connections, one request in flight on each.
    #[arg(long, default_value_t = 8)]
    pub publishers: usize,
    #[arg(long, default_value_t = 10)]
    pub multicast_size: usize,
    /// Sessions that stop reading in the `stalled` scenario.
    #[arg(long, default_value_t = 0)]
    pub stalled: usize,

    /// The hub's process id(s) for RSS and CPU from /proc (repeatable; summed).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// First source address: 127.0.0.N.
    #[arg(long, default_value_t = 2)]
    pub source_base: u8,
    /// Sessions per source address (each gives about 28k ephemeral ports).
    #[arg(long, default_value_t = 25_000)]
    pub per_source: usize,
    /// Sessions per process; more start worker processes (the open-file limit is 20,000).
    #[arg(long, default_value_t = 19_000)]
    pub max_per_process: usize,
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Seconds between connecting and measuring (the hub settles, registries join).
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// churn: seconds of the same churn before the RSS baseline is taken, so the baseline
    /// is a hub that has served connections (code paged in, allocator pools at working
    /// size) and the run measures what churn adds on top. 0: a fresh hub's baseline.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Seconds to wait for outstanding deliveries after publishing stops.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Seconds a stalled session waits, still silent to the hub, for the hub to close it
    /// (longer than the hub's heartbeat timeout).
    #[arg(long, default_value_t = 40.0)]
    pub evict_wait: f64,

    /// Also report latency by when each message was sent, in slices of this many
    /// milliseconds (e.g. 1000), to see when a run's tail happened; 0: not at all.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub timeline: u64,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 1 when the run found a correctness problem.
    #[arg(long)]
    pub strict: bool,
}

impl Args {
    pub fn users(&self) -> usize {
        self.users.unwrap_or(self.sessions).max(1)
    }

    pub fn rate(&self) -> Option<f64> {
        (self.rate > 0.0).then_some(self.rate)
    }
}
