//! Little-endian fields of on-disk structures, and the checksums ext uses (crc32c as
//! the kernel's `ext4_chksum`, crc16 for the older `gdt_csum`).
//!
//! Readers take a slice and an offset and return 0 for bytes outside the slice:
//! callers size their slices first, so this never hides a short read, and hostile
//! offsets can never panic.

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    match b.get(off..off.saturating_add(2)) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    match b.get(off..off.saturating_add(4)) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

pub(crate) fn u8at(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

pub(crate) fn put16(b: &mut [u8], off: usize, v: u16) {
    if let Some(s) = b.get_mut(off..off.saturating_add(2)) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn put32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off.saturating_add(4)) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// The kernel's `crc32c(seed, data)`: the raw CRC register update, without the
/// standard pre- and post-inversion that the `crc32c` crate applies.
pub(crate) fn crc32c(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// The kernel's `crc16(seed, data)` (CRC-16/ARC polynomial, reflected), used by the
/// `gdt_csum` group-descriptor checksum.
pub(crate) fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_return_zero_outside_the_slice() {
        let b = [1u8, 2, 3];
        assert_eq!(le16(&b, 1), 0x0302);
        assert_eq!(le16(&b, 2), 0);
        assert_eq!(le32(&b, 0), 0);
        assert_eq!(le32(&b, usize::MAX), 0);
    }

    #[test]
    fn crc32c_matches_the_kernel_convention() {
        // The kernel's crc32c(~0, "123456789") is the standard check value inverted.
        assert_eq!(crc32c(!0, b"123456789"), !0xE306_9283);
    }
}
