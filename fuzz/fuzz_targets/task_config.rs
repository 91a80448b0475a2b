//! A task config and initial model as an operator sends them (`POST /v1/tasks`, and what
//! `fedhive task create` checks before uploading): JSON then safetensors, split at the first zero
//! byte. Parsing and the server's checks answer Ok or a refusal, never panic.
#![no_main]

use fedhive_server::{coordinator::check_task, strategy::Registry};
use fedhive_shared::wire::TaskConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (json, model) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(config) = serde_json::from_slice::<TaskConfig>(json) else {
        return;
    };
    if let Ok(strategy) = Registry::default().for_config(&config) {
        let _ = check_task(strategy.as_ref(), &config, model);
    }
});
