//! `dio stat [--json] IMAGE:/PATH`: size, mode, links, owner, times and the extent
//! map of one inode, the map as `filefrag -v` shows it (logical, physical, length,
//! unwritten). Symlinks are not followed (like `stat`).

use std::io::Write;

use dio::ext::{FileExtent, Timestamp};
use serde_json::json;

use crate::fail::Failure;
use crate::location::{Image, Location};
use crate::ls::mode_string;
use crate::Engine;

fn time(t: Timestamp) -> String {
    format!("{}.{:09}", t.secs, t.nsecs)
}

/// Year, month, day of a day count since 1970-01-01 (proleptic Gregorian; H.
/// Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A timestamp as a date in UTC: `2024-05-01 12:34:56.123456789 +0000` (GNU
/// stat's layout) with `full`, else `2024-05-01 12:34` (ls's long-iso).
pub fn date(t: Timestamp, full: bool) -> String {
    let (days, secs) = (t.secs.div_euclid(86_400), t.secs.rem_euclid(86_400));
    let (y, mo, d) = civil(days);
    let (h, mi, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if full {
        format!(
            "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{:09} +0000",
            t.nsecs
        )
    } else {
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}")
    }
}

/// `EXT4_INLINE_DATA_FL`: the file's data lives in the inode.
const INLINE_DATA: u32 = 0x1000_0000;

/// `st_blocks` as the kernel reports it: a regular file with inline data counts
/// at least the sectors its bytes take, so that tools do not take it for sparse
/// (`ext4_file_getattr`; directories get no such addition).
pub fn kernel_blocks(inode: &dio::ext::Inode) -> u64 {
    if inode.has_flag(INLINE_DATA) && inode.file_type() == dio::ext::FileType::Regular {
        inode.blocks_512 + inode.size.div_ceil(512)
    } else {
        inode.blocks_512
    }
}

/// The extent table in `filefrag -v`'s layout.
fn filefrag(extents: &[FileExtent], size_blocks: u64) -> String {
    let mut s = String::from(
        " ext:     logical_offset:        physical_offset: length:   expected: flags:\n",
    );
    // filefrag shows the expected physical block where the file goes on without a
    // logical gap but jumps on the device.
    let mut prev: Option<&FileExtent> = None;
    for (i, e) in extents.iter().enumerate() {
        let exp = match prev {
            Some(p) if p.logical + p.len == e.logical && p.physical + p.len != e.physical => {
                format!("{:>10}:", p.physical + p.len)
            }
            _ => " ".repeat(11),
        };
        let mut flags = Vec::new();
        if e.unwritten {
            flags.push("unwritten");
        }
        if i + 1 == extents.len() {
            flags.push("last");
            if e.logical + e.len >= size_blocks {
                flags.push("eof");
            }
        }
        s.push_str(&format!(
            "{i:>4}: {:>8}..{:>8}: {:>10}..{:>10}: {:>6}: {exp} {}\n",
            e.logical,
            e.logical + e.len - 1,
            e.physical,
            e.physical + e.len - 1,
            e.len,
            flags.join(",")
        ));
        prev = Some(e);
    }
    s
}

/// `dio stat`.
pub fn run(loc: &Location, as_json: bool, engine: Engine) -> Result<(), Failure> {
    if loc.inner.is_none() {
        return Err(loc.fail("stat describes files inside ext images: name one as IMAGE:/PATH"));
    }
    let img = Image::open(loc, false, false, engine)?;
    let inode = &img.inode;
    let extents = img.ext.extents(inode).map_err(|e| loc.fail(e))?;
    let bs = u64::from(img.ext.block_size());
    let inline = inode.has_flag(INLINE_DATA);
    let blocks = kernel_blocks(inode);
    let dev = crate::ls::device_numbers(inode);
    let target = if inode.file_type() == dio::ext::FileType::Symlink {
        img.ext.read_link(inode).ok()
    } else {
        None
    };
    let text = if as_json {
        let v = json!({
            "path": loc.display(),
            "inode": inode.ino,
            "type": inode.file_type().name(),
            "mode": format!("{:04o}", inode.permissions()),
            "size": inode.size,
            "links": inode.links,
            "uid": inode.uid,
            "gid": inode.gid,
            "blocks_512": blocks,
            "inline_data": inline,
            "device": dev.map(|(ma, mi)| json!({"major": ma, "minor": mi})),
            "flags": inode.flags,
            "block_size": bs,
            "atime": time(inode.atime),
            "mtime": time(inode.mtime),
            "ctime": time(inode.ctime),
            "atime_iso": date(inode.atime, true),
            "mtime_iso": date(inode.mtime, true),
            "ctime_iso": date(inode.ctime, true),
            "symlink_target": target.as_ref().map(|t| String::from_utf8_lossy(t).into_owned()),
            "extents": extents.iter().map(|e| json!({
                "logical": e.logical,
                "physical": e.physical,
                "length": e.len,
                "unwritten": e.unwritten,
            })).collect::<Vec<_>>(),
        });
        format!("{v:#}\n")
    } else {
        let mut s = format!(
            "  File: {}{}\n  Type: {}  Mode: ({:04o}/{})\n  Size: {}  Blocks: {} (512-byte)  Block size: {bs}  Links: {}{}\n Inode: {}  Uid: {}  Gid: {}  Flags: {:#x}\nAccess: {}\nModify: {}\nChange: {}\n",
            loc.display(),
            target
                .map(|t| format!(" -> {}", String::from_utf8_lossy(&t)))
                .unwrap_or_default(),
            inode.file_type().name(),
            inode.permissions(),
            mode_string(inode),
            inode.size,
            blocks,
            inode.links,
            dev.map(|(ma, mi)| format!("  Device type: {ma},{mi}"))
                .unwrap_or_default(),
            inode.ino,
            inode.uid,
            inode.gid,
            inode.flags,
            date(inode.atime, true),
            date(inode.mtime, true),
            date(inode.ctime, true),
        );
        if inline {
            s.push_str(&format!(
                "Extents: none: the {} bytes of data are inline, in the inode\n",
                inode.size
            ));
        } else {
            s.push_str(&format!("Extents: {} found\n", extents.len()));
        }
        if !extents.is_empty() {
            s.push_str(&filefrag(&extents, inode.size.div_ceil(bs)));
        }
        s
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::BrokenPipe),
        Err(e) => Err(Failure::msg(format!("stdout: {e}"))),
        Ok(()) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        let t = |secs, nsecs| Timestamp { secs, nsecs };
        assert_eq!(date(t(0, 0), true), "1970-01-01 00:00:00.000000000 +0000");
        assert_eq!(
            date(t(951_782_400, 5), true),
            "2000-02-29 00:00:00.000000005 +0000"
        );
        assert_eq!(date(t(1_700_000_000, 0), false), "2023-11-14 22:13");
        assert_eq!(date(t(-1, 0), false), "1969-12-31 23:59");
    }
}
