//! `dio ls [-l] IMAGE:/DIR`: the names in a directory of an ext image, one per line,
//! sorted, without `.` and `..`; `-l` adds type and mode, size and inode number (and
//! a symlink's target). A file that is not a directory lists as itself.

use std::io::Write;

use dio::fs::ext::{DirEntry, Ext, FileType, Inode};

use crate::fail::Failure;
use crate::location::{Image, Location};
use crate::Engine;

/// `rwxr-xr-x` with setuid/setgid/sticky shown as `ls` does.
pub fn mode_string(inode: &Inode) -> String {
    let m = inode.permissions();
    let mut s = String::with_capacity(10);
    s.push(inode.file_type().ls_char());
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let set = m & bit != 0;
        let special = match i {
            2 => m & 0o4000 != 0,
            5 => m & 0o2000 != 0,
            8 => m & 0o1000 != 0,
            _ => false,
        };
        s.push(match (special, set, i) {
            (true, true, 8) => 't',
            (true, false, 8) => 'T',
            (true, true, _) => 's',
            (true, false, _) => 'S',
            (false, true, _) => *c,
            (false, false, _) => '-',
        });
    }
    s
}

fn long_line(ext: &Ext, inode: &Inode, name: &[u8]) -> Vec<u8> {
    let mut line = format!(
        "{} {:>12} {:>8} ",
        mode_string(inode),
        inode.size,
        inode.ino
    )
    .into_bytes();
    line.extend_from_slice(name);
    if inode.file_type() == FileType::Symlink {
        if let Ok(t) = ext.read_link(inode) {
            line.extend_from_slice(b" -> ");
            line.extend_from_slice(&t);
        }
    }
    line.push(b'\n');
    line
}

/// `dio ls`.
pub fn run(loc: &Location, long: bool, engine: Engine) -> Result<(), Failure> {
    if loc.inner.is_none() {
        return Err(loc.fail(
            "ls lists directories inside ext images: name one as IMAGE:/DIR (e.g. disk.img:/)",
        ));
    }
    let img = Image::open(loc, false, true, engine)?;
    let mut out = Vec::new();
    if img.inode.file_type() != FileType::Directory {
        let name = loc
            .inner
            .as_deref()
            .unwrap_or_default()
            .rsplit(|&c| c == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(b"/")
            .to_vec();
        if long {
            out.extend(long_line(&img.ext, &img.inode, &name));
        } else {
            out.extend_from_slice(&name);
            out.push(b'\n');
        }
    } else {
        let mut entries: Vec<DirEntry> = img
            .ext
            .read_dir(&img.inode)
            .map_err(|e| loc.fail(e))?
            .into_iter()
            .filter(|e| e.name != b"." && e.name != b"..")
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for e in entries {
            if long {
                let inode = img.ext.inode(e.inode).map_err(|err| {
                    loc.fail(format!("{}: {err}", String::from_utf8_lossy(&e.name)))
                })?;
                out.extend(long_line(&img.ext, &inode, &e.name));
            } else {
                out.extend_from_slice(&e.name);
                out.push(b'\n');
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&out).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::BrokenPipe),
        Err(e) => Err(Failure::msg(format!("stdout: {e}"))),
        Ok(()) => Ok(()),
    }
}
