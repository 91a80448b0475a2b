//! MM-PSGD and MC-PSGD over real HTTP on SQLite and PostgreSQL: the schedule's transitions (with a
//! SIGKILL restart in the middle of a block and of a round), the running means `p_m` against
//! hand-computed values, MC-PSGD's choice by the lower sample-weighted mean loss, serving
//! predictors, and a wall-clock block boundary passing during a round.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fedhive_client::client::FedhiveClient;
use fedhive_e2e::{
    Backend, ServerProcess, TestDb, assign, on_both_databases, small_task, small_tensors, wait_for_version,
};
use fedhive_shared::{
    NamedTensors, Tensor,
    blocks::{
        BlockSchedule, BlockStatus, CHAIN_PREFIX, ChainChoice, ClockBlock, LOSS_CHAIN, LOSS_X,
        PredictorAverage, RoundBlock, put_prefixed,
    },
    wire::{Assignment, StrategyConfig, TaskConfig, TaskState},
};

const LONG: Duration = Duration::from_secs(30);

on_both_databases!(
    mm_predictors_follow_the_schedule_across_restarts,
    mc_feeds_the_lower_loss_chain_into_the_predictor,
    wall_clock_round_stays_in_the_block_it_opened_in,
    predictor_windows_restart_or_decay_across_a_crash,
);

fn filled(v: f32) -> Bytes {
    Bytes::from(small_tensors(|_| v).encode())
}

fn rounds_schedule(blocks: &[(&str, u32)]) -> BlockSchedule {
    BlockSchedule::Rounds {
        blocks: blocks
            .iter()
            .map(|(name, rounds)| RoundBlock {
                name: name.to_string(),
                rounds: *rounds,
            })
            .collect(),
    }
}

fn with_strategy(strategy: StrategyConfig, k: u32, rounds: u32) -> TaskConfig {
    TaskConfig {
        strategy,
        ..small_task(k, k, rounds, 60)
    }
}

/// An MC-PSGD upload: `x` moves by `dx`, the chain by `dy`, with the two reported losses.
fn mc_body(dx: f32, dy: f32, loss_x: f32, loss_chain: f32) -> Bytes {
    let mut body = small_tensors(|_| dx);
    put_prefixed(&mut body, CHAIN_PREFIX, small_tensors(|_| dy));
    for (name, loss) in [(LOSS_X, loss_x), (LOSS_CHAIN, loss_chain)] {
        body.0.insert(
            name.to_string(),
            Tensor {
                shape: vec![1],
                data: vec![loss],
            },
        );
    }
    Bytes::from(body.encode())
}

/// Asserts the block part of an assignment.
fn assert_block(a: &Assignment, name: &str, cycle: i64, round_in_block: i64) {
    let b = a
        .block
        .as_ref()
        .expect("block-cyclic assignments name their block");
    assert_eq!(
        (b.name.as_str(), b.cycle, b.round_in_block),
        (name, cycle, round_in_block),
        "assignment of round {}",
        a.round_id
    );
}

async fn predictor(client: &FedhiveClient, task: &str, block: Option<&str>) -> (String, i64, NamedTensors) {
    let p = client.download_predictor(task, block).await.unwrap();
    (p.block, p.rounds, NamedTensors::decode(&p.bytes).unwrap())
}

/// Each averaging window on the same rounds (x = 1, 2, ... over day, night, day, ...), with a
/// SIGKILL before the round where the tail window restarts night's average.
async fn predictor_windows_restart_or_decay_across_a_crash(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let mut server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let mut client = server.client();
    // (window, (p_day, r_day), (p_night, r_night)) after 3 cycles, x_day = 1, 3, 5 and x_night = 2, 4, 6.
    let cases = [
        (PredictorAverage::All, (3.0, 3), (4.0, 3)),
        // From cycle 1 on: day mean(3, 5), night mean(4, 6).
        (PredictorAverage::Tail { after_cycles: 1 }, (4.0, 2), (5.0, 2)),
        // Day: 1, then 0.5 * 1 + 0.5 * 3 = 2, then 0.5 * 2 + 0.5 * 5 = 3.5. Night: 2, 3, 4.5.
        (PredictorAverage::Ema { decay: 0.5 }, (3.5, 3), (4.5, 3)),
    ];
    let mut tasks = Vec::new();
    for (window, ..) in &cases {
        let strategy = StrategyConfig::MmPsgd {
            server_lr: 1.0,
            schedule: rounds_schedule(&[("day", 1), ("night", 1)]),
            predictor_average: *window,
        };
        let config = with_strategy(strategy, 2, 6);
        let created = client
            .create_task(&config, small_tensors(|_| 0.0).encode())
            .await
            .unwrap();
        tasks.push(created.task_id);
    }
    for round in 0..6 {
        if round == 3 {
            server.kill();
            server.restart().await.unwrap();
            client = server.client();
        }
        for task in &tasks {
            let (a1, a2) = (assign(&client, task).await, assign(&client, task).await);
            for a in [&a1, &a2] {
                client
                    .upload_update(&a.upload_token, 1, filled(1.0))
                    .await
                    .unwrap();
            }
            wait_for_version(&client, task, round + 1, LONG).await;
        }
    }
    for (task, (window, (day, r_day), (night, r_night))) in tasks.iter().zip(cases) {
        assert_eq!(
            predictor(&client, task, Some("day")).await,
            ("day".into(), r_day, small_tensors(|_| day)),
            "{window:?}"
        );
        assert_eq!(
            predictor(&client, task, Some("night")).await,
            ("night".into(), r_night, small_tensors(|_| night)),
            "{window:?}"
        );
    }
}

async fn mm_predictors_follow_the_schedule_across_restarts(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let mut server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let strategy = StrategyConfig::MmPsgd {
        server_lr: 1.0,
        schedule: rounds_schedule(&[("day", 2), ("night", 1)]),
        predictor_average: PredictorAverage::All,
    };
    let config = with_strategy(strategy, 2, 6);
    let task = client
        .create_task(&config, small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;

    // Before any round: no predictor yet, the global model stands in.
    assert_eq!(
        predictor(&client, &task, None).await,
        ("day".into(), 0, small_tensors(|_| 0.0))
    );

    // x: 0 -> 1 (day) -> 2 (day) -> 6 (night) -> 3 (day of cycle 1). Rounds here get two updates of
    // the same delta (K = 2), so x moves by exactly that delta.
    let deltas = [
        (1.0, ("day", 0, 1)),
        (1.0, ("day", 0, 2)),
        (4.0, ("night", 0, 1)),
        (-3.0, ("day", 1, 1)),
    ];
    for (i, (delta, block)) in deltas.into_iter().enumerate() {
        let (a1, a2) = (assign(&client, &task).await, assign(&client, &task).await);
        assert_block(&a1, block.0, block.1, block.2);
        assert_block(&a2, block.0, block.1, block.2);
        for a in [&a1, &a2] {
            client
                .upload_update(&a.upload_token, 1, filled(delta))
                .await
                .unwrap();
        }
        wait_for_version(&client, &task, i as i64 + 1, LONG).await;
    }
    // p_day = mean(1, 2, 3) = 2; p_night = 6. The open round is day's second of cycle 1.
    assert_eq!(
        predictor(&client, &task, None).await,
        ("day".into(), 3, small_tensors(|_| 2.0))
    );
    assert_eq!(
        predictor(&client, &task, Some("night")).await,
        ("night".into(), 1, small_tensors(|_| 6.0))
    );

    // SIGKILL in the middle of a block, between rounds: the position and predictors resume.
    server.kill();
    server.restart().await.unwrap();
    let client = server.client();
    assert_eq!(
        predictor(&client, &task, None).await,
        ("day".into(), 3, small_tensors(|_| 2.0))
    );
    // SIGKILL in the middle of a round (one of two updates acknowledged).
    let (a1, a2) = (assign(&client, &task).await, assign(&client, &task).await);
    assert_block(&a1, "day", 1, 2);
    let acked = client
        .upload_update(&a1.upload_token, 1, filled(1.0))
        .await
        .unwrap();
    server.kill();
    server.restart().await.unwrap();
    let client = server.client();
    let status = client.block_status(&task).await.unwrap();
    assert_eq!(
        status
            .round_position
            .map(|p| (p.cycle, p.block, p.round_in_block)),
        Some((1, 0, 2))
    );
    assert_eq!(
        client
            .upload_update(&a1.upload_token, 1, filled(1.0))
            .await
            .unwrap(),
        acked,
        "the acknowledged upload survived the crash"
    );
    client
        .upload_update(&a2.upload_token, 1, filled(1.0))
        .await
        .unwrap();
    wait_for_version(&client, &task, 5, LONG).await;
    // x = 4; p_day = mean(1, 2, 3, 4) = 2.5. Then night of cycle 1: x = 2, p_night = mean(6, 2) = 4.
    assert_eq!(
        predictor(&client, &task, Some("day")).await,
        ("day".into(), 4, small_tensors(|_| 2.5))
    );
    let (b1, b2) = (assign(&client, &task).await, assign(&client, &task).await);
    assert_block(&b1, "night", 1, 1);
    for b in [&b1, &b2] {
        client
            .upload_update(&b.upload_token, 1, filled(-2.0))
            .await
            .unwrap();
    }
    wait_for_version(&client, &task, 6, LONG).await;
    assert_eq!(
        client.task_status(&task).await.unwrap().state,
        TaskState::Finished
    );
    let (_, x) = client.download_model(&task, None).await.unwrap();
    assert_eq!(NamedTensors::decode(&x).unwrap(), small_tensors(|_| 2.0));
    assert_eq!(
        predictor(&client, &task, Some("night")).await,
        ("night".into(), 2, small_tensors(|_| 4.0))
    );
    // After the last round the block meant for now is the one the schedule would run next.
    assert_eq!(predictor(&client, &task, None).await.0, "day");

    let status: BlockStatus = client.block_status(&task).await.unwrap();
    let history: Vec<_> = status
        .history
        .iter()
        .map(|r| {
            (
                r.block.as_str(),
                r.cycle,
                r.round_in_block,
                r.block_rounds,
                r.chosen,
            )
        })
        .collect();
    use ChainChoice::X;
    assert_eq!(
        history,
        vec![
            ("day", 0, 1, 1, X),
            ("day", 0, 2, 2, X),
            ("night", 0, 1, 1, X),
            ("day", 1, 1, 3, X),
            ("day", 1, 2, 4, X),
            ("night", 1, 1, 2, X),
        ]
    );
    assert_eq!((status.current.as_str(), status.round_position), ("day", None));
    assert_eq!(
        status
            .blocks
            .iter()
            .map(|b| (b.name.as_str(), b.rounds, b.chain_version))
            .collect::<Vec<_>>(),
        vec![("day", 4, None), ("night", 2, None)]
    );

    // Refusals name the problem.
    let raw = server.raw_client();
    let unknown = raw.download_predictor(&task, Some("dusk")).await.unwrap_err();
    assert_eq!(unknown.code(), Some("unknown_block"));
    let no_chain = raw.download_chain(&task, "day", 0).await.unwrap_err();
    assert_eq!(no_chain.code(), Some("unknown_chain_version"));
    let fedavg = raw
        .create_task(&small_task(1, 1, 1, 60), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let not_blocks = raw.download_predictor(&fedavg, None).await.unwrap_err();
    assert_eq!(not_blocks.code(), Some("not_block_cyclic"));
}

async fn mc_feeds_the_lower_loss_chain_into_the_predictor(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let mut server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    let strategy = StrategyConfig::McPsgd {
        server_lr: 1.0,
        schedule: rounds_schedule(&[("day", 1), ("night", 1)]),
        chain_learning_rate: Some(0.2),
        predictor_average: PredictorAverage::All,
    };
    let task = client
        .create_task(&with_strategy(strategy, 2, 3), small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;

    // Round 1 (day). Device a (n=1) prefers x (losses 1.0 vs 3.0), device b (n=3) the chain (2.0 vs
    // 1.0). Sample-weighted means: x (1 + 6) / 4 = 1.75, chain (3 + 3) / 4 = 1.5: the chain wins.
    let (a, b) = (assign(&client, &task).await, assign(&client, &task).await);
    let block = a.block.clone().unwrap();
    assert_eq!(
        (
            block.name.as_str(),
            block.chain_version,
            block.chain_learning_rate
        ),
        ("day", Some(0), Some(0.2))
    );
    assert_eq!(
        NamedTensors::decode(&client.download_chain(&task, "day", 0).await.unwrap()).unwrap(),
        small_tensors(|_| 0.0),
        "every chain starts from the initial model"
    );
    // An MC upload must carry the chain update and the losses; a bad one changes nothing.
    let raw = server.raw_client();
    let missing = raw
        .upload_update(&a.upload_token, 1, filled(1.0))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Some("missing_tensor"));
    let nan_loss = raw
        .upload_update(&a.upload_token, 1, mc_body(1.0, 3.0, f32::NAN, 3.0))
        .await
        .unwrap_err();
    assert_eq!(nan_loss.code(), Some("non_finite_value"));
    assert_eq!(client.rounds(&task).await.unwrap()[0].accepted, 0);

    client
        .upload_update(&a.upload_token, 1, mc_body(1.0, 3.0, 1.0, 3.0))
        .await
        .unwrap();
    client
        .upload_update(&b.upload_token, 3, mc_body(1.0, 1.0, 2.0, 1.0))
        .await
        .unwrap();
    wait_for_version(&client, &task, 1, LONG).await;
    // x = 1, y_day = (1*3 + 3*1) / 4 = 1.5 = p_day.
    let (_, x) = client.download_model(&task, None).await.unwrap();
    assert_eq!(NamedTensors::decode(&x).unwrap(), small_tensors(|_| 1.0));
    assert_eq!(
        predictor(&client, &task, Some("day")).await,
        ("day".into(), 1, small_tensors(|_| 1.5))
    );
    let round1 = a.round_id;
    assert_eq!(
        NamedTensors::decode(&client.download_chain(&task, "day", round1).await.unwrap()).unwrap(),
        small_tensors(|_| 1.5)
    );

    // Round 2 (night): its chain is still the initial model; x has the lower loss: p_night = x = 0.
    let (a, b) = (assign(&client, &task).await, assign(&client, &task).await);
    assert_eq!(
        a.block.as_ref().map(|b| (b.name.as_str(), b.chain_version)),
        Some(("night", Some(0)))
    );
    for t in [&a, &b] {
        client
            .upload_update(&t.upload_token, 1, mc_body(-1.0, 2.0, 0.5, 0.9))
            .await
            .unwrap();
    }
    wait_for_version(&client, &task, 2, LONG).await;
    assert_eq!(
        predictor(&client, &task, Some("night")).await,
        ("night".into(), 1, small_tensors(|_| 0.0))
    );

    // Round 3 (day of cycle 1) trains day's chain from round 1's version; SIGKILL after one upload.
    // Equal losses: a tie keeps x. x = 0 + 2 = 2, y_day = 1.5 + 0.5 = 2, p_day = (1.5 + 2) / 2 = 1.75.
    let (a, b) = (assign(&client, &task).await, assign(&client, &task).await);
    assert_eq!(
        a.block
            .as_ref()
            .map(|b| (b.name.as_str(), b.cycle, b.chain_version)),
        Some(("day", 1, Some(round1)))
    );
    client
        .upload_update(&a.upload_token, 2, mc_body(2.0, 0.5, 1.0, 1.0))
        .await
        .unwrap();
    server.kill();
    server.restart().await.unwrap();
    let client = server.client();
    client
        .upload_update(&b.upload_token, 2, mc_body(2.0, 0.5, 1.0, 1.0))
        .await
        .unwrap();
    wait_for_version(&client, &task, 3, LONG).await;
    assert_eq!(
        predictor(&client, &task, Some("day")).await,
        ("day".into(), 2, small_tensors(|_| 1.75))
    );
    let status = client.block_status(&task).await.unwrap();
    let history: Vec<_> = status
        .history
        .iter()
        .map(|r| (r.block.as_str(), r.chosen, r.mean_loss_x, r.mean_loss_chain))
        .collect();
    assert_eq!(
        history,
        vec![
            ("day", ChainChoice::Chain, Some(1.75), Some(1.5)),
            ("night", ChainChoice::X, Some(0.5), Some(0.8999999761581421)),
            ("day", ChainChoice::X, Some(1.0), Some(1.0)),
        ]
    );
    assert_eq!(
        status
            .blocks
            .iter()
            .map(|b| (b.rounds, b.chain_version))
            .collect::<Vec<_>>(),
        vec![(2, Some(a.round_id)), (1, Some(round1 + 1))]
    );
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Sleeps until the wall clock is `at_ms` into a `cycle_ms` cycle (at or after, within the cycle).
async fn sleep_until_phase(cycle_ms: i64, at_ms: i64) {
    let phase = unix_ms().rem_euclid(cycle_ms);
    let wait = (at_ms - phase).rem_euclid(cycle_ms);
    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
}

async fn wall_clock_round_stays_in_the_block_it_opened_in(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend).await.unwrap();
    let mut server = ServerProcess::start(dir.path(), &db).await.unwrap();
    let client = server.client();
    // Cycles of 6 s: block a for 3 s, then block b for 3 s (UTC).
    let schedule = BlockSchedule::WallClock {
        utc_offset: "+00:00".into(),
        cycle_secs: 6,
        blocks: vec![
            ClockBlock {
                name: "a".into(),
                start: "00:00:00".into(),
            },
            ClockBlock {
                name: "b".into(),
                start: "00:00:03".into(),
            },
        ],
    };
    let strategy = StrategyConfig::MmPsgd {
        server_lr: 1.0,
        schedule,
        predictor_average: PredictorAverage::All,
    };
    let config = with_strategy(strategy, 1, 2);

    // Open round 1 early in block a.
    sleep_until_phase(6_000, 200).await;
    let opened = Instant::now();
    let task = client
        .create_task(&config, small_tensors(|_| 0.0).encode())
        .await
        .unwrap()
        .task_id;
    let a = assign(&client, &task).await;
    assert_block(&a, "a", 0, 1);
    assert!(
        opened.elapsed() < Duration::from_millis(2_500),
        "test machine too slow for the schedule"
    );

    // The boundary passes while round 1 is open (and the server restarts meanwhile).
    sleep_until_phase(6_000, 3_300).await;
    server.kill();
    server.restart().await.unwrap();
    let client = server.client();
    let status = client.block_status(&task).await.unwrap();
    assert_eq!(status.current, "b", "the predictor endpoint follows the clock");
    assert_eq!(
        status.round_position.map(|p| (p.cycle, p.block)),
        Some((0, 0)),
        "the open round stays in block a"
    );
    assert_eq!(predictor(&client, &task, None).await.0, "b");
    client
        .upload_update(&a.upload_token, 1, filled(1.0))
        .await
        .unwrap();
    wait_for_version(&client, &task, 1, LONG).await;

    // Its update fed block a's predictor; the next round opened in block b.
    assert_eq!(
        predictor(&client, &task, Some("a")).await,
        ("a".into(), 1, small_tensors(|_| 1.0))
    );
    assert_eq!(predictor(&client, &task, Some("b")).await.1, 0);
    let b = assign(&client, &task).await;
    let block = b.block.clone().unwrap();
    assert_eq!(block.name, "b", "round 2 opened after the boundary: {block:?}");
    assert_eq!((block.cycle, block.round_in_block), (0, 1));
    client
        .upload_update(&b.upload_token, 1, filled(1.0))
        .await
        .unwrap();
    wait_for_version(&client, &task, 2, LONG).await;
    let history = client.block_status(&task).await.unwrap().history;
    assert_eq!(
        history
            .iter()
            .map(|r| (r.block.as_str(), r.cycle, r.round_in_block))
            .collect::<Vec<_>>(),
        vec![("a", 0, 1), ("b", 0, 1)]
    );
    assert_eq!(
        predictor(&client, &task, Some("b")).await,
        ("b".into(), 1, small_tensors(|_| 2.0))
    );
}
