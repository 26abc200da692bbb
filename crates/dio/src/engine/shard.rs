//! Counters that many threads write: one cache line per shard, each thread adds to
//! its own shard, and a reader sums them. A per-file count that every call writes
//! would otherwise be one line bouncing between the cores of every thread doing I/O
//! on the file (the engine's in-flight count, its byte counters).

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Shards per counter: a thread takes the lowest shard no live thread holds, and
/// gives it back when it exits, so up to this many threads doing I/O at once never
/// share one; more share (a thread that finds every shard taken gets one in turn).
pub(crate) const SHARDS: usize = 16;

/// One shard on a line of its own (128 bytes: the adjacent-line prefetcher pairs
/// 64-byte lines).
#[derive(Default)]
#[repr(align(128))]
struct Line(AtomicU64);

/// A counter split in [`SHARDS`] lines.
#[derive(Default)]
pub(crate) struct Sharded(Box<[Line; SHARDS]>);

impl std::fmt::Debug for Sharded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.sum(Ordering::Relaxed))
    }
}

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Gives the thread's shard back when the thread exits.
    static HELD: Held = const { Held(Cell::new(usize::MAX)) };
}

/// Shards held by live threads, one bit each.
static TAKEN: AtomicU32 = AtomicU32::new(0);

/// A thread's hold on its shard (see [`SHARDS`]).
struct Held(Cell<usize>);

impl Drop for Held {
    fn drop(&mut self) {
        let v = self.0.get();
        if v < SHARDS {
            TAKEN.fetch_and(!(1 << v), Ordering::Relaxed);
        }
    }
}

/// The calling thread's shard.
#[inline]
pub(crate) fn shard() -> usize {
    // A const-initialised Cell has no destructor: `with` works at any point of
    // the thread's life, also in other thread-locals' destructors (after `HELD`
    // gave the shard back, the thread keeps using it: a shard shared for a while
    // costs time, never a wrong count).
    SHARD.with(|s| {
        let v = s.get();
        if v < SHARDS {
            v
        } else {
            first_shard(s)
        }
    })
}

#[cold]
fn first_shard(s: &Cell<usize>) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let free = TAKEN.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
        (t != (1 << SHARDS) - 1).then(|| t | 1 << (!t).trailing_zeros())
    });
    let v = match free {
        Ok(t) => {
            let v = (!t).trailing_zeros() as usize;
            // Held until the thread exits (if its thread-locals are being torn
            // down already, the shard stays taken for good: a shard lost, no more).
            let _ = HELD.try_with(|h| h.0.set(v));
            v
        }
        Err(_) => NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS,
    };
    s.set(v);
    v
}

impl Sharded {
    /// The shard `i`'s counter.
    #[inline]
    pub(crate) fn at(&self, i: usize) -> &AtomicU64 {
        &self.0[i % SHARDS].0
    }

    /// Add `n` on the calling thread's shard.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.at(shard()).fetch_add(n, Ordering::Relaxed);
    }

    /// The sum of every shard (wrapping: one shard may be counted down by a thread
    /// other than the one that counted it up, for callers that track a shard).
    pub(crate) fn sum(&self, order: Ordering) -> u64 {
        self.0
            .iter()
            .fold(0u64, |s, l| s.wrapping_add(l.0.load(order)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_sum_what_every_thread_added() {
        let c = Sharded::default();
        std::thread::scope(|s| {
            for t in 0..40u64 {
                let c = &c;
                s.spawn(move || {
                    for _ in 0..1000 {
                        c.add(t);
                    }
                });
            }
        });
        assert_eq!(c.sum(Ordering::Relaxed), 1000 * (0..40).sum::<u64>());
        // A thread alive throughout, and SHARDS - 1 threads that come and go: a
        // thread started then does not share the first one's shard (given out in
        // turn, modulo SHARDS, it would: the threads that exited used the others).
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let first = std::thread::spawn(move || {
            tx.send(shard()).unwrap();
            stop_rx.recv().unwrap();
        });
        let a = rx.recv().unwrap();
        for _ in 0..SHARDS - 1 {
            std::thread::spawn(shard).join().unwrap();
        }
        let b = std::thread::spawn(shard).join().unwrap();
        stop_tx.send(()).unwrap();
        first.join().unwrap();
        assert_ne!(a, b);
    }
}
