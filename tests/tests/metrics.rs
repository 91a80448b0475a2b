//! `GET /metrics` counts what happened: a two-round federation with a replayed retry, a late
//! upload and a refused one, then every counter is checked against it.

use std::time::Duration;

use bytes::Bytes;
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::wire::CheckinResponse;

on_both_databases!(metrics_count_the_federation);

/// The value of the sample `series` (name and labels exactly as exported), or panics.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample `{series}` in:\n{text}"))
        .parse()
        .unwrap()
}

async fn metrics_count_the_federation(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.raw_client();
    let task = client
        .create_task(&small_task(2, 2, 2, 120), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let update = Bytes::from(small_tensors(|i| i as f32 * 0.01).encode());
    let mut body_bytes = 0;

    // Round 1: two accepted, one of them retried (answered with its receipt), one late.
    let (a, b, late) = (
        assign(&client, &task).await,
        assign(&client, &task).await,
        assign(&client, &task).await,
    );
    client
        .upload_update(&a.upload_token, 10, update.clone())
        .await
        .unwrap();
    client
        .upload_update(&a.upload_token, 10, update.clone())
        .await
        .unwrap();
    client
        .upload_update(&b.upload_token, 10, update.clone())
        .await
        .unwrap();
    wait_for_version(&client, &task, 1, Duration::from_secs(30)).await;
    let refused = client
        .upload_update(&late.upload_token, 10, update.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("round_closed"));
    body_bytes += 4 * update.len();

    // Round 2: one upload with the wrong tensors is refused, two are accepted.
    let (bad, c, d) = (
        assign(&client, &task).await,
        assign(&client, &task).await,
        assign(&client, &task).await,
    );
    let wrong = Bytes::from(b"not safetensors".to_vec());
    let refused = client
        .upload_update(&bad.upload_token, 10, wrong.clone())
        .await
        .unwrap_err();
    let refusal = refused.code().expect("an error code").to_string();
    client
        .upload_update(&c.upload_token, 10, update.clone())
        .await
        .unwrap();
    client
        .upload_update(&d.upload_token, 10, update.clone())
        .await
        .unwrap();
    wait_for_version(&client, &task, 2, Duration::from_secs(30)).await;
    body_bytes += wrong.len() + 2 * update.len();
    assert!(matches!(
        client.checkin(&task).await.unwrap(),
        CheckinResponse::Finished { .. }
    ));
    let (_, model) = client.download_model(&task, Some(2)).await.unwrap();

    let http = reqwest::Client::new();
    let url = format!("{}/metrics", server.base_url);
    let anonymous = http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "metrics need the operator token");
    let response = http.get(&url).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();

    let t = format!(r#"task="{task}""#);
    assert_eq!(sample(&text, &format!("fedhive_rounds_opened_total{{{t}}}")), 2.0);
    let finished = |outcome: &str| format!(r#"fedhive_rounds_finished_total{{{t},outcome="{outcome}"}}"#);
    assert_eq!(sample(&text, &finished("committed")), 2.0);
    assert!(!text.contains(&finished("abandoned")));
    let updates = |outcome: &str| {
        sample(
            &text,
            &format!(r#"fedhive_updates_total{{{t},outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(updates("accepted"), 4.0);
    assert_eq!(updates("replayed"), 1.0);
    assert_eq!(updates("late"), 1.0);
    assert_eq!(updates(&refusal), 1.0, "the refusal is counted by its code");
    let checkins = |outcome: &str| {
        sample(
            &text,
            &format!(r#"fedhive_checkins_total{{{t},outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(checkins("assigned"), 6.0);
    assert_eq!(checkins("finished"), 1.0);

    let upload_route = r#"route="/v1/updates",method="PUT""#;
    let uploads_ok = sample(
        &text,
        &format!(r#"fedhive_http_request_duration_seconds_count{{{upload_route},status="200"}}"#),
    );
    assert_eq!(uploads_ok, 5.0, "four accepted and one replayed");
    assert_eq!(
        sample(
            &text,
            &format!(r#"fedhive_http_request_duration_seconds_count{{{upload_route},status="409"}}"#)
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("fedhive_http_request_body_bytes_total{{{upload_route}}}")
        ),
        body_bytes as f64,
        "every upload body was read once"
    );
    let model_route = r#"route="/v1/tasks/{task_id}/model",method="GET""#;
    assert_eq!(
        sample(
            &text,
            &format!("fedhive_http_response_body_bytes_total{{{model_route}}}")
        ),
        model.len() as f64
    );
    assert_eq!(
        sample(
            &text,
            r#"fedhive_upload_stage_duration_seconds_count{stage="accept"}"#
        ),
        4.0
    );
    assert_eq!(
        sample(&text, "fedhive_round_finalize_duration_seconds_count"),
        2.0
    );
    let storage = |store: &str, op: &str| {
        let series = format!(r#"fedhive_storage_duration_seconds_count{{store="{store}",op="{op}"}}"#);
        sample(&text, &series)
    };
    assert_eq!(
        storage("database", "accept_update"),
        4.0,
        "the uploads came one at a time: one transaction each"
    );
    assert_eq!(sample(&text, "fedhive_group_commit_updates_count"), 4.0);
    assert_eq!(sample(&text, "fedhive_group_commit_updates_sum"), 4.0);
    assert_eq!(sample(&text, "fedhive_group_fold_updates_count"), 4.0);
    assert_eq!(sample(&text, "fedhive_group_fold_updates_sum"), 4.0);
    assert_eq!(storage("database", "finish_round"), 2.0);
    assert!(
        storage("blobs", "put") >= 4.0,
        "the accepted updates' blobs at least"
    );
    assert_eq!(sample(&text, "fedhive_upload_slots_busy"), 0.0);
    assert!(sample(&text, "fedhive_upload_slots") >= 1.0);
    assert!(sample(&text, "fedhive_open_connections") >= 1.0, "this request's");
    assert!(sample(&text, "process_resident_memory_bytes") > 1e6);
    assert!(!text.contains(&a.upload_token), "no credential in the metrics");
}
