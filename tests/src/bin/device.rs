//! A device process for the SDK's crash tests: the example app's model and loop
//! (`fedhive-example-app`) on a shard of Fashion-MNIST, with its state in a directory. With
//! `--pause-at STAGE` it stops for good when its round reaches that stage (after printing
//! `paused at STAGE`), so a test can SIGKILL it exactly there.
//!
//! Usage: `fedhive-e2e-device --server URL --task ID --state DIR [--enrolment-key K]
//! [--shard N] [--samples N] [--pause-at STAGE]`; prints `summary <json>` when the task finishes.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use fedhive_client::client::FedhiveClient;
use fedhive_client::data::{Split, default_data_dir, load_fashion_mnist};
use fedhive_client::session::{Progress, RoundConditions, Session};
use fedhive_client::state::DeviceState;
use fedhive_example_app::{AppImages, TwoLayerNet, run_rounds};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flags: HashMap<&str, &str> = args
        .chunks(2)
        .map(|pair| {
            (
                pair[0].trim_start_matches("--"),
                pair.get(1).map_or("", String::as_str),
            )
        })
        .collect();
    let flag = |name: &str| {
        flags
            .get(name)
            .copied()
            .with_context(|| format!("--{name} is required"))
    };
    let shard: usize = flags.get("shard").map_or(Ok(0), |s| s.parse())?;
    let samples: usize = flags.get("samples").map_or(Ok(256), |s| s.parse())?;

    let train = load_fashion_mnist(&default_data_dir(), Split::Train)?;
    let from = shard * samples;
    let data = AppImages {
        pixels: train.images[from * 784..(from + samples) * 784].to_vec(),
        labels: train.labels[from..from + samples].to_vec(),
    };
    let device = burn::tensor::Device::flex();
    let client = FedhiveClient::new(flag("server")?)?;
    let state = DeviceState::open(flag("state")?)?;
    let mut session = Session::new(
        client,
        flag("task")?,
        state,
        device,
        TwoLayerNet::new,
        Arc::new(data),
    )?;
    if let Some(key) = flags.get("enrolment-key") {
        session.enrol(key).await?;
    }
    let pause_at = flags.get("pause-at").map(|s| s.to_string());
    let conditions = RoundConditions {
        progress: Some(Arc::new(move |p: &Progress| {
            if pause_at.as_deref() == Some(p.name()) {
                println!("paused at {}", p.name());
                std::io::stdout().flush().expect("stdout");
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
        })),
        ..RoundConditions::default()
    };
    let summary = run_rounds(&mut session, &conditions, None).await?;
    println!("summary {}", serde_json::to_string(&summary)?);
    Ok(())
}
