//! `dio stat [--json] IMAGE:/PATH`: size, mode, links, owner, times and the extent
//! map of one inode, the map as `filefrag -v` shows it (logical, physical, length,
//! unwritten). Symlinks are not followed (like `stat`).

use std::io::Write;

use dio::fs::ext::{FileExtent, Timestamp};
use serde_json::json;

use crate::fail::Failure;
use crate::location::{Image, Location};
use crate::ls::mode_string;
use crate::Engine;

fn time(t: Timestamp) -> String {
    format!("{}.{:09}", t.secs, t.nsecs)
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
    let target = if inode.file_type() == dio::fs::ext::FileType::Symlink {
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
            "blocks_512": inode.blocks_512,
            "flags": inode.flags,
            "block_size": bs,
            "atime": time(inode.atime),
            "mtime": time(inode.mtime),
            "ctime": time(inode.ctime),
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
            "  File: {}{}\n  Type: {}  Mode: ({:04o}/{})\n  Size: {}  Blocks: {} (512-byte)  Block size: {bs}  Links: {}\n Inode: {}  Uid: {}  Gid: {}  Flags: {:#x}\nAccess: {}\nModify: {}\nChange: {}\n",
            loc.display(),
            target
                .map(|t| format!(" -> {}", String::from_utf8_lossy(&t)))
                .unwrap_or_default(),
            inode.file_type().name(),
            inode.permissions(),
            mode_string(inode),
            inode.size,
            inode.blocks_512,
            inode.links,
            inode.ino,
            inode.uid,
            inode.gid,
            inode.flags,
            time(inode.atime),
            time(inode.mtime),
            time(inode.ctime),
        );
        s.push_str(&format!("Extents: {} found\n", extents.len()));
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
