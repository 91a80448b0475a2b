//! The server's own metrics, served at `GET /metrics` in the Prometheus (OpenMetrics) text format.
//!
//! One [`Telemetry`] per server (no process-global recorder), so servers embedded side by side (the
//! simulator, tests) count only their own traffic. Labels are bounded: task ids, outcomes (a fixed
//! set of error codes), route templates (`/v1/tasks/{task_id}/checkin`, never a filled-in path),
//! methods and status codes; never a device, token or address. Task labels grow with the tasks this
//! process has served (one series per task and outcome).
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `fedhive_rounds_opened_total` | task | rounds opened (the first at task creation) |
//! | `fedhive_rounds_finished_total` | task, outcome = committed, abandoned | rounds finalised |
//! | `fedhive_updates_total` | task, outcome = accepted, replayed, late, or the refusal's error code | device uploads |
//! | `fedhive_checkins_total` | task, outcome = assigned, retry, finished, or the error code | device check-ins |
//! | `fedhive_anon_submissions_total` | task, outcome = accepted, duplicate, or the error code | anonymous sample submissions (nothing about the submitter) |
//! | `fedhive_http_request_duration_seconds` | route, method, status | every request (check-in and upload latency) |
//! | `fedhive_http_request_body_bytes_total`, `..._response_body_bytes_total` | route, method | bytes in and out |
//! | `fedhive_upload_stage_duration_seconds` | stage = queue, read, decode, store, accept, fold | an accepted upload's stages: `read` includes hashing (as the bytes arrive), `decode` (with the strategy's check) and `store` (the blob store's durable write) run at the same time, `accept` is the database transaction |
//! | `fedhive_group_commit_updates` | | accepted updates per database transaction (histogram: its count is transactions, its sum updates; see [`crate::group_commit`]) |
//! | `fedhive_group_fold_updates` | | accepted updates folded per pass over a round's sums (histogram: its count is passes, its sum updates; see [`crate::group_fold`]) |
//! | `fedhive_round_finalize_duration_seconds` | | closing, summing and committing a round (database and blob store included) |
//! | `fedhive_storage_duration_seconds` | store = database, blobs; op | the database's hot queries (task, round, active_round, assign, accept_update, finish_round) and blob put, get, delete_prefix |
//! | `fedhive_credential_refusals_total` | reason = unauthorized, forbidden | operator and cloud-worker requests refused for their credential (`401`: none, unknown or revoked; `403`: a token without the scope) |
//! | `fedhive_upload_slots`, `fedhive_upload_slots_busy`, `fedhive_upload_queue_depth` | | upload admission |
//! | `fedhive_open_connections` | | TCP connections open |
//! | `process_resident_memory_bytes` | | RSS (Linux) |
//!
//! Counters restart at zero with the process, as Prometheus expects.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::error::ApiError;

/// Content type of [`Telemetry::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskOutcome {
    task: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StorageOp {
    store: &'static str,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Stage {
    stage: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 0.5 ms to about 65 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

fn histograms<L: Clone + std::hash::Hash + Eq>() -> Histograms<L> {
    Family::new_with_constructor(latency_histogram)
}

/// Times database and blob-store operations into the server's metrics; the default (for a `Db` or
/// `BlobStore` used outside a server) times nothing.
#[derive(Clone, Debug, Default)]
pub struct StorageLatency(Option<Histograms<StorageOp>>);

impl StorageLatency {
    /// Runs `work`, recording how long it took under `store` and `op`.
    pub async fn time<T>(&self, store: &'static str, op: &'static str, work: impl Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let out = work.await;
        if let Some(histograms) = &self.0 {
            histograms
                .get_or_create(&StorageOp { store, op })
                .observe(started.elapsed().as_secs_f64());
        }
        out
    }
}

/// An accepted upload's stages, in the order they run (see [`crate::coordinator`]); `decode` and
/// `store` overlap, each timed on its own.
#[derive(Debug, Clone, Copy)]
pub struct UploadStages {
    pub queue: Duration,
    pub read: Duration,
    pub decode: Duration,
    pub store: Duration,
    pub accept: Duration,
    pub fold: Duration,
}

pub struct Telemetry {
    registry: Registry,
    rounds_opened: Family<TaskLabel, Counter>,
    rounds_finished: Family<TaskOutcome, Counter>,
    updates: Family<TaskOutcome, Counter>,
    checkins: Family<TaskOutcome, Counter>,
    anon_submissions: Family<TaskOutcome, Counter>,
    credential_refusals: Family<Reason, Counter>,
    request_duration: Histograms<Request>,
    request_bytes: Family<Route, Counter>,
    response_bytes: Family<Route, Counter>,
    upload_stages: Histograms<Stage>,
    finalize_duration: Histogram,
    group_commit_updates: Histogram,
    group_fold_updates: Histogram,
    round_sums: Family<Source, Counter>,
    round_sums_reread_bytes: Counter,
    storage: Histograms<StorageOp>,
    upload_slots: Gauge,
    upload_slots_busy: Gauge,
    upload_queue_depth: Gauge,
    open_connections: Gauge,
    resident_memory: Gauge,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        let mut t = Telemetry {
            registry: Registry::default(),
            rounds_opened: Family::default(),
            rounds_finished: Family::default(),
            updates: Family::default(),
            checkins: Family::default(),
            anon_submissions: Family::default(),
            credential_refusals: Family::default(),
            request_duration: histograms(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            upload_stages: histograms(),
            finalize_duration: latency_histogram(),
            group_commit_updates: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            group_fold_updates: Histogram::new(exponential_buckets(1.0, 2.0, 4)),
            round_sums: Family::default(),
            round_sums_reread_bytes: Counter::default(),
            storage: histograms(),
            upload_slots: Gauge::default(),
            upload_slots_busy: Gauge::default(),
            upload_queue_depth: Gauge::default(),
            open_connections: Gauge::default(),
            resident_memory: Gauge::default(),
        };
        let r = &mut t.registry;
        r.register("fedhive_rounds_opened", "Rounds opened", t.rounds_opened.clone());
        r.register(
            "fedhive_rounds_finished",
            "Rounds finalised, by outcome",
            t.rounds_finished.clone(),
        );
        r.register("fedhive_updates", "Device uploads, by outcome", t.updates.clone());
        r.register(
            "fedhive_checkins",
            "Device check-ins, by outcome",
            t.checkins.clone(),
        );
        r.register(
            "fedhive_anon_submissions",
            "Anonymous sample submissions, by outcome",
            t.anon_submissions.clone(),
        );
        r.register(
            "fedhive_credential_refusals",
            "Operator and cloud-worker requests refused for their credential, by reason",
            t.credential_refusals.clone(),
        );
        r.register(
            "fedhive_http_request_duration_seconds",
            "HTTP request latency, by route template, method and status",
            t.request_duration.clone(),
        );
        r.register(
            "fedhive_http_request_body_bytes",
            "Request body bytes read",
            t.request_bytes.clone(),
        );
        r.register(
            "fedhive_http_response_body_bytes",
            "Response body bytes sent",
            t.response_bytes.clone(),
        );
        r.register(
            "fedhive_upload_stage_duration_seconds",
            "Stages of accepted uploads (store: blob-store durable write; accept: database transaction)",
            t.upload_stages.clone(),
        );
        r.register(
            "fedhive_group_commit_updates",
            "Accepted updates recorded per database transaction (group commit)",
            t.group_commit_updates.clone(),
        );
        r.register(
            "fedhive_group_fold_updates",
            "Accepted updates folded per pass over a round's sums (group fold)",
            t.group_fold_updates.clone(),
        );
        r.register(
            "fedhive_round_finalize_duration_seconds",
            "Time to finalise a round (sums, database and blob store)",
            t.finalize_duration.clone(),
        );
        r.register(
            "fedhive_round_sums_updates",
            "Updates in the sums of finalised rounds, by where the finaliser found them (local: its own \
             sums; partial: another replica's; reread: decoded again from the stored update)",
            t.round_sums.clone(),
        );
        r.register(
            "fedhive_round_sums_reread_bytes",
            "Bytes of stored updates read again to rebuild round sums (after a restart or a replica's death)",
            t.round_sums_reread_bytes.clone(),
        );
        r.register(
            "fedhive_storage_duration_seconds",
            "Database queries and blob-store operations",
            t.storage.clone(),
        );
        r.register(
            "fedhive_upload_slots",
            "Upload processing slots",
            t.upload_slots.clone(),
        );
        r.register(
            "fedhive_upload_slots_busy",
            "Upload processing slots in use",
            t.upload_slots_busy.clone(),
        );
        r.register(
            "fedhive_upload_queue_depth",
            "Uploads waiting for a processing slot",
            t.upload_queue_depth.clone(),
        );
        r.register(
            "fedhive_open_connections",
            "Open TCP connections",
            t.open_connections.clone(),
        );
        r.register(
            "process_resident_memory_bytes",
            "Resident set size of the server process",
            t.resident_memory.clone(),
        );
        t
    }

    pub fn round_opened(&self, task: &str) {
        self.rounds_opened
            .get_or_create(&TaskLabel { task: task.into() })
            .inc();
    }

    pub fn round_finished(&self, task: &str, committed: bool) {
        let outcome = if committed { "committed" } else { "abandoned" };
        self.rounds_finished
            .get_or_create(&TaskOutcome {
                task: task.into(),
                outcome,
            })
            .inc();
    }

    /// An upload's outcome: `accepted`, `replayed` (a retry answered with its stored receipt),
    /// `late` (its round had closed) or the refusal's error code. `task` is empty when the upload
    /// named no known round.
    pub fn upload(&self, task: &str, result: Result<&'static str, &ApiError>) {
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(ApiError::RoundClosed(_)) => "late",
            Err(e) => e.code(),
        };
        self.updates
            .get_or_create(&TaskOutcome {
                task: task.into(),
                outcome,
            })
            .inc();
    }

    /// A check-in's outcome: `assigned`, `retry`, `finished` or the refusal's error code.
    pub fn checkin(&self, task: &str, outcome: Result<&'static str, &ApiError>) {
        let outcome = outcome.unwrap_or_else(ApiError::code);
        self.checkins
            .get_or_create(&TaskOutcome {
                task: task.into(),
                outcome,
            })
            .inc();
    }

    /// An anonymous submission's outcome: `accepted`, `duplicate` or the refusal's error code.
    pub fn anon_submission(&self, task: &str, outcome: Result<&'static str, &ApiError>) {
        let outcome = outcome.unwrap_or_else(ApiError::code);
        self.anon_submissions
            .get_or_create(&TaskOutcome {
                task: task.into(),
                outcome,
            })
            .inc();
    }

    /// A request refused for its credential: `unauthorized` (none, unknown or revoked) or
    /// `forbidden` (a token without the scope). Counted rather than written to the audit log, so
    /// that anyone's refused requests cannot fill the database.
    pub fn credential_refused(&self, error: &ApiError) {
        let reason = match error {
            ApiError::Forbidden { .. } => "forbidden",
            _ => "unauthorized",
        };
        self.credential_refusals.get_or_create(&Reason { reason }).inc();
    }

    pub fn upload_stages(&self, s: &UploadStages) {
        let stages = [
            ("queue", s.queue),
            ("read", s.read),
            ("decode", s.decode),
            ("store", s.store),
            ("accept", s.accept),
            ("fold", s.fold),
        ];
        for (stage, took) in stages {
            self.upload_stages
                .get_or_create(&Stage { stage })
                .observe(took.as_secs_f64());
        }
    }

    /// Where a finalisation found its round's updates: `local`, `partial` or `reread` (with the
    /// bytes read again).
    pub fn round_sums(&self, local: u64, partial: u64, reread: u64, reread_bytes: u64) {
        for (source, n) in [("local", local), ("partial", partial), ("reread", reread)] {
            self.round_sums.get_or_create(&Source { source }).inc_by(n);
        }
        self.round_sums_reread_bytes.inc_by(reread_bytes);
    }

    /// The histogram a group commit records its transactions' sizes in.
    pub fn group_commit_updates(&self) -> Histogram {
        self.group_commit_updates.clone()
    }

    /// The histogram a group fold records its passes' sizes in.
    pub fn group_fold_updates(&self) -> Histogram {
        self.group_fold_updates.clone()
    }

    pub fn round_finalized(&self, took: Duration) {
        self.finalize_duration.observe(took.as_secs_f64());
    }

    /// One HTTP request: `route` is the matched route template (or `unmatched`).
    pub fn request(&self, route: &str, method: &str, status: u16, took: Duration) {
        self.request_duration
            .get_or_create(&Request {
                route: route.into(),
                method: method.into(),
                status,
            })
            .observe(took.as_secs_f64());
    }

    /// A counter of request body bytes for the route, to add to as the body is read.
    pub fn request_body_counter(&self, route: &str, method: &str) -> Counter {
        self.request_bytes
            .get_or_create(&Route {
                route: route.into(),
                method: method.into(),
            })
            .clone()
    }

    /// A counter of response body bytes for the route, to add to as the body is sent.
    pub fn response_body_counter(&self, route: &str, method: &str) -> Counter {
        self.response_bytes
            .get_or_create(&Route {
                route: route.into(),
                method: method.into(),
            })
            .clone()
    }

    /// A handle that times storage operations into this registry.
    pub fn storage_latency(&self) -> StorageLatency {
        StorageLatency(Some(self.storage.clone()))
    }

    /// The gauge of open connections, for the accept loop to keep current.
    pub fn open_connections(&self) -> Gauge {
        self.open_connections.clone()
    }

    /// Every metric in the text format, with the gauges read now.
    pub fn render(&self, slots: usize, slots_busy: usize, queued: usize) -> String {
        self.upload_slots.set(slots as i64);
        self.upload_slots_busy.set(slots_busy as i64);
        self.upload_queue_depth.set(queued as i64);
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(rss as i64);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The process's resident set size from `/proc/self/statm` (Linux; `None` elsewhere).
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_their_labels_and_the_gauges() {
        let t = Telemetry::new();
        t.round_opened("t-1");
        t.round_finished("t-1", true);
        t.upload("t-1", Ok("accepted"));
        t.upload("t-1", Ok("accepted"));
        t.upload("t-1", Err(&ApiError::RoundClosed(3)));
        t.upload("", Err(&ApiError::UnknownToken));
        t.request("/v1/updates", "PUT", 200, Duration::from_millis(3));
        t.credential_refused(&ApiError::Unauthorized);
        t.request_body_counter("/v1/updates", "PUT").inc_by(1234);
        let text = t.render(4, 1, 2);
        for line in [
            r#"fedhive_rounds_opened_total{task="t-1"} 1"#,
            r#"fedhive_rounds_finished_total{task="t-1",outcome="committed"} 1"#,
            r#"fedhive_updates_total{task="t-1",outcome="accepted"} 2"#,
            r#"fedhive_updates_total{task="t-1",outcome="late"} 1"#,
            r#"fedhive_updates_total{task="",outcome="unknown_token"} 1"#,
            r#"fedhive_http_request_duration_seconds_count{route="/v1/updates",method="PUT",status="200"} 1"#,
            r#"fedhive_http_request_body_bytes_total{route="/v1/updates",method="PUT"} 1234"#,
            r#"fedhive_credential_refusals_total{reason="unauthorized"} 1"#,
            "fedhive_upload_slots 4",
            "fedhive_upload_slots_busy 1",
            "fedhive_upload_queue_depth 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        #[cfg(target_os = "linux")]
        assert!(
            text.lines()
                .any(|l| l.starts_with("process_resident_memory_bytes ") && !l.ends_with(" 0"))
        );
    }
}
