//! Writes the seed corpora: real bodies of each upload format (what the SDK sends), a task config
//! with its model, and JSON bodies, so the fuzzers start past the parsers' first refusals.
//! `cargo run --bin seeds` from `fuzz/` (the README's fuzz command runs it first).

use std::{collections::BTreeMap, fs, path::Path};

use fedhive_fuzz::{registry, specs, tasks, tensors};
use fedhive_shared::{
    sparse::{SparseRows, SparseTensors},
    wire::{StrategyConfig, UpdateEncoding},
};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let corpus = Path::new("corpus");
    let registry = registry();
    for (i, config) in tasks().iter().enumerate() {
        let strategy = registry.for_config(config).unwrap();
        let body = match &config.strategy {
            StrategyConfig::FedSubAvg { tables, .. } => {
                let dense = specs()
                    .into_iter()
                    .filter(|s| !tables.contains(&s.name))
                    .collect::<Vec<_>>();
                let mut rows = SparseRows::new(4);
                rows.push(1, &[0.1, 0.2, 0.3, 0.4]);
                rows.push(5, &[-0.1, 0.0, 0.05, 0.2]);
                SparseTensors {
                    dense: tensors(&dense),
                    tables: BTreeMap::from([("emb".to_string(), rows)]),
                }
                .encode()
            }
            _ if config.update_encoding == UpdateEncoding::Int8 => {
                let mut u = 0.0f32;
                fedhive_shared::int8::encode(&tensors(&strategy.upload_specs(config)), || {
                    u = (u + 0.37) % 1.0;
                    u
                })
            }
            _ => match config.update_encoding {
                UpdateEncoding::TopK { percent } => {
                    fedhive_shared::topk::encode(&tensors(&strategy.upload_specs(config)), percent)
                }
                _ => tensors(&strategy.upload_specs(config)).encode(),
            },
        };
        let name = match config.update_encoding {
            UpdateEncoding::F32 => config.strategy.name().to_string(),
            UpdateEncoding::Int8 => format!("{}-int8", config.strategy.name()),
            UpdateEncoding::TopK { .. } => format!("{}-top-k", config.strategy.name()),
        };
        let mut seed = vec![i as u8];
        seed.extend_from_slice(&body);
        write(&corpus.join("upload"), &name, &seed);
        let mut task = serde_json::to_vec(config).unwrap();
        task.push(0);
        task.extend_from_slice(&tensors(&config.tensors).encode());
        write(&corpus.join("task_config"), &name, &task);
    }
    write(
        &corpus.join("tensors_roundtrip"),
        "model",
        &tensors(&specs()).encode(),
    );
    for (name, json) in [
        ("metrics", r#"{"loss":0.52,"num_samples":128,"accuracy":0.81}"#),
        ("features", r#"{"num_samples":40,"rows":{"emb":[1,5,7]}}"#),
        ("rows", r#"{"version":3,"rows":{"emb":[0,2]}}"#),
        (
            "assigned",
            r#"{"status":"assigned","task_id":"t-1","round_id":4,"model_version":3,"model":"mlp","training":{"local_epochs":1,"max_local_steps":0,"batch_size":32,"learning_rate":0.05},"upload_token":"abc","deadline_unix":1790000000,"block":{"name":"day","index":0,"cycle":1,"round_in_block":2,"chain_version":3,"chain_learning_rate":0.01}}"#,
        ),
        (
            "retry",
            r#"{"status":"retry_after","retry_after_ms":1000,"reason":"round_full"}"#,
        ),
    ] {
        write(&corpus.join("json_bodies"), name, json.as_bytes());
    }
    println!("seed corpora written under fuzz/corpus/");
}
