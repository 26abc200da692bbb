//! The outside judges the tests call: commands run with their output kept for the
//! failure message, `e2fsck`, `mke2fs`, `debugfs`, kernel loop mounts and loop
//! devices (both undone on drop, also when a test panics).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{have, is_root, skip};

/// Runs `cmd` and returns its stdout; panics with the command, its stdout and its
/// stderr if it cannot start or exits non-zero.
pub fn sh(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: cannot run: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `cmd` and returns its exit code (-1 if killed) and its stdout and stderr
/// together; panics only if it cannot start.
pub fn status_of(cmd: &mut Command) -> (i32, String) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: cannot run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

/// Makes an ext2/3/4 image of `mib` MiB at `img` with `mke2fs -F -q ARGS`
/// (for instance `["-t", "ext4", "-b", "4096"]`).
pub fn mke2fs(img: &Path, args: &[&str], mib: u64) {
    let _ = std::fs::remove_file(img);
    sh(Command::new("mke2fs")
        .args(["-F", "-q"])
        .args(args)
        .arg(img)
        .arg(format!("{mib}M")));
}

/// `e2fsck ARGS IMG`: its exit code and output.
pub fn e2fsck(img: &Path, args: &[&str]) -> (i32, String) {
    status_of(Command::new("e2fsck").args(args).arg(img))
}

/// Panics unless `e2fsck -fn` finds `img` clean. Skips (with a printed reason) where
/// e2fsprogs is not installed.
pub fn assert_fsck_clean(img: &Path) {
    if !have("e2fsck") {
        skip("e2fsck check: e2fsprogs is not installed");
        return;
    }
    let (code, out) = e2fsck(img, &["-fn"]);
    assert_eq!(code, 0, "e2fsck -fn {}:\n{out}", img.display());
}

/// `debugfs -R REQUEST IMG` (read-only): its stdout.
pub fn debugfs(img: &Path, request: &str) -> String {
    sh(Command::new("debugfs").args(["-R", request]).arg(img))
}

/// `debugfs -w -R REQUEST IMG`: its stdout.
pub fn debugfs_w(img: &Path, request: &str) -> String {
    sh(Command::new("debugfs").args(["-w", "-R", request]).arg(img))
}

/// Where the inode of `path` lies in `img`: (block number, byte offset in that block),
/// from `debugfs imap`.
pub fn inode_location(img: &Path, path: &str) -> (u64, u64) {
    let text = debugfs(img, &format!("imap {path}"));
    // "Inode 12 is part of block group 0\n\tlocated at block 34, offset 0x0b00"
    let line = text
        .lines()
        .find(|l| l.contains("located at block"))
        .unwrap_or_else(|| panic!("debugfs imap {path}: {text}"));
    let block = line
        .split("block ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("debugfs imap {path}: {line}"));
    let offset = line
        .split("offset 0x")
        .nth(1)
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .unwrap_or_else(|| panic!("debugfs imap {path}: {line}"));
    (block, offset)
}

/// Copies `img`, which the kernel has mounted, to `to` as it stood at one moment.
///
/// One plain copy of a mounted image is not a state the disk was ever in: the
/// kernel keeps writing while the copy reads from the first byte to the last (the
/// jbd2 commit timer, writeback started by memory pressure or by a `sync`
/// elsewhere on the machine, the lazy inode-table init), so the copy can hold a
/// metadata block from before a checkpoint beside a journal superblock from after
/// it, whose tail has moved past the transaction that block still needs. This
/// reads the whole image again and again until two reads in a row agree and
/// writes that one: a write the first read missed would show in the second.
/// Panics if the image never holds still (20 tries, 50 ms apart).
pub fn copy_at_rest(img: &Path, to: &Path) {
    let read = || std::fs::read(img).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    let mut last = read();
    for _ in 0..20 {
        let next = read();
        if next == last {
            std::fs::write(to, &next).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
            return;
        }
        last = next;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!(
        "{}: the kernel kept writing it; no two copies in a row agreed",
        img.display()
    );
}

/// A kernel loop mount of an image at `IMG.mnt`, unmounted on drop.
#[derive(Debug)]
pub struct Mount {
    dir: PathBuf,
}

impl Mount {
    /// `mount -o loop,OPTS IMG IMG.mnt` (for instance `ro,noload`); the error is
    /// mount's message.
    pub fn new(img: &Path, opts: &str) -> Result<Mount, String> {
        let dir = PathBuf::from(format!("{}.mnt", img.display()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let o = Command::new("mount")
            .args(["-o", &format!("loop,{opts}")])
            .arg(img)
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        Ok(Mount { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Busy (a test panicked with a file open): detach lazily, never leave
            // a loop device behind.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A kernel mount for a comparison, or `None` with a printed reason where the test
/// is not root or the mount fails (the test then skips that check).
pub fn kernel_mount(img: &Path, opts: &str) -> Option<Mount> {
    if !is_root() {
        skip("the kernel comparison needs root (mount -o loop)");
        return None;
    }
    match Mount::new(img, opts) {
        Ok(m) => Some(m),
        Err(e) => {
            skip(format!("mount -o loop,{opts} {}: {e}", img.display()));
            None
        }
    }
}

/// A loop device over a file, detached on drop.
#[derive(Debug)]
pub struct LoopDev {
    dev: PathBuf,
}

impl LoopDev {
    /// `losetup --find --show --sector-size SECTOR BACKING`; the error says why
    /// (not root, losetup's message).
    pub fn attach(backing: &Path, sector: u32) -> Result<LoopDev, String> {
        if !is_root() {
            return Err("loop devices need root".into());
        }
        let o = Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--sector-size",
                &sector.to_string(),
                "--",
            ])
            .arg(backing)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if dev.is_empty() {
            return Err("losetup printed no device".into());
        }
        Ok(LoopDev { dev: dev.into() })
    }

    /// The device node (`/dev/loopN`).
    pub fn path(&self) -> &Path {
        &self.dev
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
