//! `dio ls [-l] [-h] [-a] [-1] [-i] IMAGE:/DIR...`: like ls, for directories inside
//! ext images. Names one per line, sorted, without dot files (`-a`: all, `.` and
//! `..` too); `-l`: type and mode, links, uid, gid, size (`-h`: 1.5K), mtime
//! (UTC), name (and a symlink's target); `-i`: the inode number first. Operands
//! that are not directories list first, then each directory under a `NAME:`
//! header when there are several. An entry or operand that cannot be read is
//! reported on stderr and the rest still listed; the exit status is then 1.

use std::io::Write;

use dio::ext::{DirEntry, Ext, FileType, Inode};

use crate::fail::{say, Failure};
use crate::location::{Image, Location};
use crate::LsArgs;

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

/// A size as `ls -h` prints it: powers of 1024, rounded up, one decimal below 10.
pub fn human_size(n: u64) -> String {
    if n < 1024 {
        return n.to_string();
    }
    let units = ['K', 'M', 'G', 'T', 'P', 'E'];
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if v < 10.0 {
        let t = (v * 10.0).ceil() / 10.0;
        if t < 10.0 {
            return format!("{t:.1}{}", units[u]);
        }
        return format!("{}{}", t as u64, units[u]);
    }
    format!("{}{}", v.ceil() as u64, units[u])
}

/// Major and minor numbers of a device inode, as the kernel decodes `i_block`.
pub fn device_numbers(inode: &Inode) -> Option<(u32, u32)> {
    if !matches!(
        inode.file_type(),
        FileType::CharDevice | FileType::BlockDevice
    ) {
        return None;
    }
    let b = inode.i_block();
    let w0 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let w1 = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    Some(if w0 != 0 {
        // Old encoding: 8-bit major and minor in the first word.
        ((w0 >> 8) & 0xff, w0 & 0xff)
    } else {
        // New encoding in the second word.
        ((w1 & 0xfff00) >> 8, (w1 & 0xff) | ((w1 >> 12) & 0xfff00))
    })
}

struct Line {
    name: Vec<u8>,
    /// The name is an operand as the user gave it (a path: `/` is no sign of
    /// corruption there), not a directory entry's.
    operand: bool,
    /// A name no file can have (flagged on stderr): always quoted.
    bad: bool,
    inode: Option<Inode>,
    ino: u32,
}

fn render(ext: &Ext, line: &Line, a: &LsArgs, out: &mut Vec<u8>) {
    if a.inode {
        out.extend(format!("{:>8} ", line.ino).into_bytes());
    }
    if let (true, Some(inode)) = (a.long, &line.inode) {
        let size = match device_numbers(inode) {
            Some((ma, mi)) => format!("{ma}, {mi}"),
            None if a.human => human_size(inode.size),
            None => inode.size.to_string(),
        };
        out.extend(
            format!(
                "{} {:>3} {:>5} {:>5} {:>10} {} ",
                mode_string(inode),
                inode.links,
                inode.uid,
                inode.gid,
                size,
                crate::stat::date(inode.mtime, false),
            )
            .into_bytes(),
        );
    }
    if line.operand {
        out.extend_from_slice(&line.name);
    } else if line.bad {
        out.extend_from_slice(crate::names::quoted(&line.name).as_bytes());
    } else {
        out.extend_from_slice(crate::names::show(&line.name).as_bytes());
    }
    if let (true, Some(inode)) = (a.long, &line.inode) {
        if inode.file_type() == FileType::Symlink {
            if let Ok(t) = ext.read_link(inode) {
                out.extend_from_slice(b" -> ");
                out.extend_from_slice(crate::names::show_target(&t).as_bytes());
            }
        }
    }
    out.push(b'\n');
}

fn show_name(name: &[u8]) -> String {
    crate::names::show(name)
}

/// `dio ls`.
pub fn run(a: &LsArgs) -> Result<(), Failure> {
    let mut failed = false;
    let mut files: Vec<(Image, Line)> = Vec::new();
    let mut dirs: Vec<(Location, Image)> = Vec::new();
    for arg in &a.dirs {
        let loc = match Location::parse(arg) {
            Ok(l) => l,
            Err(Failure::Usage(m)) => return Err(Failure::Usage(m)),
            Err(e) => return Err(e),
        };
        if loc.inner.is_none() {
            return Err(Failure::msg(format!(
                "{}: ls lists directories inside ext images: name one as IMAGE:/DIR (e.g. {}:/)",
                loc.display(),
                loc.display()
            )));
        }
        let img = match Image::open(&loc, false, true, a.engine) {
            Ok(i) => i,
            Err(Failure::Message(m)) => {
                say(m);
                failed = true;
                continue;
            }
            Err(e) => return Err(e),
        };
        if img.inode.file_type() == FileType::Directory {
            dirs.push((loc, img));
        } else {
            let name = loc.inner.clone().unwrap_or_default();
            let name = if name.is_empty() { b"/".to_vec() } else { name };
            let line = Line {
                ino: img.inode.ino,
                inode: Some(img.inode.clone()),
                operand: true,
                bad: false,
                // One operand: its name, as before; several: as given, like ls.
                name: if a.dirs.len() == 1 {
                    name.rsplit(|&c| c == b'/')
                        .find(|c| !c.is_empty())
                        .unwrap_or(b"/")
                        .to_vec()
                } else {
                    loc.display().into_bytes()
                },
            };
            files.push((img, line));
        }
    }
    let mut out = Vec::new();
    files.sort_by(|x, y| x.1.name.cmp(&y.1.name));
    for (img, line) in &files {
        render(&img.ext, line, a, &mut out);
    }
    let headers = a.dirs.len() > 1;
    for (i, (loc, img)) in dirs.iter().enumerate() {
        if i > 0 || !files.is_empty() {
            out.push(b'\n');
        }
        if headers {
            out.extend(format!("{}:\n", loc.display()).into_bytes());
        }
        let entries: Vec<DirEntry> = match img.ext.read_dir(&img.inode) {
            Ok(e) => e,
            Err(e) => {
                say(format_args!("{}: {e}", loc.display()));
                failed = true;
                continue;
            }
        };
        // A name no file can have (`../evil`, `a/b`, a second `..`) is listed,
        // escaped, and flagged: the image is corrupt or hostile.
        for (i, e) in entries.iter().enumerate() {
            if let Err(bad) = crate::names::check(&e.name, i) {
                say(format_args!(
                    "{}/{} (inode {}): {}",
                    loc.display().trim_end_matches('/'),
                    crate::names::quoted(&e.name),
                    e.inode,
                    bad.why()
                ));
                failed = true;
            }
        }
        let mut entries: Vec<(DirEntry, bool)> = entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let bad = crate::names::check(&e.name, i).is_err();
                (e, bad)
            })
            .filter(|(e, bad)| a.all || *bad || !e.name.starts_with(b"."))
            .collect();
        entries.sort_by(|x, y| x.0.name.cmp(&y.0.name));
        let mut lines = Vec::new();
        let mut blocks = 0u64;
        for (e, bad) in entries {
            let inode = if a.long {
                match img.ext.inode(e.inode) {
                    Ok(i) => {
                        blocks += crate::stat::kernel_blocks(&i);
                        Some(i)
                    }
                    Err(err) => {
                        say(format_args!(
                            "{}/{}: {err}",
                            loc.display().trim_end_matches('/'),
                            show_name(&e.name)
                        ));
                        failed = true;
                        continue;
                    }
                }
            } else {
                None
            };
            lines.push(Line {
                ino: e.inode,
                inode,
                operand: false,
                bad,
                name: e.name,
            });
        }
        if a.long {
            let total = blocks.div_ceil(2);
            let total = if a.human {
                human_size(total * 1024)
            } else {
                total.to_string()
            };
            out.extend(format!("total {total}\n").into_bytes());
        }
        for line in &lines {
            render(&img.ext, line, a, &mut out);
        }
    }
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&out).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(Failure::BrokenPipe),
        Err(e) => return Err(Failure::msg(format!("stdout: {e}"))),
        Ok(()) => {}
    }
    if failed {
        // Each problem was reported above.
        return Err(Failure::Quiet);
    }
    Ok(())
}
