//! The dashboard (`/ui`) in a real browser: headless Chromium (Debian's `chromium`) loads the page
//! of a server that ran a small federation, and the page it renders shows every round, the
//! upload outcomes and a plot of the devices' reported loss and accuracy. Without the operator
//! token the page shows no data, only the token form.

use std::{process::Command, time::Duration};

use bytes::Bytes;
use fedhive_e2e::{
    ADMIN_TOKEN, Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors,
    wait_for_version,
};
use fedhive_shared::wire::MetricsReport;

on_both_databases!(the_dashboard_shows_the_rounds_and_a_plot);

/// The DOM after the page's scripts ran, as headless Chromium dumps it.
fn rendered(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .expect("running chromium (apt-get install chromium; .ci/run installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The number in `attribute="N"` of the first element with `class="CLASS"`.
fn attribute_of(dom: &str, class: &str, attribute: &str) -> usize {
    let at = dom
        .find(&format!(r#"class="{class}""#))
        .unwrap_or_else(|| panic!("no .{class} in {dom}"));
    let rest = &dom[at..dom[at..].find('>').unwrap() + at];
    let value = rest
        .split(&format!(r#"{attribute}=""#))
        .nth(1)
        .unwrap_or_else(|| panic!("no {attribute} in {rest}"));
    value[..value.find('"').unwrap()].parse().unwrap()
}

/// The `<tbody>` rows of the table with `id`.
fn rows(dom: &str, id: &str) -> Vec<String> {
    let table = &dom[dom.find(&format!(r#"id="{id}""#)).unwrap()..];
    let body = &table[table.find("<tbody>").unwrap()..table.find("</tbody>").unwrap()];
    body.split("<tr").skip(1).map(str::to_string).collect()
}

async fn the_dashboard_shows_the_rounds_and_a_plot(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.raw_client();
    let task = client
        .create_task(&small_task(2, 2, 3, 120), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let update = Bytes::from(small_tensors(|i| i as f32 * 0.01).encode());
    for round in 1..=3 {
        for device in 0..2 {
            let a = assign(&client, &task).await;
            let report = MetricsReport {
                loss: 2.0 / round as f32 + device as f32 * 0.1,
                num_samples: 10,
                accuracy: Some(0.2 * round as f32),
            };
            client.report_metrics(&a.upload_token, &report).await.unwrap();
            client
                .upload_update(&a.upload_token, 10, update.clone())
                .await
                .unwrap();
        }
        wait_for_version(&client, &task, round, Duration::from_secs(30)).await;
    }

    let page = format!("{}/ui?task={task}", server.base_url);
    let dom = tokio::task::spawn_blocking(move || rendered(&format!("{page}#token={ADMIN_TOKEN}")))
        .await
        .unwrap();
    assert!(dom.contains(&format!("Task {task}")), "{dom}");
    let rounds = rows(&dom, "rounds");
    assert_eq!(rounds.len(), 3, "one row per round: {rounds:?}");
    assert!(rounds.iter().all(|r| r.contains("committed")), "{rounds:?}");
    assert!(
        rounds[0].contains("0.6000"),
        "newest first, its accuracy: {}",
        rounds[0]
    );
    assert_eq!(attribute_of(&dom, "accuracy", "data-points"), 3);
    assert_eq!(attribute_of(&dom, "loss", "data-points"), 3);
    let outcomes = rows(&dom, "outcomes");
    assert!(
        outcomes
            .iter()
            .any(|r| r.contains("accepted") && r.contains(">6<")),
        "{outcomes:?}"
    );

    // No token: the page holds no data and asks for one.
    let page = format!("{}/ui?task={task}", server.base_url);
    let dom = tokio::task::spawn_blocking(move || rendered(&page))
        .await
        .unwrap();
    assert!(dom.contains("an operator token is needed"), "{dom}");
    assert!(!dom.contains(&format!("Task {task}")));
}
