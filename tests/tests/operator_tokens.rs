//! Named operator tokens against the real server, both databases: a `read-only` token reads and
//! every change it asks for is `403 forbidden` and changes nothing; an `operator` token changes
//! tasks but not tokens; a revoked token is refused at its next request; a `cloud-worker` token
//! serves its task only (beside the task's own worker token); the audit log says who did what and
//! when, and holds no token or hash. The CLI (`fedhive token ...`, `fedhive audit`) drives part of it.

use std::process::Output;

use bytes::Bytes;
use fedhive_client::client::FedhiveClient;
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, ServerProcess, TestDb, on_both_databases, small_specs, small_task, small_tensors,
};
use fedhive_shared::wire::{
    AuditEntry, StrategyConfig, TaskConfig, TaskState, TaskSummary, TokenCreated, TokenInfo, TokenScope,
    WithoutCloud,
};
use reqwest::Method;
use serde_json::{Value, json};

on_both_databases!(
    a_read_only_token_reads_and_changes_nothing,
    an_operator_token_changes_tasks_but_not_tokens,
    a_revoked_token_is_refused_at_once,
    a_cloud_worker_token_serves_its_task_only,
    the_audit_log_says_who_did_what_and_holds_no_secret,
);

/// Fields drop in order: the server stops before its database and directory go.
struct Setup {
    server: ServerProcess,
    _db: TestDb,
    _dir: tempfile::TempDir,
    admin: Caller,
}

async fn setup(backend: Backend) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let admin = Caller::new(&server, ADMIN_TOKEN);
    Setup {
        server,
        _db: db,
        _dir: dir,
        admin,
    }
}

/// Raw HTTP with one bearer token: every answer's status and JSON, refusals included.
struct Caller {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Caller {
    fn new(server: &ServerProcess, token: &str) -> Caller {
        Caller {
            http: reqwest::Client::new(),
            base: server.base_url.clone(),
            token: token.to_string(),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str) -> (u16, Value) {
        self.call(Method::POST, path, None).await
    }

    /// A named token, created by this caller (which must be the admin).
    async fn create_token(&self, name: &str, scope: &str, task: Option<&str>) -> TokenCreated {
        let mut body = json!({ "name": name, "scope": scope });
        if let Some(task) = task {
            body["task_id"] = json!(task);
        }
        let (status, created) = self.call(Method::POST, "/v1/tokens", Some(body)).await;
        assert_eq!(status, 201, "{created}");
        serde_json::from_value(created).unwrap()
    }

    fn client(&self) -> FedhiveClient {
        FedhiveClient::new(&self.base)
            .unwrap()
            .with_retry(fedhive_client::client::RetryPolicy {
                max_attempts: 1,
                ..Default::default()
            })
            .with_admin_token(self.token.clone())
    }
}

fn dc_task() -> TaskConfig {
    TaskConfig {
        strategy: StrategyConfig::DcCcl {
            cloud_weight: 0.5,
            without_cloud: WithoutCloud::Abandon,
            control_model: "test".into(),
            control_tensors: small_specs(),
        },
        ..small_task(1, 1, 1, 300)
    }
}

fn body(value: f32) -> Bytes {
    Bytes::from(small_tensors(|_| value).encode())
}

/// Asserts a `403 forbidden` that names the scope needed.
fn forbidden((status, body): (u16, Value), needed: &str) {
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(needed), "`{message}` does not name `{needed}`");
}

fn code(e: fedhive_client::client::ClientError) -> String {
    e.code().unwrap_or("(no code)").to_string()
}

async fn a_read_only_token_reads_and_changes_nothing(backend: Backend) {
    let s = setup(backend).await;
    let admin = s.admin.client();
    let task = admin
        .create_task(&small_task(2, 2, 3, 120), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let dc = admin
        .create_task(&dc_task(), small_tensors(|_| 0.0).encode())
        .await
        .unwrap();
    let created = s.admin.create_token("viewer", "read-only", None).await;
    assert!(created.token.starts_with("fho_") && created.token.len() == 68);
    assert_eq!(
        (created.info.scope, created.info.revoked_ms),
        (TokenScope::ReadOnly, None)
    );
    let viewer = Caller::new(&s.server, &created.token);
    let before = s.admin.get("/v1/audit").await.1;

    // It reads what operators read.
    for path in [
        "/v1/tasks".to_string(),
        format!("/v1/tasks/{task}"),
        format!("/v1/tasks/{task}/rounds"),
        "/v1/audit".to_string(),
        "/metrics".to_string(),
    ] {
        let (status, answer) = viewer.get(&path).await;
        assert_eq!(status, 200, "GET {path}: {answer}");
    }

    // Every change is refused, naming the scope it needs.
    let refused = viewer
        .client()
        .create_task(&small_task(1, 1, 1, 60), small_tensors(|_| 0.0).encode())
        .await
        .unwrap_err();
    assert_eq!(code(refused), "forbidden");
    for action in ["pause", "resume", "cancel"] {
        forbidden(
            viewer.post(&format!("/v1/tasks/{task}/{action}")).await,
            "operator",
        );
    }
    forbidden(
        viewer
            .call(
                Method::POST,
                "/v1/tokens",
                Some(json!({ "name": "mine", "scope": "operator" })),
            )
            .await,
        "admin",
    );
    forbidden(viewer.get("/v1/tokens").await, "admin");
    forbidden(
        viewer.call(Method::DELETE, "/v1/tokens/viewer", None).await,
        "admin",
    );
    let worker = viewer.client();
    let dc_id = dc.task_id.as_str();
    assert_eq!(
        code(
            worker
                .publish_control_model(dc_id, 1, &created.token, body(0.0))
                .await
                .unwrap_err()
        ),
        "forbidden"
    );
    assert_eq!(
        code(worker.cloud_status(dc_id, &created.token).await.unwrap_err()),
        "forbidden"
    );

    // Nothing changed: the same tasks, still running, no new token, no control model, no audit line.
    let tasks: Vec<TaskSummary> = serde_json::from_value(s.admin.get("/v1/tasks").await.1).unwrap();
    assert_eq!(tasks.len(), 2);
    assert!(tasks.iter().all(|t| t.state == TaskState::Running), "{tasks:?}");
    let tokens: Vec<TokenInfo> = serde_json::from_value(s.admin.get("/v1/tokens").await.1).unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!((tokens[0].name.as_str(), tokens[0].revoked_ms), ("viewer", None));
    let own_worker = dc.worker_token.unwrap();
    let cloud = admin.cloud_status(dc_id, &own_worker).await.unwrap();
    assert_eq!(cloud.control_version, None);
    assert_eq!(s.admin.get("/v1/audit").await.1, before);

    // The refusals are counted by reason.
    let metrics = s.admin.get("/metrics").await.1;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"fedhive_credential_refusals_total{reason="forbidden"} 9"#),
        "{metrics}"
    );
}

async fn an_operator_token_changes_tasks_but_not_tokens(backend: Backend) {
    let s = setup(backend).await;
    let created = s.admin.create_token("ops", "operator", None).await;
    let ops = Caller::new(&s.server, &created.token);
    let task = ops
        .client()
        .create_task(&small_task(2, 2, 3, 120), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let state = |answer: (u16, Value)| {
        assert_eq!(answer.0, 200, "{}", answer.1);
        answer.1["state"].as_str().unwrap().to_string()
    };
    assert_eq!(
        state(ops.post(&format!("/v1/tasks/{task}/pause")).await),
        "paused"
    );
    assert_eq!(
        state(ops.post(&format!("/v1/tasks/{task}/resume")).await),
        "running"
    );
    assert_eq!(
        state(ops.post(&format!("/v1/tasks/{task}/cancel")).await),
        "cancelled"
    );
    assert_eq!(state(ops.get(&format!("/v1/tasks/{task}")).await), "cancelled");

    // Tokens are the admin's alone: a leaked operator token cannot mint or revoke one.
    forbidden(
        ops.call(
            Method::POST,
            "/v1/tokens",
            Some(json!({ "name": "backdoor", "scope": "operator" })),
        )
        .await,
        "admin token",
    );
    forbidden(
        ops.call(Method::DELETE, "/v1/tokens/ops", None).await,
        "admin token",
    );
    forbidden(ops.get("/v1/tokens").await, "admin token");
    let tokens: Vec<TokenInfo> = serde_json::from_value(s.admin.get("/v1/tokens").await.1).unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].revoked_ms, None);
    assert!(tokens[0].last_used_ms.is_some(), "{tokens:?}");
}

/// `fedhive ARGS` (the e2e server binary is the `fedhive` command line) with the admin token.
async fn fedhive(server: &ServerProcess, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_fedhive-e2e-server"))
        .args(args)
        .env("FEDHIVE_URL", &server.base_url)
        .env("FEDHIVE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .expect("running fedhive")
}

async fn ok(server: &ServerProcess, args: &[&str]) -> String {
    let out = fedhive(server, args).await;
    assert!(
        out.status.success(),
        "fedhive {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn a_revoked_token_is_refused_at_once(backend: Backend) {
    let s = setup(backend).await;
    let task = s
        .admin
        .client()
        .create_task(&small_task(2, 2, 3, 120), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let created: TokenCreated = serde_json::from_str(
        &ok(
            &s.server,
            &["token", "create", "--name", "ci", "--scope", "operator", "--json"],
        )
        .await,
    )
    .unwrap();
    let ci = Caller::new(&s.server, &created.token);
    assert_eq!(ci.get(&format!("/v1/tasks/{task}")).await.0, 200);
    let table = ok(&s.server, &["token", "list"]).await;
    assert!(
        table.starts_with("NAME") && table.contains("ci") && table.contains("operator"),
        "{table}"
    );
    assert!(!table.contains(&created.token), "{table}");

    ok(&s.server, &["token", "revoke", "ci"]).await;
    let (status, answer) = ci.get(&format!("/v1/tasks/{task}")).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthorized")),
        "{answer}"
    );
    let (status, _) = ci.post(&format!("/v1/tasks/{task}/pause")).await;
    assert_eq!(status, 401);
    let status = s.admin.client().task_status(&task).await.unwrap().state;
    assert_eq!(status, TaskState::Running);

    // Listed as revoked; its name is not reused, and revoking again changes nothing.
    let tokens: Vec<TokenInfo> =
        serde_json::from_str(&ok(&s.server, &["token", "list", "--json"]).await).unwrap();
    let revoked_ms = tokens[0].revoked_ms.expect("revoked");
    let (status, answer) = s
        .admin
        .call(
            Method::POST,
            "/v1/tokens",
            Some(json!({ "name": "ci", "scope": "read-only" })),
        )
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("token_name_taken")),
        "{answer}"
    );
    let (status, again) = s.admin.call(Method::DELETE, "/v1/tokens/ci", None).await;
    assert_eq!((status, again["revoked_ms"].as_i64()), (200, Some(revoked_ms)));
    let (status, answer) = s.admin.call(Method::DELETE, "/v1/tokens/nobody", None).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("unknown_operator_token"))
    );
    let out = fedhive(&s.server, &["token", "revoke", "nobody"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_operator_token"));

    // The admin token is the only one that manages tokens, and a bad name or scope is refused.
    let (status, answer) = s
        .admin
        .call(
            Method::POST,
            "/v1/tokens",
            Some(json!({ "name": "admin", "scope": "operator" })),
        )
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_request")),
        "{answer}"
    );
    let (status, _) = s
        .admin
        .call(
            Method::POST,
            "/v1/tokens",
            Some(json!({ "name": "x", "scope": "admin" })),
        )
        .await;
    assert_eq!(status, 400);
}

async fn a_cloud_worker_token_serves_its_task_only(backend: Backend) {
    let s = setup(backend).await;
    let admin = s.admin.client();
    let a = admin
        .create_task(&dc_task(), small_tensors(|_| 0.0).encode())
        .await
        .unwrap();
    let b = admin
        .create_task(&dc_task(), small_tensors(|_| 0.0).encode())
        .await
        .unwrap();
    let fedavg = admin
        .create_task(&small_task(1, 1, 1, 300), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let (a_id, b_id) = (a.task_id.as_str(), b.task_id.as_str());

    // Only for an existing DC-CCL task, and only with one.
    for (body, status, error) in [
        (
            json!({ "name": "w", "scope": "cloud-worker" }),
            400,
            "invalid_request",
        ),
        (
            json!({ "name": "w", "scope": "read-only", "task_id": a_id }),
            400,
            "invalid_request",
        ),
        (
            json!({ "name": "w", "scope": "cloud-worker", "task_id": "t-nope" }),
            404,
            "unknown_task",
        ),
        (
            json!({ "name": "w", "scope": "cloud-worker", "task_id": fedavg }),
            404,
            "not_dc_ccl",
        ),
    ] {
        let (got, answer) = s.admin.call(Method::POST, "/v1/tokens", Some(body.clone())).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(error)),
            "{body}: {answer}"
        );
    }
    let created: TokenCreated = serde_json::from_str(
        &ok(
            &s.server,
            &[
                "token",
                "create",
                "--name",
                "cloud-a",
                "--scope",
                "cloud-worker",
                "--task",
                a_id,
                "--json",
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(created.info.task_id.as_deref(), Some(a_id));
    let token = created.token.as_str();

    // Its task's worker routes, like the task's own worker token.
    let c = s.server.raw_client();
    let receipt = c.publish_control_model(a_id, 1, token, body(0.0)).await.unwrap();
    assert_eq!(receipt.id, 1);
    let status = c.cloud_status(a_id, token).await.unwrap();
    assert_eq!(status.control_version, Some(1));
    let round = status.round.unwrap().round_id;
    c.submit_cloud_update(a_id, round, token, body(0.1))
        .await
        .unwrap();
    let own = a.worker_token.clone().unwrap();
    assert!(c.cloud_status(a_id, &own).await.unwrap().cloud_submitted);

    // Not another task's, and no operator route.
    assert_eq!(code(c.cloud_status(b_id, token).await.unwrap_err()), "forbidden");
    let round_b = c
        .cloud_status(b_id, b.worker_token.as_deref().unwrap())
        .await
        .unwrap()
        .round
        .unwrap()
        .round_id;
    assert_eq!(
        code(
            c.submit_cloud_update(b_id, round_b, token, body(0.1))
                .await
                .unwrap_err()
        ),
        "forbidden"
    );
    assert_eq!(
        code(
            c.publish_control_model(b_id, 1, token, body(0.0))
                .await
                .unwrap_err()
        ),
        "forbidden"
    );
    let worker = Caller::new(&s.server, token);
    forbidden(worker.get(&format!("/v1/tasks/{a_id}")).await, "read-only");
    forbidden(worker.post(&format!("/v1/tasks/{a_id}/pause")).await, "operator");
    let b_status = c
        .cloud_status(b_id, b.worker_token.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(
        (b_status.control_version, b_status.cloud_submitted),
        (None, false)
    );

    // Revoked: refused as an unknown worker token; the task's own token still works.
    s.admin.call(Method::DELETE, "/v1/tokens/cloud-a", None).await;
    assert_eq!(
        code(c.cloud_status(a_id, token).await.unwrap_err()),
        "worker_unauthorized"
    );
    assert!(c.cloud_status(a_id, &own).await.is_ok());
}

async fn the_audit_log_says_who_did_what_and_holds_no_secret(backend: Backend) {
    let s = setup(backend).await;
    let started = fedhive_now_ms();
    let admin = s.admin.client();
    let dc = admin
        .create_task(&dc_task(), small_tensors(|_| 0.0).encode())
        .await
        .unwrap();
    let dc_id = dc.task_id.clone();
    let ops_token = s.admin.create_token("ops", "operator", None).await.token;
    let worker_token = s
        .admin
        .create_token("cloud", "cloud-worker", Some(&dc_id))
        .await
        .token;
    let viewer_token = s.admin.create_token("viewer", "read-only", None).await.token;
    let ops = Caller::new(&s.server, &ops_token);
    let task = ops
        .client()
        .create_task(&small_task(2, 2, 3, 120), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    assert_eq!(ops.post(&format!("/v1/tasks/{task}/pause")).await.0, 200);
    assert_eq!(ops.post(&format!("/v1/tasks/{task}/pause")).await.0, 409);
    s.server
        .raw_client()
        .publish_control_model(&dc_id, 1, &worker_token, body(0.0))
        .await
        .unwrap();
    // Refused for its credential: counted, not written.
    let viewer = Caller::new(&s.server, &viewer_token);
    assert_eq!(viewer.post(&format!("/v1/tasks/{task}/cancel")).await.0, 403);
    assert_eq!(
        Caller::new(&s.server, "guess")
            .post(&format!("/v1/tasks/{task}/cancel"))
            .await
            .0,
        401
    );
    s.admin.call(Method::DELETE, "/v1/tokens/ops", None).await;
    let finished = fedhive_now_ms();

    // Read with the read-only token, newest first.
    let (status, text) = viewer.get("/v1/audit").await;
    assert_eq!(status, 200);
    let entries: Vec<AuditEntry> = serde_json::from_value(text.clone()).unwrap();
    let lines: Vec<(&str, &str, &str, &str)> = entries
        .iter()
        .rev()
        .map(|e| {
            (
                e.actor.as_str(),
                e.action.as_str(),
                e.target.as_str(),
                e.outcome.as_str(),
            )
        })
        .collect();
    let control = format!("{dc_id}/1");
    assert_eq!(
        lines,
        [
            ("admin", "task.create", dc_id.as_str(), "ok"),
            ("admin", "token.create", "ops", "ok"),
            ("admin", "token.create", "cloud", "ok"),
            ("admin", "token.create", "viewer", "ok"),
            ("ops", "task.create", task.as_str(), "ok"),
            ("ops", "task.pause", task.as_str(), "ok"),
            ("ops", "task.pause", task.as_str(), "task_state_conflict"),
            ("cloud", "cloud.control_model", control.as_str(), "ok"),
            ("admin", "token.revoke", "ops", "ok"),
        ]
    );
    assert!(entries.windows(2).all(|w| w[0].id > w[1].id));
    assert!(
        entries.iter().all(|e| (started..=finished).contains(&e.at_ms)),
        "{entries:?} outside {started}..={finished}"
    );

    // No token and no token's hash, anywhere in it.
    let text = text.to_string();
    for secret in [
        ADMIN_TOKEN,
        &ops_token,
        &worker_token,
        &viewer_token,
        dc.worker_token.as_deref().unwrap(),
    ] {
        assert!(!text.contains(secret), "the audit log holds a token");
        assert!(
            !text.contains(&sha256_hex(secret)),
            "the audit log holds a token's hash"
        );
        if secret.len() > 32 {
            let tail = &secret[secret.len() - 16..];
            assert!(!text.contains(tail), "the audit log holds part of a token");
        }
    }

    // Paged: `limit` and `before`, and the CLI's table.
    let (_, page) = viewer.get("/v1/audit?limit=2").await;
    let page: Vec<AuditEntry> = serde_json::from_value(page).unwrap();
    assert_eq!(page, entries[..2]);
    let (_, next) = viewer
        .get(&format!("/v1/audit?limit=2&before={}", page[1].id))
        .await;
    let next: Vec<AuditEntry> = serde_json::from_value(next).unwrap();
    assert_eq!(next, entries[2..4]);
    assert_eq!(viewer.get("/v1/audit?limit=0").await.0, 400);
    let table = ok(&s.server, &["audit", "--limit", "3"]).await;
    assert!(
        table.starts_with("ID") && table.contains("token.revoke"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 4, "{table}");
}

fn fedhive_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn sha256_hex(text: &str) -> String {
    fedhive_server::store::sha256_hex(text.as_bytes())
}
