//! libFuzzer entry point for the ext image reader (see ../src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    dio_fuzz::ext_image(data);
});
