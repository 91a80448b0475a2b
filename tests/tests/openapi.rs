//! The API against its own description: schemathesis (PyPI) reads `GET /openapi.json` from a live
//! server and sends what it generates from it (examples, boundary values, random and malformed
//! input, and stateful sequences it infers from the schemas, e.g. a task id from one answer used in
//! the next request), with every check it has: no 5xx, only documented statuses, content types,
//! headers and bodies that match the description, schema-invalid input refused, missing credentials
//! refused. Both databases.
//!
//! schemathesis is a Python program: `FEDHIVE_SCHEMATHESIS` names it (`.ci/run` installs a pinned
//! version in a virtual environment and sets it), else `schemathesis` on the `PATH`.

use std::{path::Path, process::Stdio, time::Duration};

use bytes::Bytes;
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, ServerProcess, TestDb, assign, on_both_databases, small_specs, small_task,
    small_tensors, wait_for_version,
};
use fedhive_shared::{
    blocks::{BlockSchedule, RoundBlock},
    wire::StrategyConfig,
};

on_both_databases!(schemathesis_finds_no_failure);

/// The version `.ci/run` installs; the findings in docs/api.md ("schemathesis") are from it.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

fn schemathesis_program() -> String {
    std::env::var("FEDHIVE_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".to_string())
}

/// What exists on the server before schemathesis starts, for it to find.
struct Population {
    /// One task of each strategy (FedAvg twice: one finished, one with an open round), DC-CCL's
    /// third, anonymous embeddings' fourth.
    tasks: Vec<String>,
    /// The DC-CCL task and its cloud-worker token.
    dc_ccl_task: String,
    worker_token: String,
    /// The anonymous-embeddings task and its cloud-worker token.
    anon_task: String,
    anon_worker_token: String,
    /// An upload token of the open FedAvg round.
    upload_token: String,
    /// A named read-only token, for `DELETE /v1/tokens/{name}` to find.
    token_name: String,
    /// An enrolment key, for `POST /v1/devices`.
    enrolment_key: String,
    /// Another key's id, for `DELETE /v1/enrolment-keys/{key_id}` to find (revoking it leaves the
    /// key above and the device below working).
    decoy_key_id: String,
    /// A device enrolled with the key, for check-ins (a check-in that sends no credential is
    /// anonymous; one that sends a wrong one, such as the admin token, is refused).
    device: String,
}

/// The run's settings. Path parameters come from dictionaries of what exists most of the time, so
/// that requests reach real tasks, blocks, tokens and enrolment keys (random ids only ever meet
/// `404`); the DC-CCL worker's routes get its token, the device routes an upload token (uploads,
/// metrics), a device credential (check-in) or an enrolment key (enrolment), the rest the operator
/// token.
fn config(population: &Population) -> String {
    let ids = population
        .tasks
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"seed = 20261204
workers = 1
# A request to a server on loopback answers in milliseconds; a hang is a failure.
request-timeout = 10
headers = {{ Authorization = "Bearer {admin}" }}

[generation]
max-examples = 25

[dictionaries.tasks]
values = [{ids}]

[dictionaries.blocks]
values = ["day", "night"]

[dictionaries.tokens]
values = ["{token_name}"]

[dictionaries.keys]
values = ["{decoy_key}"]

[dictionaries.dc_ccl_task]
values = ["{dc_ccl_task}"]

[dictionaries.anon_task]
values = ["{anon_task}"]

[parameters]
"path.task_id" = {{ dictionary = "tasks", probability = 0.7 }}
"path.block" = {{ dictionary = "blocks", probability = 0.7 }}
# A predictor answers 2xx only for a block-cyclic task and no block or a real one: without the
# dictionary a run could send every GET .../predictor elsewhere (seen after a schema change moved
# the generator's sequence).
"query.block" = {{ dictionary = "blocks", probability = 0.7 }}
"path.name" = {{ dictionary = "tokens", probability = 0.7 }}
"path.key_id" = {{ dictionary = "keys", probability = 0.7 }}

# Schema-valid is not the same as acceptable here: a `format: binary` body that is not the task's
# safetensors, a config that breaks a rule no schema states (a tensor shape, a strategy's
# constraints), a token that names no assignment, a task of another strategy, a task in a state
# that forbids the action, an integer written as `260.0`. Each of those is a documented 4xx with an
# error code (docs/api.md, "schemathesis"), so here they count as answers to valid input. So is a
# credential that the run itself revoked (403: it finds key and device ids in the lists it reads).
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "304", "400", "401", "403", "404", "409", "413", "422"]

# The worker token serves its own task only: other task ids can only meet a refusal.
[[operations]]
include-tag = "dc_ccl"
headers = {{ Authorization = "Bearer {worker}" }}
parameters = {{ "path.task_id" = {{ dictionary = "dc_ccl_task", probability = 0.7 }} }}

# Likewise the anonymous-embeddings worker's (its samples route reads no credential at all).
[[operations]]
include-tag = "anon_embeddings"
headers = {{ Authorization = "Bearer {anon_worker}" }}
parameters = {{ "path.task_id" = {{ dictionary = "anon_task", probability = 0.7 }} }}

[[operations]]
include-path-regex = "^/v1/(updates|metrics)$"
headers = {{ Authorization = "Bearer {upload}" }}

[[operations]]
include-name = "POST /v1/devices"
headers = {{ Authorization = "Bearer {enrolment_key}" }}

[[operations]]
include-name = "POST /v1/tasks/{{task_id}}/checkin"
headers = {{ Authorization = "Bearer {device}" }}
"#,
        admin = ADMIN_TOKEN,
        worker = population.worker_token,
        upload = population.upload_token,
        token_name = population.token_name,
        dc_ccl_task = population.dc_ccl_task,
        anon_task = population.anon_task,
        anon_worker = population.anon_worker_token,
        enrolment_key = population.enrolment_key,
        decoy_key = population.decoy_key_id,
        device = population.device,
    )
}

/// A task of every strategy; the FedAvg ones with a committed round and an open one.
async fn populate(server: &ServerProcess) -> Population {
    let client = server.raw_client();
    let create = |strategy: StrategyConfig| {
        let client = client.clone();
        async move {
            let mut config = small_task(2, 2, 50, 600);
            config.strategy = strategy;
            client
                .create_task(&config, small_tensors(|_| 0.0).encode())
                .await
                .unwrap()
        }
    };
    let finished = client
        .create_task(&small_task(1, 1, 1, 120), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let assignment = assign(&client, &finished).await;
    let update = Bytes::from(small_tensors(|i| i as f32 * 0.01).encode());
    client
        .upload_update(&assignment.upload_token, 10, update)
        .await
        .unwrap();
    wait_for_version(&client, &finished, 1, Duration::from_secs(30)).await;

    let running = create(StrategyConfig::FedAvg { server_lr: 1.0 }).await.task_id;
    let upload_token = assign(&client, &running).await.upload_token;
    let schedule = BlockSchedule::Rounds {
        blocks: ["day", "night"]
            .map(|name| RoundBlock {
                name: name.into(),
                rounds: 1,
            })
            .to_vec(),
    };
    let dc_ccl = create(StrategyConfig::DcCcl {
        cloud_weight: 0.5,
        without_cloud: Default::default(),
        control_model: "test".into(),
        control_tensors: small_specs()[..1].to_vec(),
    })
    .await;
    let dc_ccl_task = dc_ccl.task_id.clone();
    let anon = create(StrategyConfig::AnonEmbeddings {
        embedding_dim: 2,
        sigma: 0.5,
        input_features: 3,
        num_classes: 4,
        max_samples_per_submission: 8,
        mix_batch_samples: 4,
        samples_per_second: 100.0,
        samples_burst: 100,
    })
    .await;
    let anon_task = anon.task_id.clone();
    let mut tasks = vec![finished, running, dc_ccl.task_id, anon.task_id];
    for strategy in [
        StrategyConfig::FedSubAvg {
            server_lr: 1.0,
            form: Default::default(),
            tables: vec!["w".into()],
        },
        StrategyConfig::FedLaAvg {
            warmup_rounds: 0,
            selection_window_ms: 1_000,
        },
        StrategyConfig::MmPsgd {
            server_lr: 1.0,
            schedule: schedule.clone(),
            predictor_average: Default::default(),
        },
        StrategyConfig::McPsgd {
            server_lr: 1.0,
            schedule,
            chain_learning_rate: None,
            predictor_average: Default::default(),
        },
    ] {
        tasks.push(create(strategy).await.task_id);
    }
    let token_name = "viewer".to_string();
    let created = reqwest::Client::new()
        .post(format!("{}/v1/tokens", server.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({ "name": token_name, "scope": "read-only" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let enrolment_key = client
        .create_enrolment_key("schemathesis")
        .await
        .unwrap()
        .enrolment_key;
    let decoy_key_id = client.create_enrolment_key("decoy").await.unwrap().key_id;
    let device = client.enrol_device(&enrolment_key).await.unwrap().bearer();
    Population {
        tasks,
        dc_ccl_task,
        worker_token: dc_ccl.worker_token.expect("a DC-CCL task has a worker token"),
        anon_task,
        anon_worker_token: anon
            .worker_token
            .expect("an anonymous-embeddings task has a worker token"),
        upload_token,
        token_name,
        enrolment_key,
        decoy_key_id,
        device,
    }
}

async fn run_schemathesis(base_url: &str, dir: &Path, population: &Population) -> (bool, String) {
    let config_file = dir.join("schemathesis.toml");
    std::fs::write(&config_file, config(population)).unwrap();
    let program = schemathesis_program();
    let output = tokio::process::Command::new(&program)
        .arg("--config-file")
        .arg(&config_file)
        .arg("--no-color")
        .arg("run")
        .arg(format!("{base_url}/openapi.json"))
        .args(["--checks", "all"])
        .arg("--report-dir")
        .arg(dir.join("report"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "could not run `{program}` ({e}); install it with `pip install {SCHEMATHESIS}` or set \
                 FEDHIVE_SCHEMATHESIS to its path"
            )
        });
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// How many requests to `route` with `method` the server answered with a 2xx, from its own metrics.
fn successes(metrics: &str, method: &str, route: &str) -> u64 {
    let prefix = format!(
        "fedhive_http_request_duration_seconds_count{{route=\"{route}\",method=\"{method}\",status=\"2"
    );
    metrics
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn schemathesis_finds_no_failure(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(&dir.path().join("data"), &db).await.unwrap();
    let population = populate(&server).await;

    let document: serde_json::Value = reqwest::get(format!("{}/openapi.json", server.base_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = document["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 37, "described paths: {:?}", paths.keys());

    let (passed, output) = run_schemathesis(&server.base_url, dir.path(), &population).await;
    println!("{output}");
    assert!(passed, "schemathesis found failures ({backend:?}):\n{output}");
    assert!(
        output.contains("Tested: 42"),
        "schemathesis did not test all 42 operations:\n{output}"
    );

    // The generated traffic got past the refusals into each strategy's working paths (the server
    // counts its answers by route and status).
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", server.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (method, route) in [
        ("POST", "/v1/tasks/{task_id}/checkin"),
        ("GET", "/v1/tasks/{task_id}/model"),
        ("GET", "/v1/tasks/{task_id}/rounds"),
        ("GET", "/v1/tasks/{task_id}/cloud"),
        ("GET", "/v1/tasks/{task_id}/anonymous"),
        ("GET", "/v1/tasks/{task_id}/devices"),
        ("GET", "/v1/tasks/{task_id}/predictor"),
        ("GET", "/v1/tasks/{task_id}/blocks"),
        ("GET", "/v1/tokens"),
        ("DELETE", "/v1/tokens/{name}"),
        ("GET", "/v1/audit"),
        ("POST", "/v1/devices"),
        ("GET", "/v1/devices"),
        ("GET", "/v1/enrolment-keys"),
    ] {
        assert!(
            successes(&metrics, method, route) > 0,
            "no 2xx answer to {method} {route} in:\n{metrics}"
        );
    }
}
