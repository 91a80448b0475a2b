//! `fedhive-sim`: runs federations of simulated devices against a fedhive server.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fedhive_sim::{
    anon_embeddings::{AnonOptions, run_anon_embeddings},
    availability_scenario::{AvailabilityOptions, run_availability},
    bench_training::{BenchTrainingOptions, OnceOptions},
    block_cyclic::{BlockCyclicOptions, run_block_cyclic},
    dc_ccl::{DcCclOptions, run_dc_ccl},
    demo::{DemoOptions, run_demo},
    hot_cold::{HotColdOptions, run_hot_cold},
    join::{DevicesOptions, TaskFilesOptions, run_devices, write_task_files},
};

#[derive(Parser)]
#[command(name = "fedhive-sim", version, about = "fedhive simulations")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A FedAvg federation on non-IID Fashion-MNIST: server on a temporary SQLite (or --database-url),
    /// simulated devices training with burn; prints one JSON line at the end.
    Demo(DemoOptions),
    /// Device training throughput (samples/s) per model and backend, cold and warm; each
    /// measurement in a fresh child process.
    BenchTraining(BenchTrainingOptions),
    /// One measurement of bench-training in this process (what bench-training runs as a child).
    #[command(hide = true)]
    BenchTrainingOnce(OnceOptions),
    /// FedAvg vs FedLaAvg under intermittent availability (one class per device, devices take part
    /// only when available); prints one JSON summary at the end.
    Availability(AvailabilityOptions),
    /// MM-PSGD and MC-PSGD on block-cyclic Fashion-MNIST (day/night concepts) against the last global
    /// model, plus a control where both blocks are the same; prints one JSON line at the end.
    BlockCyclic(BlockCyclicOptions),
    /// FedSubAvg vs FedAvg (server steps 1, 3, 10, 30) on Zipf-distributed sparse features with a CTR
    /// model; prints one JSON summary (training loss overall, on hot and on cold samples).
    HotCold(HotColdOptions),
    /// DC-CCL device-cloud fusion on Fashion-MNIST split by class between the cloud and the devices,
    /// against cloud-only, device-only and a pooled-data oracle, on several seeds; prints one JSON
    /// summary.
    DcCcl(DcCclOptions),
    /// Personalisation without user identifiers: anonymous user embeddings on Fashion-MNIST with a
    /// labelling of each user's own, no personalisation and a static embedding against sampled
    /// embeddings at several sigmas, with an attacker's attribution; prints one JSON summary.
    AnonEmbeddings(AnonOptions),
    /// Writes a FedAvg task config (`task.json`) and its initial model (`init.safetensors`) for
    /// `fedhive task create`.
    TaskFiles(TaskFilesOptions),
    /// Simulated devices (non-IID Fashion-MNIST shares) that join a task on a running server and
    /// train until it is over; prints one JSON line.
    Devices(DevicesOptions),
}

fn main() -> ExitCode {
    fedhive_server::cli::init_tracing_with_default("warn");
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::TaskFiles(options) => {
                let (config, model) = write_task_files(&options)?;
                println!("wrote {} and {}", config.display(), model.display());
                anyhow::Ok(())
            }
            Command::Devices(options) => {
                let report = run_devices(&options).await?;
                println!("{}", serde_json::to_string(&report)?);
                anyhow::Ok(())
            }
            Command::Demo(options) => {
                let report = run_demo(&options, true).await?;
                println!("{}", serde_json::to_string(&report)?);
                anyhow::Ok(())
            }
            Command::BenchTraining(options) => {
                let results = fedhive_sim::bench_training::run_all(&options)?;
                println!("{}", serde_json::to_string(&results)?);
                Ok(())
            }
            Command::BenchTrainingOnce(options) => {
                let result = fedhive_sim::bench_training::run_once(&options)?;
                println!("{}", serde_json::to_string(&result)?);
                Ok(())
            }
            Command::Availability(options) => {
                let report = run_availability(&options, true).await?;
                println!("{}", serde_json::to_string(&report)?);
                anyhow::Ok(())
            }
            Command::BlockCyclic(options) => {
                let report = run_block_cyclic(&options, true).await?;
                println!("{}", serde_json::to_string(&report)?);
                anyhow::Ok(())
            }
            Command::DcCcl(options) => {
                let report = run_dc_ccl(&options, true).await?;
                println!("{}", serde_json::to_string(&report)?);
                anyhow::Ok(())
            }
            Command::AnonEmbeddings(options) => {
                let report = run_anon_embeddings(&options, true).await?;
                println!("{}", serde_json::to_string(&report)?);
                anyhow::Ok(())
            }
            Command::HotCold(options) => {
                let report = run_hot_cold(&options, true).await?;
                println!("{}", serde_json::to_string(&report)?);
                anyhow::Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fedhive-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
