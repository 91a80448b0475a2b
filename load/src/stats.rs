//! What the virtual devices observed: per-endpoint latency histograms, outcomes by status, bytes,
//! event counters, and every upload receipt (for the exactly-once check).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use fedhive_shared::wire::UploadReceipt;
use serde::Serialize;

/// The device-facing endpoints the harness drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Checkin,
    Model,
    Upload,
}

impl Endpoint {
    pub const ALL: [Endpoint; 3] = [Endpoint::Checkin, Endpoint::Model, Endpoint::Upload];

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Checkin => "checkin",
            Endpoint::Model => "model",
            Endpoint::Upload => "upload",
        }
    }
}

struct EndpointStats {
    /// Microseconds from sending the request to having read the whole answer, one entry per
    /// request (4 bytes each: a 30-minute soak at 500 requests/s holds about 4 MB), so the
    /// percentiles are exact.
    latency_us: Vec<u32>,
    /// `"200"`, `"409 round_closed"`, `"transport"`, ...
    outcomes: BTreeMap<String, u64>,
    bytes_sent: u64,
    bytes_received: u64,
}

impl EndpointStats {
    fn new() -> Self {
        EndpointStats {
            latency_us: Vec::new(),
            outcomes: BTreeMap::new(),
            bytes_sent: 0,
            bytes_received: 0,
        }
    }
}

/// Event counters (atomics: every device task bumps them).
#[derive(Default)]
pub struct Counters {
    pub assignments: AtomicU64,
    pub retry_after: AtomicU64,
    pub dropped_after_checkin: AtomicU64,
    pub dropped_mid_upload: AtomicU64,
    pub download_failed: AtomicU64,
    pub late: AtomicU64,
    pub rejected: AtomicU64,
    pub retries: AtomicU64,
    pub busy_waits: AtomicU64,
    pub duplicates_sent: AtomicU64,
    pub duplicates_identical: AtomicU64,
    pub duplicates_different: AtomicU64,
    pub reconciled: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// An upload whose outcome the device never learnt (retries exhausted on transport errors, 5xx or
/// `upload_in_flight`); the harness asks again at the end with the same token and bytes.
#[derive(Debug, Clone)]
pub struct PendingUpload {
    pub token: String,
    pub variant: usize,
    pub num_samples: u64,
}

pub struct Stats {
    endpoints: Mutex<BTreeMap<Endpoint, EndpointStats>>,
    pub counters: Counters,
    /// Receipts by upload token. A token gets one receipt; a repeat must be identical.
    receipts: Mutex<HashMap<String, UploadReceipt>>,
    /// Tokens that got two different receipts (must stay empty).
    conflicting_receipts: Mutex<Vec<(UploadReceipt, UploadReceipt)>>,
    pending: Mutex<Vec<PendingUpload>>,
}

/// Summary of one endpoint for the report.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSummary {
    pub endpoint: Endpoint,
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub outcomes: BTreeMap<String, u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            endpoints: Mutex::new(Endpoint::ALL.iter().map(|&e| (e, EndpointStats::new())).collect()),
            counters: Counters::default(),
            receipts: Mutex::default(),
            conflicting_receipts: Mutex::default(),
            pending: Mutex::default(),
        }
    }
}

impl Stats {
    /// Records one request: its latency, outcome label and bytes on the wire (bodies only).
    pub fn record(&self, endpoint: Endpoint, latency: Duration, outcome: &str, sent: u64, received: u64) {
        let mut all = self.endpoints.lock().expect("stats lock");
        let e = all.get_mut(&endpoint).expect("every endpoint has stats");
        e.latency_us
            .push(latency.as_micros().min(u128::from(u32::MAX)) as u32);
        *e.outcomes.entry(outcome.to_string()).or_default() += 1;
        e.bytes_sent += sent;
        e.bytes_received += received;
    }

    /// Stores a receipt; a second, different receipt for the same token is kept as a conflict.
    pub fn receipt(&self, token: &str, receipt: UploadReceipt) {
        let mut receipts = self.receipts.lock().expect("receipts lock");
        match receipts.get(token) {
            Some(prev) if *prev != receipt => self
                .conflicting_receipts
                .lock()
                .expect("conflicts lock")
                .push((prev.clone(), receipt)),
            Some(_) => {}
            None => {
                receipts.insert(token.to_string(), receipt);
            }
        }
    }

    pub fn pending(&self, upload: PendingUpload) {
        self.pending.lock().expect("pending lock").push(upload);
    }

    pub fn take_pending(&self) -> Vec<PendingUpload> {
        std::mem::take(&mut *self.pending.lock().expect("pending lock"))
    }

    pub fn receipts(&self) -> Vec<UploadReceipt> {
        self.receipts
            .lock()
            .expect("receipts lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn accepted(&self) -> u64 {
        self.receipts.lock().expect("receipts lock").len() as u64
    }

    pub fn conflicting_receipts(&self) -> Vec<(UploadReceipt, UploadReceipt)> {
        self.conflicting_receipts.lock().expect("conflicts lock").clone()
    }

    /// Total requests and error answers (anything but 2xx/304) so far, for the progress line.
    pub fn totals(&self) -> (u64, u64) {
        let all = self.endpoints.lock().expect("stats lock");
        let mut requests = 0;
        let mut errors = 0;
        for e in all.values() {
            for (label, n) in &e.outcomes {
                requests += n;
                if !(label.starts_with('2') || label.starts_with("304")) {
                    errors += n;
                }
            }
        }
        (requests, errors)
    }

    pub fn summaries(&self, elapsed: Duration) -> Vec<EndpointSummary> {
        let all = self.endpoints.lock().expect("stats lock");
        let secs = elapsed.as_secs_f64().max(1e-9);
        all.iter()
            .map(|(&endpoint, e)| {
                let mut sorted = e.latency_us.clone();
                sorted.sort_unstable();
                // Nearest-rank percentile.
                let at = |q: f64| match sorted.len() {
                    0 => 0.0,
                    n => f64::from(sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1]) / 1000.0,
                };
                let requests = e.outcomes.values().sum();
                EndpointSummary {
                    endpoint,
                    requests,
                    requests_per_sec: requests as f64 / secs,
                    p50_ms: at(0.50),
                    p95_ms: at(0.95),
                    p99_ms: at(0.99),
                    max_ms: at(1.0),
                    outcomes: e.outcomes.clone(),
                    bytes_sent: e.bytes_sent,
                    bytes_received: e.bytes_received,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(seq: i64) -> UploadReceipt {
        UploadReceipt {
            round_id: 1,
            accepted_updates: seq,
            num_samples: 10,
            sha256: "ab".into(),
        }
    }

    #[test]
    fn repeated_receipts_count_once_and_conflicts_are_kept() {
        let stats = Stats::default();
        stats.receipt("t1", receipt(1));
        stats.receipt("t1", receipt(1));
        assert_eq!(stats.accepted(), 1);
        assert!(stats.conflicting_receipts().is_empty());
        stats.receipt("t1", receipt(2));
        assert_eq!(stats.accepted(), 1);
        assert_eq!(stats.conflicting_receipts().len(), 1);
    }

    #[test]
    fn summaries_report_percentiles_and_outcomes() {
        let stats = Stats::default();
        for ms in 1..=100 {
            stats.record(Endpoint::Upload, Duration::from_millis(ms), "200", 10, 1);
        }
        stats.record(
            Endpoint::Upload,
            Duration::from_millis(5),
            "409 round_closed",
            10,
            1,
        );
        let up = stats
            .summaries(Duration::from_secs(1))
            .into_iter()
            .find(|s| s.endpoint == Endpoint::Upload)
            .unwrap();
        assert_eq!(up.requests, 101);
        // 101 samples: 1..=100 ms and one 5 ms; nearest rank.
        assert_eq!(up.p50_ms, 50.0);
        assert_eq!(up.p99_ms, 99.0);
        assert_eq!(up.max_ms, 100.0);
        assert_eq!(up.outcomes["409 round_closed"], 1);
        assert_eq!(up.bytes_sent, 1010);
        assert_eq!(stats.totals(), (101, 1));
    }
}
