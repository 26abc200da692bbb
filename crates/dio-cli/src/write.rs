//! `dio write TARGET --offset N [--input F]`: write bytes (stdin by default) at any
//! byte offset of a host file, block device, NBD export or a file inside an ext
//! image, through byte-granular direct I/O (`Flags::UNALIGNED`: partial blocks are
//! read, patched and written back under the block-range lock).
//!
//! Inside an image the write is in place: the whole range is checked first (no
//! hole, no unwritten extent, no growth), then written, then mtime, ctime and the
//! inode checksum are updated; a refused write changes nothing. A host file grows
//! as `pwrite` would make it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use dio::Flags;

use crate::fail::Failure;
use crate::location::{Image, Location};
use crate::Engine;

/// Bytes read from the input and written per request.
const CHUNK: usize = 1 << 20;

fn input(path: &Option<PathBuf>) -> Result<(Box<dyn Read>, Option<u64>), Failure> {
    match path {
        None => Ok((Box::new(std::io::stdin().lock()), None)),
        Some(p) if p.as_os_str() == "-" => Ok((Box::new(std::io::stdin().lock()), None)),
        Some(p) => {
            let f = File::open(p).map_err(|e| Failure::at(p, e))?;
            let meta = f.metadata().map_err(|e| Failure::at(p, e))?;
            let len = meta.is_file().then_some(meta.len());
            Ok((Box::new(f), len))
        }
    }
}

/// Fill `buf` from `r` as far as it goes; returns the bytes read (less only at
/// the end of the input).
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// An exclusive `flock` on a host file or device, held while a write patches a
/// partial block. The read-modify-write of a byte-granular direct write is atomic
/// only against the writes of this process (the engine's range lock): two `dio
/// write` processes patching the same block lost one another's bytes. Others that
/// take the lock wait; plain `pwrite`s of other programs are not covered (they
/// need no read-modify-write, but one that lands during ours is lost the same way).
struct PartialBlockLock {
    file: File,
    name: String,
}

/// Unlocks on drop.
struct Held<'a>(&'a File);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.0, rustix::fs::FlockOperation::Unlock);
    }
}

impl PartialBlockLock {
    /// A lock for a host target (None for an export: NBD has no locks).
    fn open(target: &Location) -> Result<Option<PartialBlockLock>, Failure> {
        let crate::location::Source::Host(path) = &target.source else {
            return Ok(None);
        };
        // Any open file will do for flock: read, else write (a file we may only
        // write).
        let file = File::open(path)
            .or_else(|_| File::options().write(true).open(path))
            .map_err(|e| Failure::at(path, e))?;
        Ok(Some(PartialBlockLock {
            file,
            name: target.display(),
        }))
    }

    fn hold(&self) -> Result<Held<'_>, Failure> {
        use rustix::fs::{flock, FlockOperation};
        let fail = |e: rustix::io::Errno| {
            Failure::msg(format!("{}: lock: {}", self.name, std::io::Error::from(e)))
        };
        // Another dio write holds it for one chunk: a moment. Past a second, say
        // what we wait for (a lock some other program keeps).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while flock(&self.file, FlockOperation::NonBlockingLockExclusive).is_err() {
            if std::time::Instant::now() > deadline {
                crate::fail::say(format_args!(
                    "note: waiting for another process's lock (flock) on {}",
                    self.name
                ));
                flock(&self.file, FlockOperation::LockExclusive).map_err(fail)?;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(Held(&self.file))
    }
}

/// `dio write`.
pub fn run(
    target: &OsStr,
    offset: u64,
    input_path: &Option<PathBuf>,
    engine: Engine,
) -> Result<(), Failure> {
    if target == "-" {
        return Err(Failure::usage(
            "write needs a file, device or IMAGE:/PATH to write into; stdout (`-`) has no offsets (use cat)",
        ));
    }
    let target = &Location::parse(target)?;
    let in_name = input_path
        .as_ref()
        .filter(|p| p.as_os_str() != "-")
        .map_or("stdin".to_string(), |p| p.display().to_string());
    // Reading the bytes from the storage being written would read back what was
    // just written (`--input F` onto F at a later offset never ends).
    let input_loc = match input_path.as_ref().filter(|p| p.as_os_str() != "-") {
        Some(p) => Location::parse(p.as_os_str()).ok(),
        None => crate::storage::stdio_location(0),
    };
    if let Some(src) = input_loc {
        crate::storage::refuse_shared_as(
            (&src, &in_name),
            (target, &target.display()),
            "write",
            engine,
        )?;
    }
    let (mut reader, known_len) = input(input_path)?;
    let read_fail = |e: std::io::Error| Failure::msg(format!("{in_name}: {e}"));
    if target.inner.is_some() {
        let img = Image::open(target, true, true, engine)?;
        let file = img.file(target)?;
        let room = file.size().saturating_sub(offset);
        let size = file.size();
        // Name the offset the user gave and the file's real size.
        let fail = |e: dio::Error| {
            target.fail(format!(
                "writing at offset {offset} (the file holds {size} bytes): {e}"
            ))
        };
        match known_len {
            Some(len) => {
                // Check everything before the first byte moves.
                file.check_write(offset, len).map_err(fail)?;
                let mut buf = vec![0u8; CHUNK];
                let mut pos = 0u64;
                loop {
                    let n = fill(&mut reader, &mut buf).map_err(read_fail)?;
                    if n == 0 {
                        break;
                    }
                    if pos + n as u64 > len {
                        return Err(Failure::msg(format!("{in_name} grew while being written")));
                    }
                    file.write_at(offset + pos, &buf[..n]).map_err(fail)?;
                    pos += n as u64;
                }
            }
            None => {
                // A pipe: take in at most one byte more than fits, so the check
                // sees a write that would grow the file, and nothing is written.
                let mut data = Vec::new();
                reader
                    .take(room.saturating_add(1))
                    .read_to_end(&mut data)
                    .map_err(read_fail)?;
                if data.len() as u64 > room {
                    return Err(target.fail(format!(
                        "{in_name} holds more than the {room} bytes from offset {offset} to the end of the file ({} bytes): in-place writes do not grow files",
                        file.size()
                    )));
                }
                file.check_write(offset, data.len() as u64).map_err(fail)?;
                file.write_at(offset, &data).map_err(fail)?;
            }
        }
        file.touch().map_err(|e| target.fail(e))?;
        return img.sync().map_err(|e| target.fail(e));
    }
    let out = target.source.open(true, true, engine)?;
    let file = out.direct();
    // A block device or an export does not grow: bytes past its end are refused,
    // before anything is written when the input's length is known, else once the
    // input reaches the end (what fits is written first, as a short `pwrite`).
    let end = (!out.resizable()).then(|| out.size());
    if let (Some(size), Some(len)) = (end, known_len) {
        if offset.saturating_add(len) > size {
            return Err(target.fail(format!(
                "holds {size} bytes: the {len} bytes of {in_name} at --offset {offset} would pass its end (nothing was written)"
            )));
        }
    }
    let lock = PartialBlockLock::open(target)?;
    let lb = u64::from(file.geometry().logical_block);
    let mut buf = vec![0u8; CHUNK];
    let mut pos = offset;
    loop {
        let mut n = fill(&mut reader, &mut buf).map_err(read_fail)?;
        if n == 0 {
            break;
        }
        let past_end = end.filter(|&size| pos.saturating_add(n as u64) > size);
        if let Some(size) = past_end {
            n = size.saturating_sub(pos) as usize;
        }
        let partial = (pos | (pos + n as u64)) & (lb - 1) != 0;
        let _held = if partial {
            lock.as_ref().map(PartialBlockLock::hold).transpose()?
        } else {
            None
        };
        match file.write_at(pos, &buf[..n], Flags::UNALIGNED) {
            Ok(k) if k == n => {}
            Ok(k) => {
                return Err(target.fail(format!("short write at offset {pos}: {k} of {n} bytes")))
            }
            Err(e) => {
                return Err(target.fail(format!(
                "write at offset {pos} (of the {n} bytes from {in_name} at --offset {offset}): {e}"
            )))
            }
        }
        pos += n as u64;
        if let Some(size) = past_end {
            let _ = file.sync_data();
            return Err(target.fail(format!(
                "holds {size} bytes: {in_name} runs past its end; its first {} bytes were written at --offset {offset}, nothing past byte {size}",
                pos.saturating_sub(offset)
            )));
        }
    }
    // A partial last block goes to the device whole; the library cuts a host
    // file it grew back to where the bytes end (`BlockMap::trim_padding`).
    // Exit 0 means durable.
    file.sync_data().map_err(|e| target.fail(e))
}
