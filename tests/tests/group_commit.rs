//! Group commit (`fedhive_server::group_commit`) against real SQLite and PostgreSQL: one
//! transaction records a batch update by update, each under its round's guard, and uploads that
//! arrive together share transactions without any being lost or recorded twice.

use std::sync::Arc;

use fedhive_e2e::{Backend, TestDb, on_both_databases, small_task};
use fedhive_server::{
    access::{Action, AuditRecord, Principal},
    db::{Accept, Db, UpdateRow},
    group_commit::GroupCommit,
    store::{now_ms, sha256_hex},
    telemetry::Telemetry,
};

/// A database with one FedAvg task of `k` updates per round, its first round open, and `tokens`
/// upload tokens of that round handed out (their hashes returned with the round id).
async fn round_with_tokens(
    backend: Backend,
    k: u32,
    tokens: usize,
) -> (TestDb, tempfile::TempDir, Db, i64, Vec<String>) {
    let test_db = TestDb::create(backend).await.expect("test database");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = test_db
        .url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.path().join("fedhive.db").display()));
    let db = Db::connect(&url).await.expect("connect");
    let config = small_task(k, 1, 1, 600);
    let audit = AuditRecord::ok(&Principal::Admin, Action::TaskCreate, "t");
    db.create_task("t", &config, &audit, now_ms())
        .await
        .expect("task");
    let round = db.active_round("t").await.expect("round").expect("an open round");
    let mut hashes = Vec::new();
    for i in 0..tokens {
        let hash = sha256_hex(format!("token {i}").as_bytes());
        db.assign(round.id, tokens as i64, &hash, None, now_ms())
            .await
            .expect("assign");
        hashes.push(hash);
    }
    (test_db, dir, db, round.id, hashes)
}

fn update(round_id: i64, token_hash: &str, num_samples: i64) -> UpdateRow {
    UpdateRow {
        token_hash: token_hash.to_string(),
        round_id,
        num_samples,
        sha256: sha256_hex(token_hash.as_bytes()),
        blob_key: format!("updates/{round_id}/{token_hash}.safetensors"),
        accepted_seq: 0,
        replica: None,
    }
}

/// One batch holding a retry of a stored token and four new tokens, one more than the round's K
/// leaves room for: the retry and the last new token in (round, token hash) order get `None` and
/// give their counter updates back, the others are stored in that order, and the round's counters
/// are those of the stored rows alone.
async fn a_batch_stores_each_update_under_its_guard(backend: Backend) {
    let (_test_db, _dir, db, round_id, tokens) = round_with_tokens(backend, 4, 5).await;
    let first = Accept {
        k: 4,
        row: update(round_id, &tokens[0], 10),
    };
    let stored = db.accept_updates(&[first], now_ms()).await.expect("first");
    assert_eq!(stored[0].as_ref().map(|r| r.accepted_seq), Some(1));

    let retry_with_other_samples = Accept {
        k: 4,
        row: update(round_id, &tokens[0], 99),
    };
    let samples = |i: usize| 10 * (i as i64 + 1);
    let batch: Vec<Accept> = std::iter::once(retry_with_other_samples)
        .chain((1..5).map(|i| Accept {
            k: 4,
            row: update(round_id, &tokens[i], samples(i)),
        }))
        .collect();
    let stored = db.accept_updates(&batch, now_ms()).await.expect("batch");
    assert_eq!(stored[0], None, "the retry");
    let mut new: Vec<usize> = (1..5).collect();
    new.sort_by_key(|&i| tokens[i].clone());
    let (taken, refused) = (&new[..3], new[3]);
    for (seq, &i) in (2..).zip(taken) {
        assert_eq!(stored[i].as_ref().map(|r| r.accepted_seq), Some(seq), "token {i}");
    }
    assert_eq!(stored[refused], None, "past K");

    let round = db.round(round_id).await.expect("round").expect("exists");
    assert_eq!(round.accepted, 4);
    let expected_samples = 10 + taken.iter().map(|&i| samples(i)).sum::<i64>();
    assert_eq!(
        round.total_samples, expected_samples,
        "a refused row's samples are given back"
    );
    let rows = db.updates_of_round(round_id).await.expect("rows");
    assert_eq!(rows.len(), 4);
    let first_row = rows
        .iter()
        .find(|r| r.token_hash == tokens[0])
        .expect("first row");
    assert_eq!(
        first_row.num_samples, 10,
        "the retry did not replace the stored row"
    );
    assert!(
        rows.iter().all(|r| r.token_hash != tokens[refused]),
        "past K stored"
    );
}

/// 64 uploads accepted at the same moment: every one is stored exactly once with its own place
/// in the round, and they took fewer transactions than updates.
async fn uploads_arriving_together_share_transactions(backend: Backend) {
    const N: usize = 64;
    let (_test_db, _dir, db, round_id, tokens) = round_with_tokens(backend, N as u32, N).await;
    let telemetry = Telemetry::new();
    let commits = Arc::new(GroupCommit::new(db.clone(), telemetry.group_commit_updates()));
    let uploads: Vec<_> = tokens
        .iter()
        .map(|token| {
            let (commits, row) = (commits.clone(), update(round_id, token, 1));
            tokio::spawn(async move { commits.accept(Accept { k: N as i64, row }).await })
        })
        .collect();
    let mut seqs = Vec::new();
    for upload in uploads {
        let stored = upload.await.expect("task").expect("commit").expect("stored");
        seqs.push(stored.accepted_seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=N as i64).collect::<Vec<_>>());
    let round = db.round(round_id).await.expect("round").expect("exists");
    assert_eq!((round.accepted, round.total_samples), (N as i64, N as i64));
    assert_eq!(db.updates_of_round(round_id).await.expect("rows").len(), N);

    let (transactions, updates) = transactions_and_updates(&telemetry);
    println!("{N} uploads at once: {transactions} transactions");
    assert_eq!(updates, N as f64);
    assert!(
        transactions < N as u64,
        "no transaction held two updates ({transactions})"
    );

    // A retry of each, now that all are stored: none stored again.
    for token in &tokens {
        let again = commits
            .accept(Accept {
                k: N as i64,
                row: update(round_id, token, 1),
            })
            .await
            .expect("commit");
        assert_eq!(again, None);
    }
    let round = db.round(round_id).await.expect("round").expect("exists");
    assert_eq!(round.accepted, N as i64);
}

/// `fedhive_group_commit_updates`' count and sum, as `/metrics` shows them.
fn transactions_and_updates(telemetry: &Telemetry) -> (u64, f64) {
    let text = telemetry.render(0, 0, 0);
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    (
        value("fedhive_group_commit_updates_count ") as u64,
        value("fedhive_group_commit_updates_sum "),
    )
}

on_both_databases!(
    a_batch_stores_each_update_under_its_guard,
    uploads_arriving_together_share_transactions,
);
