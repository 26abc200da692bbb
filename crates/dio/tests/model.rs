//! Random sequences of reads, writes and truncates at mixed alignments, sync and
//! async, on a RAM device pre-filled with 0xAA, checked against a byte-array model.

mod common;

use std::time::Duration;

use common::{pattern, rig_with, STALE};
use dio::MemDeviceConfig;
use dio::{AlignedBuf, Flags, TestMapConfig};
use proptest::prelude::*;

const SPAN: u64 = 256 * 1024;

#[derive(Debug, Clone)]
enum Step {
    Write {
        off: u64,
        len: u64,
        seed: u8,
        async_: bool,
        flags: u8,
    },
    Read {
        off: u64,
        len: u64,
        async_: bool,
    },
    Reads(Vec<(u64, u64)>),
    Truncate(u64),
}

fn unit() -> impl Strategy<Value = u64> {
    prop_oneof![Just(512u64), Just(4096u64), Just(1024u64)]
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (unit(), 0..SPAN / 512, 1..64u64).prop_map(|(u, o, l)| ((o * 512) / u * u, l * u))
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (range(), any::<u8>(), any::<bool>(), 0..4u8)
            .prop_map(|((off, len), seed, async_, flags)| Step::Write { off, len, seed, async_, flags }),
        4 => (range(), any::<bool>()).prop_map(|((off, len), async_)| Step::Read { off, len, async_ }),
        1 => prop::collection::vec(range(), 2..8).prop_map(Step::Reads),
        1 => (0..SPAN).prop_map(Step::Truncate),
    ]
}

fn check_read(
    model: &[u8],
    off: u64,
    len: u64,
    got: dio::Result<usize>,
    buf: &[u8],
) -> Result<(), TestCaseError> {
    let size = model.len() as u64;
    let want = if off >= size {
        0
    } else {
        len.min(size - off) as usize
    };
    let n = got.map_err(|e| TestCaseError::fail(format!("read {off}+{len}: {e}")))?;
    prop_assert_eq!(
        n,
        want,
        "read {}+{} returned {}, size {}",
        off,
        len,
        n,
        size
    );
    let o = off as usize;
    if let Some(i) = (0..n).find(|&i| buf[i] != model[o + i]) {
        let stale = if buf[i] == STALE { " (stale 0xAA)" } else { "" };
        return Err(TestCaseError::fail(format!(
            "read {off}+{len}: byte {} is {:#x}, model {:#x}{stale}",
            o + i,
            buf[i],
            model[o + i]
        )));
    }
    Ok(())
}

fn run(steps: Vec<Step>, threaded: bool, seed: u64) -> Result<(), TestCaseError> {
    let mut cfg = MemDeviceConfig::new(8 << 20, 512).fill(STALE);
    if threaded {
        cfg = cfg.threaded(Some(Duration::from_micros(5)), true, seed);
    }
    let r = rig_with(cfg, TestMapConfig::new(4096, 2048), 0);
    let file = &r.file;
    let mut model: Vec<u8> = Vec::new();
    for s in steps {
        match s {
            Step::Write {
                off,
                len,
                seed,
                async_,
                flags,
            } => {
                let data = pattern(len as usize, seed);
                let mut f = Flags::NONE;
                if flags & 1 != 0 {
                    f |= Flags::DSYNC;
                }
                if flags & 2 != 0 {
                    f |= Flags::ASYNC_EXTEND | Flags::LOCKING;
                }
                let n = if async_ {
                    file.write_future(off, vec![data.clone()], f).wait().result
                } else {
                    file.write_at(off, &data, f)
                };
                let n = n.map_err(|e| TestCaseError::fail(format!("write {off}+{len}: {e}")))?;
                prop_assert_eq!(n as u64, len);
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
                prop_assert_eq!(file.size(), model.len() as u64);
            }
            Step::Read { off, len, async_ } => {
                if async_ {
                    let c = file
                        .read_future(off, vec![AlignedBuf::new(len as usize, 512)], Flags::NONE)
                        .wait();
                    check_read(&model, off, len, c.result, &c.bufs[0])?;
                } else {
                    let mut b = AlignedBuf::new(len as usize, 512);
                    let got = file.read_at(off, &mut b, Flags::LOCKING);
                    check_read(&model, off, len, got, &b)?;
                }
            }
            Step::Reads(list) => {
                let futs: Vec<_> = list
                    .iter()
                    .map(|&(off, len)| {
                        file.read_future(off, vec![AlignedBuf::new(len as usize, 512)], Flags::NONE)
                    })
                    .collect();
                for (f, &(off, len)) in futs.into_iter().zip(&list) {
                    let c = f.wait();
                    check_read(&model, off, len, c.result, &c.bufs[0])?;
                }
            }
            Step::Truncate(size) => {
                file.truncate(size)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.resize(size as usize, 0);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(96), ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_byte_model_inline(steps in prop::collection::vec(step(), 1..40)) {
        run(steps, false, 1)?;
    }

    #[test]
    fn engine_matches_byte_model_threaded_reordered(steps in prop::collection::vec(step(), 1..40), seed in 1..1000u64) {
        run(steps, true, seed)?;
    }
}
