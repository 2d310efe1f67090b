//! UniFFI's bindings generator, built with the version of UniFFI the
//! library uses (the two must match).
fn main() {
    uniffi::uniffi_bindgen_main()
}
