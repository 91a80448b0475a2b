//! Where an accepted upload's time went on the server: the mean of each stage of
//! `fedhive_upload_stage_duration_seconds` (queue, read, decode, store, accept, fold), read
//! from the server's own `/metrics` at the end of a run. The stages are timed by the coordinator
//! around each step of an upload, so they are wall time of that upload (waiting included), not CPU.

use serde::Serialize;

/// The metric the coordinator records an accepted upload's stages under.
const METRIC: &str = "fedhive_upload_stage_duration_seconds";

/// One stage's total over the run's accepted uploads.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageTime {
    pub stage: String,
    pub uploads: u64,
    pub mean_ms: f64,
}

/// The stages in the order an upload goes through them (`fedhive_server::telemetry::UploadStages`).
const PIPELINE: [&str; 6] = ["queue", "read", "decode", "store", "accept", "fold"];

/// Reads every stage's `_sum` and `_count` out of a Prometheus text exposition, in pipeline order
/// (a stage the harness does not know goes last).
pub fn stages(metrics: &str) -> Vec<StageTime> {
    let mut out: Vec<(String, f64, u64)> = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(METRIC) else {
            continue;
        };
        let (kind, rest) = if let Some(r) = rest.strip_prefix("_sum{") {
            ("sum", r)
        } else if let Some(r) = rest.strip_prefix("_count{") {
            ("count", r)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(stage) = labels
            .split(',')
            .find_map(|l| l.strip_prefix("stage=\""))
            .and_then(|s| s.strip_suffix('"'))
        else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let i = match out.iter().position(|(s, _, _)| s == stage) {
            Some(i) => i,
            None => {
                out.push((stage.to_string(), 0.0, 0));
                out.len() - 1
            }
        };
        match kind {
            "sum" => out[i].1 = value,
            _ => out[i].2 = value as u64,
        }
    }
    out.sort_by_key(|(stage, _, _)| PIPELINE.iter().position(|p| p == stage).unwrap_or(PIPELINE.len()));
    out.into_iter()
        .map(|(stage, sum, uploads)| StageTime {
            mean_ms: if uploads > 0 {
                sum * 1e3 / uploads as f64
            } else {
                0.0
            },
            stage,
            uploads,
        })
        .collect()
}

/// Where the finalisers found their rounds' updates (`fedhive_round_sums_updates`), summed over
/// the replicas' expositions: their own sums, sums another replica handed over, or read again
/// from the blob store (a replica died or restarted), and the bytes read again.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoundSums {
    pub local: u64,
    pub partial: u64,
    pub reread: u64,
    pub reread_bytes: u64,
}

pub fn round_sums<'a>(expositions: impl IntoIterator<Item = &'a str>) -> RoundSums {
    let mut total = RoundSums::default();
    for text in expositions {
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let slot = match name {
                "fedhive_round_sums_updates_total{source=\"local\"}" => &mut total.local,
                "fedhive_round_sums_updates_total{source=\"partial\"}" => &mut total.partial,
                "fedhive_round_sums_updates_total{source=\"reread\"}" => &mut total.reread,
                "fedhive_round_sums_reread_bytes_total" => &mut total.reread_bytes,
                _ => continue,
            };
            *slot += value as u64;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_sums_add_up_over_replicas() {
        let a = "fedhive_round_sums_updates_total{source=\"local\"} 7\n\
                 fedhive_round_sums_updates_total{source=\"partial\"} 5\n\
                 fedhive_round_sums_reread_bytes_total 400\n";
        let b = "fedhive_round_sums_updates_total{source=\"reread\"} 2\n\
                 fedhive_round_sums_updates_total{source=\"local\"} 1\n";
        assert_eq!(
            round_sums([a, b]),
            RoundSums {
                local: 8,
                partial: 5,
                reread: 2,
                reread_bytes: 400
            }
        );
    }

    #[test]
    fn stage_means_come_from_sum_and_count() {
        // Exposition order is not pipeline order: decode comes first here.
        let text = "# TYPE fedhive_upload_stage_duration_seconds histogram\n\
            fedhive_upload_stage_duration_seconds_sum{stage=\"decode\"} 0.02\n\
            fedhive_upload_stage_duration_seconds_count{stage=\"decode\"} 10\n\
            fedhive_upload_stage_duration_seconds_sum{stage=\"read\"} 0.5\n\
            fedhive_upload_stage_duration_seconds_count{stage=\"read\"} 10\n\
            fedhive_upload_stage_duration_seconds_bucket{le=\"0.001\",stage=\"read\"} 3\n\
            fedhive_request_duration_seconds_sum{route=\"x\"} 9\n";
        assert_eq!(
            stages(text),
            vec![
                StageTime {
                    stage: "read".into(),
                    uploads: 10,
                    mean_ms: 50.0
                },
                StageTime {
                    stage: "decode".into(),
                    uploads: 10,
                    mean_ms: 2.0
                },
            ]
        );
        assert!(stages("").is_empty());
    }
}
