//! Tracing (feature `tracing`): a subscriber of the test's own captures dio's spans
//! and events; the events name exactly the requests the RAM device logged (the
//! oracle), inside the span of the call that made them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dio::{
    AlignedBuf, DirectFile, FileState, Flags, Geometry, IdentityMap, MemDevice, MemDeviceConfig, Op,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// A span or event as captured: its name, fields, and for events the span it was
/// emitted in.
#[derive(Debug, Clone, Default)]
struct Rec {
    name: String,
    fields: HashMap<String, String>,
    parent: Option<u64>,
}

impl Rec {
    fn get(&self, k: &str) -> &str {
        self.fields.get(k).map_or("", |s| s.as_str())
    }
    fn num(&self, k: &str) -> u64 {
        self.get(k)
            .parse()
            .unwrap_or_else(|_| panic!("{k} in {self:?}"))
    }
}

impl Visit for Rec {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.fields
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.fields
            .insert(field.name().to_string(), value.to_string());
    }
}

#[derive(Default)]
struct Inner {
    next: AtomicU64,
    spans: Mutex<HashMap<u64, Rec>>,
    events: Mutex<Vec<Rec>>,
}

thread_local! {
    static STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// The subscriber: a handle on what it captured.
#[derive(Clone, Default)]
struct Capture(Arc<Inner>);

impl std::ops::Deref for Capture {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut rec = Rec {
            name: span.metadata().name().to_string(),
            ..Rec::default()
        };
        span.record(&mut rec);
        rec.parent = STACK.with(|s| s.borrow().last().copied());
        self.spans.lock().unwrap().insert(id, rec);
        Id::from_u64(id)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut rec = Rec {
            name: String::new(),
            ..Rec::default()
        };
        event.record(&mut rec);
        rec.name = rec.get("message").to_string();
        rec.parent = STACK.with(|s| s.borrow().last().copied());
        self.events.lock().unwrap().push(rec);
    }
    fn enter(&self, span: &Id) {
        STACK.with(|s| s.borrow_mut().push(span.into_u64()));
    }
    fn exit(&self, _: &Id) {
        STACK.with(|s| s.borrow_mut().pop());
    }
}

fn buf(len: usize, byte: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len, 4096);
    b.fill(byte);
    b
}

#[test]
fn spans_per_call_and_events_per_request_match_the_device_log() {
    let size = 1 << 20;
    let geo = Geometry::new(512, size).with_limits(16, 8192);
    let mem = Arc::new(MemDevice::new(
        MemDeviceConfig::new(size, 512).geometry(geo).log(),
    ));
    let map = Arc::new(IdentityMap::new(4096, size));
    let file = DirectFile::new(mem.clone(), map, Arc::new(FileState::new(size))).unwrap();
    let cap = Capture::default();
    tracing::subscriber::with_default(cap.clone(), || {
        // A write of 16 KiB: two requests of 8 KiB.
        file.write_at(8192, &buf(16384, 1), Flags::NONE).unwrap();
        // A read that fails on the device.
        mem.fail_range(0..4096, Some(Op::Read));
        assert!(file.read_at(0, &mut buf(4096, 0), Flags::NONE).is_err());
        mem.clear_faults();
        // A byte-granular write: engine calls nested in one another's spans or
        // side by side, every request inside one.
        file.write_at(100, b"hello", Flags::UNALIGNED).unwrap();
    });
    let spans = cap.spans.lock().unwrap().clone();
    let events = cap.events.lock().unwrap().clone();
    let calls: Vec<&Rec> = {
        let mut ids: Vec<&u64> = spans.keys().collect();
        ids.sort();
        ids.into_iter().map(|id| &spans[id]).collect()
    };
    assert!(calls.iter().all(|s| s.name == "dio.call"), "{calls:?}");
    let first = calls[0];
    assert_eq!(
        (
            first.get("op"),
            first.num("offset"),
            first.num("len"),
            first.get("device")
        ),
        ("write", 8192, 16384, "mem")
    );
    assert_eq!((calls[1].get("op"), calls[1].num("len")), ("read", 4096));
    assert!(
        calls.len() >= 3,
        "the byte-granular write made no call: {calls:?}"
    );
    let file_id = first.get("file");
    assert!(calls.iter().all(|s| s.get("file") == file_id));

    // Every request the device saw, as a submit event, in order, inside a call.
    let submits: Vec<&Rec> = events.iter().filter(|e| e.name == "dio.submit").collect();
    let completes: Vec<&Rec> = events.iter().filter(|e| e.name == "dio.complete").collect();
    let log = mem.log();
    assert_eq!(submits.len(), log.len(), "{submits:?} vs {log:?}");
    assert_eq!(completes.len(), log.len());
    for (e, r) in submits.iter().zip(&log) {
        let op = if r.op == Op::Read { "read" } else { "write" };
        assert_eq!(
            (e.get("op"), e.num("dev_offset"), e.num("len")),
            (op, r.offset, r.len)
        );
        assert!(e.parent.is_some_and(|p| spans.contains_key(&p)), "{e:?}");
    }
    assert_eq!(
        (submits[0].num("dev_offset"), submits[1].num("dev_offset")),
        (8192, 16384)
    );
    assert_eq!(submits[0].num("file_offset"), 8192);
    // Completions: 0 for success, EIO for the failed read.
    let errors: Vec<u64> = completes.iter().map(|e| e.num("error")).collect();
    assert_eq!(errors.iter().filter(|&&e| e == libc::EIO as u64).count(), 1);
    assert_eq!(errors[2], libc::EIO as u64, "{completes:?}");
}
