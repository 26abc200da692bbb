//! The engine's clients: what users open. Raw host files and block devices
//! ([`RawFile`]), NBD exports ([`NbdFile`]), and files inside ext2/3/4 images
//! ([`ext`]). Each builds a device and a block map and serves file data through a
//! [`crate::DirectFile`]; none of them uses `unsafe`.

pub mod ext;
pub mod nbd;
mod raw;

pub use raw::{Backend, RawFile, RawOptions};
