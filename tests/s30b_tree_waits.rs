//! s30b: waiting requests in a 4-level tree with floors, counted overcommit, growth, cancels,
//! resizes and closes, driven by hand (one thread, futures polled only when their waker was
//! woken). At every quiescent point (no wake-up pending):
//! * no lost wake-up: polling every pending request once more, unwoken, serves none of them
//!   (README guarantee 3: "a waiter whose request fits in what is free is always woken");
//! * the budget: each pool's bytes in use are within its budget, or the excess is exactly
//!   its counted `overcommit_bytes` (guarantees 1 and 15);
//! * FIFO at the root: a root request is never served while an earlier root request of no
//!   larger size still waits (guarantee 5);
//!
//! And at the end, with every holding given back, every waiter is served or failed with a
//! reason it may get, and the books are back to the floors.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Wake, Waker};

use common::{rounds, watchdog};
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reservation};

/// (parent, max_memory, floor, buffer size); pool 0 is the root.
type Shape = [(usize, usize, usize, BufferSize); 6];

const TREE_A: Shape = [
    (usize::MAX, 8192, 0, BufferSize::S64),
    (0, 4096, 1024, BufferSize::S128),
    (1, 2048, 512, BufferSize::S64),
    (2, 1024, 0, BufferSize::S32),
    (0, 6000, 768, BufferSize::S256),
    (1, 1500, 0, BufferSize::S8),
];

/// Floors at every level below the root, one equal to its pool's budget, nested three deep.
const TREE_B: Shape = [
    (usize::MAX, 4096, 0, BufferSize::S64),
    (0, 2048, 2048, BufferSize::S64),
    (1, 1024, 512, BufferSize::S32),
    (2, 512, 256, BufferSize::S16),
    (0, 2048, 0, BufferSize::S128),
    (3, 256, 128, BufferSize::S8),
];

thread_local! {
    static SHAPE: std::cell::Cell<&'static Shape> = const { std::cell::Cell::new(&TREE_A) };
}

/// The tree of the run on this thread.
fn tree() -> &'static Shape {
    SHAPE.with(|shape| shape.get())
}

const N: usize = TREE_A.len();

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// `max_waiters` of each pool in the runs with queue limits.
const LIMITS: [usize; N] = [3, 2, 1, 2, 2, 1];

fn build(limits: bool) -> Vec<BufPool> {
    let mut pools: Vec<BufPool> = Vec::new();
    for (i, &(parent, max_memory, floor, buffer_size)) in tree().iter().enumerate() {
        let mut builder = BufPool::builder(BufPoolCfg {
            buffer_size,
            max_memory,
        })
        .name(format!("p{i}"));
        if limits {
            builder = builder.max_waiters(LIMITS[i]);
        }
        if parent != usize::MAX {
            builder = builder.parent(&pools[parent]).min_memory(floor);
        }
        pools.push(builder.build().expect("the tree builds"));
    }
    pools
}

#[derive(Debug)]
enum Held {
    Alloc(#[allow(dead_code)] BufPoolAllocation),
    Res(Reservation),
}

struct Flag(AtomicUsize);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

type Fut<'a> = Pin<Box<dyn Future<Output = Result<Held, AllocError>> + 'a>>;

struct Waiter<'a> {
    id: usize,
    pool: usize,
    bytes: usize,
    /// A grow: it holds its reservation while it waits (hold-and-wait, README).
    grow: bool,
    future: Fut<'a>,
    flag: Arc<Flag>,
    waker: Waker,
}

/// Each pool's free floor, for `S30B_OPS` traces (read from the report's `Debug`: the last
/// `floor_free` of a report is its own pool's).
fn floors(pools: &[BufPool]) -> String {
    pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let d = format!("{:?}", p.report());
            let f = d
                .rsplit("floor_free: ")
                .next()
                .unwrap_or("?")
                .split(' ')
                .next()
                .unwrap_or("?")
                .trim_end_matches(',')
                .to_string();
            format!("p{i} floor_free {f}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn chain(p: usize) -> Vec<usize> {
    let mut chain = vec![p];
    let mut at = p;
    while tree()[at].0 != usize::MAX {
        at = tree()[at].0;
        chain.push(at);
    }
    chain
}

struct World<'a> {
    pools: &'a [BufPool],
    held: Vec<(usize, Held)>,
    waiters: Vec<Waiter<'a>>,
    next_id: usize,
    closed: [bool; N],
    shrunk: [bool; N],
    seed: u64,
    limits: bool,
}

impl<'a> World<'a> {
    fn add_waiter(&mut self, pool: usize, bytes: usize, grow: bool, future: Fut<'a>) {
        let flag = Arc::new(Flag(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&flag));
        let mut waiter = Waiter {
            id: self.next_id,
            pool,
            bytes,
            grow,
            future,
            flag,
            waker,
        };
        self.next_id += 1;
        match waiter
            .future
            .as_mut()
            .poll(&mut Context::from_waker(&waiter.waker))
        {
            Poll::Pending => self.waiters.push(waiter),
            Poll::Ready(result) => self.done(&waiter, result, "at once"),
        }
    }

    fn done(&mut self, waiter: &Waiter<'a>, result: Result<Held, AllocError>, when: &str) {
        let seed = self.seed;
        match result {
            Ok(held) => self.held.push((waiter.pool, held)),
            // README guarantee 13: `QueueFull` comes only at once, before a request waited.
            Err(AllocError::QueueFull) => assert!(
                self.limits && when == "at once",
                "seed {seed}: QueueFull {when} (limits: {})",
                self.limits
            ),
            Err(AllocError::Closed) => assert!(
                chain(waiter.pool).iter().any(|&l| self.closed[l]),
                "seed {seed}: Closed on an open chain ({when})"
            ),
            Err(AllocError::ExceedsBudget { .. }) => assert!(
                chain(waiter.pool).iter().any(|&l| self.shrunk[l])
                    || waiter.bytes > tree()[waiter.pool].1,
                "seed {seed}: ExceedsBudget without a shrink ({when})"
            ),
            Err(e) => panic!("seed {seed}: waiter {} failed: {e:?} ({when})", waiter.id),
        }
    }

    /// Polls every woken waiter until no wake-up is pending.
    fn settle(&mut self, step: usize) {
        // Root requests served in this settle: checked against FIFO once every wake-up ran
        // (two grants of one release may be polled in either order).
        let mut served: Vec<(usize, usize)> = Vec::new();
        loop {
            let mut progressed = false;
            let mut i = 0;
            while i < self.waiters.len() {
                if self.waiters[i].flag.0.swap(0, SeqCst) == 0 {
                    i += 1;
                    continue;
                }
                progressed = true;
                let w = &mut self.waiters[i];
                match w.future.as_mut().poll(&mut Context::from_waker(&w.waker)) {
                    Poll::Pending => i += 1,
                    Poll::Ready(result) => {
                        let w = self.waiters.remove(i);
                        if result.is_ok() && w.pool == 0 && !w.grow {
                            served.push((w.id, w.bytes));
                        }
                        self.done(&w, result, "woken");
                    }
                }
            }
            if !progressed {
                break;
            }
        }
        for (id, bytes) in served {
            self.fifo_check(id, bytes, step);
        }
    }

    /// A root request served while an earlier root request still waits (at a quiescent
    /// point: a granted one would have been woken and served).
    fn fifo_check(&self, id: usize, bytes: usize, step: usize) {
        if let Some(earlier) = self
            .waiters
            .iter()
            .find(|w| w.pool == 0 && !w.grow && w.id < id)
        {
            panic!(
                "seed {} step {step}: root request {id} ({bytes} bytes) served before the earlier {} ({} bytes)\n{}",
                self.seed,
                earlier.id,
                earlier.bytes,
                self.pools[0].report()
            );
        }
    }

    /// No lost wake-up: an unwoken poll of every pending waiter serves none.
    fn no_lost_wakeup(&mut self, step: usize) {
        for w in &mut self.waiters {
            if w.flag.0.load(SeqCst) > 0 {
                // Woken meanwhile (by another waiter's poll just now): not lost.
                continue;
            }
            let noop = Waker::noop();
            let polled = w.future.as_mut().poll(&mut Context::from_waker(noop));
            assert!(
                polled.is_pending(),
                "seed {} step {step}: waiter {} (pool {}, {} bytes) was ready but never woken: {:?}",
                self.seed,
                w.id,
                w.pool,
                w.bytes,
                polled.map(|r| r.map(drop))
            );
            // The poll replaced its waker: give it back the counting one.
            let polled = w.future.as_mut().poll(&mut Context::from_waker(&w.waker));
            assert!(polled.is_pending());
        }
        if self.waiters.iter().any(|w| w.flag.0.load(SeqCst) > 0) {
            // Those polls woke some: settle and look again.
            self.settle(step);
            self.no_lost_wakeup(step);
        }
    }

    fn budget_check(&self, step: usize) {
        for (i, pool) in self.pools.iter().enumerate() {
            let s = pool.stats();
            if self.limits {
                assert!(
                    s.waiting <= LIMITS[i],
                    "seed {} step {step}: pool {i}'s queue above its limit: {s}",
                    self.seed
                );
            }
            assert_eq!(
                s.overcommit_bytes,
                s.in_use_bytes.saturating_sub(s.max_memory),
                "seed {} step {step}: pool {i}: overcommit is the excess: {s}",
                self.seed
            );
        }
    }
}

fn run(seed: u64, steps: usize) {
    run_with(seed, steps, false);
}

fn run_with(seed: u64, steps: usize, limits: bool) {
    run_mode(seed, steps, limits, false);
}

/// `deltas`: budgets also change by `add_max_memory` and `forget_max_memory` (an op of its
/// own, so the other modes' seeds replay as before).
fn run_mode(seed: u64, steps: usize, limits: bool, deltas: bool) {
    let pools = build(limits);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut w = World {
        pools: &pools,
        held: Vec::new(),
        waiters: Vec::new(),
        next_id: 0,
        closed: [false; N],
        shrunk: [false; N],
        seed,
        limits,
    };
    let pools = &pools;
    for step in 0..steps {
        let p = rng.below(N);
        let bs = tree()[p].3 as usize;
        let op = rng.below(if deltas { 15 } else { 14 });
        let trace = std::env::var("S30B_OPS").is_ok();
        if trace {
            eprintln!(
                "step {step}: op {op} pool {p}; held {:?}; waiters {:?}",
                w.held
                    .iter()
                    .map(|(q, h)| (
                        q,
                        match h {
                            Held::Alloc(a) => a.allocated_bytes() as isize,
                            Held::Res(r) => -(r.size() as isize),
                        }
                    ))
                    .collect::<Vec<_>>(),
                w.waiters
                    .iter()
                    .map(|x| (x.id, x.pool, x.bytes, x.grow))
                    .collect::<Vec<_>>()
            );
        }
        match op {
            0..=2 if w.waiters.len() < 12 => {
                let n = 1 + rng.below(tree()[p].1 / bs / 3);
                let pool = &pools[p];
                let future: Fut<'_> = if rng.below(2) == 0 {
                    Box::pin(async move { pool.allocate(n).await.map(Held::Alloc) })
                } else {
                    Box::pin(async move { pool.allocate_zeroed(n).await.map(Held::Alloc) })
                };
                w.add_waiter(p, n * bs, false, future);
            }
            3 | 4 if w.waiters.len() < 12 => {
                let bytes = 8 * (1 + rng.below(tree()[p].1 / 8 / 3));
                let pool = &pools[p];
                w.add_waiter(
                    p,
                    bytes,
                    false,
                    Box::pin(async move { pool.reserve(bytes).await.map(Held::Res) }),
                );
            }
            5 if w.waiters.len() < 12 => {
                // A grow of a held reservation of this pool, waiting with it.
                let at = w
                    .held
                    .iter()
                    .position(|(q, h)| *q == p && matches!(h, Held::Res(_)));
                if let Some(at) = at {
                    let (_, Held::Res(mut r)) = w.held.swap_remove(at) else {
                        unreachable!()
                    };
                    let more = 8 * (1 + rng.below(40));
                    let bytes = r.size() + more;
                    w.add_waiter(
                        p,
                        bytes,
                        true,
                        Box::pin(async move {
                            match r.grow(more).await {
                                Ok(()) => Ok(Held::Res(r)),
                                // A refused grow leaves the reservation as it was: keep it.
                                Err(AllocError::ExceedsBudget { .. }) => Ok(Held::Res(r)),
                                Err(e) => Err(e),
                            }
                        }),
                    );
                }
            }
            6..=8 if !w.held.is_empty() => {
                let k = rng.below(w.held.len());
                let (q, held) = w.held.swap_remove(k);
                match held {
                    Held::Res(mut r) if rng.below(2) == 0 => {
                        let less = rng.below(r.size() + 1);
                        r.shrink(less);
                        w.held.push((q, Held::Res(r)));
                    }
                    Held::Res(mut r) if rng.below(2) == 0 => {
                        // README: a shrink under a lock of your own: the bytes go back (to
                        // the waiters they serve) at once, the wakers run only when the
                        // returned `PendingWakeUps` is dropped.
                        let woken = |w: &World<'_>| -> usize {
                            w.waiters.iter().map(|x| x.flag.0.load(SeqCst)).sum()
                        };
                        let before = woken(&w);
                        let to = rng.below(r.size() + 1);
                        let pending = r.shrink_to_deferring_wakeups(to);
                        assert_eq!(r.size(), to);
                        assert_eq!(
                            woken(&w),
                            before,
                            "seed {seed} step {step}: a waker ran before PendingWakeUps was dropped"
                        );
                        drop(pending);
                        w.held.push((q, Held::Res(r)));
                    }
                    other => drop(other),
                }
            }
            9 if !w.waiters.is_empty() => {
                // Cancel.
                let k = rng.below(w.waiters.len());
                drop(w.waiters.remove(k));
            }
            10 if !w.held.is_empty() => {
                let k = rng.below(w.held.len());
                if let (_, Held::Res(r)) = &mut w.held[k] {
                    r.force_grow(rng.below(300)).unwrap();
                }
            }
            11 => {
                let r = pools[p].try_reserve(rng.below(400));
                if let Ok(r) = r {
                    w.held.push((p, Held::Res(r)));
                }
            }
            12 => {
                // A budget change: grow, or shrink (failing waiters that can never fit).
                if rng.below(3) == 0 {
                    let to = bs.max(tree()[p].1 / 2 + rng.below(tree()[p].1));
                    if to < tree()[p].1 {
                        w.shrunk[p] = true;
                    }
                    pools[p].set_max_memory(to).unwrap();
                } else {
                    pools[p].set_max_memory(tree()[p].1).unwrap();
                }
            }
            14 => {
                // By a delta: forget frees budget (failing waiters that no longer fit), add
                // gives it back (never above the configured budget here).
                let now = pools[p].stats().max_memory;
                if rng.below(2) == 0 {
                    let forgotten = pools[p].forget_max_memory(rng.below(600));
                    if forgotten > 0 {
                        w.shrunk[p] = true;
                    }
                    assert_eq!(pools[p].stats().max_memory, now - forgotten);
                } else {
                    let more = rng.below(600).min(tree()[p].1.saturating_sub(now));
                    assert_eq!(pools[p].add_max_memory(more), now + more);
                }
            }
            13 if step > steps / 2 && p != 0 && rng.below(8) == 0 && !w.closed[p] => {
                pools[p].close();
                for q in 0..N {
                    if chain(q).contains(&p) {
                        w.closed[q] = true;
                    }
                }
            }
            _ => continue,
        }
        if trace {
            eprintln!("after op:\n{}{}", pools[0].report(), floors(pools));
        }
        w.settle(step);
        if trace {
            eprintln!("after settle:\n{}", pools[0].report());
        }
        w.no_lost_wakeup(step);
        w.budget_check(step);
    }
    // The end, all at once (several releases before any waiter runs, as when a task drops
    // what it holds): budgets back, every holding given back; grows hold their reservations
    // while they wait, so they are cancelled (a hold-and-wait could deadlock, as the README
    // warns); then results are dropped as they come.
    for (i, pool) in pools.iter().enumerate() {
        pool.set_max_memory(tree()[i].1).unwrap();
    }
    w.held.clear();
    w.waiters.retain(|w| !w.grow);
    for round in 0..1000 {
        w.settle(steps + round);
        w.no_lost_wakeup(steps + round);
        w.held.clear();
        if w.waiters.is_empty() {
            break;
        }
    }
    let stuck: Vec<_> = w.waiters.iter().map(|w| (w.id, w.pool, w.bytes)).collect();
    assert!(
        stuck.is_empty(),
        "seed {seed}: waiters never served on an idle tree: {stuck:?}\n{}",
        pools[0].report()
    );
    for (i, pool) in pools.iter().enumerate() {
        let s = pool.stats();
        let floors: usize = (1..N)
            .filter(|&c| tree()[c].0 == i && !w.closed[c])
            .map(|c| tree()[c].2)
            .sum();
        assert_eq!(
            (s.in_use_bytes, s.outstanding, s.waiting, s.reserved_bytes),
            (floors, 0, 0, 0),
            "seed {seed}: pool {i} at the end: {s}"
        );
    }
}

/// BUG: failed (seed 31, at the end) with a waiter "ready but never woken": the bug of
/// `a_request_granted_above_a_refilled_floor_takes_the_floor_instead_of_queueing_higher`
/// (first found, before the `shrink_to_deferring_wakeups` step was added, at seed 1800 with
/// `S30B_STEPS=40`, and seed 151 with a first cut of the fix). To reproduce one run:
/// `S30B_SEED=31` (`S30B_STEPS`, `S30B_SEEDS` to search; `S30B_OPS=1` prints every step and
/// the tree's report).
#[test]
fn waits_in_a_four_level_tree_lose_no_wakeup_keep_the_budget_and_end_idle() {
    watchdog(60, || {
        let only: Option<u64> = std::env::var("S30B_SEED").ok().map(|s| s.parse().unwrap());
        for seed in (0..std::env::var("S30B_SEEDS")
            .map(|s| s.parse().unwrap())
            .unwrap_or(rounds(40, 2) as u64))
            .filter(|s| only.is_none_or(|o| o == *s))
        {
            let steps = std::env::var("S30B_STEPS")
                .map(|s| s.parse().unwrap())
                .unwrap_or(rounds(400, 30));
            run(seed, steps);
        }
    });
}

fn pool_cfg(buffer_size: BufferSize, max_memory: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size,
        max_memory,
    }
}

/// BUG (found by the random run above, seed 1800, cut down by hand): a grandchild's request
/// `w` that climbed past its parent's full floor waits in the middle pool's queue; one release
/// refills that floor (room for all of `w`) and grants `w` the middle level. `w`, woken, climbs
/// on, finds no room at the root and queues there, without looking at the floor below again.
/// The floor had room for it all along: README guarantee 15 ("a request uses every floor on
/// its way up first") and guarantee 3 (no lost wake-up) want it served from the floor, but it
/// waited at the root, pending and never woken, until the root got room: with the root's
/// holders long-lived, for good. (A second poll, unwoken, served it from the floor.)
#[test]
fn a_request_granted_above_a_refilled_floor_takes_the_floor_instead_of_queueing_higher() {
    watchdog(10, || {
        let root = BufPool::builder(pool_cfg(BufferSize::S64, 2048))
            .name("root")
            .build()
            .unwrap();
        let a = root.child("a", pool_cfg(BufferSize::S64, 1024)).unwrap();
        let b = BufPool::builder(pool_cfg(BufferSize::S64, 2048))
            .name("b")
            .parent(&a)
            .min_memory(512)
            .build()
            .unwrap();
        let c = b.child("c", pool_cfg(BufferSize::S32, 1024)).unwrap();
        let in_c = c.try_reserve(248).unwrap(); // in b's floor
        let in_b = b.try_reserve(712).unwrap(); // the rest of b's floor, and 448 above it
        let in_a = a.try_reserve(64).unwrap(); // a is full
        let in_root = root.try_reserve(904).unwrap(); // 120 free at the root
        let flag = Arc::new(Flag(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&flag));
        let cx = &mut Context::from_waker(&waker);
        // The root's head takes whatever comes back there.
        let mut head = Box::pin(root.reserve(568));
        assert!(head.as_mut().poll(cx).is_pending());
        let mut w = Box::pin(c.allocate(8)); // 256 bytes: b's floor is full, it waits in a
        assert!(w.as_mut().poll(cx).is_pending());
        assert_eq!(a.stats().waiting, 1);
        drop(in_b); // b's floor has 264 free now; a grants w; the root serves its head
        let Poll::Ready(Ok(head)) = head.as_mut().poll(cx) else {
            panic!("the root's head is served")
        };
        flag.0.store(0, SeqCst);
        // w, woken, climbs on: it must take the floor now (or at least be woken again).
        let got = match w.as_mut().poll(cx) {
            Poll::Ready(Ok(got)) => got,
            Poll::Ready(Err(e)) => panic!("{e:?}"),
            Poll::Pending => {
                assert!(
                    flag.0.load(SeqCst) > 0,
                    "w waits at the root though b's floor has room for it, and nothing will wake it:\n{}",
                    root.report()
                );
                match w.as_mut().poll(cx) {
                    Poll::Ready(Ok(got)) => got,
                    other => panic!("{:?}", other.map(|r| r.map(drop))),
                }
            }
        };
        assert_eq!(got.allocated_bytes(), 256);
        // Served from b's floor: a and the root hold nothing for it.
        let (s_b, s_a, s_root) = (b.stats(), a.stats(), root.stats());
        assert_eq!(s_b.in_use_bytes, 504, "{s_b}");
        assert_eq!((s_a.in_use_bytes, s_a.waiting), (512 + 64, 0), "{s_a}");
        assert_eq!(
            (s_root.in_use_bytes, s_root.waiting),
            (904 + 568 + 576, 0),
            "{s_root}"
        );
        drop((head, in_c, in_a, in_root, w, got));
    });
}

/// The same with queue limits on every pool (`max_waiters`): `QueueFull` only at once, no
/// queue ever longer than its limit, and everything else as above (a child's request that
/// waited below and finds a full queue waits for a place, in no queue).
#[test]
fn waits_in_a_four_level_tree_with_queue_limits() {
    watchdog(60, || {
        let only: Option<u64> = std::env::var("S30B_SEED").ok().map(|s| s.parse().unwrap());
        let seeds = std::env::var("S30B_SEEDS")
            .map(|s| s.parse().unwrap())
            .unwrap_or(rounds(40, 2) as u64);
        for seed in (0..seeds).filter(|s| only.is_none_or(|o| o == *s)) {
            let steps = std::env::var("S30B_STEPS")
                .map(|s| s.parse().unwrap())
                .unwrap_or(rounds(400, 30));
            run_with(seed, steps, true);
            run_mode(seed, steps, true, true);
        }
    });
}

/// The runs (and one with budgets changed by deltas) on a tree with floors at every level
/// below the root (one equal to its pool's
/// budget), nested three deep.
#[test]
fn waits_in_a_tree_of_nested_floors() {
    watchdog(60, || {
        SHAPE.with(|shape| shape.set(&TREE_B));
        let only: Option<u64> = std::env::var("S30B_SEED").ok().map(|s| s.parse().unwrap());
        let seeds = std::env::var("S30B_SEEDS")
            .map(|s| s.parse().unwrap())
            .unwrap_or(rounds(30, 2) as u64);
        for seed in (0..seeds).filter(|s| only.is_none_or(|o| o == *s)) {
            let steps = std::env::var("S30B_STEPS")
                .map(|s| s.parse().unwrap())
                .unwrap_or(rounds(300, 30));
            run_with(seed, steps, false);
            run_with(seed, steps, true);
            run_mode(seed, steps, false, true);
        }
    });
}

/// BUG: seeds that lose a wake-up (checked by hand): 31 with the original code (the request
/// granted above a refilled floor, the test above); 125 (at step 82) with a first cut of the
/// fix that looked at every floor below but the one just below the level it queues at:
/// counting the part it took of that floor as climbed re-homed bytes into a floor further
/// below and gave that much back to it, after the request had looked.
#[test]
#[cfg_attr(
    miri,
    ignore = "hundreds of steps of a 6-pool tree: minutes under Miri"
)]
fn the_seeds_that_lost_wakeups() {
    watchdog(30, || {
        run(31, 400);
        run(125, 100);
    });
}
