//! Helpers shared by the tests of the dio workspace: dio's integration tests, dio-fsx
//! and the CLI's tests use this one copy.
//!
//! - [`Rng`]: a small seeded generator (splitmix64), so a test or an fsx run repeats
//!   from its seed.
//! - [`pattern`]: the bytes of operation `op` at file offset `at`: different for every
//!   operation and offset, never 0 and never [`STALE`] (the fill of test devices), so
//!   a read that returns stale data or zeros never matches by accident. [`bytes`] is
//!   the same as a `Vec`.
//! - What a test needs: [`is_root`], [`have`] (a tool on `PATH`); a test that lacks
//!   one calls [`skip`] with the reason and returns.
//! - The outside judges ([`tools`], re-exported here): [`sh`], [`mke2fs`], [`e2fsck`],
//!   [`assert_fsck_clean`], [`debugfs`], [`inode_location`], kernel loop mounts
//!   ([`Mount`], [`kernel_mount`]) and loop devices ([`LoopDev`]), undone on drop;
//!   a copy of a mounted image at one moment ([`copy_at_rest`]); NBD servers
//!   ([`ServerProcess`], [`qemu_nbd_unix`]) killed on drop.
//!
//! The crate does not depend on dio, so the library's own unit tests could use it too
//! without a dependency cycle.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;
use std::path::Path;

pub mod tools;
pub use tools::{
    assert_fsck_clean, copy_at_rest, debugfs, debugfs_script, debugfs_w, e2fsck, free_port, ino_of,
    inode_location, kernel_mount, make_orphans, mke2fs, mke2fs_filled, output_with_stdin,
    qemu_nbd_tcp, qemu_nbd_unix, settle_writeback, sh, status_of, superblock_field, Listen,
    LoopDev, Mount, ServerProcess,
};

/// The byte test devices are filled with: a read that shows it returned data the
/// file never wrote. [`pattern`] never produces it.
pub const STALE: u8 = 0xAA;

/// A small seeded generator (splitmix64): the same seed gives the same numbers.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A number in `range` (`range.start` when it is empty).
    pub fn range(&mut self, range: std::ops::Range<u64>) -> u64 {
        range.start + self.below(range.end.saturating_sub(range.start))
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Fill `buf` with random bytes (any value, 0 and [`STALE`] included).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let w = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

/// The splitmix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fill `buf` with the data of operation `op` at file offset `at`: different for
/// every operation and offset, never 0 and never [`STALE`]. The byte at an offset
/// does not depend on where the buffer starts: `pattern(b, op, at)` then
/// `b[i]` equals the byte `pattern` gives at `at + i`.
pub fn pattern(buf: &mut [u8], op: u64, at: u64) {
    let h = mix(op.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5DEE_CE66);
    let mut word = 0;
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = at + i as u64;
        if i == 0 || pos & 7 == 0 {
            word = mix(h ^ (pos >> 3));
        }
        let v = (word >> ((pos & 7) * 8)) as u8;
        *b = match v {
            0 => 1,
            STALE => 0x55,
            v => v,
        };
    }
}

/// `BIN cp - DST` (`dio`'s binary) with its stdin a pipe into which `first` has
/// been written and which is left open, so that the copy is under way and not
/// done; stdout is dropped and stderr captured.
pub fn cp_from_open_pipe(
    bin: &str,
    dst: impl AsRef<std::ffi::OsStr>,
    first: &[u8],
) -> (std::process::Child, std::process::ChildStdin) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin)
        .args(["cp", "--no-progress", "-"])
        .arg(dst)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dio cp");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(first).expect("feed dio cp");
    stdin.flush().expect("feed dio cp");
    (child, stdin)
}

/// Whether process `pid` holds open an unnamed file (`O_TMPFILE`: how `dio cp`
/// writes a new DST until it is done) under `dir`, with blocks already: the copy
/// is under way.
pub fn writes_unnamed_under(pid: u32, dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|e| {
        std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(dir))
            && std::fs::metadata(e.path()).is_ok_and(|m| m.nlink() == 0 && m.blocks() > 0)
    })
}

/// `len` bytes of [`pattern`] for `seed` from offset 0.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    pattern(&mut v, seed, 0);
    v
}

/// Whether the tests run as root (the effective user id is 0): loop devices,
/// mounts and block devices need it.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether `tool` is an executable file on `PATH`.
pub fn have(tool: &str) -> bool {
    if tool.contains('/') {
        return is_executable(Path::new(tool));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| is_executable(&d.join(tool))))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether every tool of `tools` is on `PATH`; if one is not, says that the test
/// skips because it is not installed (see [`skip`]) and returns false.
pub fn need(tools: &[&str]) -> bool {
    match tools.iter().find(|t| !have(t)) {
        Some(t) => {
            skip(format!("{t} is not installed"));
            false
        }
        None => true,
    }
}

/// Say that a test skips, and why (`skipped: REASON` on stderr, where `cargo test`
/// shows it with `--nocapture` and CI logs keep it).
pub fn skip(reason: impl fmt::Display) {
    eprintln!("skipped: {reason}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_never_yields_zero_or_stale_and_differs_between_ops() {
        let mut a = vec![0; 4096];
        let mut b = vec![0; 4096];
        pattern(&mut a, 1, 100);
        pattern(&mut b, 2, 100);
        assert!(a.iter().all(|&x| x != 0 && x != STALE));
        assert!(a.iter().zip(&b).filter(|(x, y)| x == y).count() < 64);
        let mut c = vec![0; 4000];
        pattern(&mut c, 1, 196);
        assert_eq!(&c[..], &a[96..]);
        assert_eq!(bytes(100, 1), {
            let mut d = vec![0; 100];
            pattern(&mut d, 1, 0);
            d
        });
    }

    #[test]
    fn rng_repeats_from_its_seed_and_stays_in_bounds() {
        let (mut a, mut b) = (Rng::new(5), Rng::new(5));
        let xs: Vec<u64> = (0..100).map(|_| a.below(10)).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.below(10)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x < 10));
        assert!((0..10).all(|v| xs.contains(&v)));
        assert_eq!(Rng::new(1).below(0), 0);
        let mut r = Rng::new(9);
        assert!((0..100)
            .map(|_| r.range(10..20))
            .all(|x| (10..20).contains(&x)));
        let mut buf = [0u8; 13];
        r.fill(&mut buf);
        assert!(buf.iter().any(|&x| x != 0));
    }

    #[test]
    fn have_finds_sh_and_not_a_made_up_tool() {
        assert!(have("sh"));
        assert!(!have("dio-testkit-no-such-tool"));
    }
}
