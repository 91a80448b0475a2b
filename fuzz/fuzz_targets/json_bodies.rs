//! The JSON bodies devices and the cloud worker send or read (metrics reports, feature sets, row
//! requests, check-in answers): parsing never panics, and what parses serialises and parses back to
//! the same value, unless it holds a non-finite float.
//!
//! JSON has no infinity, but serde_json reads a number beyond f32's range (`1e300`) into an f32
//! field as ±inf, which then serialises as `null` (found by this target). Such values must be
//! refused where they arrive: the server's metrics check wants a finite `loss` and an `accuracy` in
//! [0, 1], and task configs are checked before a check-in can carry their learning rate.
#![no_main]

use fedhive_shared::{
    sparse::{FeatureSet, RowsRequest},
    wire::{CheckinResponse, MetricsReport},
};
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};

fn round_trips<T>(data: &[u8], non_finite: impl Fn(&T) -> bool)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(value) = serde_json::from_slice::<T>(data) {
        if non_finite(&value) {
            return;
        }
        let again: T = serde_json::from_slice(&serde_json::to_vec(&value).unwrap()).unwrap();
        assert_eq!(again, value);
    }
}

fn no_floats<T>(_: &T) -> bool {
    false
}

fuzz_target!(|data: &[u8]| {
    round_trips::<MetricsReport>(data, |r| {
        !r.loss.is_finite() || r.accuracy.is_some_and(|a| !a.is_finite())
    });
    round_trips::<FeatureSet>(data, no_floats);
    round_trips::<RowsRequest>(data, no_floats);
    round_trips::<CheckinResponse>(data, |c| match c {
        CheckinResponse::Assigned(a) => {
            !a.training.learning_rate.is_finite()
                || a.block
                    .as_ref()
                    .and_then(|b| b.chain_learning_rate)
                    .is_some_and(|r| !r.is_finite())
        }
        _ => false,
    });
});
