//! The server's lifecycle: SIGTERM drains (stops accepting, finishes the upload in flight, exits
//! cleanly, and the upload is counted once), and `/readyz` says whether the database and blob
//! store can be used; `--log-format json` writes one JSON object per line.

use std::time::Duration;

use bytes::Bytes;
use fedhive_e2e::{Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors};
use fedhive_shared::wire::{ErrorBody, UploadReceipt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

on_both_databases!(
    sigterm_finishes_the_upload_in_flight,
    readiness_names_what_is_missing
);

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fedhive-e2e-server"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--insecure-dev",
            "--log-format",
            "json",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let listening = loop {
        let line = lines.next().expect("the server logged its start").unwrap();
        let entry: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}; before it: {seen:?}"));
        if entry["fields"]["message"] == "fedhive server listening" {
            break entry;
        }
        seen.push(line);
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(listening["level"], "INFO");
    assert!(
        listening["fields"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(listening["timestamp"].is_string());
}

async fn sigterm_finishes_the_upload_in_flight(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let flags = ["--shutdown-grace-secs", "20"];
    let mut server = ServerProcess::start_with(dir.path(), &db, &flags).await.unwrap();
    let client = server.raw_client();
    let task = client
        .create_task(&small_task(2, 2, 1, 120), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let a = assign(&client, &task).await;
    let body = Bytes::from(small_tensors(|i| i as f32 * 0.01).encode());

    // Half of an upload's body is on the wire when the server is told to stop.
    let addr = server.base_url.trim_start_matches("http://").to_string();
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "PUT /v1/updates?num_samples=4 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\n\r\n",
        a.upload_token,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let half = body.len() / 2;
    conn.write_all(&body[..half]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // It accepts no new connection, but the upload in flight completes and is acknowledged.
    assert!(
        TcpStream::connect(&addr).await.is_err(),
        "a draining server accepted a connection"
    );
    conn.write_all(&body[half..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut answer))
        .await
        .expect("answered before the grace deadline")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let receipt: UploadReceipt = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!((receipt.accepted_updates, receipt.num_samples), (1, 4));
    let status = server.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "the server exited with {status}");

    // After a restart the acknowledged upload is there, once.
    server.restart().await.unwrap();
    let client = server.raw_client();
    let again = client.upload_update(&a.upload_token, 4, body).await.unwrap();
    assert_eq!(again, receipt);
    assert_eq!(client.rounds(&task).await.unwrap()[0].accepted, 1);
}

async fn readiness_names_what_is_missing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let url = format!("{}/readyz", server.base_url);
    let ready = reqwest::get(&url).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.text().await.unwrap(), "ready");

    // Without its blob store the server is not ready, and says why.
    let blobs = dir.path().join("blobs");
    let moved = dir.path().join("blobs-away");
    std::fs::rename(&blobs, &moved).unwrap();
    let not_ready = reqwest::get(&url).await.unwrap();
    assert_eq!(not_ready.status(), 503);
    let body: ErrorBody = not_ready.json().await.unwrap();
    assert_eq!(body.error, "not_ready");
    assert!(body.message.contains("blob store"), "{}", body.message);
    std::fs::rename(&moved, &blobs).unwrap();
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 200);
}
