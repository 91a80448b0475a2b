//! The server's own HTTPS, end to end with the SDK, on SQLite and PostgreSQL: a round over TLS with
//! a CA made in the test, key pins, a certificate reloaded on SIGHUP, client certificates for
//! operators, and plain HTTP refused on a public address.

use std::time::Duration;

use bytes::Bytes;
use fedhive_client::client::{ClientTls, FedhiveClient, Identity};
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, DevCa, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::NamedTensors;

const LONG: Duration = Duration::from_secs(30);

on_both_databases!(
    a_round_runs_over_https_with_the_sdk,
    sighup_serves_a_new_certificate_without_a_restart,
    operators_need_a_client_certificate_when_the_server_has_a_client_ca,
);

fn filled(v: f32) -> Bytes {
    Bytes::from(small_tensors(|_| v).encode())
}

fn sdk(server: &ServerProcess, tls: &ClientTls) -> FedhiveClient {
    FedhiveClient::with_tls(&server.base_url, tls)
        .unwrap()
        .with_admin_token(ADMIN_TOKEN)
}

async fn a_round_runs_over_https_with_the_sdk(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let ca = DevCa::new("fedhive e2e CA");
    let server = ServerProcess::start_https(dir.path(), &db, &ca, &[])
        .await
        .unwrap();
    assert!(server.base_url.starts_with("https://"), "{}", server.base_url);
    let client = server.client();
    let initial = small_tensors(|i| i as f32);
    let task = client
        .create_task(&small_task(2, 2, 1, 60), initial.encode())
        .await
        .unwrap()
        .task_id;
    // Two devices: x += (1 * 0.5 + 3 * 1.5) / 4 = 1.25, as over plain HTTP.
    let a1 = assign(&client, &task).await;
    let a2 = assign(&client, &task).await;
    client
        .upload_update(&a1.upload_token, 1, filled(0.5))
        .await
        .unwrap();
    client
        .upload_update(&a2.upload_token, 3, filled(1.5))
        .await
        .unwrap();
    wait_for_version(&client, &task, 1, LONG).await;
    let (_, model) = client.download_model(&task, Some(1)).await.unwrap();
    assert_eq!(
        NamedTensors::decode(&model).unwrap(),
        small_tensors(|i| i as f32 + 1.25)
    );

    // A device that pins the server's key is served; one pinning another key is refused before
    // it sends anything, and so is one that trusts only the public roots.
    let served_pin = pin_of_served_certificate(&server);
    let pinned = sdk(
        &server,
        &ClientTls {
            pins: vec![served_pin],
            ..server.client_tls.clone()
        },
    );
    assert_eq!(pinned.download_model(&task, Some(1)).await.unwrap().0, 1);
    let wrong_pin = sdk(
        &server,
        &ClientTls {
            pins: vec![ca.issue(&["localhost"]).pin],
            ..server.client_tls.clone()
        },
    );
    let refused = wrong_pin.download_model(&task, None).await.unwrap_err();
    assert!(refused.to_string().contains("request"), "{refused}");
    let public_roots = sdk(&server, &ClientTls::default());
    assert!(public_roots.download_model(&task, None).await.is_err());
}

/// The pin of the certificate the server was started with (the file `start_https` wrote).
fn pin_of_served_certificate(server: &ServerProcess) -> fedhive_client::client::SpkiPin {
    let pem = std::fs::read(server.data_dir.join("tls-cert.pem")).unwrap();
    let certs = fedhive_tls::certificates_from_pem(&pem, "served certificate").unwrap();
    fedhive_client::client::SpkiPin::of_certificate(&certs[0]).unwrap()
}

async fn sighup_serves_a_new_certificate_without_a_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let ca = DevCa::new("fedhive e2e CA");
    let server = ServerProcess::start_https(dir.path(), &db, &ca, &[])
        .await
        .unwrap();
    let task = server
        .client()
        .create_task(&small_task(2, 2, 1, 60), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let first_pin = pin_of_served_certificate(&server);

    // Renewal: a new key and certificate in the same files, then SIGHUP.
    let renewed = ca.issue(&["localhost"]);
    std::fs::write(server.data_dir.join("tls-cert.pem"), &renewed.cert_pem).unwrap();
    std::fs::write(server.data_dir.join("tls-key.pem"), &renewed.key_pem).unwrap();
    server.signal("HUP");
    let pinned_to = |pin| {
        sdk(
            &server,
            &ClientTls {
                pins: vec![pin],
                ..server.client_tls.clone()
            },
        )
    };
    let started = std::time::Instant::now();
    while pinned_to(renewed.pin).download_model(&task, None).await.is_err() {
        assert!(
            started.elapsed() < LONG,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New connections get the new key only; the process is the same (its task is still there).
    assert!(pinned_to(first_pin).download_model(&task, None).await.is_err());
    assert_eq!(server.client().task_status(&task).await.unwrap().task_id, task);

    // A broken renewal keeps the served certificate.
    std::fs::write(server.data_dir.join("tls-cert.pem"), b"not a certificate").unwrap();
    server.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pinned_to(renewed.pin).download_model(&task, None).await.is_ok());
}

async fn operators_need_a_client_certificate_when_the_server_has_a_client_ca(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let ca = DevCa::new("fedhive e2e CA");
    let operators = DevCa::new("fedhive operators");
    let client_ca = dir.path().join("operators.pem");
    std::fs::write(&client_ca, operators.cert_pem()).unwrap();
    let server = ServerProcess::start_https(
        dir.path(),
        &db,
        &ca,
        &["--tls-client-ca", client_ca.to_str().unwrap()],
    )
    .await
    .unwrap();
    let config = small_task(2, 2, 1, 60);
    let model = small_tensors(|_| 0.0).encode();

    // The admin token alone is not enough: 401 client_certificate_required, and nothing is created.
    let without = server.raw_client();
    let refused = without.create_task(&config, model.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Some("client_certificate_required"), "{refused}");

    // A certificate from another CA does not get past the handshake.
    let with_stranger = sdk(&server, &with_certificate_tls(&server, &DevCa::new("stranger")));
    assert!(with_stranger.create_task(&config, model.clone()).await.is_err());

    let with_certificate = sdk(&server, &with_certificate_tls(&server, &operators));
    let task = with_certificate
        .create_task(&config, model)
        .await
        .unwrap()
        .task_id;
    assert_eq!(with_certificate.task_status(&task).await.unwrap().task_id, task);
    // The refused creation left nothing behind: this is the only task.
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(with_certificate_tls(&server, &operators).rustls_config().unwrap())
        .build()
        .unwrap();
    let tasks: Vec<serde_json::Value> = http
        .get(format!("{}/v1/tasks", server.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(
        without.task_status(&task).await.unwrap_err().code(),
        Some("client_certificate_required")
    );
    // Devices have no certificate and need none.
    let a = assign(&without, &task).await;
    without
        .upload_update(&a.upload_token, 1, filled(1.0))
        .await
        .unwrap();
    // A certificate without the admin token is not enough either.
    let certificate_only =
        FedhiveClient::with_tls(&server.base_url, &with_certificate_tls(&server, &operators)).unwrap();
    assert_eq!(
        certificate_only.task_status(&task).await.unwrap_err().code(),
        Some("unauthorized")
    );
}

/// The server's client TLS with a client certificate from `issuer`.
fn with_certificate_tls(server: &ServerProcess, issuer: &DevCa) -> ClientTls {
    let operator = issuer.issue(&["operator"]);
    ClientTls {
        identity: Some(Identity {
            cert_chain_pem: operator.cert_pem,
            key_pem: operator.key_pem,
        }),
        ..server.client_tls.clone()
    }
}

#[test]
fn plain_http_is_refused_on_a_public_address() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fedhive-e2e-server"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--admin-token",
            "t",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refusing plain HTTP on 0.0.0.0:0"), "{stderr}");
    assert!(stderr.contains("--tls-cert"), "{stderr}");
}
