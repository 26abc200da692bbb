//! File systems: block maps and metadata readers for on-disk formats that dio serves
//! through its engine. Each client reads its metadata through a [`crate::Device`] and
//! hands file data to the engine with its block map as the engine's `get_block`.
//!
//! Nothing here submits file data itself, and nothing here uses `unsafe`.

pub mod ext;
