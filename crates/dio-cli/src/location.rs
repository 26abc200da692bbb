//! Locations: what the CLI takes wherever it takes a file. A location is a device
//! source (a host file or block device through `RawFile`, or an NBD export) plus an
//! optional path inside an ext2/3/4 image on that source, in the e2tools spelling
//! `IMAGE:/PATH`:
//!
//! - `disk.img`, `/dev/sdb1`: the host file or device itself;
//! - `disk.img:/etc/passwd`: a file inside the ext image `disk.img`;
//! - `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`: an NBD export
//!   (`nbds://...?tls-certificates=DIR`, `nbds+unix://...`: over TLS);
//! - `nbd://HOST/EXPORT:/etc/passwd`: a file inside the ext image on that export.
//!
//! A host argument is split at its first `:/` only when the whole argument is not
//! an existing host path (so `./a:/b` still names a file called `b` in a directory
//! `a:` if there is one). NBD URIs are split at their last `:/`.
//!
//! This module opens sources and images; it moves no data.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dio::ext::{Ext, ExtFile, FileType, Inode};
use dio::nbd::NbdFile;
use dio::nbd::{NbdConfig, NbdUri};
use dio::RawOptions;

use crate::fail::Failure;
use crate::Engine;

/// Where the bytes of a location live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A host file or block device.
    Host(PathBuf),
    /// An NBD export.
    Nbd(String),
}

/// A parsed location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub source: Source,
    /// A path inside an ext image on the source.
    pub inner: Option<Vec<u8>>,
}

/// URI schemes people reach for that are NBD-like but not NBD as dio speaks it.
const NBD_SCHEMES: [&str; 6] = [
    "nbd",
    "nbd+tcp",
    "nbd+unix",
    "nbds",
    "nbds+tcp",
    "nbds+unix",
];

/// The scheme of `scheme://...` (RFC 3986: a letter, then letters, digits, `+-.`).
fn uri_scheme(bytes: &[u8]) -> Option<&str> {
    let i = bytes.windows(3).position(|w| w == b"://")?;
    let scheme = std::str::from_utf8(&bytes[..i]).ok()?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

impl Location {
    /// Parse a command-line argument. A URI with a scheme dio does not speak, or an
    /// NBD URI that is malformed, is a usage error (exit 2), unless a host path of
    /// that name exists.
    pub fn parse(arg: &OsStr) -> Result<Location, Failure> {
        let bytes = arg.as_bytes();
        let exists = || Path::new(arg).symlink_metadata().is_ok();
        let shown = String::from_utf8_lossy(bytes);
        if let Some(scheme) = uri_scheme(bytes) {
            let lower = scheme.to_ascii_lowercase();
            if NBD_SCHEMES.contains(&lower.as_str()) {
                return Self::parse_nbd(bytes);
            }
            if !exists() {
                let why = format!("dio does not speak {scheme}://");
                return Err(Failure::usage(format!(
                    "{shown}: {why} (locations: a host path, IMAGE:/PATH, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
                )));
            }
        } else if let Some(i) = bytes.iter().position(|&c| c == b':') {
            // `nbd:/h/x`, `nbd:h/x`: an NBD scheme without its `//`.
            let head = String::from_utf8_lossy(&bytes[..i]).to_ascii_lowercase();
            if NBD_SCHEMES.contains(&head.as_str()) && !exists() {
                return Err(Failure::usage(format!(
                    "{shown}: malformed NBD URI: write nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"
                )));
            }
        }
        let host = Location {
            source: Source::Host(PathBuf::from(arg)),
            inner: None,
        };
        let Some(i) = bytes.windows(2).position(|w| w == b":/") else {
            return Ok(host);
        };
        if i == 0 || exists() {
            return Ok(host);
        }
        Ok(Location {
            source: Source::Host(PathBuf::from(OsString::from_vec(bytes[..i].to_vec()))),
            inner: Some(bytes[i + 1..].to_vec()),
        })
    }

    /// An NBD URI, split at its last `:/` after the scheme's `://` (the inner
    /// path); the URI itself must parse.
    fn parse_nbd(bytes: &[u8]) -> Result<Location, Failure> {
        let body = bytes
            .windows(3)
            .position(|w| w == b"://")
            .map_or(0, |i| i + 3);
        let split = bytes[body..]
            .windows(2)
            .rposition(|w| w == b":/")
            .map(|i| i + body);
        let (uri, inner) = match split {
            Some(i) => (&bytes[..i], Some(bytes[i + 1..].to_vec())),
            None => (bytes, None),
        };
        let uri = String::from_utf8_lossy(uri).into_owned();
        if let Err(e) = NbdUri::parse(&uri) {
            return Err(Failure::usage(e.to_string()));
        }
        Ok(Location {
            source: Source::Nbd(uri),
            inner,
        })
    }

    /// How to name it in messages.
    pub fn display(&self) -> String {
        let src = match &self.source {
            Source::Host(p) => p.display().to_string(),
            Source::Nbd(u) => u.clone(),
        };
        match &self.inner {
            Some(p) => format!("{src}:{}", String::from_utf8_lossy(p)),
            None => src,
        }
    }

    /// The last component of the inner path (or of the host path).
    pub fn file_name(&self) -> Option<OsString> {
        match (&self.inner, &self.source) {
            (Some(p), _) => p
                .split(|&c| c == b'/')
                .rfind(|c| !c.is_empty())
                .map(|c| OsString::from_vec(c.to_vec())),
            (None, Source::Host(p)) => p.file_name().map(OsStr::to_os_string),
            (None, Source::Nbd(_)) => None,
        }
    }

    /// A failure about this location.
    pub fn fail(&self, err: impl std::fmt::Display) -> Failure {
        Failure::msg(format!("{}: {err}", self.display()))
    }
}

/// An opened source: a host file, block device or NBD export, one shape.
pub type Opened = Box<dyn dio::Source>;

impl Source {
    fn name(&self) -> String {
        match self {
            Source::Host(p) => p.display().to_string(),
            Source::Nbd(u) => u.clone(),
        }
    }

    /// Open the source for reading, or reading and writing (`create` a missing
    /// host file too).
    pub fn open(&self, write: bool, create: bool, engine: Engine) -> Result<Opened, Failure> {
        match self {
            Source::Host(path) => {
                if path.symlink_metadata().is_err() {
                    if let Some(hint) = relative_inner_hint(path) {
                        return Err(Failure::at(path, hint));
                    }
                }
                let raw = crate::copy::open(
                    path,
                    &RawOptions {
                        write,
                        create,
                        backend: engine.backend(),
                        ..RawOptions::default()
                    },
                )?;
                Ok(Box::new(raw))
            }
            Source::Nbd(uri) => {
                // NbdFile's errors name the URI already.
                let f = NbdFile::open_uri(uri, write, &NbdConfig::default())
                    .map_err(|e| Failure::msg(e.to_string()))?;
                Ok(Box::new(f))
            }
        }
    }
}

/// An opened source whose device requests are counted (`--stats`): every read
/// and write of it (an image's metadata and file data included, as `Image::open_on`
/// opens the image on this device) passes through a [`dio::StatsDevice`].
pub struct Counted {
    inner: Opened,
    /// The source's file over the counting device.
    direct: dio::DirectFile,
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("inner", &self.inner)
            .finish()
    }
}

/// The device wrapper that counts a source's requests.
pub type Counter = dio::StatsDevice<Arc<dyn dio::Device>>;

/// Wrap an opened source so that its device requests are counted; the counter
/// is returned with it.
pub fn counted(inner: Opened) -> Result<(Opened, Arc<Counter>), Failure> {
    let counter = Arc::new(dio::StatsDevice::new(Arc::clone(inner.device())));
    let direct = inner
        .direct()
        .with_device(counter.clone())
        .map_err(|e| Failure::msg(e.to_string()))?;
    Ok((Box::new(Counted { inner, direct }), counter))
}

impl dio::Source for Counted {
    fn direct(&self) -> &dio::DirectFile {
        &self.direct
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn notes(&self) -> &[String] {
        self.inner.notes()
    }
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    fn resizable(&self) -> bool {
        self.inner.resizable()
    }
    fn set_len(&self, size: u64) -> dio::Result<()> {
        self.inner.set_len(size)
    }
    fn data_runs(&self, end: u64) -> Box<dyn Iterator<Item = dio::Run> + '_> {
        self.inner.data_runs(end)
    }
}

/// An ext image opened from a location, with the inode its inner path names.
pub struct Image {
    // Keeps the host file (and its device) open as long as the image is used.
    _opened: Opened,
    pub ext: Ext,
    pub inode: Inode,
}

impl Image {
    /// Open the image of `loc` (which must have an inner path) and look the path
    /// up; symlinks at the end are followed with `follow`.
    pub fn open(
        loc: &Location,
        write: bool,
        follow: bool,
        engine: Engine,
    ) -> Result<Image, Failure> {
        let opened = loc.source.open(write, false, engine)?;
        Image::open_on(loc, opened, write, follow)
    }

    /// [`Image::open`] on a source already opened (`write`: for writing), e.g.
    /// one whose requests are [`counted`].
    pub fn open_on(
        loc: &Location,
        opened: Opened,
        write: bool,
        follow: bool,
    ) -> Result<Image, Failure> {
        let inner = loc.inner.as_deref().expect("an image location");
        let dev = Arc::clone(opened.device());
        let size = opened.size();
        let ext = if write {
            Ext::open_writable(dev, size)
        } else {
            Ext::open(dev, size)
        }
        .map_err(|e| Failure::msg(format!("{}: {}", loc.source.name(), image_error(e, size))))?;
        // A journal that needed recovery was replayed in memory: say so (reads then
        // see what the kernel would see after its replay; the image is not changed).
        crate::fail::print_notes(
            &ext.notes()
                .into_iter()
                .map(|n| format!("{}: {n}", loc.source.name()))
                .collect::<Vec<_>>(),
        );
        let inode = ext
            .lookup(inner, follow)
            .map_err(|e| loc.fail(lookup_error(e)))?;
        Ok(Image {
            _opened: opened,
            ext,
            inode,
        })
    }

    /// The device the image is on (for reads through block maps of its files).
    pub fn device(&self) -> &Arc<dyn dio::Device> {
        self._opened.device()
    }

    /// The back end under the image, for messages ("uring", "sync" or "nbd").
    pub fn backend_name(&self) -> &'static str {
        self._opened.backend_name()
    }

    /// Make the image's writes durable (flush its device), and leave its journal
    /// checkpointed and clean (errors reported here, not dropped at close).
    pub fn sync(&self) -> dio::Result<()> {
        self._opened.direct().sync_data()?;
        self.ext.checkpoint()
    }

    /// Open the inode's data (a regular file, symlinks already followed).
    pub fn file(&self, loc: &Location) -> Result<ExtFile, Failure> {
        match self.inode.file_type() {
            FileType::Regular => {}
            FileType::Directory => return Err(loc.fail("is a directory")),
            t => return Err(loc.fail(format!("is a {}, not a regular file", t.name()))),
        }
        self.ext.open_file(&self.inode).map_err(|e| loc.fail(e))
    }
}

/// `disk.img:etc/passwd` where `disk.img` exists: the user meant `disk.img:/etc/passwd`.
fn relative_inner_hint(path: &Path) -> Option<String> {
    let bytes = path.as_os_str().as_bytes();
    let i = bytes.iter().position(|&c| c == b':')?;
    let (img, rest) = (&bytes[..i], &bytes[i + 1..]);
    if img.is_empty() || rest.is_empty() || rest[0] == b'/' {
        return None;
    }
    let img = Path::new(OsStr::from_bytes(img));
    img.is_file().then(|| {
        let (img, rest) = (img.display(), String::from_utf8_lossy(rest));
        format!("no such file; paths inside an image start with `/`: did you mean {img}:/{rest}?")
    })
}

/// Why an image did not open, in words for a user: a file too small to hold a
/// superblock, or without the ext magic, is "not an ext2/3/4 image".
fn image_error(e: dio::Error, size: u64) -> String {
    const SUPERBLOCK_END: u64 = 2048;
    let s = e.to_string();
    if size < SUPERBLOCK_END {
        format!("not an ext2/3/4 image ({size} bytes, too small to hold a superblock)")
    } else if e.corrupt_kind() == Some(dio::CorruptKind::NoSuperblock) {
        format!("not an ext2/3/4 image ({s})")
    } else {
        s
    }
}

/// A lookup error without the path the error repeats (the location names it).
fn lookup_error(e: dio::Error) -> String {
    match e {
        dio::Error::Path(p) => {
            let s = std::io::Error::from_raw_os_error(p.kind.errno()).to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Location {
        Location::parse(OsStr::new(s)).unwrap()
    }

    fn usage(s: &str) -> String {
        match Location::parse(OsStr::new(s)) {
            Err(Failure::Usage(m)) => m,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn other_schemes_and_malformed_nbd_uris_are_usage_errors() {
        assert_eq!(parse("nbds://h/x").source, Source::Nbd("nbds://h/x".into()));
        assert!(usage("nbds://h/x?tls-verify-peer=maybe").contains("tls-verify-peer"));
        assert!(usage("http://h/x").contains("does not speak http://"));
        assert!(usage("nbd:/h/x").contains("malformed NBD URI"));
        assert!(usage("nbd://").contains("missing host"));
    }

    #[test]
    fn image_paths_split_at_the_first_colon_slash() {
        let l = parse("disk.img:/etc/passwd");
        assert_eq!(l.source, Source::Host("disk.img".into()));
        assert_eq!(l.inner.as_deref(), Some(&b"/etc/passwd"[..]));
        assert_eq!(parse("d.img:/").inner.as_deref(), Some(&b"/"[..]));
        assert_eq!(parse("a:b:/c").source, Source::Host("a:b".into()));
    }

    #[test]
    fn plain_host_paths_stay_whole() {
        for s in ["disk.img", "/dev/loop0", "a:b", ":/x"] {
            let l = parse(s);
            assert_eq!(l.source, Source::Host(s.into()), "{s}");
            assert_eq!(l.inner, None, "{s}");
        }
    }

    #[test]
    fn nbd_uris_split_at_their_last_colon_slash() {
        let l = parse("nbd://host:10809/exp");
        assert_eq!(l.source, Source::Nbd("nbd://host:10809/exp".into()));
        assert_eq!(l.inner, None);
        let l = parse("nbd://host:10809/exp:/var/log/syslog");
        assert_eq!(l.source, Source::Nbd("nbd://host:10809/exp".into()));
        assert_eq!(l.inner.as_deref(), Some(&b"/var/log/syslog"[..]));
        let l = parse("nbd+unix:///exp?socket=/run/s.sock:/etc/hosts");
        assert_eq!(
            l.source,
            Source::Nbd("nbd+unix:///exp?socket=/run/s.sock".into())
        );
        assert_eq!(l.inner.as_deref(), Some(&b"/etc/hosts"[..]));
        assert_eq!(parse("nbd+unix:///exp?socket=/run/s.sock").inner, None);
    }

    #[test]
    fn file_name_is_the_last_inner_component() {
        assert_eq!(
            parse("d.img:/var/log/syslog/").file_name(),
            Some("syslog".into())
        );
        assert_eq!(parse("dir/d.img").file_name(), Some("d.img".into()));
    }
}
