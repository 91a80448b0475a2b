//! The final report: a human-readable table and one JSON line.

use std::{collections::BTreeMap, fmt::Write};

use serde::Serialize;

use crate::{
    discard::Baseline,
    profile::{RoundSums, StageTime},
    replicas::ReplicaUsage,
    server::ProcSample,
    stats::EndpointSummary,
    verify::Verification,
};

/// What the run was asked to do.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub devices: usize,
    pub devices_per_round: u32,
    pub params: usize,
    pub update_bytes: u64,
    pub update_encoding: fedhive_shared::wire::UpdateEncoding,
    pub database: String,
    /// `directory`, or the `s3://` URL of the blob store.
    pub blob_store: String,
    pub train_ms: u64,
    pub dropout: f64,
    pub retries: u32,
    pub duplicate_rate: f64,
    pub max_concurrent_uploads: usize,
    pub max_queued_uploads: usize,
    pub duration_secs: f64,
    /// Server replicas behind the balancer (1: no balancer).
    pub replicas: usize,
}

/// Times between consecutive commits, as the harness's monitor saw them (200 ms polling).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundTimes {
    pub measured: usize,
    pub mean_secs: f64,
    pub p50_secs: f64,
    pub min_secs: f64,
    pub max_secs: f64,
    /// Accepted updates per second between the first and the last observed commit (ramp-up excluded).
    pub steady_updates_per_sec: f64,
}

impl RoundTimes {
    /// `commits`: (seconds since start, accepted updates of the round that committed then).
    pub fn from_commits(commits: &[(f64, i64)]) -> RoundTimes {
        if commits.len() < 2 {
            return RoundTimes::default();
        }
        let mut gaps: Vec<f64> = commits.windows(2).map(|w| w[1].0 - w[0].0).collect();
        let span = commits.last().expect("two or more").0 - commits[0].0;
        let updates: i64 = commits[1..].iter().map(|c| c.1).sum();
        gaps.sort_by(f64::total_cmp);
        RoundTimes {
            measured: gaps.len(),
            mean_secs: gaps.iter().sum::<f64>() / gaps.len() as f64,
            p50_secs: gaps[gaps.len() / 2],
            min_secs: gaps[0],
            max_secs: gaps[gaps.len() - 1],
            steady_updates_per_sec: if span > 0.0 { updates as f64 / span } else { 0.0 },
        }
    }
}

/// Memory and CPU of one process over the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessUsage {
    pub pid: u32,
    /// VmHWM at the end of the run.
    pub peak_rss_bytes: u64,
    pub end_rss_bytes: u64,
    /// Largest VmRSS seen in each tenth of the run: flat means no growth with time.
    pub rss_by_tenth: Vec<u64>,
    pub cpu_secs: f64,
    /// CPU seconds per wall second (2.0 = both cores of this machine).
    pub cpu_cores_used: f64,
}

impl ProcessUsage {
    pub fn new(pid: u32, samples: &[(f64, ProcSample)], last: ProcSample, first_cpu: f64, secs: f64) -> Self {
        let mut tenths = vec![0u64; 10];
        for (t, s) in samples {
            let i = ((t / secs.max(1e-9)) * 10.0).floor().clamp(0.0, 9.0) as usize;
            tenths[i] = tenths[i].max(s.rss_bytes);
        }
        ProcessUsage {
            pid,
            peak_rss_bytes: last.peak_rss_bytes,
            end_rss_bytes: last.rss_bytes,
            rss_by_tenth: tenths,
            cpu_secs: last.cpu_secs - first_cpu,
            cpu_cores_used: (last.cpu_secs - first_cpu) / secs.max(1e-9),
        }
    }
}

/// Counts of device-side events.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Events {
    pub assignments: u64,
    pub retry_after: u64,
    pub dropped_after_checkin: u64,
    pub dropped_mid_upload: u64,
    pub download_failed: u64,
    /// Uploads refused with `409 round_closed` (the round had its K updates or passed its deadline).
    pub late: u64,
    /// Uploads refused for another reason (must stay 0 with valid synthetic updates).
    pub rejected: u64,
    pub retries: u64,
    /// Requests answered `503 server_busy` and sent again when the server said.
    pub busy_waits: u64,
    pub duplicates_sent: u64,
    pub duplicates_identical: u64,
    pub duplicates_different: u64,
    /// Uploads with an unknown outcome that the final reconciliation found accepted.
    pub reconciled_accepted: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub setup: Setup,
    pub seconds: f64,
    pub task_id: String,
    pub rounds_committed: i64,
    pub rounds_abandoned: i64,
    pub updates_accepted: u64,
    pub updates_per_sec: f64,
    pub round_times: RoundTimes,
    pub endpoints: Vec<EndpointSummary>,
    /// Non-success answers by `endpoint status code`.
    pub errors: BTreeMap<String, u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub events: Events,
    pub server: Option<ProcessUsage>,
    pub generator: ProcessUsage,
    pub exactly_once: Verification,
    /// Mean server time of an accepted upload per stage (the server's `/metrics`).
    pub server_stages: Vec<StageTime>,
    /// The machine's own limit for these uploads, measured after the run (`--baseline-secs`).
    pub baseline: Option<BaselineComparison>,
    /// The same, with the discard server writing and fsyncing every body before its answer: the
    /// limit the disk sets on an ingest that acknowledges only what is on disk.
    pub durable_baseline: Option<BaselineComparison>,
    /// Each server replica the harness started, its processes' memory and CPU.
    pub replicas: Vec<ReplicaUsage>,
    /// The replicas' CPU time per accepted update, milliseconds: with several replicas, what
    /// coordinating them costs shows against one replica's figure.
    pub server_cpu_ms_per_update: Option<f64>,
    /// Where the finalisers found the rounds' updates (running replicas' counters only).
    pub round_sums: Option<RoundSums>,
    /// Replicas killed with SIGKILL by the fault mode (`--kill-every-secs`).
    pub replica_kills: u64,
}

/// The run's ingest against the discard server's, same devices and bodies.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineComparison {
    #[serde(flatten)]
    pub baseline: Baseline,
    /// The run's accepted updates per second between commits (over the whole run if fewer than
    /// two commits were seen) divided by the discard server's uploads per second.
    pub ingest_ratio: f64,
}

impl BaselineComparison {
    pub fn new(baseline: Baseline, report: &Report) -> BaselineComparison {
        let steady = report.round_times.steady_updates_per_sec;
        let rate = if steady > 0.0 {
            steady
        } else {
            report.updates_per_sec
        };
        BaselineComparison {
            ingest_ratio: if baseline.uploads_per_sec > 0.0 {
                rate / baseline.uploads_per_sec
            } else {
                0.0
            },
            baseline,
        }
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Report {
    pub fn errors_from(endpoints: &[EndpointSummary]) -> BTreeMap<String, u64> {
        let mut errors = BTreeMap::new();
        for e in endpoints {
            for (label, n) in &e.outcomes {
                if !(label.starts_with('2') || label.starts_with("304")) {
                    errors.insert(format!("{} {label}", e.endpoint.name()), *n);
                }
            }
        }
        errors
    }

    /// The human-readable form.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let s = &self.setup;
        let _ = writeln!(
            out,
            "fedhive-load: {} devices, K={} per round, {} params ({:.2} MB {:?} updates), {}, blobs {}, {:.0} s",
            s.devices,
            s.devices_per_round,
            s.params,
            mb(s.update_bytes),
            s.update_encoding,
            s.database,
            s.blob_store,
            self.seconds
        );
        let _ = writeln!(
            out,
            "{:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "endpoint", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"
        );
        for e in &self.endpoints {
            let _ = writeln!(
                out,
                "{:<9} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                e.endpoint.name(),
                e.requests,
                e.requests_per_sec,
                e.p50_ms,
                e.p95_ms,
                e.p99_ms,
                e.max_ms
            );
        }
        let _ = writeln!(
            out,
            "rounds committed {} (abandoned {}), updates accepted {} ({:.1}/s over the run, {:.1}/s between commits)",
            self.rounds_committed,
            self.rounds_abandoned,
            self.updates_accepted,
            self.updates_per_sec,
            self.round_times.steady_updates_per_sec
        );
        let rt = &self.round_times;
        if rt.measured > 0 {
            let _ = writeln!(
                out,
                "round time: mean {:.2} s, p50 {:.2} s, min {:.2} s, max {:.2} s over {} rounds",
                rt.mean_secs, rt.p50_secs, rt.min_secs, rt.max_secs, rt.measured
            );
        }
        let _ = writeln!(
            out,
            "bytes: sent {:.1} MB, received {:.1} MB",
            mb(self.bytes_sent),
            mb(self.bytes_received)
        );
        let ev = &self.events;
        let _ = writeln!(
            out,
            "events: {} assignments, {} retry-after, {} late (409 round_closed), {} dropped after check-in, \
             {} dropped mid-upload, {} retries, {} server-busy waits, {} duplicates ({} identical receipts), {} rejected",
            ev.assignments,
            ev.retry_after,
            ev.late,
            ev.dropped_after_checkin,
            ev.dropped_mid_upload,
            ev.retries,
            ev.busy_waits,
            ev.duplicates_sent,
            ev.duplicates_identical,
            ev.rejected
        );
        if !self.errors.is_empty() {
            let list: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let _ = writeln!(out, "non-2xx answers: {}", list.join(", "));
        }
        let usage = |name: &str, u: &ProcessUsage| {
            let tenths: Vec<String> = u.rss_by_tenth.iter().map(|b| format!("{:.0}", mb(*b))).collect();
            format!(
                "{name}: peak RSS {:.1} MB, end {:.1} MB, RSS by tenth of the run [{}] MB, CPU {:.1} s ({:.2} cores)",
                mb(u.peak_rss_bytes),
                mb(u.end_rss_bytes),
                tenths.join(" "),
                u.cpu_secs,
                u.cpu_cores_used
            )
        };
        if let Some(server) = &self.server {
            let _ = writeln!(out, "{}", usage("server", server));
        }
        let _ = writeln!(out, "{}", usage("load generator", &self.generator));
        if !self.server_stages.is_empty() {
            let total: f64 = self.server_stages.iter().map(|s| s.mean_ms).sum();
            let parts: Vec<String> = self
                .server_stages
                .iter()
                .map(|s| format!("{} {:.2}", s.stage, s.mean_ms))
                .collect();
            let _ = writeln!(
                out,
                "server time per accepted upload (mean ms, wall): {} = {:.2}",
                parts.join(", "),
                total
            );
        }
        for r in &self.replicas {
            let _ = writeln!(
                out,
                "replica {}: peak RSS {:.1} MB, CPU {:.1} s, killed {} times",
                r.name,
                mb(r.peak_rss_bytes),
                r.cpu_secs,
                r.kills
            );
        }
        if let Some(ms) = self.server_cpu_ms_per_update {
            let _ = writeln!(out, "server CPU per accepted update: {ms:.2} ms (all replicas)");
        }
        if let Some(rs) = &self.round_sums {
            let _ = writeln!(
                out,
                "round sums: {} updates from the finaliser's own sums, {} handed over by other replicas, \
                 {} read again ({:.1} MB); {} replica kills",
                rs.local,
                rs.partial,
                rs.reread,
                mb(rs.reread_bytes),
                self.replica_kills
            );
        }
        let baselines = [
            ("discard server", &self.baseline),
            ("discard server fsyncing each body", &self.durable_baseline),
        ];
        for (what, b) in baselines {
            let Some(b) = b else { continue };
            let _ = writeln!(
                out,
                "baseline ({what}, same {} devices and bodies, {:.0} s): {:.1} uploads/s, {:.0} MB/s, \
                 {} failed, its CPU {:.2} cores; this run's ingest = {:.3} of it",
                b.baseline.devices,
                b.baseline.seconds,
                b.baseline.uploads_per_sec,
                b.baseline.megabytes_per_sec,
                b.baseline.failed,
                b.baseline.server_cpu_cores,
                b.ingest_ratio
            );
        }
        let v = &self.exactly_once;
        let _ = writeln!(
            out,
            "exactly-once: {} ({} rounds, server accepted {}, receipts {}, {} mismatched rounds, {} conflicting receipts, {} unresolved)",
            if v.ok { "OK" } else { "FAILED" },
            v.rounds_checked,
            v.server_accepted,
            v.receipts,
            v.mismatches.len(),
            v.conflicting_receipts,
            v.unresolved_uploads
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_times_skip_the_first_round() {
        let rt = RoundTimes::from_commits(&[(5.0, 10), (7.0, 10), (10.0, 10)]);
        assert_eq!(rt.measured, 2);
        assert_eq!((rt.min_secs, rt.max_secs, rt.mean_secs), (2.0, 3.0, 2.5));
        assert_eq!(rt.steady_updates_per_sec, 20.0 / 5.0);
        assert_eq!(RoundTimes::from_commits(&[(1.0, 3)]).measured, 0);
    }

    #[test]
    fn rss_goes_into_tenths() {
        let s = |rss| ProcSample {
            rss_bytes: rss,
            peak_rss_bytes: rss,
            cpu_secs: 1.0,
        };
        let u = ProcessUsage::new(1, &[(0.5, s(5)), (9.9, s(7)), (9.95, s(6))], s(7), 0.5, 10.0);
        assert_eq!(u.rss_by_tenth[0], 5);
        assert_eq!(u.rss_by_tenth[9], 7);
        assert_eq!(u.cpu_secs, 0.5);
    }
}
