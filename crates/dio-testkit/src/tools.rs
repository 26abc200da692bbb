//! The outside judges the tests call: commands run with their output kept for the
//! failure message, `e2fsck`, `mke2fs`, `debugfs`, kernel loop mounts and loop
//! devices (both undone on drop, also when a test panics), and NBD servers
//! (qemu-nbd, nbdkit) killed on drop.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// Runs `cmd` with `input` on its stdin (`None`: /dev/null) and returns its
/// output, stdout and stderr captured. The input is fed from a thread, so a large
/// one cannot deadlock against a full stdout pipe; the command may exit before
/// reading it all (a refusal): a broken pipe is not an error, any other write
/// error panics.
pub fn output_with_stdin(cmd: &mut Command, input: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: cannot run: {e}"));
    let feeder = input.map(|i| {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let i = i.to_vec();
        std::thread::spawn(move || match stdin.write_all(&i) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e),
            _ => Ok(()),
        })
    });
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if let Some(f) = feeder {
        if let Err(e) = f.join().expect("the stdin feeder panicked") {
            panic!("{cmd:?}: writing its stdin: {e}");
        }
    }
    out
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

/// Makes an image of `mib` MiB at `img` whose free space holds `fill`: the file is
/// written whole with that byte, then `mke2fs -F -q -E nodiscard ARGS` (no discard,
/// so mke2fs leaves it). A block the file system never wrote reads as `fill`, so a
/// reader that shows stale data is caught.
pub fn mke2fs_filled(img: &Path, args: &[&str], mib: u64, fill: u8) {
    std::fs::write(img, vec![fill; (mib << 20) as usize])
        .unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    sh(Command::new("mke2fs")
        .args(["-F", "-q", "-E", "nodiscard"])
        .args(args)
        .arg(img));
}

/// The value of `KEY:` in `dumpe2fs -h IMG` (for instance "Free blocks"),
/// trimmed; panics if dumpe2fs fails or does not print it.
pub fn superblock_field(img: &Path, key: &str) -> String {
    let text = sh(Command::new("dumpe2fs").arg("-h").arg(img));
    let prefix = format!("{key}:");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("dumpe2fs -h {}: no {key}:\n{text}", img.display()))
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

/// `debugfs -w -f SCRIPT IMG`, the script being `cmds` one a line (written beside
/// the image as `IMG.debugfs`): its stdout and stderr together (debugfs reports a
/// failed request on stderr and still exits 0, so callers check the text).
pub fn debugfs_script(img: &Path, cmds: &[&str]) -> String {
    let script = PathBuf::from(format!("{}.debugfs", img.display()));
    std::fs::write(&script, cmds.join("\n") + "\n")
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    let (code, out) = status_of(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(img),
    );
    assert_eq!(code, 0, "debugfs -w -f {}: {out}", script.display());
    let _ = std::fs::remove_file(&script);
    out
}

/// Leaves `img` as a crash mid-truncate and mid-unlink leaves it, with debugfs:
/// /t's size cut to `t_size` with its blocks past that still mapped, /u unlinked
/// with its inode kept (no links, a deletion time), and the orphan list /u -> /t
/// in the superblock. Both files must exist; returns /u's inode, the list's head.
pub fn make_orphans(img: &Path, t_size: u64) -> u32 {
    let (ti, ui) = (ino_of(img, "/t"), ino_of(img, "/u"));
    debugfs_script(
        img,
        &[
            &format!("sif /t size {t_size}"),
            &format!("sif /u dtime {ti}"),
            "unlink /u",
            &format!("sif <{ui}> links_count 0"),
            &format!("ssv last_orphan {ui}"),
        ],
    );
    ui
}

/// The inode number of `path` in `img`, from `debugfs stat`.
pub fn ino_of(img: &Path, path: &str) -> u32 {
    let text = debugfs(img, &format!("stat {path}"));
    text.split("Inode: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("debugfs stat {path}: {text}"))
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

/// Writes back every dirty page of the machine (`sync`), before a test leaves
/// changes in a mounted image's journal for a few seconds: the kernel's background
/// writeback, which starts once the machine's dirty memory passes its threshold
/// (other tests writing large files), writes every file system's dirty pages, a
/// test image's too, and would put those changes in place before the test copies
/// the image. Starting from clean memory, it stays out of the next seconds.
pub fn settle_writeback() {
    sh(&mut Command::new("sync"));
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
        // A mount can stay busy for a moment (udev probing the loop device):
        // retry for about 5 s, then detach lazily (a test panicked with a file
        // open), never leaving a loop device behind.
        for attempt in 0..20u32 {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                let _ = std::fs::remove_dir(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(10 << attempt.min(5)));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
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

/// Where a [`ServerProcess`] listens.
#[derive(Debug, Clone, Copy)]
pub enum Listen<'a> {
    /// A Unix socket at this path.
    Unix(&'a Path),
    /// A TCP port on 127.0.0.1.
    Tcp(u16),
}

/// A server process (qemu-nbd, nbdkit), killed and reaped on drop, also when the
/// test panics.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts `cmd` (stdin and stdout to /dev/null) and waits until it listens at
    /// `at`: the socket file exists (a probe connection would make the server log a
    /// broken handshake), or a TCP connection succeeds. Panics if it cannot start,
    /// exits first, or is not up within 10 s.
    pub fn start(mut cmd: Command, at: Listen<'_>) -> ServerProcess {
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: cannot start: {e}"));
        let mut srv = ServerProcess { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match at {
                Listen::Unix(p) => p.exists(),
                Listen::Tcp(port) => TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok(),
            };
            if up {
                // bind() makes the file a moment before listen() accepts.
                std::thread::sleep(Duration::from_millis(20));
                return srv;
            }
            if let Some(st) = srv.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{cmd:?}: the server exited at start: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "{cmd:?}: the server did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's process id.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server now (a server that dies under its clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free TCP port on 127.0.0.1: {e}"))
}

/// `qemu-nbd --persistent --shared=8 -x disk -f FMT IMAGE` listening on the Unix
/// socket `sock` (`--persistent` keeps it up across connections, `--shared=8` lets
/// a test open several), up and serving export "disk":
/// `nbd+unix:///disk?socket=SOCK`.
pub fn qemu_nbd_unix(image: &Path, fmt: &str, sock: &Path) -> ServerProcess {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--persistent", "--shared=8", "-x", "disk", "-f", fmt]);
    cmd.arg("-k").arg(sock).arg(image);
    ServerProcess::start(cmd, Listen::Unix(sock))
}

/// The same on TCP 127.0.0.1: the server and its port
/// (`nbd://127.0.0.1:PORT/disk`).
pub fn qemu_nbd_tcp(image: &Path, fmt: &str) -> (ServerProcess, u16) {
    let port = free_port();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--persistent", "--shared=8", "-x", "disk", "-f", fmt]);
    cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()])
        .arg(image);
    (ServerProcess::start(cmd, Listen::Tcp(port)), port)
}
