//! Every kind of bad input gets a 4xx with a JSON body naming the problem, and changes nothing.

use bytes::Bytes;
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::{NamedTensors, Tensor, wire::ErrorBody};
use reqwest::{Method, StatusCode};
use safetensors::{Dtype, tensor::TensorView};

on_both_databases!(
    bad_uploads_change_nothing,
    bad_operator_and_device_requests_change_nothing
);

/// Sends a raw request and returns (status, error body).
async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Option<ErrorBody>) {
    let resp = req.send().await.expect("request reaches the server");
    let status = resp.status();
    let body = resp.json::<ErrorBody>().await.ok();
    (status, body)
}

fn assert_refused(case: &str, got: (StatusCode, Option<ErrorBody>), status: StatusCode, code: &str) {
    let (got_status, body) = got;
    let body = body.unwrap_or_else(|| panic!("{case}: no JSON error body"));
    assert_eq!(
        (got_status, body.error.as_str()),
        (status, code),
        "{case}: {}",
        body.message
    );
    assert!(!body.message.is_empty(), "{case}: empty message");
}

fn upload(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    num_samples: &str,
    body: Bytes,
) -> reqwest::RequestBuilder {
    http.request(
        Method::PUT,
        format!("{base}/v1/updates?num_samples={num_samples}"),
    )
    .bearer_auth(token)
    .body(body)
}

fn with(f: impl Fn(&mut NamedTensors)) -> Bytes {
    let mut t = small_tensors(|_| 0.5);
    f(&mut t);
    Bytes::from(t.encode())
}

async fn bad_uploads_change_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.raw_client();
    let base = server.base_url.clone();
    let http = reqwest::Client::new();
    let task = client
        .create_task(&small_task(1, 1, 3, 60), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;

    // Round 1 (K = 1, two assignments): `used` uploads and commits it; `stale` never uploads, so
    // afterwards it is a valid token of another, closed round.
    let used = assign(&client, &task).await;
    let stale = assign(&client, &task).await;
    client
        .upload_update(&used.upload_token, 1, with(|_| ()))
        .await
        .unwrap();
    wait_for_version(&client, &task, 1, std::time::Duration::from_secs(30)).await;
    let a = assign(&client, &task).await;

    let f64_body = {
        let data = [0u8; 8 * 3];
        let view = TensorView::new(Dtype::F64, vec![3], &data).unwrap();
        let w = small_tensors(|_| 0.5).0["w"].data.clone();
        let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let wview = TensorView::new(Dtype::F32, vec![2, 3], &wb).unwrap();
        Bytes::from(safetensors::serialize(vec![("b", view), ("w", wview)], None).unwrap())
    };
    let good = with(|_| ());
    let limit = fedhive_server::coordinator::upload_limit(&small_task(1, 1, 3, 60)).unwrap();
    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            "unknown tensor name",
            upload(
                &http,
                &base,
                &a.upload_token,
                "1",
                with(|t| {
                    let b = t.0.remove("b").unwrap();
                    t.0.insert("bias".into(), b);
                }),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_tensor",
        ),
        (
            "extra tensor",
            upload(
                &http,
                &base,
                &a.upload_token,
                "1",
                with(|t| {
                    t.0.insert(
                        "z".into(),
                        Tensor {
                            shape: vec![1],
                            data: vec![0.0],
                        },
                    );
                }),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unexpected_tensor",
        ),
        (
            "wrong shape",
            upload(
                &http,
                &base,
                &a.upload_token,
                "1",
                with(|t| {
                    t.0.get_mut("w").unwrap().shape = vec![3, 2];
                }),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "shape_mismatch",
        ),
        (
            "wrong dtype",
            upload(&http, &base, &a.upload_token, "1", f64_body),
            StatusCode::UNPROCESSABLE_ENTITY,
            "dtype_mismatch",
        ),
        (
            "NaN",
            upload(
                &http,
                &base,
                &a.upload_token,
                "1",
                with(|t| t.0.get_mut("w").unwrap().data[4] = f32::NAN),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "non_finite_value",
        ),
        (
            "Inf",
            upload(
                &http,
                &base,
                &a.upload_token,
                "1",
                with(|t| t.0.get_mut("b").unwrap().data[0] = f32::NEG_INFINITY),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "non_finite_value",
        ),
        (
            "out of range",
            upload(
                &http,
                &base,
                &a.upload_token,
                "1",
                with(|t| t.0.get_mut("b").unwrap().data[0] = 1e6),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "value_out_of_range",
        ),
        (
            "truncated body",
            upload(&http, &base, &a.upload_token, "1", good.slice(..good.len() - 5)),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_tensors",
        ),
        (
            "garbage body",
            upload(
                &http,
                &base,
                &a.upload_token,
                "1",
                Bytes::from_static(b"not safetensors"),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_tensors",
        ),
        (
            "empty body",
            upload(&http, &base, &a.upload_token, "1", Bytes::new()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_tensors",
        ),
        (
            "oversize body",
            upload(
                &http,
                &base,
                &a.upload_token,
                "1",
                Bytes::from(vec![0u8; limit + 1]),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            "zero samples",
            upload(&http, &base, &a.upload_token, "0", good.clone()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_num_samples",
        ),
        (
            "too many samples",
            upload(&http, &base, &a.upload_token, "99999999999", good.clone()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_num_samples",
        ),
        (
            "num_samples not a number",
            upload(&http, &base, &a.upload_token, "many", good.clone()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "unknown token",
            upload(&http, &base, "not-a-token", "1", good.clone()),
            StatusCode::UNAUTHORIZED,
            "unknown_token",
        ),
        (
            "token of another (closed) round",
            upload(&http, &base, &stale.upload_token, "1", good.clone()),
            StatusCode::CONFLICT,
            "round_closed",
        ),
        (
            "used token of another round, new payload",
            upload(
                &http,
                &base,
                &used.upload_token,
                "1",
                with(|t| t.0.get_mut("b").unwrap().data[0] = 0.25),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "conflicting_retry",
        ),
        (
            "missing token",
            http.request(Method::PUT, format!("{base}/v1/updates?num_samples=1"))
                .body(good.clone()),
            StatusCode::UNAUTHORIZED,
            "missing_token",
        ),
        (
            "metrics with a NaN loss",
            http.post(format!("{base}/v1/metrics"))
                .bearer_auth(&a.upload_token)
                .header("content-type", "application/json")
                .body(r#"{"loss": "NaN", "num_samples": 1}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "metrics with an unknown token",
            http.post(format!("{base}/v1/metrics"))
                .bearer_auth("nope")
                .json(&serde_json::json!({"loss": 0.1, "num_samples": 1})),
            StatusCode::UNAUTHORIZED,
            "unknown_token",
        ),
    ];

    let status_before = client.task_status(&task).await.unwrap();
    let rounds_before = client.rounds(&task).await.unwrap();
    for (case, req, status, code) in cases {
        assert_refused(case, send(req).await, status, code);
        assert_eq!(
            client.rounds(&task).await.unwrap(),
            rounds_before,
            "{case} changed the rounds"
        );
        assert_eq!(
            client.task_status(&task).await.unwrap(),
            status_before,
            "{case} changed the task"
        );
    }
    // A refused body may have been written while it was checked (the two overlap), then removed:
    // the round's folder may exist, but holds nothing.
    let updates_dir = dir.path().join("blobs/updates").join(a.round_id.to_string());
    let left: Vec<_> = std::fs::read_dir(&updates_dir)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "refused uploads left blobs: {left:?}");

    // None of that used up the token: the good update is accepted, and commits round 2.
    let receipt = client
        .upload_update(&a.upload_token, 2, good.clone())
        .await
        .unwrap();
    assert_eq!((receipt.round_id, receipt.accepted_updates), (a.round_id, 1));
    wait_for_version(&client, &task, 2, std::time::Duration::from_secs(30)).await;
    let rounds = client.rounds(&task).await.unwrap();
    assert_eq!((rounds[1].accepted, rounds[1].total_samples), (1, 2));
}

async fn bad_operator_and_device_requests_change_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let base = server.base_url.clone();
    let http = reqwest::Client::new();
    let model = small_tensors(|_| 0.0).encode();
    let form = |config: serde_json::Value, model: Vec<u8>| {
        reqwest::multipart::Form::new()
            .text("config", config.to_string())
            .part("model", reqwest::multipart::Part::bytes(model))
    };
    let good_config = serde_json::to_value(small_task(2, 1, 1, 60)).unwrap();
    let mut k_zero = good_config.clone();
    k_zero["devices_per_round"] = 0.into();
    let mut min_above_k = good_config.clone();
    min_above_k["min_devices_per_round"] = 5.into();
    let mut unknown_strategy = good_config.clone();
    unknown_strategy["strategy"] = serde_json::json!({"name": "fedmagic"});
    let mut wrong_specs = small_tensors(|_| 0.0);
    wrong_specs.0.get_mut("b").unwrap().shape = vec![1, 3];

    let tasks = |s: &str| format!("{base}/v1/tasks{s}");
    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            "create without admin token",
            http.post(tasks(""))
                .multipart(form(good_config.clone(), model.clone())),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "create with a wrong admin token",
            http.post(tasks(""))
                .bearer_auth("guess")
                .multipart(form(good_config.clone(), model.clone())),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "K = 0",
            http.post(tasks(""))
                .bearer_auth(ADMIN_TOKEN)
                .multipart(form(k_zero, model.clone())),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
        ),
        (
            "minimum above K",
            http.post(tasks(""))
                .bearer_auth(ADMIN_TOKEN)
                .multipart(form(min_above_k, model.clone())),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
        ),
        (
            "unknown strategy",
            http.post(tasks(""))
                .bearer_auth(ADMIN_TOKEN)
                .multipart(form(unknown_strategy, model.clone())),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
        ),
        (
            "model does not match config",
            http.post(tasks(""))
                .bearer_auth(ADMIN_TOKEN)
                .multipart(form(good_config.clone(), wrong_specs.encode())),
            StatusCode::UNPROCESSABLE_ENTITY,
            "shape_mismatch",
        ),
        (
            "model missing",
            http.post(tasks(""))
                .bearer_auth(ADMIN_TOKEN)
                .multipart(reqwest::multipart::Form::new().text("config", good_config.to_string())),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "status of an unknown task",
            http.get(tasks("/t-nope")).bearer_auth(ADMIN_TOKEN),
            StatusCode::NOT_FOUND,
            "unknown_task",
        ),
        (
            "status without admin token",
            http.get(tasks("/t-nope")),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "check-in to an unknown task",
            http.post(tasks("/t-nope/checkin")),
            StatusCode::NOT_FOUND,
            "unknown_task",
        ),
        (
            "model of an unknown task",
            http.get(tasks("/t-nope/model")),
            StatusCode::NOT_FOUND,
            "unknown_task",
        ),
        // Found by the `requests` fuzz target: axum answered these with an empty body.
        (
            "a path no route matches (an empty task id)",
            http.get(tasks("/")).bearer_auth(ADMIN_TOKEN),
            StatusCode::NOT_FOUND,
            "no_route",
        ),
        (
            "a method the route does not answer",
            http.delete(tasks("")).bearer_auth(ADMIN_TOKEN),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (case, req, status, code) in cases {
        assert_refused(case, send(req).await, status, code);
    }
    let answer = http.delete(tasks("")).send().await.unwrap();
    let mut allow: Vec<_> = answer.headers()["allow"].to_str().unwrap().split(',').collect();
    allow.sort();
    assert_eq!(allow, ["GET", "HEAD", "POST"], "405 keeps its Allow header");
    // Nothing was created: no model blobs, and the one good request is task number one.
    let models = dir.path().join("blobs/models");
    assert!(
        !models.exists() || std::fs::read_dir(&models).unwrap().next().is_none(),
        "a refused task left blobs"
    );
    let client = server.raw_client();
    let task = client
        .create_task(&small_task(2, 1, 1, 60), model)
        .await
        .unwrap()
        .task_id;
    let future_version = send(http.get(tasks(&format!("/{task}/model?version=7")))).await;
    assert_refused(
        "future model version",
        future_version,
        StatusCode::NOT_FOUND,
        "unknown_model_version",
    );
    assert_eq!(client.rounds(&task).await.unwrap().len(), 1);
}
