//! Whole requests through the server's own router (every extractor and handler, no socket): query
//! strings, path segments, the credential headers (`Authorization`, `Fedhive-Device`) and JSON or
//! multipart bodies, against a server that holds a task of each strategy, an enrolment key, an
//! enrolled device, a named token and an upload token, so credentials the fuzzer splices into get
//! past the first lookups.
//!
//! What must hold for every request: no panic, no `500`, and every refusal is a JSON body naming
//! its code (`{"error": ..., "message": ...}`) — the API's error contract (docs/api.md).
//!
//! Routes that only change a task's or a credential's state (pause, resume, cancel, revoke) are
//! left out: they decode nothing but a path segment, which the read routes fuzz, and running them
//! would make every later input meet a different server.
#![no_main]

use std::sync::{Arc, LazyLock};

use arbitrary::Arbitrary;
use axum::{
    Router,
    body::{Body, to_bytes},
    http::{HeaderValue, Method, Request, header},
};
use fedhive_fuzz::{tasks, tensors};
use fedhive_server::{Coordinator, CoordinatorOptions, api, blobs::BlobStore, db::Db};
use fedhive_shared::wire::{
    CheckinResponse, DeviceCredentials, EnrolmentKeyCreated, TaskCreated, TokenCreated,
};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const ADMIN_TOKEN: &str = "fuzz-admin-token";

/// The routes a request can take: method, path (`{0}`, `{1}`: the input's path segments) and the
/// body's content type.
const ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("POST", "/v1/tasks/{0}/checkin", None),
    ("PUT", "/v1/updates", Some("application/octet-stream")),
    ("POST", "/v1/metrics", Some("application/json")),
    ("GET", "/v1/tasks/{0}/model", None),
    ("GET", "/v1/tasks/{0}", None),
    ("GET", "/v1/tasks/{0}/rounds", None),
    ("GET", "/v1/tasks", None),
    ("POST", "/v1/tasks", Some("multipart/form-data; boundary=fuzz")),
    ("POST", "/v1/devices", None),
    ("GET", "/v1/devices", None),
    ("POST", "/v1/enrolment-keys", Some("application/json")),
    ("GET", "/v1/enrolment-keys", None),
    ("POST", "/v1/tokens", Some("application/json")),
    ("GET", "/v1/tokens", None),
    ("GET", "/v1/audit", None),
    ("POST", "/v1/tasks/{0}/devices", None),
    ("GET", "/v1/tasks/{0}/devices", None),
    ("POST", "/v1/tasks/{0}/submodel", Some("application/json")),
    (
        "PUT",
        "/v1/tasks/{0}/devices/{1}/features",
        Some("application/json"),
    ),
    ("POST", "/v1/tasks/{0}/heat", Some("application/json")),
    ("GET", "/v1/tasks/{0}/blocks", None),
    ("GET", "/v1/tasks/{0}/blocks/{1}/chain", None),
    ("GET", "/v1/tasks/{0}/predictor", None),
    ("GET", "/v1/tasks/{0}/cloud", None),
    ("GET", "/v1/tasks/{0}/control-model", None),
    (
        "PUT",
        "/v1/tasks/{0}/control-model/{1}",
        Some("application/octet-stream"),
    ),
    (
        "PUT",
        "/v1/tasks/{0}/rounds/{1}/cloud-update",
        Some("application/octet-stream"),
    ),
    ("GET", "/metrics", None),
    ("GET", "/readyz", None),
    ("GET", "/ui", None),
];

/// A path segment or credential: one the server issued, one with bytes spliced into it, or raw bytes.
#[derive(Arbitrary, Debug)]
enum Value {
    Known(u8),
    Spliced { known: u8, at: u8, bytes: Vec<u8> },
    Raw(Vec<u8>),
    Absent,
}

#[derive(Arbitrary, Debug)]
struct Input {
    route: u8,
    segments: [Value; 2],
    query: Vec<u8>,
    authorization: Value,
    device: Value,
    body: Vec<u8>,
}

/// The server and what it issued during setup.
struct Server {
    runtime: tokio::runtime::Runtime,
    router: Router,
    /// Task ids, device and key ids, round and version numbers, a block name, a token name.
    segments: Vec<String>,
    /// Admin, named, upload, worker and device credentials and an enrolment key.
    credentials: Vec<String>,
    _dir: tempfile::TempDir,
}

static SERVER: LazyLock<Server> = LazyLock::new(setup);

fn setup() -> Server {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let router = runtime.block_on(async {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("fuzz.db").display());
        let db = Db::connect(&url).await.unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let coordinator = Arc::new(Coordinator::new(db, blobs, CoordinatorOptions::default()));
        let state = api::AppState {
            coordinator,
            admin_token: Some(ADMIN_TOKEN.into()),
            body_read_timeout: std::time::Duration::from_secs(5),
            rate_limit: None,
            trusted_proxies: Arc::from([]),
            client_certificates: false,
        };
        api::router(state, 1 << 20)
    });
    let call = |method: &str, path: &str, token: Option<&str>, content_type: &str, body: Vec<u8>| {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap();
        let response = runtime.block_on(router.clone().oneshot(request)).unwrap();
        let status = response.status();
        let bytes = runtime
            .block_on(to_bytes(response.into_body(), usize::MAX))
            .unwrap();
        assert!(
            status.is_success(),
            "setup: {method} {path}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        bytes
    };
    let json = "application/json";
    let mut segments = Vec::new();
    let mut credentials = vec![ADMIN_TOKEN.to_string()];
    for config in tasks() {
        let mut form = b"--fuzz\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n".to_vec();
        form.extend(serde_json::to_vec(&config).unwrap());
        form.extend(b"\r\n--fuzz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n");
        form.extend(tensors(&config.tensors).encode());
        form.extend(b"\r\n--fuzz--\r\n");
        let created: TaskCreated = serde_json::from_slice(&call(
            "POST",
            "/v1/tasks",
            Some(ADMIN_TOKEN),
            "multipart/form-data; boundary=fuzz",
            form,
        ))
        .unwrap();
        let checkin = call(
            "POST",
            &format!("/v1/tasks/{}/checkin", created.task_id),
            None,
            json,
            vec![],
        );
        if let Ok(CheckinResponse::Assigned(assignment)) = serde_json::from_slice(&checkin) {
            credentials.push(assignment.upload_token);
        }
        credentials.extend(created.worker_token);
        segments.push(created.task_id);
    }
    let key: EnrolmentKeyCreated = serde_json::from_slice(&call(
        "POST",
        "/v1/enrolment-keys",
        Some(ADMIN_TOKEN),
        json,
        br#"{"name":"app 1.0"}"#.to_vec(),
    ))
    .unwrap();
    let device: DeviceCredentials = serde_json::from_slice(&call(
        "POST",
        "/v1/devices",
        Some(&key.enrolment_key),
        json,
        vec![],
    ))
    .unwrap();
    let token: TokenCreated = serde_json::from_slice(&call(
        "POST",
        "/v1/tokens",
        Some(ADMIN_TOKEN),
        json,
        br#"{"name":"reader","scope":"read-only"}"#.to_vec(),
    ))
    .unwrap();
    credentials.extend([
        key.enrolment_key,
        format!("{}:{}", device.device_id, device.device_secret),
        token.token,
    ]);
    segments.extend([
        device.device_id,
        key.key_id,
        "1".into(),
        "a".into(),
        "reader".into(),
    ]);
    Server {
        runtime,
        router,
        segments,
        credentials,
        _dir: dir,
    }
}

/// The value's bytes, or `None` when absent.
fn resolve(value: &Value, known: &[String]) -> Option<Vec<u8>> {
    let pick = |i: &u8| known[*i as usize % known.len()].as_bytes().to_vec();
    match value {
        Value::Known(i) => Some(pick(i)),
        Value::Spliced { known: i, at, bytes } => {
            let mut out = pick(i);
            let at = *at as usize % (out.len() + 1);
            out.splice(at..at, bytes.iter().copied());
            Some(out)
        }
        Value::Raw(bytes) => Some(bytes.clone()),
        Value::Absent => None,
    }
}

/// Bytes as they may stand in a URI: what a URI cannot hold is percent-encoded; `%`, `&`, `=`,
/// `+` and the rest stay as the fuzzer wrote them, so the server's decoding meets them raw.
fn uri_text(bytes: &[u8], in_path: bool) -> String {
    let mut out = String::new();
    for &b in bytes {
        let keep = b.is_ascii_graphic() && b != b'#' && !(in_path && (b == b'/' || b == b'?'));
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fuzz_target!(|input: Input| {
    let server = &*SERVER;
    let (method, template, content_type) = ROUTES[input.route as usize % ROUTES.len()];
    let mut path = template.to_string();
    for (i, segment) in input.segments.iter().enumerate() {
        let text = resolve(segment, &server.segments).unwrap_or_default();
        path = path.replace(&format!("{{{i}}}"), &uri_text(&text, true));
    }
    if !input.query.is_empty() {
        path = format!("{path}?{}", uri_text(&input.query, false));
    }
    let mut request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(&path);
    if let Some(bytes) = resolve(&input.authorization, &server.credentials) {
        let mut value = b"Bearer ".to_vec();
        value.extend(bytes);
        // A value no HTTP parser would pass on (a newline, say) never reaches the server.
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            request = request.header(header::AUTHORIZATION, value);
        }
    }
    if let Some(bytes) = resolve(&input.device, &server.credentials) {
        if let Ok(value) = HeaderValue::from_bytes(&bytes) {
            request = request.header("fedhive-device", value);
        }
    }
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let Ok(request) = request.body(Body::from(input.body)) else {
        return; // not a URI hyper would accept
    };
    let response = server
        .runtime
        .block_on(server.router.clone().oneshot(request))
        .unwrap();
    let status = response.status();
    let body = server
        .runtime
        .block_on(to_bytes(response.into_body(), usize::MAX))
        .unwrap();
    assert_ne!(
        status.as_u16(),
        500,
        "{method} {path}: {}",
        String::from_utf8_lossy(&body)
    );
    if status.is_client_error() || status.is_server_error() {
        let error: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{method} {path}: {status} without a JSON body ({e}): {body:?}"));
        assert!(
            error["error"].is_string() && error["message"].is_string(),
            "{method} {path}: {status} {error}"
        );
    }
});
