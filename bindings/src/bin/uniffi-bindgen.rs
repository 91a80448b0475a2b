//! UniFFI's binding generator, pinned to the library's UniFFI version.

fn main() {
    uniffi::uniffi_bindgen_main()
}
