//! The harness against the real server binary: a few seconds of load with dropouts and duplicate
//! deliveries must end with the exactly-once check passing, on SQLite (f32 updates) and on
//! PostgreSQL (int8 updates), with the stage profile and the discard-server baselines (plain and fsyncing) in the report.

use std::process::Command;

use serde_json::Value;

fn run(extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fedhive-load"))
        .args(["run", "--quiet", "--devices", "40", "--devices-per-round", "8"])
        .args(["--params", "20000", "--train-ms", "150", "--duration-secs", "6"])
        .args([
            "--dropout",
            "0.15",
            "--duplicate-rate",
            "0.2",
            "--checkin-retry-ms",
            "100",
        ])
        .args([
            "--threads",
            "2",
            "--round-deadline-secs",
            "2",
            "--baseline-secs",
            "2",
        ])
        .args(extra)
        .output()
        .expect("running fedhive-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fedhive-load failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("the last line is JSON")
}

fn check(report: &Value) {
    let n = |path: &[&str]| {
        path.iter()
            .fold(report, |v, k| &v[*k])
            .as_f64()
            .unwrap_or_else(|| panic!("{path:?} missing in {report}"))
    };
    assert_eq!(report["exactly_once"]["ok"], true, "{report}");
    assert!(n(&["rounds_committed"]) >= 2.0, "{report}");
    // One replica, never killed: every round's sums are its own, none is read back from the blobs.
    assert_eq!(n(&["round_sums", "reread"]), 0.0, "{report}");
    assert_eq!(n(&["exactly_once", "server_accepted"]), n(&["updates_accepted"]));
    assert!(n(&["updates_accepted"]) >= 16.0);
    // Both kinds of dropout and the duplicate deliveries happened, and duplicates were harmless.
    assert!(n(&["events", "dropped_after_checkin"]) + n(&["events", "dropped_mid_upload"]) > 0.0);
    assert!(n(&["events", "duplicates_sent"]) > 0.0);
    assert_eq!(
        n(&["events", "duplicates_identical"]),
        n(&["events", "duplicates_sent"])
    );
    assert_eq!(n(&["events", "rejected"]), 0.0, "{report}");
    // Every endpoint was measured and the server's memory was read from /proc.
    for e in report["endpoints"].as_array().unwrap() {
        assert!(e["requests"].as_u64().unwrap() > 0, "{e}");
        assert!(e["p99_ms"].as_f64().unwrap() >= e["p50_ms"].as_f64().unwrap());
    }
    assert!(n(&["server", "peak_rss_bytes"]) > 1e6);
    assert!(n(&["bytes_sent"]) >= n(&["updates_accepted"]) * n(&["setup", "update_bytes"]));
    // The stage profile covers every accepted upload, once each, in pipeline order.
    let stages = report["server_stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["queue", "read", "decode", "store", "accept", "fold"],
        "{report}"
    );
    for stage in stages {
        assert_eq!(
            stage["uploads"].as_f64(),
            Some(n(&["updates_accepted"])),
            "{stage}"
        );
    }
    // The discard server took the same bodies, faster than the server under test.
    assert!(n(&["baseline", "uploads"]) > 0.0, "{report}");
    assert_eq!(n(&["baseline", "failed"]), 0.0, "{report}");
    let ratio = n(&["baseline", "ingest_ratio"]);
    assert!(ratio > 0.0 && ratio < 1.0, "{report}");
    // And with every body fsynced.
    assert!(n(&["durable_baseline", "uploads"]) > 0.0, "{report}");
    assert_eq!(n(&["durable_baseline", "failed"]), 0.0, "{report}");
    assert!(n(&["durable_baseline", "ingest_ratio"]) > 0.0, "{report}");
}

#[test]
fn sqlite_load_counts_every_update_once() {
    check(&run(&[]));
}

#[test]
fn postgres_load_counts_every_update_once() {
    let server = std::env::var("FEDHIVE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let report = run(&["--postgres", &server, "--update-encoding", "int8"]);
    assert_eq!(report["setup"]["database"], "postgres");
    assert_eq!(report["setup"]["update_encoding"], "int8");
    check(&report);
}
