//! The model of the file under test.

use crate::report::WrongByte;

/// The model of the file: its size and bytes, plus the bytes a failed write may or
/// may not have left (each one is either the model's byte or one of these).
#[derive(Clone)]
pub(crate) struct Model {
    pub(crate) size: u64,
    pub(crate) data: Vec<u8>,
    maybe: Vec<(u64, Vec<u8>)>,
}

impl Model {
    pub(crate) fn new(span: u64) -> Model {
        Model {
            size: 0,
            data: vec![0; span as usize],
            maybe: Vec::new(),
        }
    }

    pub(crate) fn accepts(&self, at: u64, b: u8) -> bool {
        self.data[at as usize] == b
            || self
                .maybe
                .iter()
                .any(|(s, v)| at >= *s && at < s + v.len() as u64 && v[(at - s) as usize] == b)
    }

    pub(crate) fn candidates(&self, at: u64) -> Vec<u8> {
        let mut c = vec![self.data[at as usize]];
        for (s, v) in &self.maybe {
            if at >= *s && at < s + v.len() as u64 {
                let b = v[(at - s) as usize];
                if !c.contains(&b) {
                    c.push(b);
                }
            }
        }
        c
    }

    /// Forget the alternatives over `[a, b)`.
    pub(crate) fn cut(&mut self, a: u64, b: u64) {
        if self.maybe.is_empty() {
            return;
        }
        let mut out = Vec::new();
        for (s, v) in self.maybe.drain(..) {
            let e = s + v.len() as u64;
            if e <= a || s >= b {
                out.push((s, v));
                continue;
            }
            if s < a {
                out.push((s, v[..(a - s) as usize].to_vec()));
            }
            if e > b {
                out.push((b, v[(b - s) as usize..].to_vec()));
            }
        }
        self.maybe = out;
    }

    pub(crate) fn set(&mut self, at: u64, bytes: &[u8]) {
        self.data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        self.cut(at, at + bytes.len() as u64);
    }

    pub(crate) fn zero(&mut self, a: u64, b: u64) {
        let b = b.min(self.data.len() as u64);
        if a < b {
            self.data[a as usize..b as usize].fill(0);
            self.cut(a, b);
        }
    }

    pub(crate) fn might_be(&mut self, at: u64, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.maybe.push((at, bytes.to_vec()));
        }
    }
}

/// First byte of `got` (read at `off`) that no model allows.
pub(crate) fn first_wrong(models: &[&Model], off: u64, got: &[u8]) -> Option<WrongByte> {
    let ok = |i: usize| models.iter().any(|m| m.accepts(off + i as u64, got[i]));
    let first = (0..got.len()).find(|&i| !ok(i))?;
    let wrong = (first..got.len()).filter(|&i| !ok(i)).count() as u64;
    let at = off + first as u64;
    let mut expected = Vec::new();
    for m in models {
        for b in m.candidates(at) {
            if !expected.contains(&b) {
                expected.push(b);
            }
        }
    }
    Some(WrongByte {
        offset: at,
        got: got[first],
        expected,
        wrong,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_alternatives_are_cut_by_writes() {
        let mut m = Model::new(100);
        m.might_be(10, &[1; 20]);
        assert!(m.accepts(15, 1) && m.accepts(15, 0));
        m.set(12, &[2; 4]);
        assert!(!m.accepts(13, 1));
        assert!(m.accepts(11, 1) && m.accepts(16, 1));
        m.zero(0, 100);
        assert!(!m.accepts(11, 1));
    }
}
