//! The two upload gates must agree: `TensorLayout::check` (the server's, which reads values in place)
//! and `NamedTensors::decode_checked` (the SDK's and the tests'), on any body; and an accepted
//! body decodes to the values the layout reads.
#![no_main]

use fedhive_fuzz::specs;
use fedhive_shared::{
    fedavg::DELTA_LIMIT,
    tensors::{NamedTensors, TensorLayout},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let specs = specs();
    let layout = TensorLayout::check(data, &specs, DELTA_LIMIT);
    let decoded = NamedTensors::decode_checked(data, &specs, DELTA_LIMIT);
    match (layout, decoded) {
        (Ok(layout), Ok(tensors)) => {
            for (name, tensor) in &tensors.0 {
                assert_eq!(
                    layout.values(data, name).unwrap().as_ref(),
                    tensor.data.as_slice()
                );
            }
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "the two gates refuse for different reasons"),
        (a, b) => panic!("the gates disagree: layout {a:?}, decode {b:?}"),
    }
});
