//! `dio cp -r IMAGE:/DIR HOSTDIR`: trees built with `mke2fs -d` from real host
//! trees holding every kind of file are extracted and compared with their source
//! (bytes, kinds, link targets, hard-link identity, holes, modes) and, as root,
//! with the kernel's view through a loop mount (owners, modes, times to the
//! nanosecond with -p). Hostile images (entries patched to `..`, `../evil`, a
//! name with `/`, a directory linked twice, symlinks waiting in the destination)
//! must be reported, exit 1, and leave nothing outside the destination.

use dio_testkit::{debugfs_w, have, is_root, kernel_mount, qemu_nbd_unix, sh, Mount};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dio(args: &[&OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dio"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("extract")
        .join(tag);
    if d.exists() {
        std::fs::remove_dir_all(&d).unwrap();
    }
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `mke2fs -d SRC` into a new image of `mib` MiB.
fn mkfs(src: &Path, img: &Path, mib: u64, opts: &[&str]) {
    sh(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096"])
        .args(opts)
        .arg("-d")
        .arg(src)
        .arg(img)
        .arg(format!("{mib}M")));
}

/// Mount `img` read-only (loop, no journal replay, no atime updates), as root.
fn mount_ro(img: &Path) -> Option<Mount> {
    kernel_mount(img, "ro,noload,noatime")
}

/// A host tree with every kind of file and some odd but legal names.
fn make_tree(root: &Path) {
    use std::os::unix::fs::symlink;
    let w = |p: &str, data: &[u8]| std::fs::write(root.join(p), data).unwrap();
    std::fs::create_dir_all(root.join("d1/d2/d3")).unwrap();
    std::fs::create_dir_all(root.join("locked")).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize| {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect::<Vec<u8>>()
    };
    w("small", b"hello\n");
    w("empty", b"");
    w("d1/d2/d3/deep", &random(5000));
    // Several chunks of the default 1 MiB.
    w("d1/big", &random(3 * (1 << 20) + 12345));
    w("locked/inside", b"in a read-only directory\n");
    for i in 0..40 {
        w(&format!("d1/many-{i}"), &random(100 + i * 997));
    }
    // Holes at the start and in the middle; data at the end (mke2fs -d drops a
    // trailing hole's i_size).
    let f = std::fs::File::create(root.join("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&random(8192), 1 << 20).unwrap();
    f.write_all_at(&random(100), 5 << 20).unwrap();
    drop(f);
    // Hard links: three names of one inode, across directories.
    w("d1/linked", b"one inode, three names\n");
    std::fs::hard_link(root.join("d1/linked"), root.join("linked2")).unwrap();
    std::fs::hard_link(root.join("d1/linked"), root.join("d1/d2/linked3")).unwrap();
    symlink("small", root.join("rel-link")).unwrap();
    symlink("/etc/passwd", root.join("abs-link")).unwrap();
    symlink("../nowhere/at/all", root.join("d1/dangling")).unwrap();
    symlink("d1", root.join("dir-link")).unwrap();
    // Odd but legal names.
    w("with space", b"s");
    w("new\nline", b"n");
    std::fs::write(root.join(OsStr::from_bytes(b"bad-utf8-\xff\xfe")), b"b").unwrap();
    w("\u{e9}t\u{e9}", b"u");
    let fifo = root.join("fifo");
    sh(Command::new("mkfifo").arg(&fifo));
    if is_root() {
        sh(Command::new("mknod")
            .arg(root.join("null-dev"))
            .args(["c", "1", "3"]));
        std::os::unix::fs::chown(root.join("small"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(root.join("rel-link"), Some(42), Some(43)).unwrap();
    }
    let perm = |p: &str, m: u32| {
        std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(m)).unwrap()
    };
    perm("d1/d2/d3/deep", 0o4755);
    perm("d1/big", 0o600);
    perm("locked", 0o555);
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Link(Vec<u8>),
    Fifo,
    Char(u64),
    Other,
}

struct Entry {
    kind: Kind,
    meta: std::fs::Metadata,
}

/// Every entry beneath `root` (lost+found left out), by relative path.
fn walk(root: &Path) -> BTreeMap<Vec<u8>, Entry> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if r == Path::new("lost+found") {
                continue;
            }
            let p = root.join(&r);
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let t = meta.file_type();
            let kind = if t.is_symlink() {
                Kind::Link(
                    std::fs::read_link(&p)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            } else if t.is_dir() {
                todo.push(r.clone());
                Kind::Dir
            } else if t.is_file() {
                // Read below, once every entry's metadata is taken (reading
                // updates the atime of every name of a hard-linked inode).
                Kind::File(Vec::new())
            } else if t.is_fifo() {
                Kind::Fifo
            } else if t.is_char_device() {
                Kind::Char(meta.rdev())
            } else {
                Kind::Other
            };
            out.insert(r.as_os_str().as_bytes().to_vec(), Entry { kind, meta });
        }
    }
    for (r, e) in out.iter_mut() {
        if let Kind::File(bytes) = &mut e.kind {
            *bytes = std::fs::read(root.join(OsStr::from_bytes(r))).unwrap();
        }
    }
    out
}

/// The names of each inode with several links, as sets of paths.
fn link_groups(t: &BTreeMap<Vec<u8>, Entry>) -> Vec<Vec<Vec<u8>>> {
    let mut by_ino: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for (p, e) in t {
        if !e.meta.is_dir() {
            by_ino.entry(e.meta.ino()).or_default().push(p.clone());
        }
    }
    let mut g: Vec<_> = by_ino.into_values().filter(|v| v.len() > 1).collect();
    g.sort();
    g
}

fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap()
}

/// `want` (the source) and `got` (the copy) hold the same names, kinds, bytes,
/// link targets and hard-link structure; holes are holes.
fn same_tree(want: &BTreeMap<Vec<u8>, Entry>, got: &BTreeMap<Vec<u8>, Entry>) {
    let names = |t: &BTreeMap<Vec<u8>, Entry>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want));
    for (p, w) in want {
        let g = &got[p];
        assert!(
            g.kind == w.kind,
            "{}: kind or bytes differ",
            String::from_utf8_lossy(p)
        );
        assert_eq!(g.meta.len(), w.meta.len(), "{}", String::from_utf8_lossy(p));
    }
    assert_eq!(link_groups(got), link_groups(want));
    // The sparse file: its holes are holes (it holds 8 KiB + 100 bytes of data in
    // 5 MiB), and SEEK_DATA finds its first data at 1 MiB.
    let sparse = &got[&b"sparse".to_vec()];
    assert!(
        sparse.meta.blocks() * 512 <= 64 << 10,
        "the sparse copy holds {} blocks",
        sparse.meta.blocks()
    );
}

/// The first data offset of a file (SEEK_DATA).
fn first_data(p: &Path) -> u64 {
    let f = std::fs::File::open(p).unwrap();
    rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0)).unwrap()
}

#[test]
fn tree_equals_its_source_without_preserve() {
    if !have("mke2fs") {
        eprintln!("skipped: mke2fs missing");
        return;
    }
    let dir = scratch("plain");
    let src = dir.join("src");
    make_tree(&src);
    let img = dir.join("img");
    mkfs(&src, &img, 32, &[]);
    let out = dir.join("out");
    let mut arg = img.as_os_str().to_owned();
    arg.push(":/");
    let o = dio(&[OsStr::new("cp"), OsStr::new("-r"), &arg, out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("files"), "a summary: {}", stderr(&o));
    let (want, got) = (walk(&src), walk(&out));
    same_tree(&want, &got);
    assert_eq!(first_data(&out.join("sparse")), 1 << 20);
    // Without -p: the source's permission bits less the umask (setuid dropped),
    // owned by us, times of the copy.
    let mask = umask();
    let me = std::fs::metadata("/proc/self").unwrap().uid();
    for (p, w) in &want {
        let g = &got[p];
        if w.meta.file_type().is_symlink() {
            continue;
        }
        assert_eq!(
            g.meta.mode() & 0o7777,
            w.meta.mode() & 0o777 & !mask,
            "{}",
            String::from_utf8_lossy(p)
        );
        assert_eq!(g.meta.uid(), me);
    }
    // ls escapes the odd but legal names, as GNU ls does, and flags none.
    let o = dio(&[OsStr::new("ls"), &arg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let listing = String::from_utf8(o.stdout).unwrap();
    assert!(listing.contains("\n$'new\\nline'\n"), "{listing}");
    assert!(listing.contains("\n$'bad-utf8-\\xff\\xfe'\n"), "{listing}");
    assert!(listing.contains("\nwith space\n"), "{listing}");
    // A file as SRC: -r copies it as cp does.
    let mut file = img.as_os_str().to_owned();
    file.push(":/d1/big");
    let one = dir.join("one");
    let o = dio(&[OsStr::new("cp"), OsStr::new("-r"), &file, one.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&one).unwrap(),
        std::fs::read(src.join("d1/big")).unwrap()
    );
    // Copied again into the same place: existing files are replaced.
    let o = dio(&[OsStr::new("cp"), OsStr::new("-r"), &arg, out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    same_tree(&want, &walk(&out));
}

#[test]
fn a_named_directory_goes_inside_an_existing_destination() {
    if !have("mke2fs") {
        eprintln!("skipped: mke2fs missing");
        return;
    }
    let dir = scratch("named");
    let src = dir.join("src");
    make_tree(&src);
    let img = dir.join("img");
    mkfs(&src, &img, 32, &[]);
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let mut arg = img.as_os_str().to_owned();
    arg.push(":/d1");
    let o = dio(&[OsStr::new("cp"), OsStr::new("-r"), &arg, out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = walk(&src.join("d1"));
    let got = walk(&out.join("d1"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (p, w) in &want {
        assert!(got[p].kind == w.kind, "{}", String::from_utf8_lossy(p));
    }
}

#[test]
fn inline_data_files_are_copied() {
    if !have("mke2fs") || !have("debugfs") {
        eprintln!("skipped: mke2fs or debugfs missing");
        return;
    }
    let dir = scratch("inline");
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("tiny"), b"inline bytes").unwrap();
    std::fs::write(src.join("sub/also"), b"more inline bytes, still short").unwrap();
    std::fs::write(src.join("big"), vec![7u8; 20000]).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    let img = dir.join("img");
    mkfs(&src, &img, 8, &["-O", "inline_data", "-I", "256"]);
    let st = Command::new("debugfs")
        .args(["-R", "stat /tiny"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&st.stdout).contains("inline data"),
        "the test file is not inline: {}",
        String::from_utf8_lossy(&st.stdout)
    );
    let out = dir.join("out");
    let mut arg = img.as_os_str().to_owned();
    arg.push(":/");
    let o = dio(&[OsStr::new("cp"), OsStr::new("-r"), &arg, out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["tiny", "sub/also", "big", "empty"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(src.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn preserve_matches_the_kernel_and_cp_a() {
    if !have("mke2fs") || !have("debugfs") {
        eprintln!("skipped: mke2fs or debugfs missing");
        return;
    }
    if !is_root() {
        eprintln!("skipped: needs root (loop mount, owners, device nodes)");
        return;
    }
    let dir = scratch("preserve");
    let src = dir.join("src");
    make_tree(&src);
    let img = dir.join("img");
    mkfs(&src, &img, 32, &[]);
    // Nanoseconds (mke2fs -d keeps whole seconds): set some by hand.
    debugfs_w(&img, "set_inode_field /small mtime_extra 0x1d4c2b0c");
    debugfs_w(&img, "set_inode_field /small atime_extra 0x0000a5a4");
    debugfs_w(&img, "set_inode_field /d1 mtime_extra 0x00c0ffee");
    debugfs_w(&img, "set_inode_field /rel-link mtime_extra 0x00000404");
    let Some(mnt) = mount_ro(&img) else { return };
    let out = dir.join("out");
    let mut arg = img.as_os_str().to_owned();
    arg.push(":/");
    let o = dio(&[OsStr::new("cp"), OsStr::new("-rp"), &arg, out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let oracle = dir.join("oracle");
    sh(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", mnt.path().display()))
        .arg(&oracle));
    let kernel = walk(mnt.path());
    let got = walk(&out);
    let by_cp = walk(&oracle);
    drop(mnt);
    same_tree(&walk(&src), &got);
    for (p, k) in &kernel {
        let g = &got[p];
        let c = &by_cp[p];
        let name = String::from_utf8_lossy(p);
        assert!(g.kind == k.kind, "{name}");
        assert_eq!(g.meta.mode(), k.meta.mode(), "{name}: mode");
        assert_eq!(
            (g.meta.uid(), g.meta.gid()),
            (k.meta.uid(), k.meta.gid()),
            "{name}: owner"
        );
        assert_eq!(
            (g.meta.mtime(), g.meta.mtime_nsec()),
            (k.meta.mtime(), k.meta.mtime_nsec()),
            "{name}: mtime"
        );
        assert_eq!(
            (g.meta.atime(), g.meta.atime_nsec()),
            (k.meta.atime(), k.meta.atime_nsec()),
            "{name}: atime"
        );
        // cp -a from the mount agrees on what it keeps.
        assert_eq!(g.meta.mode(), c.meta.mode(), "{name}: mode vs cp -a");
        assert_eq!(
            (g.meta.mtime(), g.meta.mtime_nsec()),
            (c.meta.mtime(), c.meta.mtime_nsec()),
            "{name}: mtime vs cp -a"
        );
        // No more blocks than cp -a's copy (holes kept as holes).
        assert!(
            g.meta.blocks() <= c.meta.blocks().max(8),
            "{name}: {} blocks, cp -a {}",
            g.meta.blocks(),
            c.meta.blocks()
        );
    }
    assert_eq!(link_groups(&got), link_groups(&by_cp));
    assert_eq!(got[&b"small".to_vec()].meta.mtime_nsec(), 0x1d4c2b0c >> 2);
    assert!(matches!(got[&b"null-dev".to_vec()].kind, Kind::Char(_)));
}

/// Patch a unique byte string of the image (a name of the same length).
fn patch(img: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut d = std::fs::read(img).unwrap();
    let hits: Vec<usize> = d
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{} found {} times",
        String::from_utf8_lossy(from),
        hits.len()
    );
    d[hits[0]..hits[0] + to.len()].copy_from_slice(to);
    std::fs::write(img, d).unwrap();
}

/// Every path beneath `dir`, recursively (symlinks not followed).
fn everything(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            v.extend(everything(&p));
        }
        v.push(p);
    }
    v.sort();
    v
}

/// An image whose directory `d` holds entries patched to `../evil`, `ab/cd`,
/// `NU\0L` and `..`, next to good ones; no metadata_csum, so the patched blocks read.
fn hostile_image(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("d/sub")).unwrap();
    std::fs::write(src.join("d/EVIL_0X"), b"escaped?\n").unwrap();
    std::fs::write(src.join("d/ab_cd"), b"slash\n").unwrap();
    std::fs::write(src.join("d/zz"), b"dotdot\n").unwrap();
    std::fs::write(src.join("d/NU_L"), b"nul\n").unwrap();
    std::fs::write(src.join("d/fine"), b"fine\n").unwrap();
    std::fs::write(src.join("d/sub/deep"), b"deep\n").unwrap();
    let img = dir.join("img");
    mkfs(&src, &img, 8, &["-O", "^metadata_csum"]);
    patch(&img, b"EVIL_0X", b"../evil");
    patch(&img, b"ab_cd", b"ab/cd");
    patch(&img, b"NU_L", b"NU\0L");
    // A 2-byte name: its record's name_len (2) and file type (1) come first.
    patch(&img, b"\x02\x01zz", b"\x02\x01..");
    img
}

#[test]
fn hostile_names_are_reported_and_nothing_escapes() {
    if !have("mke2fs") {
        eprintln!("skipped: mke2fs missing");
        return;
    }
    let dir = scratch("hostile");
    let img = hostile_image(&dir);
    let box_ = dir.join("box");
    std::fs::create_dir(&box_).unwrap();
    let out = box_.join("out");
    let mut arg = img.as_os_str().to_owned();
    arg.push(":/");
    let o = dio(&[OsStr::new("cp"), OsStr::new("-r"), &arg, out.as_os_str()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("$'../evil' (inode "), "{err}");
    assert!(err.contains("$'ab/cd' (inode "), "{err}");
    assert!(err.contains("/d/$'..' (inode "), "{err}");
    assert!(err.contains("/d/$'NU\\x00L' (inode "), "{err}");
    // Nothing beside the destination, nothing named evil anywhere.
    let all = everything(&dir);
    assert!(
        all.iter().all(|p| !p.to_string_lossy().contains("evil")),
        "{all:?}"
    );
    assert_eq!(
        std::fs::read_dir(&box_).unwrap().count(),
        1,
        "only the destination in its parent"
    );
    // The rest is copied.
    assert_eq!(std::fs::read(out.join("d/fine")).unwrap(), b"fine\n");
    assert_eq!(std::fs::read(out.join("d/sub/deep")).unwrap(), b"deep\n");
    let names: Vec<_> = std::fs::read_dir(out.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // ls shows the names escaped and flags them.
    let mut d = img.as_os_str().to_owned();
    d.push(":/d");
    let o = dio(&[OsStr::new("ls"), OsStr::new("-la"), &d]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("$'../evil'\n"), "{out}");
    assert!(out.contains("$'ab/cd'\n"), "{out}");
    assert!(out.contains("$'..'\n"), "{out}");
    assert!(!out.contains(" ../evil"), "{out}");
    let err = stderr(&o);
    assert_eq!(err.matches("corrupt directory entry").count(), 4, "{err}");
}

#[test]
fn a_directory_linked_twice_is_copied_once() {
    if !have("mke2fs") || !have("debugfs") {
        eprintln!("skipped: mke2fs or debugfs missing");
        return;
    }
    let dir = scratch("loop");
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::write(src.join("a/b/f"), b"once\n").unwrap();
    let img = dir.join("img");
    mkfs(&src, &img, 8, &[]);
    debugfs_w(&img, "link /a/b /a/b/self");
    debugfs_w(&img, "link /a/b /again");
    let out = dir.join("out");
    let mut arg = img.as_os_str().to_owned();
    arg.push(":/");
    let o = dio(&[OsStr::new("cp"), OsStr::new("-r"), &arg, out.as_os_str()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("is reached again").count(), 2, "{err}");
    assert!(err.contains(":/a/b/self"), "{err}");
    assert!(err.contains(":/again"), "{err}");
    assert_eq!(std::fs::read(out.join("a/b/f")).unwrap(), b"once\n");
    assert!(!out.join("a/b/self").exists());
    assert!(!out.join("again").exists());
}

#[test]
fn symlinks_waiting_in_the_destination_are_never_followed() {
    if !have("mke2fs") {
        eprintln!("skipped: mke2fs missing");
        return;
    }
    let dir = scratch("trap");
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/f"), b"into sub\n").unwrap();
    std::fs::write(src.join("victim"), b"replaced\n").unwrap();
    let img = dir.join("img");
    mkfs(&src, &img, 8, &[]);
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("precious"), b"keep me\n").unwrap();
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.join("precious"), out.join("victim")).unwrap();
    let mut arg = img.as_os_str().to_owned();
    arg.push(":/");
    let o = dio(&[OsStr::new("cp"), OsStr::new("-r"), &arg, out.as_os_str()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("never followed"), "{err}");
    // Nothing written through either link.
    assert_eq!(
        std::fs::read(outside.join("precious")).unwrap(),
        b"keep me\n"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    // The file link was replaced by the file itself.
    assert!(!std::fs::symlink_metadata(out.join("victim"))
        .unwrap()
        .is_symlink());
    assert_eq!(std::fs::read(out.join("victim")).unwrap(), b"replaced\n");
    assert!(std::fs::symlink_metadata(out.join("sub"))
        .unwrap()
        .is_symlink());
}

#[test]
fn a_host_source_or_a_missing_path_is_refused_clearly() {
    let dir = scratch("refused");
    let host = dir.join("plain");
    std::fs::create_dir(&host).unwrap();
    let o = dio(&[
        OsStr::new("cp"),
        OsStr::new("-r"),
        host.as_os_str(),
        dir.join("x").as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("IMAGE:/DIR"), "{}", stderr(&o));
    let o = dio(&[
        OsStr::new("cp"),
        OsStr::new("-p"),
        host.as_os_str(),
        dir.join("x").as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(2), "-p needs -r");
}

#[test]
fn a_tree_comes_out_of_an_image_over_nbd() {
    if !have("mke2fs") || !have("qemu-nbd") {
        eprintln!("skipped: mke2fs or qemu-nbd missing");
        return;
    }
    let dir = scratch("nbd");
    let src = dir.join("src");
    make_tree(&src);
    let img = dir.join("img");
    mkfs(&src, &img, 32, &[]);
    let sock = dir.join("sock");
    let srv = qemu_nbd_unix(&img, "raw", &sock);
    let out = dir.join("out");
    let uri = format!("nbd+unix:///disk?socket={}:/", sock.display());
    let o = dio(&[
        OsStr::new("cp"),
        OsStr::new("-r"),
        OsStr::new(&uri),
        out.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    drop(srv);
    same_tree(&walk(&src), &walk(&out));
}

#[test]
fn unwritten_extents_become_holes() {
    if !have("mke2fs") || !have("fallocate") {
        eprintln!("skipped: mke2fs or fallocate missing");
        return;
    }
    if !is_root() {
        eprintln!("skipped: needs root (a loop mount makes the unwritten extent)");
        return;
    }
    let dir = scratch("unwritten");
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let img = dir.join("img");
    mkfs(&src, &img, 16, &[]);
    // Mounted read-write: 4 MiB preallocated (unwritten), 4 KiB written at 1 MiB.
    let Some(m) = kernel_mount(&img, "rw") else {
        return;
    };
    let mnt = m.path().to_path_buf();
    let f = mnt.join("prealloc");
    sh(Command::new("fallocate").args(["-l", "4M"]).arg(&f));
    let data = vec![0xabu8; 4096];
    {
        use std::os::unix::fs::FileExt;
        let fh = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        fh.write_all_at(&data, 1 << 20).unwrap();
        fh.sync_all().unwrap();
    }
    drop(m);
    let out = dir.join("out");
    let mut arg = img.as_os_str().to_owned();
    arg.push(":/");
    let o = dio(&[OsStr::new("cp"), OsStr::new("-r"), &arg, out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let copy = out.join("prealloc");
    let bytes = std::fs::read(&copy).unwrap();
    assert_eq!(bytes.len(), 4 << 20);
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0));
    assert_eq!(&bytes[1 << 20..(1 << 20) + 4096], &data[..]);
    assert!(bytes[(1 << 20) + 4096..].iter().all(|&b| b == 0));
    // Only the written block holds data.
    assert_eq!(first_data(&copy), 1 << 20);
    let blocks = std::fs::metadata(&copy).unwrap().blocks();
    assert!(blocks * 512 <= 64 << 10, "{blocks} blocks allocated");
}
