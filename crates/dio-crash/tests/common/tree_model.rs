//! The model of an ext workload's tree for crash replay (ext_workload.rs, ext_put_files.rs):
//! the versions of the tree a crash may show, and a checker that walks each crash
//! state through dio's reader and judges every path against them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dio::ext::{Ext, FileType};
use dio_crash::{Checker, StateView, Verdict};

/// What a path holds in one version of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File(Vec<u8>),
    Dir,
    Link(Vec<u8>),
}

pub type Tree = BTreeMap<String, Node>;

/// The workload's history: the tree after each operation, and where each
/// operation's marks are in the log.
#[derive(Debug, Default)]
pub struct History {
    /// `trees[0]` the start, `trees[k + 1]` after operation k.
    pub trees: Vec<Tree>,
    /// Per operation: (record of its begin mark, record of its end mark,
    /// durable when it returned).
    pub ops: Vec<(u64, u64, bool)>,
    pub names: Vec<String>,
    /// Per operation: a tree it may show while in flight besides those before
    /// and after it (a truncate zeroes the tail of the block the new size ends
    /// in before the size changes, as the kernel's truncate does: data, not
    /// metadata).
    pub mids: Vec<Option<Tree>>,
}

impl History {
    /// The versions a crash at `at` may show: from the tree after the last
    /// operation that returned durably to the tree after the operation in
    /// flight (if any).
    pub fn allowed(&self, at: u64) -> Vec<&Tree> {
        let done = self.ops.iter().take_while(|o| o.1 < at).count();
        let lower = self.ops[..done]
            .iter()
            .rposition(|o| o.2)
            .map_or(0, |j| j + 1);
        let in_flight = usize::from(self.ops.get(done).is_some_and(|o| o.0 < at));
        let upper = done + in_flight;
        let mut v: Vec<&Tree> = self.trees[lower..=upper].iter().collect();
        v.extend(self.mids[lower..upper].iter().flatten());
        v
    }

    pub fn op_name(&self, at: u64) -> String {
        let done = self.ops.iter().take_while(|o| o.1 < at).count();
        match self.ops.get(done) {
            Some(o) if o.0 < at => format!("in op {done} ({})", self.names[done]),
            _ => format!("after op {} (of {})", done, self.ops.len()),
        }
    }
}

/// Checks a state against the history through dio's own reader.
pub struct ModelFs {
    pub history: Arc<History>,
    pub checked: AtomicU64,
}

pub fn walk(fs: &Ext, dir: &str, out: &mut BTreeMap<String, Node>) -> Result<(), String> {
    let inode = fs
        .lookup(if dir.is_empty() { b"/" } else { dir.as_bytes() }, false)
        .map_err(|e| format!("{dir}/: {e}"))?;
    for e in fs.read_dir(&inode).map_err(|e| format!("{dir}/: {e}"))? {
        let name = String::from_utf8_lossy(&e.name).into_owned();
        if name == "." || name == ".." || (dir.is_empty() && name == "lost+found") {
            continue;
        }
        let path = format!("{dir}/{name}");
        let inode = fs.inode(e.inode).map_err(|e| format!("{path}: {e}"))?;
        match inode.file_type() {
            FileType::Directory => {
                out.insert(path.clone(), Node::Dir);
                walk(fs, &path, out)?;
            }
            FileType::Symlink => {
                let t = fs.read_link(&inode).map_err(|e| format!("{path}: {e}"))?;
                out.insert(path, Node::Link(t));
            }
            FileType::Regular => {
                let f = fs.open_file(&inode).map_err(|e| format!("{path}: {e}"))?;
                let mut data = vec![0u8; f.size() as usize];
                let n = f
                    .read_at(0, &mut data)
                    .map_err(|e| format!("{path}: {e}"))?;
                data.truncate(n);
                out.insert(path, Node::File(data));
            }
            t => return Err(format!("{path}: unexpected type {t:?}")),
        }
    }
    Ok(())
}

/// Whether `found` is allowed by `versions`: a name present in some version (or
/// absent in some), of a kind some version has; a file's size one some version
/// has, each byte one some version has at that offset.
pub fn judge(path: &str, found: Option<&Node>, versions: &[&Tree]) -> Option<String> {
    let Some(found) = found else {
        if versions.iter().any(|t| !t.contains_key(path)) {
            return None;
        }
        return Some(format!("{path} is missing"));
    };
    let same: Vec<&Node> = versions
        .iter()
        .filter_map(|t| t.get(path))
        .filter(|n| std::mem::discriminant(*n) == std::mem::discriminant(found))
        .collect();
    if same.is_empty() {
        return Some(format!("{path}: {found:?} is in no allowed version"));
    }
    match found {
        Node::Dir => None,
        Node::Link(_) => (!same.contains(&found)).then(|| format!("{path}: wrong link target")),
        Node::File(d) => {
            let files: Vec<&Vec<u8>> = same
                .iter()
                .filter_map(|n| match n {
                    Node::File(v) => Some(v),
                    _ => None,
                })
                .collect();
            if !files.iter().any(|v| v.len() == d.len()) {
                let sizes: Vec<usize> = files.iter().map(|v| v.len()).collect();
                return Some(format!("{path}: size {} is none of {sizes:?}", d.len()));
            }
            for (i, &b) in d.iter().enumerate() {
                if !files.iter().any(|v| v.get(i) == Some(&b)) {
                    let had: Vec<u8> = files.iter().filter_map(|v| v.get(i).copied()).collect();
                    return Some(format!(
                        "{path} ({} bytes): byte {i} is {b:#04x}, no allowed version has it (they have {had:02x?}): stale bytes",
                        d.len()
                    ));
                }
            }
            None
        }
    }
}

impl Checker for ModelFs {
    fn name(&self) -> String {
        "model-fs".into()
    }

    fn check(&self, state: &StateView) -> dio_crash::Result<Verdict> {
        self.checked.fetch_add(1, Ordering::Relaxed);
        let at = state.spec().at;
        let where_ = self.history.op_name(at);
        let fs = match Ext::open(state.device(), state.size()) {
            Ok(fs) => fs,
            Err(e) => {
                return Ok(Verdict::Fail(format!(
                    "{where_}: the image does not open: {e}"
                )))
            }
        };
        let mut found = BTreeMap::new();
        if let Err(e) = walk(&fs, "", &mut found) {
            return Ok(Verdict::Fail(format!("{where_}: {e}")));
        }
        let versions = self.history.allowed(at);
        let mut paths: Vec<&String> = found.keys().collect();
        for t in &versions {
            paths.extend(t.keys());
        }
        paths.sort();
        paths.dedup();
        for p in paths {
            if let Some(why) = judge(p, found.get(p), &versions) {
                return Ok(Verdict::Fail(format!("{where_}: {why}")));
            }
        }
        Ok(Verdict::Pass)
    }
}

/// Runs the inner checker on one state in `every`, by count (e2fsck costs two
/// processes a state; the model checks every state).
pub struct Sampled<C> {
    pub inner: C,
    pub every: u64,
    pub seen: AtomicU64,
    pub ran: AtomicU64,
}

impl<C: Checker> Checker for Sampled<C> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn check(&self, state: &StateView) -> dio_crash::Result<Verdict> {
        if self.seen.fetch_add(1, Ordering::Relaxed) % self.every != 0 {
            return Ok(Verdict::Pass);
        }
        self.ran.fetch_add(1, Ordering::Relaxed);
        self.inner.check(state)
    }
}
