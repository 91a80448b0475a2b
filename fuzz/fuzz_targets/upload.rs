//! An update body as a device sends it (`PUT /v1/updates`), through the upload gate of each
//! strategy's task: it must answer Ok or a refusal, never panic, and an accepted dense or int8
//! body's values must be finite and within the clipping range, as the gate promises.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use fedhive_fuzz::{registry, tasks};
use fedhive_server::strategy::{Registry, interface::Update};
use fedhive_shared::{fedavg::DELTA_LIMIT, wire::TaskConfig};
use libfuzzer_sys::fuzz_target;

static SETUP: OnceLock<(Registry, Vec<TaskConfig>)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (registry, tasks) = SETUP.get_or_init(|| (registry(), tasks()));
    // The first byte picks the task, the rest is the body.
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let config = &tasks[pick as usize % tasks.len()];
    let strategy = registry.for_config(config).expect("a fedhive strategy");
    let body = Bytes::copy_from_slice(body);
    let values_of: Box<dyn Fn(&str) -> Option<Vec<f32>>> = match strategy.decode_update(config, &body) {
        Ok(Update::Dense { body, layout }) => {
            Box::new(move |name| layout.values(&body, name).map(|v| v.to_vec()))
        }
        Ok(Update::Int8 { body, layout }) => Box::new(move |name| layout.values(&body, name)),
        Ok(Update::TopK(update)) => Box::new(move |name| update.values(name)),
        _ => return,
    };
    for spec in strategy.upload_specs(config) {
        let values = values_of(&spec.name).expect("an accepted body has every tensor");
        assert_eq!(values.len(), spec.numel());
        assert!(values.iter().all(|v| v.is_finite() && v.abs() <= DELTA_LIMIT));
    }
});
