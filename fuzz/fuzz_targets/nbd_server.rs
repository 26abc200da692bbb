//! libFuzzer entry point for the NBD client under a hostile server (see ../src/nbd.rs).
#![no_main]

#[path = "../src/nbd.rs"]
mod nbd;

libfuzzer_sys::fuzz_target!(
    init: {
        // libFuzzer's main is C: unlike a Rust main it leaves SIGPIPE deadly, and
        // the fake server writes to sockets the client has closed.
        // SAFETY: setting a signal to be ignored, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    },
    |data: &[u8]| {
        let _ = nbd::nbd_server(data);
    }
);
