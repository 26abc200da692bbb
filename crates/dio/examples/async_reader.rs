//! Many reads in flight through the `Future` API: first with no executor at all
//! (a hand-written `block_on` over `std::task`), then with tokio.
//!
//! A `DioFuture` is completed by whichever thread reaps the device; it wakes the
//! task that polled it. On a device whose completions must be polled (io_uring),
//! polling the future reaps the device too, so no background thread is needed.
//!
//! Run: `cargo run --example async_reader [FILE]` (default: a RAM device with
//! 200 µs completion latency; with FILE: a host file read with io_uring).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use dio::{
    AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig, Result,
};

const BS: usize = 64 * 1024;
const IN_FLIGHT: usize = 32;

/// The smallest executor: park the thread until the future's waker unparks it.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        thread::park();
    }
}

/// Read the whole file, IN_FLIGHT requests at a time, awaiting the oldest.
async fn read_all(file: &DirectFile) -> Result<u64> {
    let size = file.size();
    let align = file.geometry().buffer_align();
    let mut next = 0u64;
    let mut total = 0u64;
    let mut queue = std::collections::VecDeque::new();
    loop {
        while queue.len() < IN_FLIGHT && next < size {
            queue.push_back(file.read_future(next, vec![AlignedBuf::new(BS, align)], Flags::NONE));
            next += BS as u64;
        }
        let Some(fut) = queue.pop_front() else { break };
        let done = fut.await;
        total += done.result? as u64;
    }
    Ok(total)
}

fn open() -> Result<(DirectFile, Option<dio::RawFile>)> {
    if let Some(path) = std::env::args().nth(1) {
        let raw = dio::RawFile::open(path, &dio::RawOptions::default())?;
        return Ok((raw.direct().clone(), Some(raw)));
    }
    let size = 64 << 20;
    let dev = Arc::new(MemDevice::new(MemDeviceConfig::new(size, 512).threaded(
        Some(Duration::from_micros(200)),
        true,
        1,
    )));
    let file = DirectFile::new(
        dev,
        Arc::new(IdentityMap::new(4096, size)),
        Arc::new(FileState::new(size)),
    )?;
    Ok((file, None))
}

fn main() -> Result<()> {
    let (file, _raw) = open()?;
    let t = Instant::now();
    let n = block_on(read_all(&file))?;
    println!(
        "no executor: read {n} bytes in {:?}, {IN_FLIGHT} requests in flight",
        t.elapsed()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let t = Instant::now();
    let n = rt.block_on(read_all(&file))?;
    println!("tokio:       read {n} bytes in {:?}", t.elapsed());
    Ok(())
}
