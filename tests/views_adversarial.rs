//! Adversarial tests of the memory views (guarantees 7, 16 and 18, "Cargo features"): random
//! sequences of every safe call on plain and zeroed allocations (`uninit_mut`,
//! `buffers_uninit_mut`, `iter`, `buffer`, `into_filled`, `set_filled`, the filled views,
//! `std::io::Write`, `read_from` with hostile readers and, with `bytes`, `BufMut`, tokio's
//! `read_buf` with hostile `AsyncRead`s, `freeze`, `Bytes::from`) checked against a model of
//! what each byte holds; zeroed waiters served by a release of a dirty block; `Bytes` clones
//! outliving their pool's handle on other threads; owned allocations after the last
//! `Arc<BufPool>`; every buffer size at its edges.
//!
//! Miri is the main oracle (a read of an uninitialised byte is reported before a model
//! assertion could fail):
//! `MIRIFLAGS=-Zmiri-strict-provenance cargo +nightly miri test --test views_adversarial`.

mod common;

use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::Arc;
use std::sync::mpsc;
use std::task::Poll;
use std::thread;
use std::time::Duration;

#[cfg(feature = "bytes")]
use bytes::{BufMut, Bytes, BytesMut};
use common::{
    Rng, assert_full_budget_back, assert_idle, poll_once, rounds, wait_waiting, watchdog,
};
use membudget::{BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, FilledAllocation};
#[cfg(feature = "bytes")]
use std::future::Future;

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

/// What the crate promises about one allocation, and what the test knows each byte holds.
#[derive(Clone, Debug)]
struct Model {
    cap: usize,
    bs: usize,
    /// What each byte holds, `None` when it may be uninitialised (or holds an unknown value).
    mem: Vec<Option<u8>>,
    /// The block still counts as zeroed (no uninitialised view taken).
    zeroed: bool,
    /// In the filled form: the initialised prefix the crate tracks, and the filled length.
    init: usize,
    filled: usize,
}

impl Model {
    fn new(cap: usize, bs: usize, zeroed: bool) -> Self {
        Model {
            cap,
            bs,
            mem: vec![if zeroed { Some(0) } else { None }; cap],
            zeroed,
            init: 0,
            filled: 0,
        }
    }

    fn write(&mut self, at: usize, len: usize, byte: u8) {
        for slot in &mut self.mem[at..at + len] {
            *slot = Some(byte);
        }
    }

    /// `into_filled`.
    fn enter_filled(&mut self) {
        self.init = if self.zeroed { self.cap } else { 0 };
        self.filled = 0;
    }

    /// Appends `len` bytes of `byte` through the cursor (as `extend_from_slice`, `fill`,
    /// `put_slice`, a read): returns how many fit.
    fn append(&mut self, len: usize, byte: u8) -> usize {
        let w = len.min(self.cap - self.filled);
        let at = self.filled;
        self.write(at, w, byte);
        self.filled += w;
        self.init = self.init.max(self.filled);
        w
    }

    /// `read_from`'s zeroing of what was never initialised.
    fn zero_rest(&mut self) {
        for slot in &mut self.mem[self.init..] {
            *slot = Some(0);
        }
        self.init = self.cap;
    }

    fn known(&self, range: std::ops::Range<usize>, what: &str) -> Vec<u8> {
        self.mem[range.clone()]
            .iter()
            .enumerate()
            .map(|(i, b)| {
                b.unwrap_or_else(|| {
                    panic!(
                        "{what}: byte {} is exposed but was never written ({self:?})",
                        range.start + i
                    )
                })
            })
            .collect()
    }
}

enum Form {
    Alloc(BufPoolAllocation),
    Filled(FilledAllocation),
    /// Consumed (`freeze`), or in the middle of a conversion.
    Gone,
}

impl Form {
    fn filled(&mut self, m: &mut Model) -> &mut FilledAllocation {
        if let Form::Alloc(_) = self {
            let Form::Alloc(a) = std::mem::replace(self, Form::Gone) else {
                unreachable!()
            };
            *self = Form::Filled(a.into_filled());
            m.enter_filled();
        }
        match self {
            Form::Filled(f) => f,
            _ => unreachable!(),
        }
    }

    fn alloc(&mut self) -> &mut BufPoolAllocation {
        if let Form::Filled(_) = self {
            let Form::Filled(f) = std::mem::replace(self, Form::Gone) else {
                unreachable!()
            };
            *self = Form::Alloc(f.into_allocation());
        }
        match self {
            Form::Alloc(a) => a,
            _ => unreachable!(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Checks after every step
// ---------------------------------------------------------------------------------------

fn check_alloc(a: &BufPoolAllocation, m: &Model) {
    assert_eq!(a.allocated_bytes(), m.cap);
    assert_eq!(a.buffer_size(), m.bs);
    assert_eq!(a.length(), m.cap / m.bs);
    assert!(!a.first().is_null());
    assert_eq!(a.first().addr() % m.bs.min(16), 0, "alignment");
    let ptrs: Vec<_> = a.iter().collect();
    assert_eq!(ptrs.len(), a.length());
    assert_eq!(a.iter().len(), a.length());
    for (i, p) in ptrs.iter().enumerate() {
        assert_eq!(p.addr(), a.first().addr() + i * m.bs);
        assert_eq!(a.buffer(i), Some(*p));
    }
    assert_eq!(a.buffer(a.length()), None);
    assert_eq!(a.buffer(usize::MAX), None);
    let back: Vec<_> = a.iter().rev().collect();
    assert_eq!(back.iter().rev().copied().collect::<Vec<_>>(), ptrs);
    assert_eq!(a.into_iter().count(), a.length());
    let _ = format!("{a:?}");
}

fn check_filled(f: &mut FilledAllocation, m: &Model) {
    assert!(m.filled <= m.init && m.init <= m.cap, "model: {m:?}");
    assert_eq!(f.capacity(), m.cap);
    assert_eq!(f.remaining(), m.cap - m.filled);
    assert_eq!(f.len(), m.filled);
    let expect = m.known(0..m.filled, "filled()");
    assert_eq!(f.filled(), &expect[..]);
    assert_eq!(&f[..], &expect[..]);
    assert_eq!(f.as_ref(), &expect[..]);
    assert_eq!(f.filled_mut(), &expect[..]);
    let pieces: Vec<&[u8]> = f.buffers().collect();
    assert!(pieces.iter().all(|p| p.len() <= m.bs && !p.is_empty()));
    assert_eq!(pieces.concat(), expect);
    let slices = f.io_slices();
    assert_eq!(slices.len(), m.filled.div_ceil(m.bs));
    assert_eq!(
        slices
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect::<Vec<_>>(),
        expect
    );
    drop(slices);
    #[cfg(feature = "bytes")]
    {
        assert_eq!(f.remaining_mut(), m.cap - m.filled);
        assert_eq!(
            f.chunk_mut().len(),
            m.cap - m.filled,
            "chunk_mut is all the rest"
        );
        assert_eq!(f.has_remaining_mut(), m.filled < m.cap);
    }
    // Probe what the crate counts as initialised: exactly the model's prefix.
    assert!(
        f.set_filled(m.init),
        "set_filled({}) refused: {m:?}",
        m.init
    );
    let all = m.known(0..m.init, "set_filled(init)");
    assert_eq!(f.filled(), &all[..]);
    if m.init < m.cap {
        assert!(
            !f.set_filled(m.init + 1),
            "set_filled past init accepted: {m:?}"
        );
        assert_eq!(f.len(), m.init, "a refused set_filled changed the length");
    }
    assert!(!f.set_filled(m.cap + 1));
    assert!(!f.set_filled(usize::MAX));
    assert!(f.set_filled(m.filled));
    let _ = format!("{f:?}");
}

fn check(form: &mut Form, m: &Model) {
    match form {
        Form::Alloc(a) => check_alloc(a, m),
        Form::Filled(f) => check_filled(f, m),
        Form::Gone => {}
    }
}

// ---------------------------------------------------------------------------------------
// Hostile readers
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum ReaderKind {
    /// Writes `n` bytes (as many as fit) and says so.
    Data(usize, u8),
    /// `Ok(0)`.
    Eof,
    /// Writes `n` bytes, reports `len + extra` (a bug in the reader).
    OverReport(usize, u8, usize),
    /// Writes `n` bytes, then fails.
    Error(usize, u8),
    /// Writes, reports `Interrupted`, then on the retry writes again and reports that.
    Interrupted(usize, u8, usize, u8),
    /// Writes `n` bytes, then panics.
    Panic(usize, u8),
}

/// A `std::io::Read` that reads the whole buffer it is given before it writes (it must see
/// the bytes the model knows), and misbehaves as `kind` says.
struct HostileReader {
    kind: ReaderKind,
    expected: Vec<u8>,
    calls: usize,
}

impl HostileReader {
    fn put(&mut self, buf: &mut [u8], n: usize, byte: u8) -> usize {
        let w = n.min(buf.len());
        buf[..w].fill(byte);
        self.expected[..w].fill(byte);
        w
    }
}

impl Read for HostileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        assert_eq!(
            buf.len(),
            self.expected.len(),
            "the reader got the unfilled part"
        );
        // Reads every byte it is given (Miri: each must be initialised).
        assert_eq!(&*buf, &self.expected[..], "the reader saw unexpected bytes");
        match self.kind {
            ReaderKind::Data(n, b) => Ok(self.put(buf, n, b)),
            ReaderKind::Eof => Ok(0),
            ReaderKind::OverReport(n, b, extra) => {
                self.put(buf, n, b);
                Ok(buf.len() + extra)
            }
            ReaderKind::Error(n, b) => {
                self.put(buf, n, b);
                Err(io::Error::other("hostile"))
            }
            ReaderKind::Interrupted(n1, b1, n2, b2) => {
                if self.calls == 1 {
                    self.put(buf, n1, b1);
                    Err(io::ErrorKind::Interrupted.into())
                } else {
                    Ok(self.put(buf, n2, b2))
                }
            }
            ReaderKind::Panic(n, b) => {
                self.put(buf, n, b);
                panic!("hostile reader panics mid-read");
            }
        }
    }
}

fn do_read_from(f: &mut FilledAllocation, m: &mut Model, kind: ReaderKind) {
    if m.filled == m.cap {
        let mut reader = HostileReader {
            kind,
            expected: Vec::new(),
            calls: 0,
        };
        assert_eq!(f.read_from(&mut reader).unwrap(), 0);
        assert_eq!(reader.calls, 0, "a full allocation calls no reader");
        return;
    }
    m.zero_rest();
    let expected = m.known(m.filled..m.cap, "the reader's buffer");
    let offered = expected.len();
    let mut reader = HostileReader {
        kind,
        expected,
        calls: 0,
    };
    let result = catch_unwind(AssertUnwindSafe(|| f.read_from(&mut reader)));
    let at = m.filled;
    let wrote = |m: &mut Model, n: usize, b: u8| {
        let w = n.min(offered);
        m.write(at, w, b);
        w
    };
    match kind {
        ReaderKind::Data(n, b) => {
            let w = wrote(m, n, b);
            assert_eq!(result.unwrap().unwrap(), w);
            m.filled += w;
        }
        ReaderKind::Eof => assert_eq!(result.unwrap().unwrap(), 0),
        ReaderKind::OverReport(n, b, _) => {
            wrote(m, n, b);
            let error = result.unwrap().unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        }
        ReaderKind::Error(n, b) => {
            wrote(m, n, b);
            let error = result.unwrap().unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::Other);
        }
        ReaderKind::Interrupted(n1, b1, n2, b2) => {
            wrote(m, n1, b1);
            let w = wrote(m, n2, b2);
            assert_eq!(result.unwrap().unwrap(), w);
            assert_eq!(reader.calls, 2, "Interrupted is retried");
            m.filled += w;
        }
        ReaderKind::Panic(n, b) => {
            wrote(m, n, b);
            assert!(result.is_err(), "the reader's panic is passed on");
        }
    }
}

#[cfg(feature = "bytes")]
mod async_readers {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Waker};
    use tokio::io::{AsyncRead, ReadBuf};

    #[derive(Clone, Copy, Debug)]
    pub enum AsyncKind {
        Data(usize, u8),
        PendingThenData(usize, u8),
        /// `initialize_unfilled_to(k)` (zeros), then writes and reports only `n <= k`.
        InitThenLess(usize, usize, u8),
        Error(usize, u8),
        Panic(usize, u8),
        Eof,
    }

    pub struct HostileAsync {
        pub kind: AsyncKind,
        pub polls: usize,
    }

    impl AsyncRead for HostileAsync {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.polls += 1;
            // Everything safe code may look at must be initialised.
            std::hint::black_box(buf.initialized().iter().map(|&b| b as usize).sum::<usize>());
            assert!(buf.filled().is_empty());
            let room = buf.remaining();
            let put = |buf: &mut ReadBuf<'_>, n: usize, b: u8| {
                let w = n.min(room);
                buf.put_slice(&vec![b; w]);
            };
            match self.kind {
                AsyncKind::Data(n, b) => put(buf, n, b),
                AsyncKind::PendingThenData(n, b) => {
                    if self.polls == 1 {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    put(buf, n, b);
                }
                AsyncKind::InitThenLess(k, n, b) => {
                    let k = k.min(room);
                    let n = n.min(k);
                    let init = buf.initialize_unfilled_to(k);
                    assert!(init.iter().all(|&x| x == 0));
                    init[..n].fill(b);
                    buf.advance(n);
                }
                AsyncKind::Error(n, b) => {
                    put(buf, n, b);
                    return Poll::Ready(Err(io::Error::other("hostile async")));
                }
                AsyncKind::Panic(n, b) => {
                    put(buf, n, b);
                    panic!("hostile AsyncRead panics mid-read");
                }
                AsyncKind::Eof => {}
            }
            Poll::Ready(Ok(()))
        }
    }

    /// tokio's `read_buf(&mut filled)` with `kind`, polled by hand (no runtime needed).
    pub fn do_read_buf(f: &mut FilledAllocation, m: &mut Model, kind: AsyncKind) {
        use tokio::io::AsyncReadExt;
        let mut reader = HostileAsync { kind, polls: 0 };
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut fut = pin!(reader.read_buf(f));
            let mut cx = Context::from_waker(Waker::noop());
            for _ in 0..4 {
                if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                    return out;
                }
            }
            panic!("read_buf never finished");
        }));
        if m.filled == m.cap {
            assert_eq!(result.unwrap().unwrap(), 0);
            assert_eq!(reader.polls, 0, "a full allocation polls no reader");
            return;
        }
        let room = m.cap - m.filled;
        let at = m.filled;
        match kind {
            AsyncKind::Data(n, b) | AsyncKind::PendingThenData(n, b) => {
                let w = n.min(room);
                m.write(at, w, b);
                assert_eq!(result.unwrap().unwrap(), w);
                m.filled += w;
                m.init = m.init.max(m.filled);
            }
            AsyncKind::InitThenLess(k, n, b) => {
                let k = k.min(room);
                let n = n.min(k);
                m.write(at, k, 0);
                m.write(at, n, b);
                assert_eq!(result.unwrap().unwrap(), n);
                m.filled += n;
                m.init = m.init.max(m.filled);
            }
            AsyncKind::Error(n, b) => {
                m.write(at, n.min(room), b);
                assert!(result.unwrap().is_err());
            }
            AsyncKind::Panic(n, b) => {
                m.write(at, n.min(room), b);
                assert!(result.is_err());
            }
            AsyncKind::Eof => assert_eq!(result.unwrap().unwrap(), 0),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Random sequences
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Op {
    Whole(usize, Option<u8>),
    WholeFill(Option<u8>),
    Buffers(usize, usize, Option<u8>),
    Extend(usize, u8),
    Fill(u8, usize),
    Write(usize, u8),
    WriteAll(usize, u8),
    WriteVectored([usize; 3], u8),
    ReadFrom(ReaderKind),
    Clear,
    SetFilled(usize),
    FilledMut(u8),
    Refill,
    ToAlloc,
    #[cfg(feature = "bytes")]
    PutSlice(usize, u8),
    #[cfg(feature = "bytes")]
    PutBytes(u8, usize),
    #[cfg(feature = "bytes")]
    ChunkWrite(usize, u8, bool),
    #[cfg(feature = "bytes")]
    AdvancePastEnd,
    #[cfg(feature = "bytes")]
    ReadBuf(async_readers::AsyncKind),
    /// Terminal: `freeze` (or `Bytes::from`), then reads of clones and slices.
    #[cfg(feature = "bytes")]
    Freeze(bool),
}

fn random_op(rng: &mut Rng, cap: usize, bs: usize) -> Op {
    let len = |rng: &mut Rng| rng.range(0, cap + 2);
    let pos = |rng: &mut Rng| rng.range(0, cap - 1);
    let val = |rng: &mut Rng| {
        if rng.range(0, 1) == 0 {
            None
        } else {
            Some(rng.next() as u8)
        }
    };
    let byte = |rng: &mut Rng| (rng.next() as u8) | 1;
    let kinds = if cfg!(feature = "bytes") { 21 } else { 15 };
    match rng.range(0, kinds - 1) {
        0 => Op::Whole(pos(rng), val(rng)),
        1 => Op::WholeFill(val(rng)),
        2 => Op::Buffers(rng.range(0, cap / bs - 1), rng.range(0, bs - 1), val(rng)),
        3 => Op::Extend(len(rng), byte(rng)),
        4 => Op::Fill(byte(rng), len(rng)),
        5 => Op::Write(len(rng), byte(rng)),
        6 => Op::WriteAll(len(rng), byte(rng)),
        7 => Op::WriteVectored([len(rng) / 2, len(rng) / 2, len(rng)], byte(rng)),
        8 | 9 => Op::ReadFrom(match rng.range(0, 6) {
            0 | 1 => ReaderKind::Data(len(rng), byte(rng)),
            2 => ReaderKind::Eof,
            3 => ReaderKind::OverReport(len(rng), byte(rng), rng.range(1, 3)),
            4 => ReaderKind::Error(len(rng), byte(rng)),
            5 => ReaderKind::Interrupted(len(rng), byte(rng), len(rng), byte(rng)),
            _ => ReaderKind::Panic(len(rng), byte(rng)),
        }),
        10 => Op::Clear,
        11 => Op::SetFilled(len(rng)),
        12 => Op::FilledMut(byte(rng)),
        13 => Op::Refill,
        14 => Op::ToAlloc,
        #[cfg(feature = "bytes")]
        15 => Op::PutSlice(len(rng), byte(rng)),
        #[cfg(feature = "bytes")]
        16 => Op::PutBytes(byte(rng), len(rng)),
        #[cfg(feature = "bytes")]
        17 => Op::ChunkWrite(len(rng), byte(rng), rng.range(0, 1) == 0),
        #[cfg(feature = "bytes")]
        18 => {
            if rng.range(0, 3) == 0 {
                Op::AdvancePastEnd
            } else {
                Op::Freeze(rng.range(0, 1) == 0)
            }
        }
        #[cfg(feature = "bytes")]
        19 | 20 => {
            use async_readers::AsyncKind;
            Op::ReadBuf(match rng.range(0, 5) {
                0 => AsyncKind::Data(len(rng), byte(rng)),
                1 => AsyncKind::PendingThenData(len(rng), byte(rng)),
                2 => AsyncKind::InitThenLess(len(rng), len(rng), byte(rng)),
                3 => AsyncKind::Error(len(rng), byte(rng)),
                4 => AsyncKind::Panic(len(rng), byte(rng)),
                _ => AsyncKind::Eof,
            })
        }
        _ => unreachable!(),
    }
}

fn write_val(slot: &mut MaybeUninit<u8>, val: Option<u8>) {
    *slot = match val {
        Some(b) => MaybeUninit::new(b),
        None => MaybeUninit::uninit(),
    };
}

/// Applies `op`; returns `false` if it consumed the allocation.
fn apply(pool: &BufPool, form: &mut Form, m: &mut Model, op: Op, rng: &mut Rng) -> bool {
    match op {
        Op::Whole(pos, val) => {
            write_val(&mut form.alloc().uninit_mut()[pos], val);
            m.zeroed = false;
            m.mem[pos] = val;
        }
        Op::WholeFill(val) => {
            let view = form.alloc().uninit_mut();
            assert_eq!(view.len(), m.cap);
            for slot in view {
                write_val(slot, val);
            }
            m.zeroed = false;
            m.mem.fill(val);
        }
        Op::Buffers(buffer, offset, val) => {
            let a = form.alloc();
            let mut count = 0;
            for (i, view) in a.buffers_uninit_mut().enumerate() {
                assert_eq!(view.len(), m.bs);
                count += 1;
                if i == buffer {
                    write_val(&mut view[offset], val);
                }
            }
            assert_eq!(count, m.cap / m.bs);
            m.zeroed = false;
            m.mem[buffer * m.bs + offset] = val;
        }
        Op::Extend(len, b) => {
            let f = form.filled(m);
            let w = f.extend_from_slice(&vec![b; len]);
            assert_eq!(w, m.append(len, b));
        }
        Op::Fill(b, count) => {
            let f = form.filled(m);
            assert_eq!(f.fill(b, count), m.append(count, b));
        }
        Op::Write(len, b) => {
            let f = form.filled(m);
            let w = f.write(&vec![b; len]).unwrap();
            assert_eq!(w, m.append(len, b));
            f.flush().unwrap();
        }
        Op::WriteAll(len, b) => {
            let f = form.filled(m);
            let result = f.write_all(&vec![b; len]);
            let room = m.cap - m.filled;
            m.append(len, b);
            if len > room {
                assert_eq!(result.unwrap_err().kind(), io::ErrorKind::WriteZero);
            } else {
                result.unwrap();
            }
        }
        Op::WriteVectored(lens, b) => {
            let f = form.filled(m);
            let bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![b; l]).collect();
            let slices: Vec<IoSlice<'_>> = bufs.iter().map(|v| IoSlice::new(v)).collect();
            let w = f.write_vectored(&slices).unwrap();
            let mut expect = 0;
            for &l in &lens {
                let n = m.append(l, b);
                expect += n;
                if n < l {
                    break;
                }
            }
            assert_eq!(w, expect);
        }
        Op::ReadFrom(kind) => {
            let f = form.filled(m);
            do_read_from(f, m, kind);
        }
        Op::Clear => {
            form.filled(m).clear();
            m.filled = 0;
        }
        Op::SetFilled(len) => {
            let f = form.filled(m);
            let accepted = f.set_filled(len);
            assert_eq!(accepted, len <= m.init, "set_filled({len}): {m:?}");
            if accepted {
                m.filled = len;
            }
        }
        Op::FilledMut(b) => {
            let f = form.filled(m);
            f.filled_mut().fill(b);
            let filled = m.filled;
            m.write(0, filled, b);
        }
        Op::Refill => {
            form.alloc();
            form.filled(m);
        }
        Op::ToAlloc => {
            form.alloc();
        }
        #[cfg(feature = "bytes")]
        Op::PutSlice(len, b) => {
            let f = form.filled(m);
            let room = m.cap - m.filled;
            let result = catch_unwind(AssertUnwindSafe(|| f.put_slice(&vec![b; len])));
            if len > room {
                assert!(result.is_err(), "put_slice past the end must panic");
            } else {
                result.unwrap();
                m.append(len, b);
            }
        }
        #[cfg(feature = "bytes")]
        Op::PutBytes(b, count) => {
            let f = form.filled(m);
            let room = m.cap - m.filled;
            let result = catch_unwind(AssertUnwindSafe(|| f.put_bytes(b, count)));
            if count > room {
                assert!(result.is_err(), "put_bytes past the end must panic");
            } else {
                result.unwrap();
                m.append(count, b);
            }
        }
        #[cfg(feature = "bytes")]
        Op::ChunkWrite(len, b, advance) => {
            let f = form.filled(m);
            let chunk = f.chunk_mut();
            let w = len.min(chunk.len());
            for i in 0..w {
                chunk.write_byte(i, b);
            }
            let at = m.filled;
            m.write(at, w, b);
            if advance {
                // SAFETY: the first `w` bytes of `chunk_mut()` were just written.
                unsafe { f.advance_mut(w) };
                m.filled += w;
                m.init = m.init.max(m.filled);
            }
        }
        #[cfg(feature = "bytes")]
        Op::AdvancePastEnd => {
            let f = form.filled(m);
            let chunk = f.chunk_mut();
            let w = chunk.len();
            for i in 0..w {
                chunk.write_byte(i, 0x5A);
            }
            let at = m.filled;
            m.write(at, w, 0x5A);
            // SAFETY: every byte `chunk_mut` offers was written; asking for one more is the
            // documented panic ("advance_mut(cnt) with cnt > remaining_mut()").
            let result = catch_unwind(AssertUnwindSafe(|| unsafe { f.advance_mut(w + 1) }));
            assert!(result.is_err(), "advance_mut past the end must panic");
        }
        #[cfg(feature = "bytes")]
        Op::ReadBuf(kind) => {
            let f = form.filled(m);
            async_readers::do_read_buf(f, m, kind);
        }
        #[cfg(feature = "bytes")]
        Op::Freeze(via_from) => {
            form.filled(m);
            let Form::Filled(f) = std::mem::replace(form, Form::Gone) else {
                unreachable!()
            };
            check_filled_then_freeze(pool, f, m, via_from, rng);
            return false;
        }
    }
    let _ = (pool, rng);
    true
}

#[cfg(feature = "bytes")]
fn check_filled_then_freeze(
    pool: &BufPool,
    f: FilledAllocation,
    m: &Model,
    via_from: bool,
    rng: &mut Rng,
) {
    let expect = m.known(0..m.filled, "freeze");
    let in_use = pool.stats().in_use_bytes;
    let frozen = if via_from { Bytes::from(f) } else { f.freeze() };
    assert_eq!(&frozen[..], &expect[..]);
    let mut pieces = vec![(frozen.clone(), expect.clone())];
    for _ in 0..3 {
        let lo = rng.range(0, m.filled);
        let hi = rng.range(lo, m.filled);
        let s = frozen.slice(lo..hi);
        assert_eq!(&s[..], &expect[lo..hi]);
        pieces.push((s, expect[lo..hi].to_vec()));
    }
    let frozen = match frozen.try_into_mut() {
        Ok(mutable) => panic!("a pooled Bytes is never unique: {mutable:?}"),
        Err(frozen) => frozen,
    };
    pieces.push((frozen, expect.clone()));
    // Drop in a random order; the budget stays until the last one holding the block.
    while !pieces.is_empty() {
        let i = rng.range(0, pieces.len() - 1);
        let (piece, want) = pieces.swap_remove(i);
        assert_eq!(&piece[..], &want[..]);
        if !piece.is_empty() || pieces.iter().any(|(p, _)| !p.is_empty()) {
            assert_eq!(
                pool.stats().in_use_bytes,
                in_use,
                "released before the last Bytes"
            );
        }
        match rng.range(0, 2) {
            0 => drop(piece),
            1 => assert_eq!(Vec::<u8>::from(piece), want),
            _ => assert_eq!(&BytesMut::from(piece)[..], &want[..]),
        }
    }
    assert_eq!(
        pool.stats().in_use_bytes,
        in_use - m.cap,
        "every Bytes gone, the budget is back"
    );
}

fn run_sequence(seed: u64, max_ops: usize) {
    let mut rng = Rng::new(seed);
    let sizes = [BufferSize::S8, BufferSize::S16, BufferSize::S64];
    let size = sizes[rng.range(0, if cfg!(miri) { 1 } else { 2 })];
    let bs = size.bytes();
    let n = rng.range(1, 3);
    let cap = bs * n;
    let recycling = rng.range(0, 1) == 0;
    let cfg = BufPoolCfg {
        buffer_size: size,
        max_memory: cap * 2,
    };
    let pool = if recycling {
        BufPool::builder(cfg)
            .recycle(2)
            .recycle_min_bytes(0)
            .build()
            .unwrap()
    } else {
        BufPool::new(cfg)
    };
    // Leave a dirty block behind for reuse.
    {
        let mut dirty = pool.try_allocate(n).unwrap();
        dirty.uninit_mut().fill(MaybeUninit::new(0xFF));
    }
    let zeroed = rng.range(0, 1) == 0;
    let allocation = if zeroed {
        pool.try_allocate_zeroed(n).unwrap()
    } else {
        pool.try_allocate(n).unwrap()
    };
    let mut m = Model::new(cap, bs, zeroed);
    let mut form = Form::Alloc(allocation);
    check(&mut form, &m);
    let ops = rng.range(1, max_ops);
    let mut trace = Vec::new();
    for _ in 0..ops {
        let op = random_op(&mut rng, cap, bs);
        trace.push(op);
        let alive = catch_unwind(AssertUnwindSafe(|| {
            let go_on = apply(&pool, &mut form, &mut m, op, &mut rng);
            if go_on {
                check(&mut form, &m);
            }
            go_on
        }))
        .unwrap_or_else(|panic| {
            eprintln!("seed {seed}, zeroed {zeroed}, recycling {recycling}, trace {trace:?}");
            std::panic::resume_unwind(panic)
        });
        let stats = pool.stats();
        assert!(
            stats.in_use_bytes + stats.cached_bytes <= stats.max_memory,
            "seed {seed}: footprint over budget: {stats}"
        );
        if !alive {
            break;
        }
    }
    drop(form);
    assert_eq!(pool.stats().in_use_bytes, 0, "seed {seed}: budget lost");
    assert_full_budget_back(&pool);
}

#[test]
fn random_sequences_of_every_safe_view_call() {
    let sequences = rounds(3000, 100);
    let max_ops = rounds(16, 6);
    for seed in 0..sequences as u64 {
        run_sequence(seed, max_ops);
    }
}

// ---------------------------------------------------------------------------------------
// Zeroed allocations served with a dirty block
// ---------------------------------------------------------------------------------------

fn dirty(allocation: &mut BufPoolAllocation) -> usize {
    allocation.uninit_mut().fill(MaybeUninit::new(0xFF));
    allocation.first().addr()
}

#[track_caller]
fn assert_zeros(allocation: BufPoolAllocation, what: &str) {
    let cap = allocation.allocated_bytes();
    let mut filled = allocation.into_filled();
    assert!(
        filled.set_filled(cap),
        "{what}: a zeroed allocation is initialised"
    );
    assert!(filled.iter().all(|&b| b == 0), "{what}: not zeros");
}

fn build(size: BufferSize, n: usize, recycling: bool) -> BufPool {
    let cfg = BufPoolCfg {
        buffer_size: size,
        max_memory: size.bytes() * n,
    };
    if recycling {
        BufPool::builder(cfg)
            .recycle(4)
            .recycle_min_bytes(0)
            .build()
            .unwrap()
    } else {
        BufPool::new(cfg)
    }
}

fn edge_sizes() -> Vec<BufferSize> {
    if cfg!(miri) {
        vec![BufferSize::S8, BufferSize::S64]
    } else {
        vec![BufferSize::S8, BufferSize::S64, BufferSize::S4096]
    }
}

#[test]
fn zeroed_async_waiter_handed_a_dirty_block_reads_zeros() {
    for size in edge_sizes() {
        for n in [1, 3] {
            for mode in 0..3 {
                let pool = match mode {
                    0 | 1 => build(size, n, mode == 1),
                    _ => BufPool::builder(BufPoolCfg {
                        buffer_size: size,
                        max_memory: size.bytes() * n,
                    })
                    .direct_io_alignment()
                    .build()
                    .unwrap(),
                };
                let mut held = pool.try_allocate(n).unwrap();
                let address = dirty(&mut held);
                let mut waiter = pin!(pool.allocate_zeroed(n));
                assert!(poll_once(&mut waiter).is_pending());
                drop(held);
                let Poll::Ready(Ok(allocation)) = poll_once(&mut waiter) else {
                    panic!("the release did not serve the zeroed head");
                };
                assert_eq!(allocation.first().addr(), address, "handed over");
                let align = if mode == 2 { 4096 } else { 16 };
                assert_eq!(address % size.bytes().min(align), 0, "alignment");
                assert_zeros(allocation, "async zeroed waiter");
                assert_full_budget_back(&pool);
            }
        }
    }
}

#[test]
fn zeroed_owned_waiter_handed_a_dirty_owned_block_reads_zeros() {
    for recycling in [false, true] {
        let pool = Arc::new(build(BufferSize::S64, 2, recycling));
        let mut first = Box::pin(Arc::clone(&pool).allocate_owned(2));
        let Poll::Ready(Ok(mut held)) = poll_once(&mut first) else {
            panic!("the budget is free");
        };
        let address = dirty(&mut held);
        let mut waiter = Box::pin(Arc::clone(&pool).allocate_zeroed_owned(2));
        assert!(poll_once(&mut waiter).is_pending());
        // The releaser is a frozen `Bytes` of the owned allocation, dropped on another
        // thread after the last `Arc<BufPool>` we hold is gone.
        let weak = Arc::downgrade(&pool);
        drop(pool);
        #[cfg(feature = "bytes")]
        {
            let mut filled = held.into_filled();
            filled.extend_from_slice(b"dirty");
            let frozen = filled.freeze();
            thread::spawn(move || drop(frozen)).join().unwrap();
        }
        #[cfg(not(feature = "bytes"))]
        thread::spawn(move || drop(held)).join().unwrap();
        let Poll::Ready(Ok(allocation)) = poll_once(&mut waiter) else {
            panic!("the release did not serve the zeroed owned head");
        };
        assert_eq!(allocation.first().addr(), address, "handed over");
        assert_zeros(allocation, "owned zeroed waiter");
        drop(waiter);
        drop(first);
        assert!(
            weak.upgrade().is_none(),
            "the pool is gone with its last owner"
        );
    }
}

#[test]
fn zeroed_blocking_and_timeout_waiters_handed_a_dirty_block_read_zeros() {
    watchdog(60, || {
        for size in edge_sizes() {
            for recycling in [false, true] {
                for timeout in [false, true] {
                    let pool = Arc::new(build(size, 2, recycling));
                    let mut held = pool.try_allocate(2).unwrap();
                    let address = dirty(&mut held);
                    let waiter = {
                        let pool = Arc::clone(&pool);
                        thread::spawn(move || {
                            let allocation = if timeout {
                                pool.allocate_zeroed_timeout(2, Duration::from_secs(600))
                            } else {
                                pool.allocate_zeroed_blocking(2)
                            }
                            .unwrap();
                            let got = allocation.first().addr();
                            assert_zeros(allocation, "blocking zeroed waiter");
                            got
                        })
                    };
                    wait_waiting(&pool, 1);
                    drop(held);
                    assert_eq!(waiter.join().unwrap(), address, "handed over");
                    assert_full_budget_back(&pool);
                }
            }
        }
    });
}

#[test]
fn recycled_dirty_blocks_never_read_as_initialised() {
    for size in edge_sizes() {
        let pool = build(size, 4, true);
        for round in 0..3 {
            let mut a = pool.try_allocate(2).unwrap();
            dirty(&mut a);
            drop(a);
            // A zeroed request never takes the dirty cached block unzeroed.
            assert_zeros(
                pool.try_allocate_zeroed(2).unwrap(),
                "zeroed after recycling",
            );
            // A plain one may get it, but counts nothing as initialised ...
            let mut plain = pool.try_allocate(2).unwrap().into_filled();
            assert!(
                !plain.set_filled(1),
                "round {round}: dirty block read as initialised"
            );
            // ... and `read_from` shows the reader zeros, not the old 0xFF.
            let cap = plain.capacity();
            let mut reader = HostileReader {
                kind: ReaderKind::Data(3, 7),
                expected: vec![0; cap],
                calls: 0,
            };
            assert_eq!(plain.read_from(&mut reader).unwrap(), 3);
            assert!(plain.set_filled(cap));
            assert_eq!(&plain[..3], &[7, 7, 7]);
            assert!(plain[3..].iter().all(|&b| b == 0));
        }
        assert_full_budget_back(&pool);
    }
}

// ---------------------------------------------------------------------------------------
// Hostile readers and budget
// ---------------------------------------------------------------------------------------

#[test]
fn a_reader_panic_loses_no_budget_and_serves_the_waiter() {
    let pool = common::pool(BufferSize::S16, 2);
    let mut filled = pool.try_allocate(2).unwrap().into_filled();
    filled.extend_from_slice(b"abc");
    let mut waiter = pin!(pool.allocate_zeroed(2));
    assert!(poll_once(&mut waiter).is_pending());
    let mut reader = HostileReader {
        kind: ReaderKind::Panic(5, 9),
        expected: vec![0; 29],
        calls: 0,
    };
    assert!(catch_unwind(AssertUnwindSafe(|| filled.read_from(&mut reader))).is_err());
    assert_eq!(filled.filled(), b"abc", "nothing counted after the panic");
    assert!(
        filled.set_filled(32),
        "zeroed by read_from before the reader ran"
    );
    assert_eq!(&filled[3..8], &[9; 5]);
    // Dropped during an unwind of its own.
    let unwound = catch_unwind(AssertUnwindSafe(move || {
        let _f = filled;
        panic!("unwinding with the allocation");
    }));
    assert!(unwound.is_err());
    let Poll::Ready(Ok(allocation)) = poll_once(&mut waiter) else {
        panic!("the waiter was not served");
    };
    assert_zeros(allocation, "after a panicking reader");
    assert_full_budget_back(&pool);
}

#[test]
fn read_from_through_dyn_read_and_a_reader_that_reports_usize_max() {
    let pool = common::pool(BufferSize::S8, 1);
    let mut filled = pool.try_allocate(1).unwrap().into_filled();
    struct Liar;
    impl Read for Liar {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Ok(usize::MAX)
        }
    }
    let reader: &mut dyn Read = &mut Liar;
    let error = filled.read_from(reader).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert_eq!(filled.len(), 0);
    let mut source: &[u8] = b"0123456789";
    assert_eq!(filled.read_from(&mut source).unwrap(), 8);
    assert_eq!(filled.read_from(&mut source).unwrap(), 0, "full");
    assert_eq!(source, b"89", "the full allocation did not call the reader");
    drop(filled);
    assert_idle(&pool);
}

// ---------------------------------------------------------------------------------------
// Edge sizes
// ---------------------------------------------------------------------------------------

#[test]
fn buffer_size_accepts_only_powers_of_two_from_8_to_16k() {
    for bytes in 0..=4096usize {
        let ok = BufferSize::try_from(bytes).is_ok();
        assert_eq!(ok, bytes.is_power_of_two() && bytes >= 8, "{bytes}");
    }
    for bytes in [8192, 16384, 16385, 32768, usize::MAX] {
        assert_eq!(
            BufferSize::try_from(bytes).is_ok(),
            bytes <= 16384 && bytes.is_power_of_two()
        );
    }
    for size in BufferSize::ALL {
        assert_eq!(BufferSize::try_from(size.bytes()).unwrap(), size);
    }
}

/// Fills an allocation to exactly its capacity through `how`, then checks every view of a
/// full allocation.
fn fill_exactly(pool: &BufPool, n: usize, how: usize, zeroed: bool) {
    let a = if zeroed {
        pool.try_allocate_zeroed(n).unwrap()
    } else {
        pool.try_allocate(n).unwrap()
    };
    let cap = a.allocated_bytes();
    let mut f = a.into_filled();
    let data: Vec<u8> = (0..cap).map(|i| (i * 31 + 7) as u8).collect();
    match how {
        0 => assert_eq!(f.extend_from_slice(&data), cap),
        1 => f.write_all(&data).unwrap(),
        2 => {
            let mut source = &data[..];
            while f.read_from(&mut source).unwrap() > 0 {}
        }
        3 => {
            let half = cap / 2;
            assert_eq!(f.fill(0, half), half);
            f.filled_mut().copy_from_slice(&data[..half]);
            assert_eq!(f.extend_from_slice(&data[half..]), cap - half);
        }
        #[cfg(feature = "bytes")]
        4 => f.put_slice(&data),
        #[cfg(feature = "bytes")]
        5 => {
            let mut source = &data[..];
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            loop {
                use tokio::io::AsyncReadExt;
                let mut fut = pin!(AsyncReadExt::read_buf(&mut source, &mut f));
                match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(Ok(0)) => break,
                    Poll::Ready(Ok(_)) => {}
                    other => panic!("read_buf from a slice: {other:?}"),
                }
            }
        }
        _ => return,
    }
    assert_eq!(f.remaining(), 0);
    assert_eq!(&f[..], &data[..]);
    assert_eq!(f.buffers().count(), n);
    assert!(f.buffers().all(|b| b.len() == pool.buffer_size().bytes()));
    assert_eq!(f.write(b"x").unwrap(), 0);
    assert_eq!(
        f.write_all(b"x").unwrap_err().kind(),
        io::ErrorKind::WriteZero
    );
    assert_eq!(f.fill(1, 1), 0);
    assert_eq!(f.extend_from_slice(b"x"), 0);
    assert!(!f.set_filled(cap + 1));
    let mut never = HostileReader {
        kind: ReaderKind::Panic(0, 0),
        expected: Vec::new(),
        calls: 0,
    };
    assert_eq!(f.read_from(&mut never).unwrap(), 0);
    #[cfg(feature = "bytes")]
    {
        assert_eq!(f.remaining_mut(), 0);
        assert_eq!(f.chunk_mut().len(), 0);
        assert!(catch_unwind(AssertUnwindSafe(|| f.put_u8(1))).is_err());
        // SAFETY: zero bytes are promised.
        unsafe { f.advance_mut(0) };
        let frozen = f.freeze();
        assert_eq!(&frozen[..], &data[..]);
        let last = frozen.slice(cap - 1..);
        drop(frozen);
        assert_eq!(last[0], data[cap - 1]);
    }
    #[cfg(not(feature = "bytes"))]
    drop(f);
}

#[test]
fn every_buffer_size_filled_exactly_to_capacity_every_way() {
    let sizes: Vec<BufferSize> = if cfg!(miri) {
        vec![BufferSize::S8, BufferSize::S16, BufferSize::S512]
    } else {
        BufferSize::ALL.to_vec()
    };
    for size in sizes {
        let many = if cfg!(miri) {
            2
        } else {
            (65536 / size.bytes()).clamp(2, 64)
        };
        let pool = common::pool(size, many);
        for n in [1, many] {
            for how in 0..6 {
                for zeroed in [false, true] {
                    fill_exactly(&pool, n, how, zeroed);
                    assert_idle(&pool);
                }
            }
            let a = pool.try_allocate(n).unwrap();
            let m = Model::new(a.allocated_bytes(), size.bytes(), false);
            check_alloc(&a, &m);
        }
        assert_full_budget_back(&pool);
    }
}

// ---------------------------------------------------------------------------------------
// Bytes across threads, the drop barrier, owned allocations
// ---------------------------------------------------------------------------------------

#[cfg(feature = "bytes")]
#[test]
fn bytes_clones_on_other_threads_hold_the_pool_drop_barrier() {
    watchdog(60, || {
        let pool = common::pool(BufferSize::S64, 4);
        let mut filled = pool.try_allocate(3).unwrap().into_filled();
        filled.fill(0xAB, 150);
        let frozen = filled.freeze();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Arc::new(std::sync::Mutex::new(go_rx));
        let readers: Vec<_> = (0..3)
            .map(|i| {
                let piece = frozen.slice(i * 10..i * 10 + 40);
                let go_rx = Arc::clone(&go_rx);
                thread::spawn(move || {
                    go_rx.lock().unwrap().recv().unwrap();
                    assert!(piece.iter().all(|&b| b == 0xAB));
                    let again = piece.clone();
                    drop(piece);
                    assert_eq!(again.len(), 40);
                })
            })
            .collect();
        drop(frozen);
        let (dropped_tx, dropped_rx) = mpsc::channel();
        let dropper = thread::spawn(move || {
            drop(pool);
            dropped_tx.send(()).unwrap();
        });
        assert!(
            dropped_rx
                .recv_timeout(Duration::from_millis(if cfg!(miri) { 20 } else { 200 }))
                .is_err(),
            "the pool's drop returned while Bytes slices still lived"
        );
        for _ in 0..3 {
            go_tx.send(()).unwrap();
        }
        for reader in readers {
            reader.join().unwrap();
        }
        dropped_rx.recv().unwrap();
        dropper.join().unwrap();
    });
}

#[cfg(feature = "bytes")]
#[test]
fn owned_frozen_bytes_outlive_the_last_pool_handle_across_threads() {
    watchdog(60, || {
        let pool = Arc::new(common::pool(BufferSize::S32, 4));
        let weak = Arc::downgrade(&pool);
        let mut fut = Box::pin(Arc::clone(&pool).allocate_owned(2));
        let Poll::Ready(Ok(mut allocation)) = poll_once(&mut fut) else {
            panic!("the budget is free");
        };
        let mut other = Box::pin(Arc::clone(&pool).allocate_zeroed_owned(2));
        let Poll::Ready(Ok(zeros)) = poll_once(&mut other) else {
            panic!("the budget is free");
        };
        drop((fut, other));
        drop(pool);
        // Every view still works with no handle left but the owners'.
        assert!(
            weak.upgrade().is_some(),
            "owned allocations keep the pool alive"
        );
        let m = Model::new(64, 32, false);
        check_alloc(&allocation, &m);
        allocation.uninit_mut()[0] = MaybeUninit::uninit();
        for buffer in allocation.buffers_uninit_mut() {
            buffer.fill(MaybeUninit::new(1));
        }
        let mut filled = allocation.into_filled();
        assert!(!filled.set_filled(1));
        let mut source: &[u8] = b"owned and frozen";
        filled.read_from(&mut source).unwrap();
        filled.put_slice(b"!");
        let frozen = filled.freeze();
        assert_eq!(&frozen[..], b"owned and frozen!");
        let zeros = zeros.into_filled().freeze();
        assert_eq!(zeros.len(), 0);
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let piece = frozen.slice(i..i + 5);
                thread::spawn(move || {
                    assert_eq!(&piece[..], &b"owned and frozen!"[i..i + 5]);
                    piece
                })
            })
            .collect();
        drop(frozen);
        let pieces: Vec<Bytes> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(weak.upgrade().is_some());
        drop(zeros);
        assert!(weak.upgrade().is_some());
        // The last one dropped on another thread runs the pool's drop there.
        thread::spawn(move || drop(pieces)).join().unwrap();
        assert!(
            weak.upgrade().is_none(),
            "the pool is dropped with its last owned block"
        );
    });
}

#[cfg(feature = "bytes")]
#[test]
fn empty_and_zero_length_bytes_hold_the_whole_allocation() {
    let pool = common::pool(BufferSize::S16, 4);
    let empty = pool.try_allocate(2).unwrap().into_filled().freeze();
    assert!(empty.is_empty());
    assert_eq!(
        pool.stats().in_use_bytes,
        32,
        "an empty Bytes still holds its block"
    );
    let nothing = empty.slice(0..0);
    let clone = empty.clone();
    drop(empty);
    assert_eq!(pool.stats().in_use_bytes, 32);
    drop(clone);
    assert!(nothing.is_empty());
    assert_eq!(pool.stats().in_use_bytes, 0);
    drop(nothing);

    // `Vec::from` and `BytesMut::from` copy and let go of the pooled block.
    let mut filled = pool.try_allocate(4).unwrap().into_filled();
    filled.extend_from_slice(b"to vec");
    let frozen = filled.freeze();
    let frozen = frozen.try_into_mut().unwrap_err();
    let copy = BytesMut::from(frozen.clone());
    assert_eq!(&copy[..], b"to vec");
    let v = Vec::from(frozen);
    assert_eq!(v, b"to vec");
    assert_eq!(
        pool.stats().in_use_bytes,
        0,
        "the block is back once copied out"
    );
    assert_full_budget_back(&pool);
}

#[cfg(feature = "bytes")]
#[test]
fn read_buf_under_a_runtime_with_a_slow_writer() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let pool = Arc::new(common::pool(BufferSize::S8, 4));
        let (mut client, mut server) = tokio::io::duplex(5);
        let writer = tokio::spawn(async move {
            for chunk in [&b"abc"[..], b"defgh", b"ijklmnopq", b"rstuvwxyz0123456789"] {
                client.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut filled = Arc::clone(&pool)
            .allocate_owned(4)
            .await
            .unwrap()
            .into_filled();
        while filled.has_remaining_mut() {
            let n = server.read_buf(&mut filled).await.unwrap();
            assert!(n > 0 && n <= 5);
        }
        assert_eq!(&filled[..], b"abcdefghijklmnopqrstuvwxyz012345");
        assert_eq!(server.read_buf(&mut filled).await.unwrap(), 0);
        writer.await.unwrap();
        let frozen = filled.freeze();
        drop(pool);
        assert_eq!(&frozen[..8], b"abcdefgh");
    });
}

// ---------------------------------------------------------------------------------------
// Many threads: random sequences with hand-overs on one small pool
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(miri, ignore = "heavy; the single-threaded sequences cover the views")]
fn concurrent_sequences_with_hand_overs_keep_every_promise() {
    watchdog(120, || {
        let pool = Arc::new(common::pool(BufferSize::S16, 4));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let pool = Arc::clone(&pool);
                thread::spawn(move || {
                    let mut rng = Rng::new(1000 + t);
                    for _ in 0..rounds(400, 10) {
                        let n = rng.range(1, 4);
                        let zeroed = rng.range(0, 1) == 0;
                        let mut a = if zeroed {
                            pool.allocate_zeroed_blocking(n).unwrap()
                        } else {
                            pool.allocate_blocking(n).unwrap()
                        };
                        let cap = a.allocated_bytes();
                        if zeroed {
                            let mut f = a.into_filled();
                            assert!(f.set_filled(cap));
                            assert!(f.iter().all(|&b| b == 0), "a zeroed allocation is dirty");
                            a = f.into_allocation();
                        }
                        let mut m = Model::new(cap, 16, zeroed);
                        let mut form = Form::Alloc(a);
                        for _ in 0..rng.range(1, 6) {
                            let op = random_op(&mut rng, cap, 16);
                            // `freeze` checks the pool's bytes in use, which other
                            // threads change here.
                            #[cfg(feature = "bytes")]
                            if matches!(op, Op::Freeze(_)) {
                                continue;
                            }
                            apply(&pool, &mut form, &mut m, op, &mut rng);
                            check(&mut form, &m);
                        }
                        // Dirty it before it goes back, for the next zeroed waiter.
                        let a = form.alloc();
                        a.uninit_mut().fill(MaybeUninit::new(0xFF));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_full_budget_back(&pool);
    });
}

// ---------------------------------------------------------------------------------------
// Other sources of a released block: reservations, child pools, large blocks
// ---------------------------------------------------------------------------------------

#[test]
fn zeroed_waiter_served_by_a_reservation_allocation_release_reads_zeros() {
    let pool = common::pool(BufferSize::S64, 4);
    let mut reservation = pool.try_reserve(256).unwrap();
    let mut held = reservation.allocate(2).unwrap();
    let mut other = reservation.allocate(2).unwrap();
    dirty(&mut held);
    dirty(&mut other);
    drop(reservation);
    let mut waiter = pin!(pool.allocate_zeroed(2));
    assert!(poll_once(&mut waiter).is_pending());
    let mut second = pin!(pool.allocate_zeroed(2));
    assert!(poll_once(&mut second).is_pending());
    drop(held);
    let Poll::Ready(Ok(allocation)) = poll_once(&mut waiter) else {
        panic!("the release did not serve the zeroed head");
    };
    assert_zeros(allocation, "zeroed waiter after a reservation's allocation");
    drop(other);
    let Poll::Ready(Ok(allocation)) = poll_once(&mut second) else {
        panic!("the release did not serve the second zeroed waiter");
    };
    assert_zeros(allocation, "second zeroed waiter");
    assert_full_budget_back(&pool);
}

#[test]
fn child_pools_with_recycling_give_zeroed_requests_zeros() {
    let root = common::pool(BufferSize::S64, 8);
    let child = BufPool::builder(BufPoolCfg {
        buffer_size: BufferSize::S32,
        max_memory: 128,
    })
    .name("child")
    .parent(&root)
    .recycle(4)
    .recycle_min_bytes(0)
    .build()
    .unwrap();
    for _ in 0..3 {
        let mut a = child.try_allocate(4).unwrap();
        dirty(&mut a);
        let mut waiter = pin!(child.allocate_zeroed(4));
        assert!(poll_once(&mut waiter).is_pending());
        drop(a);
        let Poll::Ready(Ok(allocation)) = poll_once(&mut waiter) else {
            panic!("the release did not serve the child's zeroed waiter");
        };
        assert_zeros(allocation, "child zeroed waiter");
        let mut a = child.try_allocate(2).unwrap();
        dirty(&mut a);
        drop(a);
        assert_zeros(
            child.try_allocate_zeroed(2).unwrap(),
            "child zeroed after recycling",
        );
        let mut plain = child.try_allocate(2).unwrap().into_filled();
        assert!(
            !plain.set_filled(1),
            "a recycled dirty block read as initialised"
        );
        let mut reader = HostileReader {
            kind: ReaderKind::Data(1, 1),
            expected: vec![0; 64],
            calls: 0,
        };
        plain.read_from(&mut reader).unwrap();
    }
    drop(child);
    assert_full_budget_back(&root);
}

#[cfg(feature = "bytes")]
#[test]
fn bytes_of_a_child_pool_hold_the_child_and_parent_drop_barriers() {
    watchdog(60, || {
        let root = common::pool(BufferSize::S64, 4);
        let child = root
            .child(
                "child",
                BufPoolCfg {
                    buffer_size: BufferSize::S16,
                    max_memory: 64,
                },
            )
            .unwrap();
        let mut filled = child.try_allocate(4).unwrap().into_filled();
        filled.extend_from_slice(b"child bytes");
        let frozen = filled.freeze();
        let (tx, rx) = mpsc::channel();
        let dropper = thread::spawn(move || {
            drop(root);
            tx.send("root").unwrap();
            drop(child);
            tx.send("child").unwrap();
        });
        let patience = Duration::from_millis(if cfg!(miri) { 20 } else { 200 });
        // The child handle outlives the root's: the root's drop waits for its subtree.
        assert!(
            rx.recv_timeout(patience).is_err(),
            "a drop returned under live Bytes"
        );
        assert_eq!(&frozen[..], b"child bytes");
        let piece = frozen.slice(6..);
        drop(frozen);
        thread::spawn(move || {
            assert_eq!(&piece[..], b"bytes");
        })
        .join()
        .unwrap();
        assert_eq!(rx.recv().unwrap(), "root");
        assert_eq!(rx.recv().unwrap(), "child");
        dropper.join().unwrap();
    });
}

#[test]
fn large_blocks_handed_to_a_zeroed_waiter_read_zeros() {
    // From 64 KiB a queued release frees outside the lock: the hand-over comes first.
    for n in if cfg!(miri) { vec![4] } else { vec![4, 8] } {
        let pool = common::pool(BufferSize::S16384, n);
        let mut held = pool.try_allocate(n).unwrap();
        let address = dirty(&mut held);
        let mut waiter = pin!(pool.allocate_zeroed(n));
        assert!(poll_once(&mut waiter).is_pending());
        drop(held);
        let Poll::Ready(Ok(allocation)) = poll_once(&mut waiter) else {
            panic!("the release did not serve the zeroed head");
        };
        assert_eq!(allocation.first().addr(), address, "handed over");
        assert_zeros(allocation, "large zeroed waiter");
        assert_full_budget_back(&pool);
    }
}

/// Documents a wording point: `BufMut`'s impl docs say `remaining_mut` "never grows", but
/// `clear` and a smaller `set_filled` (documented cursor moves) make it grow.
#[cfg(feature = "bytes")]
#[test]
fn remaining_mut_grows_after_clear_and_set_filled() {
    let pool = common::pool(BufferSize::S8, 2);
    let mut filled = pool.try_allocate(2).unwrap().into_filled();
    filled.put_slice(&[1; 16]);
    assert_eq!(filled.remaining_mut(), 0);
    filled.clear();
    assert_eq!(filled.remaining_mut(), 16);
    assert!(filled.set_filled(10));
    assert_eq!(filled.remaining_mut(), 6);
    assert_eq!(filled.chunk_mut().len(), 6);
    filled.put_slice(&[2; 6]);
    assert_eq!(
        &filled[..],
        &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    );
}

// ---------------------------------------------------------------------------------------
// tokio multi-thread: read_buf, freeze, Bytes sent between tasks, zeroed waiters
// ---------------------------------------------------------------------------------------

#[cfg(feature = "bytes")]
#[test]
fn tokio_tasks_read_buf_freeze_and_hand_bytes_across_tasks() {
    watchdog(120, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        runtime.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let pool = Arc::new(common::pool(BufferSize::S16, 4));
            let weak = Arc::downgrade(&pool);
            let rounds = rounds(40, 3);
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(Bytes, u8)>(2);
            let (mut client, mut server) = tokio::io::duplex(7);
            let writer = tokio::spawn(async move {
                for i in 0..rounds {
                    client.write_all(&[i as u8; 48]).await.unwrap();
                }
            });
            let reader = {
                let pool = Arc::clone(&pool);
                tokio::spawn(async move {
                    for i in 0..rounds {
                        let mut filled = Arc::clone(&pool)
                            .allocate_owned(3)
                            .await
                            .unwrap()
                            .into_filled();
                        while filled.has_remaining_mut() {
                            assert!(server.read_buf(&mut filled).await.unwrap() > 0);
                        }
                        tx.send((filled.freeze(), i as u8)).await.unwrap();
                    }
                })
            };
            let zeroed = {
                let pool = Arc::clone(&pool);
                tokio::spawn(async move {
                    for _ in 0..rounds {
                        let allocation = Arc::clone(&pool).allocate_zeroed_owned(1).await.unwrap();
                        assert_zeros(allocation, "a zeroed task's allocation");
                        tokio::task::yield_now().await;
                    }
                })
            };
            drop(pool);
            let mut seen = 0;
            while let Some((frozen, tag)) = rx.recv().await {
                let piece = frozen.slice(8..40);
                drop(frozen);
                tokio::spawn(async move {
                    assert!(piece.iter().all(|&b| b == tag));
                })
                .await
                .unwrap();
                seen += 1;
            }
            assert_eq!(seen, rounds);
            writer.await.unwrap();
            reader.await.unwrap();
            zeroed.await.unwrap();
            assert!(
                weak.upgrade().is_none(),
                "the pool went with its last owner"
            );
        });
    });
}

// ---------------------------------------------------------------------------------------
// Hostile wakers on the far side of a Bytes drop
// ---------------------------------------------------------------------------------------

#[cfg(feature = "bytes")]
mod wakers {
    use super::*;
    use std::sync::Mutex;
    use std::task::{Context, Wake, Waker};

    /// Panics when woken.
    struct PanicWake;

    impl Wake for PanicWake {
        fn wake(self: Arc<Self>) {
            panic!("hostile waker");
        }
        fn wake_by_ref(self: &Arc<Self>) {
            panic!("hostile waker");
        }
    }

    /// Drops the `Bytes` it holds when woken (re-entering the pool from a release's wake-up).
    struct DropBytesWake(Mutex<Option<Bytes>>);

    impl Wake for DropBytesWake {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            let bytes = self.0.lock().unwrap().take();
            drop(bytes);
        }
    }

    /// A child's owned allocation `x` is released; its give-back at the root serves a root
    /// waiter whose waker drops the `Bytes` of `y`, the child's last owned allocation, after
    /// the last `Arc` of the child was dropped: the child pool's drop (and the freeing of its
    /// state) runs inside the wake-up that `x`'s release runs.
    #[test]
    fn last_owned_bytes_dropped_by_a_waker_that_xs_release_wakes() {
        watchdog(60, || {
            let root = common::pool(BufferSize::S32, 4);
            let child = Arc::new(
                root.child(
                    "child",
                    BufPoolCfg {
                        buffer_size: BufferSize::S32,
                        max_memory: 128,
                    },
                )
                .unwrap(),
            );
            let weak = Arc::downgrade(&child);
            let mut fx = Box::pin(Arc::clone(&child).allocate_owned(2));
            let Poll::Ready(Ok(x)) = poll_once(&mut fx) else {
                panic!("free budget");
            };
            let mut fy = Box::pin(Arc::clone(&child).allocate_owned(2));
            let Poll::Ready(Ok(y)) = poll_once(&mut fy) else {
                panic!("free budget");
            };
            drop((fx, fy));
            drop(child);
            let mut y = y.into_filled();
            y.extend_from_slice(b"the child's last owned block");
            let wake = Arc::new(DropBytesWake(Mutex::new(Some(y.freeze()))));
            let waker = Waker::from(Arc::clone(&wake));
            let mut waiter = pin!(root.allocate(2));
            assert!(
                waiter
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
            assert!(weak.upgrade().is_some());
            drop(x);
            assert!(wake.0.lock().unwrap().is_none(), "the waker ran");
            assert!(
                weak.upgrade().is_none(),
                "the child went with its last owned block"
            );
            let Poll::Ready(Ok(allocation)) = poll_once(&mut waiter) else {
                panic!("the root waiter was not served");
            };
            drop(allocation);
            assert_full_budget_back(&root);
        });
    }

    #[test]
    fn last_bytes_dropped_into_a_panicking_waker_loses_nothing() {
        let pool = common::pool(BufferSize::S32, 2);
        let mut filled = pool.try_allocate(2).unwrap().into_filled();
        filled.fill(0xEE, 64);
        let frozen = filled.freeze();
        let clone = frozen.slice(1..3);
        drop(frozen);
        let mut waiter = pin!(pool.allocate_zeroed(2));
        let waker = Waker::from(Arc::new(PanicWake));
        assert!(
            waiter
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        let dropped = catch_unwind(AssertUnwindSafe(move || drop(clone)));
        assert!(dropped.is_err(), "the waker's panic is passed on");
        let Poll::Ready(Ok(allocation)) = poll_once(&mut waiter) else {
            panic!("the zeroed waiter was granted despite its waker");
        };
        assert_zeros(allocation, "a zeroed waiter with a panicking waker");
        assert_full_budget_back(&pool);
    }

    #[test]
    fn a_waker_that_drops_bytes_of_the_same_pool_hands_on_zeros() {
        let pool = common::pool(BufferSize::S32, 4);
        let mut a = pool.try_allocate(2).unwrap().into_filled();
        a.fill(0xAA, 64);
        let mut b = pool.try_allocate(2).unwrap().into_filled();
        b.fill(0xBB, 64);
        let (a, b) = (a.freeze(), b.freeze());
        let wake = Arc::new(DropBytesWake(Mutex::new(Some(b.slice(5..9)))));
        drop(b);
        let mut first = pin!(pool.allocate_zeroed(2));
        let waker = Waker::from(Arc::clone(&wake));
        assert!(
            first
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        let mut second = pin!(pool.allocate_zeroed(2));
        assert!(poll_once(&mut second).is_pending());
        // `a`'s release serves `first`, whose wake-up drops the last of `b`, which serves
        // `second`: both handed dirty blocks, both must read zeros.
        drop(a);
        assert!(wake.0.lock().unwrap().is_none(), "the waker ran");
        let Poll::Ready(Ok(x)) = poll_once(&mut first) else {
            panic!("first not served");
        };
        let Poll::Ready(Ok(y)) = poll_once(&mut second) else {
            panic!("second not served by the re-entrant release");
        };
        assert_zeros(x, "first");
        assert_zeros(y, "second");
        assert_full_budget_back(&pool);
    }
}

// ---------------------------------------------------------------------------------------
// A child pool's state freed inside the wake-up its own release runs
// ---------------------------------------------------------------------------------------

mod freed_in_wake {
    use super::*;
    use std::sync::Mutex;
    use std::task::{Context, Wake, Waker};

    /// Drops whatever it holds when woken.
    struct DropOnWake<T: Send>(Mutex<Option<T>>);

    impl<T: Send> Wake for DropOnWake<T> {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            let held = self.0.lock().unwrap().take();
            drop(held);
        }
    }

    fn child_of(root: &BufPool) -> BufPool {
        root.child(
            "child",
            BufPoolCfg {
                buffer_size: BufferSize::S32,
                max_memory: 128,
            },
        )
        .unwrap()
    }

    /// Parks a root waiter for 2 buffers whose waker holds `held`, runs `release` (which
    /// gives 2 buffers back at the root), then checks the waiter is served.
    fn with_root_waiter<T: Send + 'static>(root: &BufPool, held: T, release: impl FnOnce()) {
        let wake = Arc::new(DropOnWake(Mutex::new(Some(held))));
        let waker = Waker::from(Arc::clone(&wake));
        let mut waiter = pin!(root.allocate(2));
        assert!(
            waiter
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        release();
        assert!(wake.0.lock().unwrap().is_none(), "the waker ran");
        let Poll::Ready(Ok(allocation)) = poll_once(&mut waiter) else {
            panic!("the root waiter was not served");
        };
        drop(allocation);
    }

    /// Owned: `x`'s release (`release_owned`, through `settle`) wakes a root waiter whose
    /// waker drops `y`, the child's last owned allocation; that runs the child's drop and
    /// frees its state while `x`'s release still borrows it.
    #[test]
    fn last_owned_allocation_dropped_by_a_waker_of_a_siblings_release() {
        watchdog(60, || {
            let root = common::pool(BufferSize::S32, 4);
            let child = Arc::new(child_of(&root));
            let weak = Arc::downgrade(&child);
            let mut fx = Box::pin(Arc::clone(&child).allocate_owned(2));
            let Poll::Ready(Ok(x)) = poll_once(&mut fx) else {
                panic!("free budget");
            };
            let mut fy = Box::pin(Arc::clone(&child).allocate_owned(2));
            let Poll::Ready(Ok(y)) = poll_once(&mut fy) else {
                panic!("free budget");
            };
            drop((fx, fy, child));
            with_root_waiter(&root, y, || drop(x));
            assert!(
                weak.upgrade().is_none(),
                "the child went with its last owned block"
            );
            assert_full_budget_back(&root);
        });
    }

    /// Plain: a child's allocation is released; its give-back at the root wakes a waiter
    /// whose waker drops the child pool itself (drained by then, so its drop does not wait)
    /// and frees its state while the release still borrows it.
    #[test]
    fn child_pool_dropped_by_a_waker_its_own_release_wakes() {
        watchdog(60, || {
            let root = common::pool(BufferSize::S32, 4);
            let child = child_of(&root);
            let x = child.try_allocate(2).unwrap();
            let _rest = root.try_allocate(2).unwrap();
            with_root_waiter(&root, child, || drop(x));
        });
    }

    /// Root only: a plain allocation's release hands its block to the head, an owned
    /// future that lives in its own waker with the last `Arc<BufPool>`; the wake-up drops
    /// both, so the pool's drop (drained by then) frees the state while the release that
    /// woke it still borrows it.
    #[test]
    fn root_pool_dropped_by_a_waker_its_own_release_wakes() {
        watchdog(60, || {
            let root = Arc::new(common::pool(BufferSize::S32, 2));
            let x = root.try_allocate(2).unwrap();
            let waiter = Box::pin(Arc::clone(&root).allocate_owned(2));
            let wake = Arc::new(DropOnWake(Mutex::new(Some((waiter, root)))));
            let waker = Waker::from(Arc::clone(&wake));
            {
                let mut held = wake.0.lock().unwrap();
                let (waiter, _) = held.as_mut().unwrap();
                assert!(
                    waiter
                        .as_mut()
                        .poll(&mut Context::from_waker(&waker))
                        .is_pending()
                );
            }
            drop(x);
            assert!(wake.0.lock().unwrap().is_none(), "the waker ran");
        });
    }
}

#[cfg(feature = "bytes")]
#[test]
fn owned_child_bytes_outlive_both_handles_and_hold_the_parent_drop() {
    watchdog(60, || {
        let root = common::pool(BufferSize::S64, 4);
        let child = Arc::new(
            root.child(
                "child",
                BufPoolCfg {
                    buffer_size: BufferSize::S16,
                    max_memory: 64,
                },
            )
            .unwrap(),
        );
        let weak = Arc::downgrade(&child);
        let mut fut = Box::pin(Arc::clone(&child).allocate_zeroed_owned(4));
        let Poll::Ready(Ok(allocation)) = poll_once(&mut fut) else {
            panic!("free budget");
        };
        drop((fut, child));
        let mut filled = allocation.into_filled();
        assert!(filled.set_filled(64), "zeroed");
        filled.clear();
        filled.extend_from_slice(b"outlives both handles");
        let frozen = filled.freeze();
        let (tx, rx) = mpsc::channel();
        let dropper = thread::spawn(move || {
            drop(root);
            tx.send(()).unwrap();
        });
        let patience = Duration::from_millis(if cfg!(miri) { 20 } else { 200 });
        assert!(
            rx.recv_timeout(patience).is_err(),
            "the root's drop waits for its subtree"
        );
        assert!(weak.upgrade().is_some());
        let piece = frozen.slice(9..);
        drop(frozen);
        thread::spawn(move || assert_eq!(&piece[..], b"both handles"))
            .join()
            .unwrap();
        rx.recv().unwrap();
        dropper.join().unwrap();
        assert!(weak.upgrade().is_none());
    });
}

#[cfg(feature = "bytes")]
#[test]
fn bytes_clones_dropped_racing_on_threads_hand_a_zeroed_waiter_zeros() {
    watchdog(120, || {
        for round in 0..rounds(20, 3) {
            let pool = Arc::new(common::pool(BufferSize::S16, 2));
            let mut filled = pool.try_allocate(2).unwrap().into_filled();
            filled.fill(0xFF, 32);
            let frozen = filled.freeze();
            let waiter = {
                let pool = Arc::clone(&pool);
                thread::spawn(move || {
                    let allocation = pool.allocate_zeroed_blocking(2).unwrap();
                    assert_zeros(allocation, "zeroed waiter behind racing Bytes drops");
                })
            };
            wait_waiting(&pool, 1);
            let droppers: Vec<_> = (0..3)
                .map(|i| {
                    let piece = frozen.slice(i..i + 8 + round % 8);
                    thread::spawn(move || {
                        assert!(piece.iter().all(|&b| b == 0xFF));
                        drop(piece);
                    })
                })
                .collect();
            drop(frozen);
            for dropper in droppers {
                dropper.join().unwrap();
            }
            waiter.join().unwrap();
            assert_full_budget_back(&pool);
        }
    });
}

#[test]
fn owned_reservation_allocations_keep_their_views_after_every_handle() {
    watchdog(60, || {
        let pool = Arc::new(common::pool(BufferSize::S16, 8));
        let weak = Arc::downgrade(&pool);
        let mut fut = Box::pin(Arc::clone(&pool).reserve_owned(128));
        let Poll::Ready(Ok(mut reservation)) = poll_once(&mut fut) else {
            panic!("free budget");
        };
        drop((fut, pool));
        let mut a = reservation.allocate(3).unwrap();
        let b = reservation.allocate(2).unwrap();
        drop(reservation);
        assert!(weak.upgrade().is_some());
        let m = Model::new(48, 16, false);
        check_alloc(&a, &m);
        for (i, buffer) in a.buffers_uninit_mut().enumerate() {
            buffer.fill(MaybeUninit::new(i as u8));
        }
        let mut filled = a.into_filled();
        assert!(
            !filled.set_filled(1),
            "nothing written through the cursor yet"
        );
        let mut source: &[u8] = b"an owned reservation's buffers";
        assert_eq!(filled.read_from(&mut source).unwrap(), 30);
        let a = filled.into_allocation().into_filled();
        assert!(a.is_empty() && a.capacity() == 48);
        let other = thread::spawn(move || {
            let mut b = b.into_filled();
            b.fill(7, 32);
            assert_eq!(&b[..], &[7; 32]);
            b.into_allocation()
        })
        .join()
        .unwrap();
        drop(a);
        assert!(weak.upgrade().is_some(), "one owned allocation is left");
        thread::spawn(move || drop(other)).join().unwrap();
        assert!(weak.upgrade().is_none());
    });
}

#[cfg(feature = "bytes")]
#[test]
fn shutdown_waits_for_bytes_held_by_another_task() {
    watchdog(60, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let pool = common::pool(BufferSize::S64, 2);
            let mut filled = pool.allocate_zeroed(2).await.unwrap().into_filled();
            filled.extend_from_slice(b"held across shutdown");
            let frozen = filled.freeze();
            let report = pool.shutdown_timeout(Duration::from_millis(1));
            assert!(!report.is_drained());
            assert_eq!((report.outstanding, report.in_use_bytes), (1, 128));
            let report = pool
                .shutdown_before(tokio::time::sleep(Duration::from_millis(1)))
                .await;
            assert_eq!(
                report.in_use_bytes, 128,
                "an empty-looking Bytes still holds it"
            );
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let holder = tokio::spawn(async move {
                rx.await.unwrap();
                assert_eq!(&frozen[..], b"held across shutdown");
            });
            let shutdown = tokio::spawn(pool.shutdown());
            tokio::task::yield_now().await;
            assert!(!shutdown.is_finished());
            tx.send(()).unwrap();
            holder.await.unwrap();
            common::within(10, shutdown).await.unwrap();
        });
    });
}

/// No waker frees anything here: the waker `x`'s release runs is only slow (it signals the
/// polling thread, then sleeps). Meanwhile that thread takes its grant, drops its owned
/// allocation and with it the pool's last handle, and the pool's drop (drained, its lock
/// free) frees the state, while the releasing thread is still inside `settle` with `&State`
/// borrowed.
#[test]
fn pool_state_freed_on_another_thread_while_a_release_runs_a_slow_waker() {
    use std::sync::Mutex;
    use std::task::{Context, Wake, Waker};

    struct SlowWake(Mutex<mpsc::Sender<()>>);

    impl Wake for SlowWake {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            let _ = self.0.lock().unwrap().send(());
            thread::sleep(Duration::from_millis(200));
        }
    }

    watchdog(60, || {
        let pool = Arc::new(common::pool(BufferSize::S32, 1));
        let x = pool.try_allocate(1).unwrap();
        let (tx, rx) = mpsc::channel();
        let (queued_tx, queued_rx) = mpsc::channel();
        let waiter = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                let waker = Waker::from(Arc::new(SlowWake(Mutex::new(tx))));
                let mut future = Box::pin(pool.allocate_owned(1));
                let mut cx = Context::from_waker(&waker);
                assert!(future.as_mut().poll(&mut cx).is_pending());
                queued_tx.send(()).unwrap();
                rx.recv().unwrap();
                let Poll::Ready(Ok(allocation)) = future.as_mut().poll(&mut cx) else {
                    panic!("woken but not granted");
                };
                drop(future);
                // The last owned allocation and the pool's last handle: the pool drops here.
                drop(allocation);
            })
        };
        queued_rx.recv().unwrap();
        drop(pool);
        let releaser = thread::spawn(move || drop(x));
        releaser.join().unwrap();
        waiter.join().unwrap();
    });
}

/// How many rounds the two races below run: enough for Miri's random preemption to land in
/// the window now and then, few enough for its speed.
const RACE_ROUNDS: usize = if cfg!(miri) { 40 } else { 300 };

/// A release's last step (the fast path's compare-exchange) racing the pool's drop on
/// another thread, which frees the state as soon as it sees the bytes back: the release
/// must not still hold the pool as an argument of a running function then (`heap.rs`,
/// rule 4). Miri reports that as UB (a protected reference's memory freed) when its
/// scheduler preempts the releasing thread right after the compare-exchange.
#[test]
fn pool_freed_right_after_a_releases_last_step_on_the_fast_path() {
    watchdog(120, || {
        for _ in 0..RACE_ROUNDS {
            let pool = common::pool(BufferSize::S64, 4);
            let allocation = pool.try_allocate(1).unwrap();
            let releaser = thread::spawn(move || drop(allocation));
            while pool.stats().outstanding != 0 {
                thread::yield_now();
            }
            drop(pool);
            releaser.join().unwrap();
        }
    });
}

/// The same for a release that hands its block to a waiting thread under the pool's lock:
/// the waiter can take its grant as soon as the lock is free, drop the allocation and the
/// pool's last handle, and the pool's drop frees the state (its `quiesce` waits for the
/// lock only), while the releasing thread returns from its unlock.
#[test]
fn pool_freed_right_after_a_release_unlocks_the_queue() {
    watchdog(120, || {
        for _ in 0..RACE_ROUNDS {
            let pool = Arc::new(common::pool(BufferSize::S64, 1));
            let held = pool.try_allocate(1).unwrap();
            let waiter = {
                let pool = Arc::clone(&pool);
                thread::spawn(move || {
                    let allocation = pool.allocate_blocking(1).unwrap();
                    drop(allocation);
                    // The last handle (the test's went below): the pool's drop runs here.
                    drop(pool);
                })
            };
            while pool.stats().waiting == 0 {
                thread::yield_now();
            }
            drop(pool);
            let releaser = thread::spawn(move || drop(held));
            releaser.join().unwrap();
            waiter.join().unwrap();
        }
    });
}
