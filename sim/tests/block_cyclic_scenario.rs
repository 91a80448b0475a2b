//! A tiny block-cyclic scenario end to end: simulated devices train with burn on real Fashion-MNIST
//! through the SDK's device loop (MM-PSGD, and MC-PSGD with its two chains and reported losses), and
//! the predictors come back from the predictor endpoint; on SQLite and on PostgreSQL.

use fedhive_e2e::{Backend, TestDb};
use fedhive_sim::block_cyclic::{BlockCyclicOptions, run_block_cyclic};

async fn tiny_scenario(backend: Backend) {
    let db = TestDb::create(backend).await.unwrap();
    let options = BlockCyclicOptions {
        devices: 6,
        cycles: 2,
        rounds_per_block: 1,
        devices_per_round: 3,
        samples_per_device: 300,
        no_control: true,
        database_url: db.url.clone(),
        ..BlockCyclicOptions::default()
    };
    let report = run_block_cyclic(&options, false).await.unwrap();
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    assert!(report.control.is_none());
    let r = report.blocks_differ.expect("the blocks-differ setting ran");
    assert_eq!(r.rounds, 4, "2 cycles x (day + night) x 1 round");
    // Chance is 0.10; two rounds per block of real training got each predictor to 0.40-0.49 in runs.
    for (name, acc) in [
        ("MM day", r.mm_psgd.day),
        ("MM night", r.mm_psgd.night),
        ("MC day", r.mc_psgd.day),
        ("MC night", r.mc_psgd.night),
    ] {
        assert!(acc > 0.25, "{name} predictor accuracy {acc}");
    }
    for share in [r.mc_chain_chosen.day, r.mc_chain_chosen.night] {
        assert!([0.0, 0.5, 1.0].contains(&share), "two rounds per block: {share}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn block_cyclic_on_sqlite() {
    tiny_scenario(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn block_cyclic_on_postgres() {
    tiny_scenario(Backend::Postgres).await;
}
