//! Upload admission: past the processing slots and the queue, an upload is refused at once with
//! `503 server_busy` and a time to retry, changes nothing, and succeeds when sent again; a refused
//! model-sized body is drained, so a client still sending it gets that answer, not a reset; an upload
//! whose body stalls gives its slot back after `--body-read-timeout-secs` (`408 body_timeout`); an
//! oversized body is refused with `413` as soon as its declared length, or the bytes read, exceed
//! the task's limit; an upload too late for a round the server has seen fill is refused with `409
//! round_closed` without waiting for a slot, its body drained so the connection stays open.

use std::time::Duration;

use bytes::Bytes;
use fedhive_client::client::FedhiveClient;
use fedhive_e2e::{Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors};
use fedhive_shared::{
    tensors::{NamedTensors, TensorSpec},
    wire::{ErrorBody, UploadReceipt},
};
use reqwest::{StatusCode, header};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

on_both_databases!(
    a_busy_server_refuses_uploads_with_a_retry_time,
    a_busy_refusal_reaches_a_client_still_sending_a_model_sized_body,
    a_stalled_body_gives_its_slot_back,
    oversized_bodies_are_refused_without_reading_them,
    a_late_upload_is_refused_without_a_slot_on_a_connection_kept_open,
    one_address_over_its_rate_is_told_when_to_retry,
    addresses_behind_a_trusted_proxy_are_limited_one_by_one,
);

/// One upload at a time and none waiting.
const ONE_SLOT_NO_QUEUE: &[&str] = &["--max-concurrent-uploads", "1", "--max-queued-uploads", "0"];

/// A server started with `flags` and a task of K = 2 in one round. Fields drop in order: the server
/// stops before its database and data directory go.
struct Setup {
    server: ServerProcess,
    client: FedhiveClient,
    task: String,
    _db: TestDb,
    _dir: tempfile::TempDir,
}

async fn setup(backend: Backend, flags: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start_with(dir.path(), &db, flags).await.unwrap();
    let client = server.raw_client();
    let task = new_task(&client).await;
    Setup {
        server,
        client,
        task,
        _db: db,
        _dir: dir,
    }
}

/// A task of K = 2 in one round.
async fn new_task(client: &FedhiveClient) -> String {
    client
        .create_task(&small_task(2, 2, 1, 120), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id
}

impl Setup {
    /// `host:port` of the server, for raw TCP clients.
    fn addr(&self) -> String {
        self.server.base_url.trim_start_matches("http://").to_string()
    }

    /// The request line and headers of an upload with `token`; `framing` is the body's
    /// `Content-Length: N` or `Transfer-Encoding: chunked` header.
    fn upload_head(&self, token: &str, num_samples: u64, framing: &str) -> String {
        format!(
            "PUT /v1/updates?num_samples={num_samples} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             {framing}\r\n\r\n",
            self.addr()
        )
    }

    /// A raw connection that has sent the headers of an upload of `update` with `token` and the
    /// first `sent` bytes of its body.
    async fn send_upload(&self, token: &str, num_samples: u64, update: &[u8], sent: usize) -> TcpStream {
        let mut conn = TcpStream::connect(self.addr()).await.unwrap();
        let head = self.upload_head(token, num_samples, &format!("Content-Length: {}", update.len()));
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&update[..sent])
            .await
            .expect("the server reads the body sent");
        conn
    }

    /// Asserts that `conn`, kept open after an answer, serves `/healthz`.
    async fn assert_serves_healthz(&self, conn: &mut TcpStream) {
        let health = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr());
        conn.write_all(health.as_bytes()).await.unwrap();
        let answer = read_answer(conn, "ok", Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

/// Reads from `conn` until the answer contains `needle` (or panics after `within` without a byte,
/// or when the connection closes first).
async fn read_answer(conn: &mut (impl AsyncRead + Unpin), needle: &str, within: Duration) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains(needle) {
        let n = tokio::time::timeout(within, conn.read(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        assert!(
            n > 0,
            "closed without an answer: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

async fn a_busy_server_refuses_uploads_with_a_retry_time(backend: Backend) {
    let setup = setup(backend, ONE_SLOT_NO_QUEUE).await;
    let Setup {
        server, client, task, ..
    } = &setup;
    let slow = assign(client, task).await;
    let refused = assign(client, task).await;
    let update = Bytes::from(small_tensors(|i| i as f32 * 0.01).encode());

    // `slow` sends its headers and half its body, and so holds the only slot while the server
    // waits for the rest.
    let half = update.len() / 2;
    let mut slow_conn = setup.send_upload(&slow.upload_token, 5, &update, half).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let http = reqwest::Client::new();
    let send_refused = || {
        http.put(format!("{}/v1/updates?num_samples=7", server.base_url))
            .bearer_auth(&refused.upload_token)
            .body(update.clone())
            .send()
    };
    let resp = send_refused().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_header: u64 = resp.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    let body: ErrorBody = resp.json().await.unwrap();
    assert_eq!(body.error, "server_busy", "{}", body.message);
    let retry_ms = body.retry_after_ms.expect("retry_after_ms in the body");
    assert!((100..=60_000).contains(&retry_ms), "retry after {retry_ms} ms");
    assert_eq!(retry_header, retry_ms.div_ceil(1000));
    let rounds = client.rounds(task).await.unwrap();
    assert_eq!(
        (rounds[0].accepted, rounds[0].total_samples),
        (0, 0),
        "a refusal changes nothing"
    );

    // The slow upload completes and is accepted.
    slow_conn.write_all(&update[half..]).await.unwrap();
    let answer = read_answer(&mut slow_conn, "\"sha256\"", Duration::from_secs(30)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The refused device sends the same update again and is counted once.
    let resp = send_refused().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let receipt: UploadReceipt = resp.json().await.unwrap();
    assert_eq!(receipt.accepted_updates, 2);
    let rounds = client.rounds(task).await.unwrap();
    assert_eq!((rounds[0].accepted, rounds[0].total_samples), (2, 12));
}

async fn a_busy_refusal_reaches_a_client_still_sending_a_model_sized_body(backend: Backend) {
    let setup = setup(backend, ONE_SLOT_NO_QUEUE).await;
    let client = &setup.client;
    // 4M parameters: a 16 MB update, more than loopback's socket buffers hold, so a server that
    // answered without reading it would close the connection under a client still sending.
    let mut config = small_task(1, 1, 1, 120);
    config.tensors = vec![TensorSpec {
        name: "w".into(),
        shape: vec![4_000_000],
    }];
    let update = NamedTensors::zeros(&config.tensors).encode();
    let task = client.create_task(&config, update.clone()).await.unwrap().task_id;
    let holder = assign(client, &task).await;
    let refused = assign(client, &task).await;

    // `holder` holds the only slot, half its body sent.
    let half = update.len() / 2;
    let mut holder_conn = setup.send_upload(&holder.upload_token, 5, &update, half).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The refused device sends its whole body (which fails if the server closes the connection
    // without reading it), then reads `503 server_busy`; the same connection serves the next
    // request.
    let mut conn = setup
        .send_upload(&refused.upload_token, 7, &update, update.len())
        .await;
    let answer = read_answer(&mut conn, "retry_after_ms", Duration::from_secs(30)).await;
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("server_busy"),
        "{answer}"
    );
    setup.assert_serves_healthz(&mut conn).await;

    // The holder's upload completes; the refusal changed nothing.
    holder_conn.write_all(&update[half..]).await.unwrap();
    let answer = read_answer(&mut holder_conn, "\"sha256\"", Duration::from_secs(30)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let rounds = client.rounds(&task).await.unwrap();
    assert_eq!((rounds[0].accepted, rounds[0].total_samples), (1, 5));
}

async fn a_late_upload_is_refused_without_a_slot_on_a_connection_kept_open(backend: Backend) {
    // One upload at a time and none waiting: an upload that needed a slot would get 503.
    let setup = setup(backend, ONE_SLOT_NO_QUEUE).await;
    let Setup { client, task, .. } = &setup;
    let update = Bytes::from(small_tensors(|i| i as f32 * 0.01).encode());
    // K = 2 with over-selection 2: four tokens for round 1, two of which fill it.
    let mut tokens = Vec::new();
    for _ in 0..4 {
        tokens.push(assign(client, task).await);
    }
    let first_receipt = client
        .upload_update(&tokens[0].upload_token, 5, update.clone())
        .await
        .unwrap();
    client
        .upload_update(&tokens[1].upload_token, 7, update.clone())
        .await
        .unwrap();

    // Another task's upload holds the only slot, half its body sent.
    let holder = assign(client, &new_task(client).await).await;
    let half = update.len() / 2;
    let mut holder_conn = setup.send_upload(&holder.upload_token, 3, &update, half).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A late device sends its whole update: refused as late, not as busy, and the same connection
    // serves the next request.
    let mut late_conn = setup
        .send_upload(&tokens[2].upload_token, 9, &update, update.len())
        .await;
    let answer = read_answer(&mut late_conn, "round_closed", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 409"), "{answer}");
    setup.assert_serves_healthz(&mut late_conn).await;

    // A retry of a stored update still gets its receipt (once the slot is free: it reads the body
    // to compare it), and the late one is refused again. The round holds the two it took.
    holder_conn.write_all(&update[half..]).await.unwrap();
    let answer = read_answer(&mut holder_conn, "\"sha256\"", Duration::from_secs(30)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let again = client
        .upload_update(&tokens[0].upload_token, 5, update.clone())
        .await
        .unwrap();
    assert_eq!(again, first_receipt);
    let late = client
        .upload_update(&tokens[3].upload_token, 11, update.clone())
        .await;
    let Err(fedhive_client::client::ClientError::Api { status, body }) = late else {
        panic!("a late upload was not refused: {late:?}");
    };
    assert_eq!(
        (status, body.error.as_str()),
        (StatusCode::CONFLICT, "round_closed")
    );
    let rounds = client.rounds(task).await.unwrap();
    assert_eq!((rounds[0].accepted, rounds[0].total_samples), (2, 12));
}

async fn a_stalled_body_gives_its_slot_back(backend: Backend) {
    let setup = setup(
        backend,
        &["--max-concurrent-uploads", "1", "--body-read-timeout-secs", "1"],
    )
    .await;
    let Setup {
        server, client, task, ..
    } = &setup;
    let stalled = assign(client, task).await;
    let other = assign(client, task).await;
    let update = Bytes::from(small_tensors(|i| i as f32 * 0.01).encode());

    // Headers and half the body, then nothing: the only slot is held until the timeout.
    let mut conn = setup
        .send_upload(&stalled.upload_token, 5, &update, update.len() / 2)
        .await;
    let started = std::time::Instant::now();
    let answer = read_answer(&mut conn, "body_timeout", Duration::from_secs(20)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let rounds = client.rounds(task).await.unwrap();
    assert_eq!(
        (rounds[0].accepted, rounds[0].total_samples),
        (0, 0),
        "a timeout changes nothing"
    );

    // The slot is free again, and the stalled device's token still uploads once, in full.
    let http = reqwest::Client::new();
    for (token, samples, seq) in [(&other.upload_token, 7, 1), (&stalled.upload_token, 5, 2)] {
        let resp = http
            .put(format!("{}/v1/updates?num_samples={samples}", server.base_url))
            .bearer_auth(token)
            .body(update.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let receipt: UploadReceipt = resp.json().await.unwrap();
        assert_eq!(receipt.accepted_updates, seq);
    }
    let rounds = client.rounds(task).await.unwrap();
    assert_eq!((rounds[0].accepted, rounds[0].total_samples), (2, 12));
}

async fn oversized_bodies_are_refused_without_reading_them(backend: Backend) {
    let setup = setup(backend, &[]).await;
    let Setup { client, task, .. } = &setup;
    let limit = fedhive_server::coordinator::upload_limit(&small_task(2, 2, 1, 120)).unwrap();

    // A declared length of 10 GB with 5 bytes sent: refused at once, not after a body read.
    let huge = assign(client, task).await;
    let (mut read, mut write) = TcpStream::connect(setup.addr()).await.unwrap().into_split();
    let head = setup.upload_head(&huge.upload_token, 5, "Content-Length: 10000000000");
    write.write_all(head.as_bytes()).await.unwrap();
    write.write_all(b"hello").await.unwrap();
    let started = std::time::Instant::now();
    let answer = read_answer(&mut read, "body_too_large", Duration::from_secs(20)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // Chunked without end: refused once the bytes read pass the limit, and the connection is
    // closed, so the sender's writes fail. The kernel's socket buffers on loopback absorb tens of
    // MiB after the server stops reading (tcp_rmem's maximum is 32 MiB here), so what the client
    // managed to send says nothing by itself; what shows the server stopped is that the writes
    // fail well before a cap far above those buffers.
    const CAP: usize = 256 << 20;
    let endless = assign(client, task).await;
    let (mut read, mut write) = TcpStream::connect(setup.addr()).await.unwrap().into_split();
    let head = setup.upload_head(&endless.upload_token, 5, "Transfer-Encoding: chunked");
    write.write_all(head.as_bytes()).await.unwrap();
    let sender = tokio::spawn(async move {
        let chunk = [0u8; 64 * 1024];
        let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
        let mut sent = 0usize;
        while sent < CAP {
            if write.write_all(&frame).await.is_err() {
                return (sent, true);
            }
            sent += chunk.len();
        }
        (sent, false)
    });
    let answer = read_answer(&mut read, "body_too_large", Duration::from_secs(20)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let (sent, closed) = tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("the server neither closed the connection nor kept reading")
        .unwrap();
    assert!(
        closed && sent < CAP,
        "the server kept reading: {sent} bytes sent without an error, limit {limit}"
    );
    drop(read);

    let rounds = client.rounds(task).await.unwrap();
    assert_eq!(
        (rounds[0].accepted, rounds[0].total_samples),
        (0, 0),
        "refusals change nothing"
    );
}

async fn one_address_over_its_rate_is_told_when_to_retry(backend: Backend) {
    let setup = setup(
        backend,
        &["--rate-limit-per-address", "2", "--rate-limit-burst", "3"],
    )
    .await;
    let Setup {
        server, client, task, ..
    } = &setup;
    let http = reqwest::Client::new();
    let checkin = || {
        http.post(format!("{}/v1/tasks/{task}/checkin", server.base_url))
            .send()
    };
    // The burst of 3 passes (the round hands out 4 tokens, so each is an assignment).
    for _ in 0..3 {
        assert_eq!(checkin().await.unwrap().status(), StatusCode::OK);
    }
    let resp = checkin().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_header: u64 = resp.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: ErrorBody = resp.json().await.unwrap();
    assert_eq!(body.error, "rate_limited", "{}", body.message);
    let retry_ms = body.retry_after_ms.expect("retry_after_ms in the body");
    assert!(
        (1..=500).contains(&retry_ms),
        "retry after {retry_ms} ms at 2 per second"
    );
    assert_eq!(retry_header, retry_ms.div_ceil(1000));
    let rounds = client.rounds(task).await.unwrap();
    assert_eq!(rounds[0].assigned, 3, "the refused check-in took no token");
    // Operator routes are not limited; after the wait the address is served again.
    tokio::time::sleep(Duration::from_millis(retry_ms + 50)).await;
    assert_eq!(checkin().await.unwrap().status(), StatusCode::OK);
}

async fn addresses_behind_a_trusted_proxy_are_limited_one_by_one(backend: Backend) {
    // One check-in per address, then none for 100 s.
    let limit = ["--rate-limit-per-address", "0.01", "--rate-limit-burst", "1"];
    let status = |server: &ServerProcess, task: &str, forwarded_for: &str| {
        reqwest::Client::new()
            .post(format!("{}/v1/tasks/{task}/checkin", server.base_url))
            .header("x-forwarded-for", forwarded_for)
            .send()
    };
    // Behind a balancer on loopback that the server trusts: each client address its own bucket,
    // and what a client wrote itself (left of the balancer's entry) is not read.
    let mut flags = limit.to_vec();
    flags.extend(["--trusted-proxies", "127.0.0.1"]);
    let behind = setup(backend, &flags).await;
    let (server, task) = (&behind.server, &behind.task);
    let ok = StatusCode::OK;
    assert_eq!(status(server, task, "198.51.100.1").await.unwrap().status(), ok);
    let again = status(server, task, "6.6.6.6, 198.51.100.1").await.unwrap();
    assert_eq!(again.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(status(server, task, "198.51.100.2").await.unwrap().status(), ok);
    assert_eq!(status(server, task, "2001:db8::1").await.unwrap().status(), ok);
    // Without the flag, the header is the client's word and is not read: one bucket.
    let direct = setup(backend, &limit).await;
    let (server, task) = (&direct.server, &direct.task);
    assert_eq!(status(server, task, "198.51.100.1").await.unwrap().status(), ok);
    let other = status(server, task, "198.51.100.2").await.unwrap();
    assert_eq!(other.status(), StatusCode::TOO_MANY_REQUESTS);
}
