//! Memory views and I/O integration, as a demanding new user would drive them (issues 5, 12
//! and 18's "no UB from safe code"): many live allocations at once across a tree of pools
//! with recycling and hand-overs, every view of each checked against a model of its bytes
//! (no uninitialised byte readable, no byte of another allocation changed, zeroed memory
//! reads zeros, alignment on every path); `bytes::BufMut` adapters, tokio's `read_buf` from
//! hand-written readers, `Bytes` split every way; all under Miri too.
#![cfg(feature = "bytes")]

mod common;

use std::future::Future;
use std::io::{IoSlice, Write};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use common::{Rng, rounds, watchdog};
use membudget::{
    AllocError, AllocateOwned, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize,
    FilledAllocation, PollAllocate,
};

fn noop() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// What the test knows of each byte of one allocation: `Some(v)` written (or zeroed) with
/// `v`, `None` unknown (never read).
#[derive(Clone, Debug)]
struct Model {
    bytes: Vec<Option<u8>>,
    /// The crate should count the whole block initialised (zeroed request, no uninit view).
    zeroed: bool,
    align: usize,
}

impl Model {
    fn fresh(len: usize, zeroed: bool, align: usize) -> Self {
        Model {
            bytes: vec![if zeroed { Some(0) } else { None }; len],
            zeroed,
            align,
        }
    }
}

/// The model of a `FilledAllocation`: its bytes, the filled length and the initialised
/// prefix the docs promise (`set_filled`).
#[derive(Debug)]
struct FilledModel {
    m: Model,
    filled: usize,
    init: usize,
}

enum Item {
    Alloc(BufPoolAllocation, Model),
    Filled(FilledAllocation, FilledModel),
    Frozen(Bytes, Vec<u8>),
}

enum Pending {
    Owned(Pin<Box<AllocateOwned>>, bool, usize),
    Polled(PollAllocate, usize),
}

/// Reads the bytes the model knows, through the raw pointer (sound: each was written).
fn check_raw(first: *mut u8, m: &Model, what: &str) {
    assert_eq!(
        first as usize % m.align,
        0,
        "{what}: block not aligned to {}",
        m.align
    );
    for (i, known) in m.bytes.iter().enumerate() {
        if let Some(v) = known {
            // SAFETY: byte `i` of the live block was written with `v` (or zeroed) and the
            // model says nothing wrote it since except through tracked views.
            let got = unsafe { first.add(i).read() };
            assert_eq!(
                got, *v,
                "{what}: byte {i} changed (another allocation's write?)"
            );
        }
    }
}

fn check_item(item: &mut Item, what: &str) {
    match item {
        Item::Alloc(a, m) => {
            assert_eq!(a.allocated_bytes(), m.bytes.len(), "{what}");
            check_raw(a.first(), m, what);
        }
        Item::Filled(f, fm) => {
            assert_eq!(f.capacity(), fm.m.bytes.len(), "{what}");
            assert_eq!(f.filled().len(), fm.filled, "{what}: filled length");
            let expected: Vec<u8> = fm.m.bytes[..fm.filled]
                .iter()
                .map(|b| b.expect("filled bytes are known"))
                .collect();
            assert_eq!(f.filled(), &expected[..], "{what}: filled bytes");
            assert_eq!(
                f.buffers().map(<[u8]>::len).sum::<usize>(),
                fm.filled,
                "{what}"
            );
            assert_eq!(f.io_slices().len(), f.buffers().len(), "{what}");
            assert_eq!(f.remaining(), f.capacity() - fm.filled, "{what}");
            // The known bytes past the cursor, through the filled view (no raw pointer to
            // the block here): widen to the initialised prefix, compare, narrow back.
            assert!(f.set_filled(fm.init), "{what}: the initialised prefix");
            for (i, (got, want)) in f.filled().iter().zip(&fm.m.bytes).enumerate() {
                if let Some(want) = want {
                    assert_eq!(got, want, "{what}: byte {i} changed");
                }
            }
            assert!(f.set_filled(fm.filled));
            assert_eq!(f.as_ptr() as usize % fm.m.align, 0, "{what}: alignment");
        }
        Item::Frozen(b, v) => assert_eq!(&b[..], &v[..], "{what}: frozen bytes"),
    }
}

struct Tree {
    root: Arc<BufPool>,
    child: Arc<BufPool>,
    root_align: usize,
    child_align: usize,
}

fn tree(direct: bool) -> Tree {
    let root_bs = BufferSize::S16;
    let mut b = BufPool::builder(BufPoolCfg {
        buffer_size: root_bs,
        max_memory: 16 * 16,
    })
    .recycle(2)
    .recycle_min_bytes(0);
    if direct {
        b = b.direct_io_alignment();
    }
    let root = Arc::new(b.build().unwrap());
    let mut cb = BufPool::builder(BufPoolCfg {
        buffer_size: BufferSize::S32,
        max_memory: 32 * 4,
    })
    .parent(&root);
    if direct {
        cb = cb.direct_io_alignment();
    }
    let child = Arc::new(cb.build().unwrap());
    Tree {
        root,
        child,
        root_align: 16,
        child_align: if direct { 32 } else { 16 },
    }
}

fn new_item(a: BufPoolAllocation, zeroed: bool, align: usize) -> Item {
    let len = a.allocated_bytes();
    let mut item = Item::Alloc(a, Model::fresh(len, zeroed, align));
    check_item(&mut item, "new allocation");
    item
}

fn poll_pending(t: &Tree, pending: &mut Vec<Pending>, items: &mut Vec<Item>) {
    let mut i = 0;
    while i < pending.len() {
        let done = match &mut pending[i] {
            Pending::Owned(fut, zeroed, align) => match fut.as_mut().poll(&mut noop()) {
                Poll::Ready(r) => Some((r, *zeroed, *align)),
                Poll::Pending => None,
            },
            Pending::Polled(p, n) => match p.poll_allocate(&mut noop(), *n) {
                // Only root requests are polled.
                Poll::Ready(r) => Some((r, false, t.root_align)),
                Poll::Pending => None,
            },
        };
        match done {
            Some((Ok(a), zeroed, align)) => {
                pending.swap_remove(i);
                items.push(new_item(a, zeroed, align));
            }
            Some((Err(e), ..)) => panic!("a pending request failed: {e}"),
            None => i += 1,
        }
    }
}

fn pattern(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.next() as u8).collect()
}

/// One random step on `items[k]` (or a new allocation); `false` if nothing was done.
fn step(t: &Tree, rng: &mut Rng, items: &mut Vec<Item>, pending: &mut Vec<Pending>) {
    if rng.range(0, 15) == 0 {
        // Resize the root (every request still fits, so no waiter fails): cached blocks
        // are trimmed, live views must not notice.
        t.root
            .set_max_memory(16 * rng.range(10, 20))
            .expect("a valid budget");
        return;
    }
    if items.len() > 2 && rng.range(0, 3) == 0 {
        // Drop one (its release may hand its block to a queued head).
        let k = rng.range(0, items.len() - 1);
        drop(items.swap_remove(k));
        return;
    }
    let op = rng.range(0, 19);
    if op < 5 || items.is_empty() {
        // A new allocation, some form, some pool.
        let on_child = rng.range(0, 3) == 0;
        let (pool, align, max_n) = if on_child {
            (&t.child, t.child_align, 4)
        } else {
            (&t.root, t.root_align, 6)
        };
        let n = rng.range(1, max_n);
        let form = rng.range(0, 4);
        let zeroed = form == 1 || form == 4;
        let got = match form {
            0 => pool.try_allocate(n),
            1 => pool.try_allocate_zeroed(n),
            2 => pool
                .try_reserve(n * pool.buffer_size().bytes())
                .and_then(|mut r| r.allocate(n)),
            3 => Arc::clone(pool).allocate_owned(n).poll_now(),
            _ => Arc::clone(pool).allocate_zeroed_owned(n).poll_now(),
        };
        match got {
            Ok(a) => items.push(new_item(a, zeroed, align)),
            Err(AllocError::WouldBlock) | Err(AllocError::QueueFull) => {
                if pending.len() < 3 {
                    // Queue: a hand-over may give it the very block a release frees.
                    if rng.range(0, 1) == 0 || zeroed || on_child {
                        let mut fut = Box::pin(Arc::clone(pool).allocate_owned(n));
                        if zeroed {
                            fut = Box::pin(Arc::clone(pool).allocate_zeroed_owned(n));
                        }
                        match fut.as_mut().poll(&mut noop()) {
                            Poll::Pending => pending.push(Pending::Owned(fut, zeroed, align)),
                            Poll::Ready(r) => items.push(new_item(r.unwrap(), zeroed, align)),
                        }
                    } else {
                        let mut p = PollAllocate::new(Arc::clone(pool));
                        match p.poll_allocate(&mut noop(), n) {
                            Poll::Pending => pending.push(Pending::Polled(p, n)),
                            Poll::Ready(r) => items.push(new_item(r.unwrap(), false, align)),
                        }
                    }
                }
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
        return;
    }
    let k = rng.range(0, items.len() - 1);
    let item = items.swap_remove(k);
    let next = match (item, op) {
        // Drop it (the release may hand its block to a queued head).
        (_, 5 | 6) => None,
        (Item::Alloc(mut a, mut m), 7) => {
            // Whole block through uninit_mut: known pattern, one byte de-initialised.
            let p = pattern(rng, m.bytes.len());
            let hole = rng.range(0, m.bytes.len() - 1);
            let view = a.uninit_mut();
            for (i, byte) in p.iter().enumerate() {
                view[i] = MaybeUninit::new(*byte);
                m.bytes[i] = Some(*byte);
            }
            view[hole] = MaybeUninit::uninit();
            m.bytes[hole] = None;
            m.zeroed = false;
            Some(Item::Alloc(a, m))
        }
        (Item::Alloc(mut a, mut m), 8) => {
            // One buffer through buffers_uninit_mut.
            let bs = a.buffer_size();
            let which = rng.range(0, a.length() - 1);
            let byte = rng.next() as u8;
            let mut count = 0;
            for (i, buffer) in a.buffers_uninit_mut().enumerate() {
                count += 1;
                assert_eq!(buffer.len(), bs);
                if i == which {
                    buffer.fill(MaybeUninit::new(byte));
                    for b in &mut m.bytes[i * bs..(i + 1) * bs] {
                        *b = Some(byte);
                    }
                }
            }
            assert_eq!(count, a.length());
            m.zeroed = false;
            Some(Item::Alloc(a, m))
        }
        (Item::Alloc(a, m), _) => {
            let init = if m.zeroed { m.bytes.len() } else { 0 };
            let f = a.into_filled();
            Some(Item::Filled(f, FilledModel { m, filled: 0, init }))
        }
        (Item::Filled(mut f, mut fm), op) => {
            let cap = fm.m.bytes.len();
            match op {
                7 => {
                    let len = rng.range(0, cap);
                    let p = pattern(rng, len);
                    let wrote = f.extend_from_slice(&p);
                    assert_eq!(wrote, p.len().min(cap - fm.filled));
                    for (i, byte) in p[..wrote].iter().enumerate() {
                        fm.m.bytes[fm.filled + i] = Some(*byte);
                    }
                    fm.filled += wrote;
                    fm.init = fm.init.max(fm.filled);
                }
                8 => {
                    let byte = rng.next() as u8;
                    let count = rng.range(0, cap);
                    let wrote = f.fill(byte, count);
                    assert_eq!(wrote, count.min(cap - fm.filled));
                    for b in &mut fm.m.bytes[fm.filled..fm.filled + wrote] {
                        *b = Some(byte);
                    }
                    fm.filled += wrote;
                    fm.init = fm.init.max(fm.filled);
                }
                9 => {
                    // BufMut: put_slice within what fits, then put_u8s.
                    let room = f.remaining_mut();
                    assert_eq!(room, cap - fm.filled);
                    assert_eq!(f.chunk_mut().len(), room, "the whole remaining capacity");
                    let len = rng.range(0, room);
                    let p = pattern(rng, len);
                    f.put_slice(&p);
                    for (i, byte) in p.iter().enumerate() {
                        fm.m.bytes[fm.filled + i] = Some(*byte);
                    }
                    fm.filled += p.len();
                    fm.init = fm.init.max(fm.filled);
                }
                10 => {
                    // read_from a slice reader: zeroes what was never initialised first.
                    let len = rng.range(1, cap);
                    let p = pattern(rng, len);
                    let mut src: &[u8] = &p;
                    let read = f.read_from(&mut src).unwrap();
                    assert_eq!(read, p.len().min(cap - fm.filled));
                    if fm.filled < cap {
                        for b in &mut fm.m.bytes[fm.init.max(fm.filled)..] {
                            *b = Some(0);
                        }
                        fm.init = cap;
                    }
                    for (i, byte) in p[..read].iter().enumerate() {
                        fm.m.bytes[fm.filled + i] = Some(*byte);
                    }
                    fm.filled += read;
                }
                11 => {
                    let len = rng.range(0, cap);
                    let accepted = f.set_filled(len);
                    assert_eq!(
                        accepted,
                        len <= fm.init,
                        "set_filled({len}) with {} known initialised (zeroed {})",
                        fm.init,
                        fm.m.zeroed
                    );
                    if accepted {
                        fm.filled = len;
                    }
                }
                12 => {
                    f.clear();
                    fm.filled = 0;
                }
                13 => {
                    // Vectored write of the filled buffers into a Vec, one short writer.
                    let mut out = Vec::new();
                    let slices = f.io_slices();
                    let mut total = 0;
                    for s in &slices {
                        total += out.write(s).unwrap();
                    }
                    assert_eq!(&out[..], f.filled());
                    assert_eq!(total, fm.filled);
                }
                14 => {
                    let a = f.into_allocation();
                    // Writes through the cursor keep a zeroed allocation initialised.
                    return items.push(Item::Alloc(a, fm.m));
                }
                15 | 16 => {
                    let v = f.filled().to_vec();
                    return items.push(Item::Frozen(f.freeze(), v));
                }
                _ => {
                    if fm.filled > 0 {
                        let i = rng.range(0, fm.filled - 1);
                        let byte = rng.next() as u8;
                        f.filled_mut()[i] = byte;
                        fm.m.bytes[i] = Some(byte);
                    }
                }
            }
            Some(Item::Filled(f, fm))
        }
        (Item::Frozen(b, v), op) => match op {
            7..=9 if b.len() > 1 => {
                let at = rng.range(1, b.len() - 1);
                let mut head = b.clone();
                let tail = head.split_off(at);
                items.push(Item::Frozen(tail, v[at..].to_vec()));
                drop(b);
                Some(Item::Frozen(head, v[..at].to_vec()))
            }
            10 | 11 if !b.is_empty() => {
                let lo = rng.range(0, b.len() - 1);
                let hi = rng.range(lo + 1, b.len());
                let s = b.slice(lo..hi);
                items.push(Item::Frozen(s, v[lo..hi].to_vec()));
                Some(Item::Frozen(b, v))
            }
            12 if !b.is_empty() => {
                let mut b = b;
                let cnt = rng.range(0, b.len());
                b.advance(cnt);
                Some(Item::Frozen(b, v[cnt..].to_vec()))
            }
            _ => Some(Item::Frozen(b, v)),
        },
    };
    if let Some(mut item) = next {
        check_item(&mut item, "after a step");
        items.push(item);
    }
}

trait PollNow {
    fn poll_now(self) -> Result<BufPoolAllocation, AllocError>;
}

impl PollNow for AllocateOwned {
    /// One poll: ready now or `WouldBlock` (the future dropped, leaving the queue).
    fn poll_now(self) -> Result<BufPoolAllocation, AllocError> {
        let mut fut = Box::pin(self);
        match fut.as_mut().poll(&mut noop()) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(AllocError::WouldBlock),
        }
    }
}

fn check_books(t: &Tree) {
    let root = t.root.stats();
    // Live bytes may stay above a shrunk budget (they were made before it); cached ones
    // never add to that (README guarantee 1, "shrinks included").
    assert!(
        root.cached_bytes <= root.max_memory.saturating_sub(root.in_use_bytes),
        "cached blocks put the footprint above the root's budget: {root}"
    );
    let child = t.child.stats();
    assert!(child.in_use_bytes <= child.max_memory, "{child}");
}

fn run_sequence(seed: u64, steps: usize, direct: bool) {
    let t = tree(direct);
    let mut rng = Rng::new(seed);
    let mut items = Vec::new();
    let mut pending = Vec::new();
    for s in 0..steps {
        step(&t, &mut rng, &mut items, &mut pending);
        poll_pending(&t, &mut pending, &mut items);
        for (i, item) in items.iter_mut().enumerate() {
            check_item(item, &format!("seed {seed} step {s} item {i}"));
        }
        check_books(&t);
    }
    while !items.is_empty() || !pending.is_empty() {
        items.pop();
        poll_pending(&t, &mut pending, &mut items);
        for item in &mut items {
            check_item(item, &format!("seed {seed} draining"));
        }
        check_books(&t);
    }
    for pool in [&t.child, &t.root] {
        let s = pool.stats();
        assert_eq!((s.in_use_bytes, s.outstanding, s.waiting), (0, 0, 0), "{s}");
    }
    let Tree { root, child, .. } = t;
    drop(Arc::try_unwrap(child).expect("no owned allocation keeps the child"));
    drop(Arc::try_unwrap(root).expect("no owned allocation keeps the root"));
}

#[test]
fn many_live_views_across_a_tree_with_recycling_and_hand_overs() {
    watchdog(120, || {
        for seed in 0..rounds(60, 3) as u64 {
            run_sequence(seed, rounds(600, 60), seed % 2 == 1);
        }
    });
}

/// `bytes::BufMut`'s provided adapters over a `FilledAllocation`: `writer()`, `limit`,
/// `chain_mut`, `put_bytes`, `put` from a `Buf`, and `&mut` forwarding. Every write lands
/// in order across buffers, the tracking follows, and nothing uninitialised is exposed.
#[test]
fn buf_mut_adapters_fill_in_order_and_track_what_they_wrote() {
    watchdog(60, || {
        let pool = common::pool(BufferSize::S8, 16);
        for zeroed in [false, true] {
            let get = |n| {
                if zeroed {
                    pool.try_allocate_zeroed(n).unwrap()
                } else {
                    pool.try_allocate(n).unwrap()
                }
            };
            // writer(): std::io::Write through BufMut.
            let mut w = get(2).into_filled().writer();
            write!(w, "0123456789").unwrap();
            let mut f = w.into_inner();
            assert_eq!(f.filled(), b"0123456789");
            // limit: at most 3 more.
            {
                let mut lim = (&mut f).limit(3);
                assert_eq!(lim.remaining_mut(), 3);
                lim.put_slice(b"abc");
                assert_eq!(lim.remaining_mut(), 0);
            }
            assert_eq!(f.filled(), b"0123456789abc");
            // put_bytes to exactly the end.
            f.put_bytes(b'z', 3);
            assert_eq!(f.remaining_mut(), 0);
            assert_eq!(f.filled(), b"0123456789abczzz");
            assert_eq!(f.chunk_mut().len(), 0);
            // chain_mut across two allocations: the first fills, then the second.
            let first = get(1).into_filled();
            let second = get(2).into_filled();
            let mut chain = first.chain_mut(second);
            assert_eq!(chain.remaining_mut(), 24);
            chain.put_slice(b"across two allocations!");
            chain.put(&b"?"[..]);
            let (first, second) = chain.into_inner();
            assert_eq!(first.filled(), b"across t");
            assert_eq!(second.filled(), b"wo allocations!?");
            // put from a chained Buf of several pieces.
            let mut third = get(3).into_filled();
            third.put((&b"one "[..]).chain(&b"two "[..]).chain(&b"three"[..]));
            assert_eq!(third.filled(), b"one two three");
            third.put_u64_le(0x0102_0304_0506_0708);
            assert_eq!(&third[13..], &[8, 7, 6, 5, 4, 3, 2, 1]);
            assert_eq!(third.remaining_mut(), 3);
            // Zeroed: the zeros past the cursor stay readable, a plain one refuses.
            assert_eq!(third.set_filled(24), zeroed);
            if zeroed {
                assert_eq!(&third[21..], &[0, 0, 0]);
            }
            assert_eq!(pool.stats().in_use_bytes, 8 * (2 + 1 + 2 + 3));
            drop((f, first, second, third));
            common::assert_idle(&pool);
        }
    });
}

/// A reader that initialises the whole unfilled part (safe `ReadBuf` API), then fills only
/// part of it: tokio's `read_buf` must count only what was filled.
struct InitialisingReader {
    data: Vec<u8>,
    at: usize,
    per_read: usize,
}

impl tokio::io::AsyncRead for InitialisingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let unfilled = buf.initialize_unfilled();
        let n = self
            .per_read
            .min(unfilled.len())
            .min(self.data.len() - self.at);
        unfilled[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        buf.advance(n);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// A reader that is pending every other poll, then puts a slice (through `put_slice`).
struct SlowReader {
    data: Vec<u8>,
    at: usize,
    ready: bool,
}

impl tokio::io::AsyncRead for SlowReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.ready {
            self.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = false;
        let n = 5.min(buf.remaining()).min(self.data.len() - self.at);
        buf.put_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

#[test]
fn tokio_read_buf_from_hand_written_readers_counts_only_what_was_read() {
    use tokio::io::AsyncReadExt;
    watchdog(60, || {
        let pool = common::pool(BufferSize::S16, 16);
        let data: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37)).collect();
        futures::executor::block_on(async {
            for zeroed in [false, true] {
                let get = |n| {
                    if zeroed {
                        pool.try_allocate_zeroed(n).unwrap()
                    } else {
                        pool.try_allocate(n).unwrap()
                    }
                };
                // Initialising reader, 7 bytes a read, into 3 buffers (48 bytes).
                let mut f = get(3).into_filled();
                let mut r = InitialisingReader {
                    data: data.clone(),
                    at: 0,
                    per_read: 7,
                };
                let mut total = 0;
                loop {
                    let n = r.read_buf(&mut f).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    total += n;
                    assert_eq!(f.filled(), &data[..total]);
                }
                assert_eq!(total, 48);
                assert_eq!(f.remaining(), 0);
                // Bytes the reader zeroed but did not fill never count (unless zeroed).
                f.clear();
                assert!(f.set_filled(48));
                drop(f);

                // A pending-then-ready reader, via take and chain.
                let mut f = get(4).into_filled();
                f.extend_from_slice(b">>");
                let slow = SlowReader {
                    data: data.clone(),
                    at: 0,
                    ready: false,
                };
                let mut r = slow.take(23).chain(&b"<tail>"[..]);
                while r.read_buf(&mut f).await.unwrap() > 0 {}
                let mut want = b">>".to_vec();
                want.extend_from_slice(&data[..23]);
                want.extend_from_slice(b"<tail>");
                assert_eq!(f.filled(), &want[..]);
                assert_eq!(f.set_filled(64), zeroed, "past the cursor: zeroed only");
                if !zeroed {
                    assert!(!f.set_filled(want.len() + 1));
                }
                // Freeze and read it back as Bytes.
                assert!(f.set_filled(want.len()));
                let frozen = f.freeze();
                assert_eq!(&frozen[..], &want[..]);
                drop(frozen);

                // read_exact into the filled view after read_from zeroed it.
                let mut f = get(2).into_filled();
                f.fill(0, 32);
                let mut src: &[u8] = &data[..32];
                src.read_exact(f.filled_mut()).await.unwrap();
                assert_eq!(f.filled(), &data[..32]);
                // BufReader over a slice, read_buf until full: stops with 0 when full.
                let mut f = get(1).into_filled();
                let mut br = tokio::io::BufReader::with_capacity(5, &data[..]);
                while br.read_buf(&mut f).await.unwrap() > 0 {}
                assert_eq!(f.filled(), &data[..16]);
            }
        });
        common::assert_idle(&pool);
    });
}

/// `Bytes` from a frozen allocation split every way across buffer boundaries: every piece
/// reads its own bytes, and the whole allocation stays reserved until the last piece holding
/// it drops (a waiter then proceeds).
#[test]
fn frozen_bytes_split_every_way_hold_the_budget_until_the_last_piece() {
    watchdog(60, || {
        let pool = Arc::new(common::pool(BufferSize::S8, 6));
        let data: Vec<u8> = (b'a'..=b'z').chain(b'A'..=b'V').collect(); // 48 bytes
        for round in 0..rounds(6, 2) {
            let mut f = pool.try_allocate(6).unwrap().into_filled();
            assert_eq!(f.extend_from_slice(&data), 48);
            let mut b = f.freeze();
            let mut waiter = Box::pin(Arc::clone(&pool).allocate_zeroed_owned(6));
            assert!(waiter.as_mut().poll(&mut noop()).is_pending());
            let mut pieces: Vec<(Bytes, &[u8])> = Vec::new();
            let tail = b.split_off(41);
            pieces.push((tail, &data[41..]));
            let head = b.split_to(3);
            pieces.push((head, &data[..3]));
            // b is 3..41
            let mut mid = b.clone();
            mid.advance(5); // 8..41
            let copy = mid.copy_to_bytes(9); // 8..17, shares (Bytes::copy_to_bytes)
            pieces.push((copy, &data[8..17]));
            let sub = b.slice_ref(&b[10..20]); // 13..23
            pieces.push((sub, &data[13..23]));
            let mut trunc = b.clone();
            trunc.truncate(4); // 3..7
            pieces.push((trunc, &data[3..7]));
            pieces.push((mid, &data[17..41]));
            pieces.push((b, &data[3..41]));
            let mut rng = Rng::new(round as u64);
            while !pieces.is_empty() {
                let i = rng.range(0, pieces.len() - 1);
                for (p, want) in &pieces {
                    assert_eq!(&p[..], *want);
                }
                assert_eq!(
                    pool.stats().in_use_bytes,
                    48,
                    "reserved while a piece lives"
                );
                assert!(waiter.as_mut().poll(&mut noop()).is_pending());
                let (p, _) = pieces.swap_remove(i);
                // Half of them dropped on another thread.
                if rng.range(0, 1) == 0 {
                    std::thread::spawn(move || drop(p)).join().unwrap();
                } else {
                    drop(p);
                }
            }
            let Poll::Ready(Ok(zeros)) = waiter.as_mut().poll(&mut noop()) else {
                panic!("the waiter proceeds once the last piece is gone");
            };
            let mut zeros = zeros.into_filled();
            assert!(zeros.set_filled(48));
            assert!(zeros.iter().all(|&b| b == 0), "a zeroed waiter reads zeros");
        }
        common::assert_idle(&pool);
    });
}

/// Every path an allocation can come from honours the direct-I/O alignment promise:
/// `min(buffer_size, 4096)` for every buffer (fresh, zeroed, recycled, handed over, out of a
/// reservation, owned, polled, blocking, timeout, a child's served from the root's cache).
#[test]
fn direct_io_alignment_holds_on_every_path() {
    watchdog(120, || {
        let sizes = if cfg!(miri) {
            vec![BufferSize::S512, BufferSize::S16384]
        } else {
            vec![
                BufferSize::S8,
                BufferSize::S512,
                BufferSize::S4096,
                BufferSize::S16384,
            ]
        };
        for size in sizes {
            let bs = size.bytes();
            let align = bs.min(4096);
            let check = |a: &BufPoolAllocation, what: &str| {
                for (i, buffer) in a.iter().enumerate() {
                    assert_eq!(
                        buffer as usize % align,
                        0,
                        "{size:?} {what}: buffer {i} not aligned to {align}"
                    );
                }
            };
            let root = Arc::new(
                BufPool::builder(BufPoolCfg {
                    buffer_size: size,
                    max_memory: bs * 4,
                })
                .direct_io_alignment()
                .recycle(2)
                .recycle_min_bytes(0)
                .build()
                .unwrap(),
            );
            let child = BufPool::builder(BufPoolCfg {
                buffer_size: size,
                max_memory: bs * 2,
            })
            .parent(&root)
            .direct_io_alignment()
            .build()
            .unwrap();
            let a = root.try_allocate(2).unwrap();
            check(&a, "fresh");
            drop(a); // cached
            let a = root.try_allocate(2).unwrap();
            check(&a, "recycled");
            drop(a);
            let a = child.try_allocate(2).unwrap();
            check(&a, "child from the root's cache");
            drop(a);
            check(&root.try_allocate_zeroed(3).unwrap(), "zeroed");
            check(&root.allocate_blocking(1).unwrap(), "blocking");
            check(
                &root.allocate_timeout(1, Duration::from_secs(5)).unwrap(),
                "timeout",
            );
            let mut r = root.try_reserve(bs * 3).unwrap();
            check(&r.allocate(3).unwrap(), "reservation");
            drop(r);
            let owned = futures::executor::block_on(Arc::clone(&root).allocate_owned(4)).unwrap();
            check(&owned, "owned");
            // Hand-overs: the full budget is out; queue a polled and an owned zeroed waiter.
            let mut polled = PollAllocate::new(Arc::clone(&root));
            assert!(polled.poll_allocate(&mut noop(), 4).is_pending());
            let mut zeroed = Box::pin(Arc::clone(&root).allocate_zeroed_owned(4));
            assert!(zeroed.as_mut().poll(&mut noop()).is_pending());
            drop(owned);
            let Poll::Ready(Ok(handed)) = polled.poll_allocate(&mut noop(), 4) else {
                panic!("the polled head is served");
            };
            check(&handed, "handed to a polled waiter");
            drop(handed);
            let Poll::Ready(Ok(handed)) = zeroed.as_mut().poll(&mut noop()) else {
                panic!("the zeroed head is served");
            };
            check(&handed, "handed to a zeroed waiter");
            let mut f = handed.into_filled();
            assert!(f.set_filled(bs * 4));
            assert!(f.iter().all(|&b| b == 0));
            drop(f);
            drop((polled, zeroed, child));
            let root = Arc::try_unwrap(root).unwrap();
            common::assert_idle(&root);
        }
    });
}

/// `std::io::Write` at the edges: a full allocation takes nothing more (`write` is `Ok(0)`,
/// `write_all`/`write!` a `WriteZero` error after filling what fit), vectored writes with
/// empty slices anywhere, and `io_slices` handing everything to a one-byte-at-a-time writer.
#[test]
fn write_edges_and_vectored_round_trips() {
    watchdog(60, || {
        let pool = common::pool(BufferSize::S8, 8);
        let mut f = pool.try_allocate(3).unwrap().into_filled();
        let empty: &[u8] = &[];
        let slices = [
            IoSlice::new(empty),
            IoSlice::new(b"abc"),
            IoSlice::new(empty),
            IoSlice::new(b"defghijk"),
            IoSlice::new(empty),
            IoSlice::new(b"lmnopqrstuvwxyz"),
        ];
        assert_eq!(f.write_vectored(&slices).unwrap(), 24);
        assert_eq!(f.filled(), b"abcdefghijklmnopqrstuvwx");
        assert_eq!(f.write(b"more").unwrap(), 0);
        assert_eq!(f.write_vectored(&slices).unwrap(), 0);
        f.clear();
        let err = write!(f, "{}", "0123456789".repeat(3)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WriteZero);
        assert_eq!(f.filled(), b"012345678901234567890123");
        // A writer that takes one byte a call, driven over io_slices with advance_slices.
        struct OneByte(Vec<u8>);
        impl Write for OneByte {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if let Some(&x) = b.first() {
                    self.0.push(x);
                    return Ok(1);
                }
                Ok(0)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut out = OneByte(Vec::new());
        let mut owned = f.io_slices();
        let mut bufs = &mut owned[..];
        while !bufs.is_empty() {
            let n = out.write_vectored(bufs).unwrap();
            IoSlice::advance_slices(&mut bufs, n);
        }
        assert_eq!(&out.0[..], f.filled());
        drop(f);
        common::assert_idle(&pool);
    });
}

/// A zeroed allocation read back after `into_filled`/`into_allocation` round trips and
/// cursor writes stays readable as zeros past the cursor; the uninit view at any point makes
/// it forget, even from inside a round trip, and the next `into_filled` then refuses to
/// expose anything not written through it.
#[test]
fn zeroed_round_trips_keep_zeros_until_an_uninit_view() {
    watchdog(60, || {
        let pool = common::pool(BufferSize::S8, 8);
        let mut f = pool.try_allocate_zeroed(2).unwrap().into_filled();
        f.extend_from_slice(b"abc");
        let mut a = f.into_allocation();
        let mut f = a.into_filled();
        assert!(f.set_filled(16), "still zeroed through a round trip");
        assert_eq!(f.filled(), b"abc\0\0\0\0\0\0\0\0\0\0\0\0\0");
        f.clear();
        f.put_slice(b"XY");
        a = f.into_allocation();
        a.buffers_uninit_mut().next().unwrap()[1] = MaybeUninit::uninit();
        let mut f = a.into_filled();
        assert!(!f.set_filled(1), "forgot its zeros");
        assert_eq!(f.read_from(&mut &b"Q"[..]).unwrap(), 1);
        assert!(f.set_filled(16), "read_from zeroed the rest");
        assert_eq!(f.filled(), b"Q\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        let frozen = Bytes::from(f);
        assert_eq!(frozen.len(), 16);
        drop(frozen);
        common::assert_idle(&pool);
    });
}

/// Threads fill allocations of a small tree (a cache shared by root and child, hand-overs
/// between threads), check zeros and their own patterns, and pass frozen `Bytes` around to
/// be read and dropped on other threads: Miri checks every byte access for races and
/// uninitialised reads, and the books end exact.
#[test]
fn threads_fill_freeze_and_pass_bytes_around_a_shared_tree() {
    use std::sync::mpsc;
    watchdog(120, || {
        let root = Arc::new(
            BufPool::builder(BufPoolCfg {
                buffer_size: BufferSize::S16,
                max_memory: 16 * 8,
            })
            .recycle(1)
            .recycle_min_bytes(0)
            .build()
            .unwrap(),
        );
        let child = Arc::new(
            root.child(
                "c",
                BufPoolCfg {
                    buffer_size: BufferSize::S32,
                    max_memory: 32 * 2,
                },
            )
            .unwrap(),
        );
        const THREADS: usize = 3;
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..THREADS)
            .map(|_| mpsc::channel::<(Bytes, Vec<u8>)>())
            .unzip();
        let rounds = rounds(150, 6);
        let handles: Vec<_> = receivers
            .into_iter()
            .enumerate()
            .map(|(t, rx)| {
                let next = senders[(t + 1) % THREADS].clone();
                let (root, child) = (Arc::clone(&root), Arc::clone(&child));
                std::thread::spawn(move || {
                    let mut rng = Rng::new(1000 + t as u64);
                    let drain = |rx: &mpsc::Receiver<(Bytes, Vec<u8>)>| {
                        while let Ok((b, want)) = rx.try_recv() {
                            assert_eq!(&b[..], &want[..], "Bytes read on another thread");
                        }
                    };
                    for round in 0..rounds {
                        drain(&rx);
                        let pool = if rng.range(0, 2) == 0 { &child } else { &root };
                        let max_n = if Arc::ptr_eq(pool, &child) { 2 } else { 4 };
                        let n = rng.range(1, max_n);
                        let zeroed = rng.range(0, 1) == 0;
                        let got = match rng.range(0, 2) {
                            0 if zeroed => {
                                pool.allocate_zeroed_timeout(n, Duration::from_millis(20))
                            }
                            0 => pool.allocate_timeout(n, Duration::from_millis(20)),
                            1 if zeroed => Arc::clone(pool).allocate_zeroed_owned(n).poll_now(),
                            1 => Arc::clone(pool).allocate_owned(n).poll_now(),
                            _ => {
                                if zeroed {
                                    pool.try_allocate_zeroed(n)
                                } else {
                                    pool.try_allocate(n)
                                }
                            }
                        };
                        let mut a = match got {
                            Ok(a) => a,
                            Err(AllocError::TimedOut | AllocError::WouldBlock) => {
                                std::thread::yield_now();
                                continue;
                            }
                            Err(e) => panic!("{e}"),
                        };
                        let cap = a.allocated_bytes();
                        assert_eq!(a.first() as usize % 16, 0);
                        let tag = (t * 64 + round % 64) as u8;
                        if rng.range(0, 2) == 0 {
                            // Raw pattern through the uninit view, read back raw.
                            for (i, b) in a.uninit_mut().iter_mut().enumerate() {
                                b.write(tag ^ i as u8);
                            }
                            std::thread::yield_now();
                            for i in 0..cap {
                                // SAFETY: every byte was just written through uninit_mut.
                                assert_eq!(unsafe { a.first().add(i).read() }, tag ^ i as u8);
                            }
                            continue;
                        }
                        let mut f = a.into_filled();
                        assert_eq!(f.set_filled(cap), zeroed, "zeroed {zeroed}");
                        if zeroed {
                            assert!(f.iter().all(|&b| b == 0), "a zeroed allocation reads zeros");
                        }
                        f.clear();
                        let want: Vec<u8> = (0..rng.range(0, cap)).map(|i| tag ^ i as u8).collect();
                        f.put_slice(&want);
                        std::thread::yield_now();
                        assert_eq!(f.filled(), &want[..]);
                        if rng.range(0, 1) == 0 {
                            let b = f.freeze();
                            let _ = next.send((b.slice(..), want));
                        }
                    }
                    drain(&rx);
                    rx
                })
            })
            .collect();
        drop(senders);
        let receivers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for rx in receivers {
            while let Ok((b, want)) = rx.try_recv() {
                assert_eq!(&b[..], &want[..]);
            }
        }
        for pool in [&child, &root] {
            let s = pool.stats();
            assert_eq!((s.in_use_bytes, s.outstanding, s.waiting), (0, 0, 0), "{s}");
            assert!(s.in_use_bytes + s.cached_bytes <= s.max_memory);
        }
        drop(Arc::try_unwrap(child).expect("the child's last handle"));
        drop(Arc::try_unwrap(root).expect("the root's last handle"));
    });
}

/// The thread-safety the docs state, checked at compile time.
#[test]
fn views_are_send_and_sync_as_documented() {
    fn send_sync_static<T: Send + Sync + 'static>() {}
    fn send_static<T: Send + 'static>() {}
    fn unpin<T: Unpin>() {}
    send_sync_static::<BufPoolAllocation>();
    send_sync_static::<FilledAllocation>();
    send_static::<AllocateOwned>();
    send_static::<PollAllocate>();
    unpin::<PollAllocate>();
    // `Bytes::from_owner` needs `Send + 'static` and `AsRef<[u8]>`.
    fn owner<T: AsRef<[u8]> + Send + 'static>() {}
    owner::<FilledAllocation>();
}

/// Allocations out of an overcommitted reservation (`force_grow`) beside cached blocks: once
/// reserved bytes become live memory, cached blocks never add to it beyond the budget
/// (README guarantee 1: reserved bytes are no memory, and cached blocks "are evicted when
/// those bytes become an allocation"); the views of every allocation stay intact.
#[test]
fn overcommitted_reservation_allocations_evict_the_cache_and_keep_their_views() {
    watchdog(60, || {
        const B: usize = 4096;
        let pool = BufPool::builder(BufPoolCfg {
            buffer_size: BufferSize::S4096,
            max_memory: 16 * B,
        })
        .recycle(4)
        .recycle_min_bytes(0)
        .build()
        .unwrap();
        let footprint_ok = |live: usize| {
            let s = pool.stats();
            assert!(
                live + s.cached_bytes <= s.max_memory.max(live),
                "live {live} + cached {} above the budget {}: {s}",
                s.cached_bytes,
                s.max_memory
            );
            if live > s.max_memory {
                assert_eq!(
                    s.cached_bytes, 0,
                    "nothing cached while live memory is over"
                );
            }
        };
        drop(pool.try_allocate(4).unwrap());
        drop(pool.try_allocate(2).unwrap());
        assert_eq!(pool.stats().cached_bytes, 6 * B);
        let mut r = pool.try_reserve(10 * B).unwrap();
        r.force_grow(10 * B).unwrap();
        assert_eq!(pool.stats().overcommit_bytes, 4 * B);
        footprint_ok(0);
        let mut four = r.allocate(4).unwrap().into_filled();
        four.fill(0xA4, 4 * B);
        footprint_ok(4 * B);
        let mut big = r.allocate(14).unwrap().into_filled();
        footprint_ok(18 * B);
        big.put_bytes(0xB1, 14 * B);
        assert!(
            four.iter().all(|&b| b == 0xA4),
            "another allocation's bytes changed"
        );
        assert!(big.iter().all(|&b| b == 0xB1));
        let frozen = big.freeze();
        drop(four);
        footprint_ok(14 * B);
        let two = r.allocate(2).unwrap();
        footprint_ok(16 * B);
        drop(r);
        assert!(frozen.iter().all(|&b| b == 0xB1));
        drop(frozen);
        footprint_ok(2 * B);
        drop(two);
        footprint_ok(0);
        common::assert_idle(&pool);
        common::assert_full_budget_back(&pool);
    });
}

/// Real `O_DIRECT` I/O through every buffer size of 512 bytes or more, with blocks from
/// every source (fresh, recycled, handed over, a child's from the root's cache): written
/// from the filled view, read back with `read_from` straight into the allocation. Skipped
/// (with a message) where the filesystem refuses `O_DIRECT`, and under Miri.
#[test]
#[cfg(target_os = "linux")]
fn o_direct_through_every_size_and_block_source() {
    use std::fs::OpenOptions;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if cfg!(miri) {
        eprintln!("o_direct: SKIPPED (Miri has no O_DIRECT file I/O)");
        return;
    }
    const O_DIRECT: i32 = 0o40000; // x86-64 and aarch64 Linux
    watchdog(60, || {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("direct.bin");
        let open = || {
            OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .custom_flags(O_DIRECT)
                .open(&path)
        };
        let file = match open() {
            Ok(file) => file,
            Err(error) => {
                eprintln!("o_direct: SKIPPED (the filesystem refuses O_DIRECT: {error})");
                return;
            }
        };
        for size in [
            BufferSize::S512,
            BufferSize::S1024,
            BufferSize::S2048,
            BufferSize::S4096,
            BufferSize::S8192,
            BufferSize::S16384,
        ] {
            let bs = size.bytes();
            let root = Arc::new(
                BufPool::builder(BufPoolCfg {
                    buffer_size: size,
                    max_memory: bs * 3,
                })
                .direct_io_alignment()
                .recycle(1)
                .recycle_min_bytes(0)
                .build()
                .unwrap(),
            );
            let child = BufPool::builder(BufPoolCfg {
                buffer_size: size,
                max_memory: bs * 3,
            })
            .parent(&root)
            .direct_io_alignment()
            .build()
            .unwrap();
            let pattern: Vec<u8> = (0..bs * 3).map(|i| (i * 31 % 253) as u8).collect();
            let write = |a: BufPoolAllocation, what: &str| -> bool {
                let mut f = a.into_filled();
                f.extend_from_slice(&pattern);
                match file.write_all_at(&f, 0) {
                    Ok(()) => true,
                    Err(error) if error.raw_os_error() == Some(22) => {
                        eprintln!("o_direct: SKIPPED {size:?} {what} (EINVAL: {error})");
                        false
                    }
                    Err(error) => panic!("{size:?} {what}: O_DIRECT write failed: {error}"),
                }
            };
            let read_back = |a: BufPoolAllocation, what: &str| {
                let mut f = a.into_filled();
                let mut reader = open().unwrap();
                while f.remaining() > 0 {
                    let n = f
                        .read_from(&mut reader)
                        .unwrap_or_else(|e| panic!("{size:?} {what}: O_DIRECT read: {e}"));
                    assert!(n > 0, "{size:?} {what}: short file");
                }
                assert!(f[..] == pattern[..], "{size:?} {what}: bytes differ");
            };
            // Fresh, then recycled.
            if !write(root.try_allocate(3).unwrap(), "fresh") {
                return;
            }
            read_back(root.try_allocate(3).unwrap(), "recycled");
            // A child's, from the root's cache.
            read_back(child.try_allocate(3).unwrap(), "child from the cache");
            // Handed over to a polled and to a zeroed waiter.
            let held = root.try_allocate(3).unwrap();
            let mut polled = PollAllocate::new(Arc::clone(&root));
            assert!(polled.poll_allocate(&mut noop(), 3).is_pending());
            drop(held);
            let Poll::Ready(Ok(handed)) = polled.poll_allocate(&mut noop(), 3) else {
                panic!("served");
            };
            assert!(write(handed, "handed over"));
            let held = root.try_allocate(3).unwrap();
            let mut zeroed = Box::pin(Arc::clone(&root).allocate_zeroed_owned(3));
            assert!(zeroed.as_mut().poll(&mut noop()).is_pending());
            drop(held);
            let Poll::Ready(Ok(handed)) = zeroed.as_mut().poll(&mut noop()) else {
                panic!("served");
            };
            read_back(handed, "handed to a zeroed waiter");
            drop((polled, zeroed, child));
            common::assert_idle(&root);
        }
        eprintln!("o_direct: every size checked");
    });
}

/// Owned `Bytes` of a leaf under a floored middle pool, in a recycling tree, outlive every
/// pool handle: the root's drop (on another thread) waits for them, the bytes stay readable
/// on a third thread meanwhile, and everything drops once the last piece is gone.
#[test]
fn owned_bytes_under_a_floored_pool_outlive_every_handle() {
    use std::sync::mpsc;
    watchdog(60, || {
        let cfg = |buffer_size, buffers: usize| BufPoolCfg {
            buffer_size,
            max_memory: buffers * (buffer_size as usize),
        };
        let root = BufPool::builder(cfg(BufferSize::S64, 8))
            .recycle(2)
            .recycle_min_bytes(0)
            .build()
            .unwrap();
        let mid = BufPool::builder(cfg(BufferSize::S64, 6))
            .parent(&root)
            .min_memory(128)
            .build()
            .unwrap();
        let leaf = Arc::new(mid.child("leaf", cfg(BufferSize::S32, 8)).unwrap());
        // Something cached at the root first.
        drop(root.try_allocate(2).unwrap());
        let weak = Arc::downgrade(&leaf);
        let fut = Arc::clone(&leaf).allocate_zeroed_owned(6);
        let allocation = futures::executor::block_on(fut).unwrap();
        drop(leaf);
        assert!(
            weak.upgrade().is_some(),
            "the owned allocation keeps the leaf"
        );
        let mut filled = allocation.into_filled();
        assert!(filled.set_filled(192), "zeroed");
        filled.clear();
        let text: Vec<u8> = (0..192u32).map(|i| (i * 7 % 251) as u8).collect();
        filled.put_slice(&text);
        let frozen = filled.freeze();
        let (tx, rx) = mpsc::channel();
        let dropper = std::thread::spawn(move || {
            drop(mid);
            drop(root);
            tx.send(()).unwrap();
        });
        let patience = Duration::from_millis(if cfg!(miri) { 20 } else { 200 });
        assert!(rx.recv_timeout(patience).is_err(), "the drops wait");
        let piece = frozen.slice(100..);
        drop(frozen);
        let want = text[100..].to_vec();
        std::thread::spawn(move || {
            assert_eq!(&piece[..], &want[..]);
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(&piece[..], &want[..]);
        })
        .join()
        .unwrap();
        rx.recv().unwrap();
        dropper.join().unwrap();
        assert!(
            weak.upgrade().is_none(),
            "the leaf went with its last allocation"
        );
    });
}
