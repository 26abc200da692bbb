//! libFuzzer entry point for the NBD client under a hostile server (see ../src/nbd.rs).
#![no_main]

#[path = "../src/nbd.rs"]
mod nbd;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nbd::nbd_server(data);
});
