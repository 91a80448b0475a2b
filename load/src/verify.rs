//! The exactly-once check: every round's accepted count and sample total on the server must equal
//! what the harness holds receipts for, and the receipts' sequence numbers must be exactly
//! `1..=accepted` (no update lost, none counted twice).

use std::collections::{BTreeMap, BTreeSet};

use fedhive_shared::wire::{RoundInfo, UploadReceipt};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct RoundMismatch {
    pub round_id: i64,
    pub server_accepted: i64,
    pub receipts: u64,
    pub server_samples: i64,
    pub receipt_samples: u64,
    /// Sequence numbers that do not form `1..=receipts`.
    pub bad_sequence: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// True when every round matched and no token got two different receipts.
    pub ok: bool,
    pub rounds_checked: usize,
    pub server_accepted: i64,
    pub receipts: u64,
    pub mismatches: Vec<RoundMismatch>,
    /// Receipts for rounds the server does not list.
    pub unknown_rounds: Vec<i64>,
    pub conflicting_receipts: usize,
    /// Uploads whose outcome stayed unknown after the final reconciliation (makes the check
    /// inconclusive, so `ok` is false).
    pub unresolved_uploads: usize,
}

pub fn verify(
    rounds: &[RoundInfo],
    receipts: &[UploadReceipt],
    conflicting_receipts: usize,
    unresolved_uploads: usize,
) -> Verification {
    let mut by_round: BTreeMap<i64, Vec<&UploadReceipt>> = BTreeMap::new();
    for r in receipts {
        by_round.entry(r.round_id).or_default().push(r);
    }
    let mut mismatches = Vec::new();
    for round in rounds {
        let got = by_round.remove(&round.round_id).unwrap_or_default();
        let samples: u64 = got.iter().map(|r| r.num_samples).sum();
        let seqs: BTreeSet<i64> = got.iter().map(|r| r.accepted_updates).collect();
        let bad_sequence = seqs.len() != got.len() || seqs != (1..=got.len() as i64).collect::<BTreeSet<_>>();
        if round.accepted != got.len() as i64 || round.total_samples != samples as i64 || bad_sequence {
            mismatches.push(RoundMismatch {
                round_id: round.round_id,
                server_accepted: round.accepted,
                receipts: got.len() as u64,
                server_samples: round.total_samples,
                receipt_samples: samples,
                bad_sequence,
            });
        }
    }
    let unknown_rounds: Vec<i64> = by_round.into_keys().collect();
    Verification {
        ok: mismatches.is_empty()
            && unknown_rounds.is_empty()
            && conflicting_receipts == 0
            && unresolved_uploads == 0,
        rounds_checked: rounds.len(),
        server_accepted: rounds.iter().map(|r| r.accepted).sum(),
        receipts: receipts.len() as u64,
        mismatches,
        unknown_rounds,
        conflicting_receipts,
        unresolved_uploads,
    }
}

#[cfg(test)]
mod tests {
    use fedhive_shared::wire::RoundState;

    use super::*;

    fn round(id: i64, accepted: i64, samples: i64) -> RoundInfo {
        RoundInfo {
            round_id: id,
            seq: id,
            state: RoundState::Committed,
            base_version: 0,
            assigned: accepted,
            accepted,
            total_samples: samples,
            opened_unix: 0,
            deadline_unix: 0,
            closed_unix: None,
            reports: None,
        }
    }

    fn receipt(round_id: i64, seq: i64, n: u64) -> UploadReceipt {
        UploadReceipt {
            round_id,
            accepted_updates: seq,
            num_samples: n,
            sha256: String::new(),
        }
    }

    #[test]
    fn matching_counts_pass() {
        let v = verify(
            &[round(1, 2, 30), round(2, 0, 0)],
            &[receipt(1, 1, 10), receipt(1, 2, 20)],
            0,
            0,
        );
        assert!(v.ok, "{v:?}");
        assert_eq!((v.server_accepted, v.receipts), (2, 2));
    }

    #[test]
    fn lost_double_counted_and_unknown_are_caught() {
        // The server counted an update nobody holds a receipt for.
        let lost = verify(&[round(1, 2, 30)], &[receipt(1, 1, 10)], 0, 0);
        assert!(!lost.ok);
        assert_eq!(lost.mismatches[0].receipts, 1);
        // Two receipts with the same sequence number: one update counted for two devices.
        let twice = verify(&[round(1, 2, 20)], &[receipt(1, 1, 10), receipt(1, 1, 10)], 0, 0);
        assert!(!twice.ok && twice.mismatches[0].bad_sequence);
        // Sample totals must agree too.
        assert!(!verify(&[round(1, 1, 11)], &[receipt(1, 1, 10)], 0, 0).ok);
        // A receipt for a round the server does not list.
        assert_eq!(verify(&[], &[receipt(9, 1, 1)], 0, 0).unknown_rounds, vec![9]);
        // Conflicting receipts or unresolved uploads make the check fail.
        assert!(!verify(&[], &[], 1, 0).ok);
        assert!(!verify(&[], &[], 0, 1).ok);
    }
}
