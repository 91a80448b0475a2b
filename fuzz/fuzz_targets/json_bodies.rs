//! The JSON bodies devices and the cloud worker send or read (metrics reports, feature sets, row
//! requests, check-in answers): parsing never panics, and what parses serialises and parses back to
//! the same value.
#![no_main]

use fedhive_shared::{
    sparse::{FeatureSet, RowsRequest},
    wire::{CheckinResponse, MetricsReport},
};
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(data) {
        let again: T = serde_json::from_slice(&serde_json::to_vec(&value).unwrap()).unwrap();
        // NaN is not equal to itself; JSON cannot carry it anyway, so a parsed value has none.
        assert_eq!(again, value);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trips::<MetricsReport>(data);
    round_trips::<FeatureSet>(data);
    round_trips::<RowsRequest>(data);
    round_trips::<CheckinResponse>(data);
});
