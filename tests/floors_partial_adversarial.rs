//! Floors used in part (README guarantee 15, "Design → Floors"): a request takes as much of
//! each floor on its way up as is free and climbs with the rest; a request whose rest could
//! never fit above takes at least the difference or waits for the floor in no queue;
//! requests waiting above take the floor when it can serve all they still need.
//!
//! Adversarial: exact books at every quiescent point, hangs under watchdogs, nested floors,
//! cancels at every stage, closes and resizes while requests wait for a floor or above with
//! part of one, reservations and owned allocations in floored pools, and a multi-thread
//! stress that ends with every pool back to exactly its floor.

mod common;

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use common::{Rng, rounds, watchdog};
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize};

/// Every size here is in units of 8 bytes (one `S8` buffer).
const U: usize = 8;

fn cfg(units: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S8,
        max_memory: units * U,
    }
}

fn root(units: usize) -> Arc<BufPool> {
    Arc::new(BufPool::new(cfg(units)))
}

fn floored(parent: &BufPool, name: &str, units: usize, floor: usize) -> Arc<BufPool> {
    Arc::new(
        BufPool::builder(cfg(units))
            .name(name)
            .parent(parent)
            .min_memory(floor * U)
            .build()
            .expect("a floor the ancestors can set aside"),
    )
}

fn plain(parent: &BufPool, name: &str, units: usize) -> Arc<BufPool> {
    Arc::new(parent.child(name, cfg(units)).expect("a child"))
}

/// Bytes in use of each pool, in units.
fn units(pools: &[&BufPool]) -> Vec<usize> {
    pools
        .iter()
        .map(|pool| {
            let bytes = pool.stats().in_use_bytes;
            assert_eq!(bytes % U, 0, "bytes in use not a multiple of 8: {bytes}");
            bytes / U
        })
        .collect()
}

/// Asserts nobody waits anywhere in the pools, and the report agrees with the stats.
#[track_caller]
fn quiet(pools: &[&BufPool]) {
    for pool in pools {
        let stats = pool.stats();
        assert_eq!(stats.waiting, 0, "someone still waits: {stats}");
        let report = pool.report();
        assert_eq!(report.in_use_bytes, stats.in_use_bytes, "report vs stats");
        assert_eq!(report.waiting, 0);
    }
}

/// A waker that counts its wake-ups.
#[derive(Default)]
struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// A future polled by hand with a counting waker.
struct Manual<F> {
    future: Pin<Box<F>>,
    counter: Arc<Counter>,
    waker: Waker,
    /// Wake-ups counted when it was last polled.
    seen: usize,
}

impl<F: Future> Manual<F> {
    fn new(future: F) -> Self {
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(Arc::clone(&counter));
        Manual {
            future: Box::pin(future),
            counter,
            waker,
            seen: 0,
        }
    }

    fn poll(&mut self) -> Poll<F::Output> {
        self.seen = self.wakes();
        self.poll_raw()
    }

    fn poll_raw(&mut self) -> Poll<F::Output> {
        self.future
            .as_mut()
            .poll(&mut Context::from_waker(&self.waker))
    }

    fn wakes(&self) -> usize {
        self.counter.0.load(SeqCst)
    }

    #[track_caller]
    fn pending(&mut self) {
        assert!(self.poll().is_pending(), "expected the request to wait");
    }

    /// Polls it until done, as an executor would: only after a wake-up. Panics if it is
    /// pending and was not woken since its last poll (a lost wake-up, or a hang).
    #[track_caller]
    fn ready_after_wake(&mut self) -> F::Output {
        for _ in 0..100 {
            let wakes = self.wakes();
            assert!(
                wakes > self.seen,
                "pending and not woken since its last poll: a hang"
            );
            self.seen = wakes;
            if let Poll::Ready(out) = self.poll_raw() {
                return out;
            }
        }
        panic!("not done after 100 polls")
    }

    /// Polls it if it was woken since its last poll (as an executor would); else pending.
    fn ready_after_wake_or_pending(&mut self) -> Poll<F::Output> {
        let wakes = self.wakes();
        if wakes == self.seen {
            return Poll::Pending;
        }
        self.seen = wakes;
        self.poll_raw()
    }
}

/// Length of a successful allocation, or the error.
fn len(result: Result<BufPoolAllocation, AllocError>) -> Result<usize, AllocError> {
    result.map(|allocation| allocation.length())
}

// ---------------------------------------------------------------------------------------
// Probes.
// ---------------------------------------------------------------------------------------

/// Nested floors: a grandchild's floor is set aside inside its parent's floor (the issue-19
/// trees say so), so the root holds only the parent's floor. A grandchild's request of the
/// chain's smallest cap, on an otherwise idle tree, must be served, by its slow path too.
#[test]
fn nested_floor_slow_path_request_of_the_chain_cap_is_served() {
    watchdog(10, || {
        let r = root(24);
        let a = floored(&r, "a", 24, 8);
        let b = floored(&a, "b", 24, 8);
        assert_eq!(units(&[&r, &a, &b]), [8, 8, 0]);
        // The fast path serves it.
        let all = b.try_allocate(24).unwrap();
        assert_eq!(units(&[&r, &a, &b]), [24, 24, 24]);
        drop(all);
        assert_eq!(units(&[&r, &a, &b]), [8, 8, 0]);
        // Now the same through a queue: something holds one unit of b, the request waits
        // in b's own queue, and the holder goes.
        let holder = b.try_allocate(1).unwrap();
        let mut request = Manual::new(b.allocate(24));
        request.pending();
        drop(holder);
        let served = len(request.ready_after_wake());
        assert_eq!(served, Ok(24));
        assert_eq!(units(&[&r, &a, &b]), [8, 8, 0]);
        quiet(&[&r, &a, &b]);
    });
}

/// A root shrinks while a floored child's request waits in its queue with part of the floor
/// taken; the request can never fit the new cap: it must fail with `ExceedsBudget`.
#[test]
fn root_shrink_fails_a_request_waiting_with_part_of_a_floor() {
    watchdog(10, || {
        let r = root(16);
        let c = floored(&r, "c", 16, 8);
        let s = plain(&r, "s", 16);
        let sibling = s.try_allocate(8).unwrap();
        let mut request = Manual::new(c.allocate(12));
        request.pending();
        // It took the floor (8) and waits at the root for 4.
        assert_eq!(units(&[&r, &c]), [16, 12]);
        assert_eq!(r.stats().waiting, 1);
        r.set_max_memory(10 * U).unwrap();
        let out = request.ready_after_wake();
        assert!(
            matches!(out, Err(AllocError::ExceedsBudget { .. })),
            "{out:?}"
        );
        assert_eq!(units(&[&r, &c]), [16, 0]);
        drop(sibling);
        assert_eq!(units(&[&r, &c, &s]), [8, 0, 0]);
        quiet(&[&r, &c, &s]);
    });
}

/// The floored pool itself shrinks below a request that waits for its floor in no queue.
#[test]
fn own_shrink_fails_a_request_waiting_for_its_floor() {
    watchdog(10, || {
        let r = root(8);
        let c = floored(&r, "c", 16, 4);
        let holder = c.try_allocate(3).unwrap();
        let mut request = Manual::new(c.allocate(7));
        request.pending();
        assert_eq!(units(&[&r, &c]), [4, 10]);
        c.set_max_memory(5 * U).unwrap();
        let out = request.ready_after_wake();
        assert!(
            matches!(out, Err(AllocError::ExceedsBudget { .. })),
            "{out:?}"
        );
        drop(holder);
        assert_eq!(units(&[&r, &c]), [4, 0]);
        quiet(&[&r, &c]);
    });
}

/// The root shrinks below a request that waits for its floor in no queue.
#[test]
fn root_shrink_fails_a_request_waiting_for_a_floor() {
    watchdog(10, || {
        let r = root(8);
        let c = floored(&r, "c", 16, 4);
        let holder = c.try_allocate(3).unwrap();
        let mut request = Manual::new(c.allocate(7));
        request.pending();
        r.set_max_memory(6 * U).unwrap();
        let out = request.ready_after_wake();
        assert!(
            matches!(out, Err(AllocError::ExceedsBudget { .. })),
            "{out:?}"
        );
        drop(holder);
        assert_eq!(units(&[&r, &c]), [4, 0]);
        quiet(&[&r, &c]);
    });
}

/// The root grows while a request waits for its floor in no queue: it is served.
#[test]
fn root_growth_serves_a_request_waiting_for_a_floor() {
    watchdog(10, || {
        let r = root(8);
        let c = floored(&r, "c", 16, 4);
        let holder = c.try_allocate(3).unwrap();
        let mut request = Manual::new(c.allocate(7));
        request.pending();
        r.set_max_memory(16 * U).unwrap();
        let got = request.ready_after_wake().unwrap();
        assert_eq!(got.length(), 7);
        assert_eq!(units(&[&r, &c]), [10, 10]);
        drop((got, holder));
        quiet(&[&r, &c]);
        assert_eq!(units(&[&r, &c]), [4, 0]);
    });
}

// ---------------------------------------------------------------------------------------
// A model of the books: sequences of non-waiting calls on a tree with floors at several
// levels, every pool's bytes checked after every call.
// ---------------------------------------------------------------------------------------

/// A tree of pools with its model: `own[p]` is what the test holds in pool `p` itself
/// (allocations and reservations, in bytes). A floored pool's parent sees its floor or all
/// it holds, whichever is larger (README: "the parent of a floored pool sees only what that
/// pool holds beyond its floor"; sequential calls keep the floors' books canonical).
struct Tree {
    pools: Vec<Arc<BufPool>>,
    parent: Vec<Option<usize>>,
    floor: Vec<usize>,
    cap: Vec<usize>,
    own: Vec<usize>,
}

impl Tree {
    /// Root 0; `shape[i] = (parent, cap, floor)` for pools 1.. (parents before children).
    /// `None` if a floor could not be set aside.
    fn build(root_cap: usize, shape: &[(usize, usize, usize)]) -> Option<Tree> {
        let mut tree = Tree {
            pools: vec![root(root_cap)],
            parent: vec![None],
            floor: vec![0],
            cap: vec![root_cap * U],
            own: vec![0],
        };
        for (i, &(parent, cap, floor)) in shape.iter().enumerate() {
            let built = BufPool::builder(cfg(cap))
                .name(format!("p{}", i + 1))
                .parent(&tree.pools[parent])
                .min_memory(floor * U)
                .build();
            let pool = match built {
                Ok(pool) => Arc::new(pool),
                Err(_) => return None,
            };
            tree.pools.push(pool);
            tree.parent.push(Some(parent));
            tree.floor.push(floor * U);
            tree.cap.push(cap * U);
            tree.own.push(0);
        }
        tree.check();
        Some(tree)
    }

    /// The model's bytes in use of every pool.
    fn in_use(&self) -> Vec<usize> {
        let mut in_use = self.own.clone();
        // Children come after their parents: fold from the leaves up.
        for p in (1..self.pools.len()).rev() {
            let parent = self.parent[p].expect("not the root");
            in_use[parent] += in_use[p].max(self.floor[p]);
        }
        in_use
    }

    fn chain(&self, mut p: usize) -> Vec<usize> {
        let mut chain = vec![p];
        while let Some(parent) = self.parent[p] {
            chain.push(parent);
            p = parent;
        }
        chain
    }

    fn smallest_cap(&self, p: usize) -> usize {
        self.chain(p).iter().map(|&q| self.cap[q]).min().unwrap()
    }

    /// Whether `bytes` more held in `p` fit every level whose books they change.
    fn fits(&self, p: usize, bytes: usize) -> bool {
        let before = self.in_use();
        let mut more = self.own.clone();
        more[p] += bytes;
        let after = Tree::fold(self, &more);
        self.chain(p)
            .iter()
            .all(|&q| after[q] == before[q] || after[q] <= self.cap[q])
    }

    fn fold(&self, own: &[usize]) -> Vec<usize> {
        let mut in_use = own.to_vec();
        for p in (1..self.pools.len()).rev() {
            let parent = self.parent[p].expect("not the root");
            in_use[parent] += in_use[p].max(self.floor[p]);
        }
        in_use
    }

    #[track_caller]
    fn check(&self) {
        let model = self.in_use();
        for (p, pool) in self.pools.iter().enumerate() {
            let stats = pool.stats();
            assert_eq!(
                stats.in_use_bytes, model[p],
                "pool p{p}: in use {} but the model says {} (own {:?}, floors {:?})",
                stats.in_use_bytes, model[p], self.own, self.floor
            );
            assert_eq!(stats.waiting, 0);
            assert_eq!(pool.report().in_use_bytes, model[p]);
        }
        // The root's report sums up its subtree the same way.
        let report = self.pools[0].report();
        assert_eq!(report.in_use_bytes, model[0]);
    }
}

enum Holding {
    Alloc(BufPoolAllocation),
    Res(membudget::Reservation),
}

fn held(holding: &Holding) -> usize {
    match holding {
        Holding::Alloc(a) => a.allocated_bytes(),
        Holding::Res(r) => r.size().next_multiple_of(8),
    }
}

fn model_round(seed: u64) {
    let mut rng = Rng::new(seed);
    let four_levels = rng.range(0, 1) == 1;
    let shape = |rng: &mut Rng| {
        let mut shape = vec![
            (0, rng.range(8, 40), rng.range(0, 12)), // 1: a, floored
            (1, rng.range(6, 30), rng.range(0, 8)),  // 2: a's child b, floored
            (0, rng.range(4, 40), 0),                // 3: s, the root's other child
            (1, rng.range(4, 24), rng.range(0, 6)),  // 4: b's sibling, floored
        ];
        if four_levels {
            shape.push((2, rng.range(4, 24), rng.range(0, 6))); // 5: b's child
        }
        shape
    };
    let tree = loop {
        let root_cap = rng.range(16, 56);
        let s = shape(&mut rng);
        if let Some(tree) = Tree::build(root_cap, &s) {
            break tree;
        }
    };
    let mut tree = tree;
    let mut holdings: Vec<(usize, Holding)> = Vec::new();
    let n = tree.pools.len();
    for _ in 0..rounds(300, 40) {
        let p = rng.range(0, n - 1);
        let pool = Arc::clone(&tree.pools[p]);
        let cap = tree.smallest_cap(p);
        match rng.range(0, 9) {
            0..=2 => {
                let x = rng.range(1, cap / U + 2);
                let fits = x * U <= cap && tree.fits(p, x * U);
                match pool.try_allocate(x) {
                    Ok(a) => {
                        assert!(fits, "p{p}: {x} served though the model says no");
                        tree.own[p] += x * U;
                        holdings.push((p, Holding::Alloc(a)));
                    }
                    Err(AllocError::ExceedsBudget { .. }) => {
                        assert!(x * U > cap, "p{p}: {x} refused as too big")
                    }
                    Err(AllocError::WouldBlock) => {
                        assert!(!fits && x * U <= cap, "p{p}: {x} fits but WouldBlock")
                    }
                    Err(other) => panic!("{other:?}"),
                }
            }
            3 => {
                let x = rng.range(0, cap / U + 1) * U;
                let fits = x <= cap && tree.fits(p, x);
                match pool.try_reserve(x) {
                    Ok(r) => {
                        assert!(fits, "p{p}: reserve {x} served though the model says no");
                        tree.own[p] += x;
                        holdings.push((p, Holding::Res(r)));
                    }
                    Err(AllocError::ExceedsBudget { .. }) => assert!(x > cap),
                    Err(AllocError::WouldBlock) => assert!(!fits && x <= cap),
                    Err(other) => panic!("{other:?}"),
                }
            }
            4..=5 if !holdings.is_empty() => {
                let i = rng.range(0, holdings.len() - 1);
                let (q, holding) = holdings.swap_remove(i);
                tree.own[q] -= held(&holding);
                drop(holding);
            }
            6 => {
                // Grow a reservation of any pool: try_grow, force_grow or resize_to.
                let Some(i) = holdings
                    .iter()
                    .position(|(_, h)| matches!(h, Holding::Res(_)))
                else {
                    continue;
                };
                let q = holdings[i].0;
                let cap = tree.smallest_cap(q);
                let before = held(&holdings[i].1);
                let Holding::Res(r) = &mut holdings[i].1 else {
                    unreachable!()
                };
                let way = rng.range(0, 2);
                let more = rng.range(1, 3 * U);
                // `try_grow` rounds `more` up by itself; the others round the new size.
                let rounded_after = if way == 0 {
                    before + more.next_multiple_of(8)
                } else {
                    (r.size() + more).next_multiple_of(8)
                };
                let extra = rounded_after - before;
                let fits = rounded_after <= cap && tree.fits(q, extra);
                let result = match way {
                    0 => r.try_grow(more),
                    1 => r.resize_to(r.size() + more),
                    _ => r.force_grow(more),
                };
                match result {
                    Ok(()) => {
                        assert!(way == 2 || fits, "p{q}: growth by {more} though no room");
                        tree.own[q] += held(&holdings[i].1) - before;
                    }
                    Err(AllocError::WouldBlock) => assert!(
                        way != 2 && !fits,
                        "p{q}: way {way} by {more} from {before} WouldBlock; model {:?} own {:?} caps {:?} floors {:?} parents {:?}",
                        tree.in_use(),
                        tree.own,
                        tree.cap,
                        tree.floor,
                        tree.parent
                    ),
                    Err(AllocError::ExceedsBudget { .. }) => {
                        assert!(way != 2 && rounded_after > cap)
                    }
                    Err(other) => panic!("{other:?}"),
                }
            }
            7 => {
                // Shrink a reservation: try_shrink, resize_to or split (+ merge back or keep).
                let Some(i) = holdings
                    .iter()
                    .position(|(_, h)| matches!(h, Holding::Res(_)))
                else {
                    continue;
                };
                let q = holdings[i].0;
                let before = held(&holdings[i].1);
                let Holding::Res(r) = &mut holdings[i].1 else {
                    unreachable!()
                };
                let less = rng.range(0, r.size());
                match rng.range(0, 3) {
                    0 => r.try_shrink(less).unwrap(),
                    1 => r.resize_to(r.size() - less).unwrap(),
                    2 => {
                        let part = r.split(less);
                        if rng.range(0, 1) == 0 {
                            r.merge(part).map_err(|_| ()).unwrap();
                        } else {
                            let part_held = held(&Holding::Res(part));
                            // Kept as a reservation of its own.
                            let part = r.split(0);
                            drop(part);
                            let _ = part_held;
                        }
                    }
                    _ => {
                        // Buffers out of the reservation (no change in the books).
                        let n = r.size() / U;
                        if n > 0 {
                            let a = r.allocate(rng.range(1, n)).unwrap();
                            tree.own[q] -= before - held(&holdings[i].1);
                            let bytes = a.allocated_bytes();
                            tree.own[q] += bytes;
                            holdings.push((q, Holding::Alloc(a)));
                            tree.check();
                            continue;
                        }
                    }
                }
                tree.own[q] -= before - held(&holdings[i].1);
            }
            _ => {
                // An owned allocation.
                let x = rng.range(1, cap / U);
                let fits = tree.fits(p, x * U);
                let mut owned = Manual::new(Arc::clone(&pool).allocate_owned(x));
                match owned.poll() {
                    Poll::Ready(Ok(a)) => {
                        assert!(fits, "p{p}: owned {x} though no room");
                        tree.own[p] += x * U;
                        holdings.push((p, Holding::Alloc(a)));
                    }
                    Poll::Ready(Err(e)) => panic!("{e:?}"),
                    Poll::Pending => {
                        assert!(!fits, "p{p}: owned {x} fits but waits");
                        drop(owned);
                    }
                }
            }
        }
        tree.check();
    }
    holdings.clear();
    tree.own.iter_mut().for_each(|own| *own = 0);
    tree.check();
    // Every pool back to exactly its floor in its parent; then dropped, the root at zero.
    let pools = std::mem::take(&mut tree.pools);
    for pool in pools.into_iter().rev() {
        drop(pool);
    }
}

#[test]
fn model_of_partial_floors_in_sequences() {
    watchdog(30, || {
        for seed in 0..rounds(60, 2) as u64 {
            model_round(seed);
        }
    });
}

// ---------------------------------------------------------------------------------------
// Two requests that each need part of one floor.
// ---------------------------------------------------------------------------------------

/// Root 8, a child with a floor of 4 (cap 16, so two requests fit its own level at once),
/// another holder of part of the floor, requests of 6 and 7 at once: neither holds part of
/// the floor while it waits for more, so both are served once the holder goes.
#[test]
fn two_requests_needing_part_of_one_floor_are_both_served() {
    watchdog(10, || {
        for holder_units in [1, 2, 3, 4] {
            for first_big in [false, true] {
                let r = root(8);
                let c = floored(&r, "c", 16, 4);
                let holder = c.try_allocate(holder_units).unwrap();
                let (x, y) = if first_big { (7, 6) } else { (6, 7) };
                let mut requests = [Manual::new(c.allocate(x)), Manual::new(c.allocate(y))];
                let mut done = [false, false];
                let mut live = Vec::new();
                for (i, m) in requests.iter_mut().enumerate() {
                    if let Poll::Ready(out) = m.poll() {
                        live.push(out.unwrap());
                        done[i] = true;
                    }
                }
                drop(holder);
                // Whoever is served gives back; the other is served then.
                while done != [true, true] {
                    let mut progressed = false;
                    for (i, m) in requests.iter_mut().enumerate() {
                        if !done[i] && m.wakes() > m.seen {
                            m.seen = m.wakes();
                            if let Poll::Ready(out) = m.poll_raw() {
                                let allocation = out.unwrap();
                                assert!(r.stats().in_use_bytes <= 8 * U);
                                live.push(allocation);
                                done[i] = true;
                                progressed = true;
                            }
                        }
                    }
                    if !progressed {
                        assert!(
                            !live.is_empty(),
                            "holder {holder_units}: both wait with nothing held: {:?}",
                            units(&[&r, &c])
                        );
                        drop(live.remove(0));
                    }
                }
                drop(live);
                assert_eq!(units(&[&r, &c]), [4, 0], "holder {holder_units}");
                quiet(&[&r, &c]);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------
// One request waiting at the root with part of the floor, one waiting for the floor in no
// queue: cancels, closes and resizes at each stage.
// ---------------------------------------------------------------------------------------

type Waiting<'a> = Manual<membudget::Allocate<'a>>;

/// Root 8, floored child `c` (cap 16, floor 4), plain sibling `s` (cap 16) holding 2, a
/// holder of 2 of the floor; `a` (6) takes the other 2 of the floor and waits at the root
/// for 4; `b` (7) needs at least 3 of the floor and waits for it in no queue.
struct Stage {
    // The holdings first: they are dropped before the pools (whose drop waits for them).
    sibling: Cell<Option<BufPoolAllocation>>,
    holder: Cell<Option<BufPoolAllocation>>,
    r: Arc<BufPool>,
    c: Arc<BufPool>,
    s: Arc<BufPool>,
}

impl Stage {
    fn new() -> Stage {
        let r = root(8);
        let c = floored(&r, "c", 16, 4);
        let s = plain(&r, "s", 16);
        let sibling = Cell::new(Some(s.try_allocate(2).unwrap()));
        let holder = Cell::new(Some(c.try_allocate(2).unwrap()));
        assert_eq!(units(&[&r, &c, &s]), [6, 2, 2]);
        Stage {
            sibling,
            holder,
            r,
            c,
            s,
        }
    }

    fn books(&self) -> Vec<usize> {
        units(&[&self.r, &self.c, &self.s])
    }

    fn waiters<'a>(&'a self) -> (Waiting<'a>, Waiting<'a>) {
        let mut a = Manual::new(self.c.allocate(6));
        a.pending();
        assert_eq!(self.books(), [6, 8, 2]);
        assert_eq!(self.r.stats().waiting, 1, "a waits at the root");
        let mut b = Manual::new(self.c.allocate(7));
        b.pending();
        assert_eq!(self.books(), [6, 15, 2]);
        assert_eq!(
            (self.r.stats().waiting, self.c.stats().waiting),
            (1, 0),
            "b waits in no queue"
        );
        (a, b)
    }
}

#[test]
fn cancel_the_request_waiting_for_the_floor() {
    watchdog(10, || {
        let st = Stage::new();
        let (mut a, b) = st.waiters();
        drop(b);
        assert_eq!(st.books(), [6, 8, 2]);
        drop(st.sibling.take());
        let got = a.ready_after_wake().unwrap();
        assert_eq!(st.books(), [8, 8, 0]);
        drop(got);
        assert_eq!(st.books(), [4, 2, 0]);
        drop(st.holder.take());
        assert_eq!(st.books(), [4, 0, 0]);
        quiet(&[&st.r, &st.c, &st.s]);
    });
}

#[test]
fn cancel_the_request_waiting_above_with_part_of_the_floor() {
    watchdog(10, || {
        let st = Stage::new();
        let (a, mut b) = st.waiters();
        let before = b.wakes();
        drop(a);
        // Its 2 of the floor come back as a release's would: the floor has 2 free, less
        // than the 3 `b` needs.
        assert_eq!(st.books(), [6, 9, 2]);
        if b.wakes() > before {
            b.seen = before;
            assert!(b.ready_after_wake_or_pending().is_pending());
        }
        drop(st.holder.take());
        // The floor has 4: b takes it all and waits at the root for 3 (the sibling holds 2).
        assert!(b.ready_after_wake_or_pending().is_pending());
        assert_eq!(st.books(), [6, 7, 2]);
        assert_eq!(st.r.stats().waiting, 1);
        drop(st.sibling.take());
        let got = b.ready_after_wake().unwrap();
        assert_eq!(st.books(), [7, 7, 0]);
        drop(got);
        assert_eq!(st.books(), [4, 0, 0]);
        quiet(&[&st.r, &st.c, &st.s]);
    });
}

#[test]
fn cancel_a_grant_not_taken_of_a_request_with_part_of_the_floor() {
    watchdog(10, || {
        let st = Stage::new();
        let (a, mut b) = st.waiters();
        drop(st.sibling.take());
        // a is granted its 4 at the root, and not polled again: dropped.
        assert_eq!(st.books(), [8, 15, 0]);
        assert!(a.wakes() > a.seen);
        drop(a);
        assert_eq!(st.books(), [4, 9, 0]);
        drop(st.holder.take());
        let got = b.ready_after_wake().unwrap();
        assert_eq!(st.books(), [7, 7, 0]);
        drop(got);
        assert_eq!(st.books(), [4, 0, 0]);
        quiet(&[&st.r, &st.c, &st.s]);
    });
}

#[test]
fn both_served_in_turn_with_exact_books() {
    watchdog(10, || {
        let st = Stage::new();
        let (mut a, mut b) = st.waiters();
        drop(st.holder.take());
        // 2 back to the floor: a needs 4 (no), b at least 3 (no).
        assert!(b.ready_after_wake_or_pending().is_pending());
        assert!(a.ready_after_wake_or_pending().is_pending());
        assert_eq!(st.books(), [6, 13, 2]);
        drop(st.sibling.take());
        let got_a = a.ready_after_wake().unwrap();
        // Served at the root, a takes the 2 the floor got while it waited there and gives 2
        // back at the root: the root holds only what `c` holds beyond its floor.
        assert_eq!(st.books(), [6, 13, 0]);
        assert!(b.ready_after_wake_or_pending().is_pending());
        drop(got_a);
        // 6 back: the 2 climbed go up first, 4 refill the floor: b takes them.
        let got_b = b.ready_after_wake().unwrap();
        assert_eq!(st.books(), [7, 7, 0]);
        drop(got_b);
        assert_eq!(st.books(), [4, 0, 0]);
        quiet(&[&st.r, &st.c, &st.s]);
    });
}

#[test]
fn root_growth_serves_both() {
    watchdog(10, || {
        let st = Stage::new();
        let (mut a, mut b) = st.waiters();
        // Room for a's 4 but not b's 7 (no floor free for it): b moves to the root's queue.
        st.r.set_max_memory(15 * U).unwrap();
        let got_a = a.ready_after_wake().unwrap();
        assert!(b.ready_after_wake_or_pending().is_pending());
        assert_eq!(st.books(), [10, 15, 2]);
        assert_eq!(st.r.stats().waiting, 1);
        st.r.set_max_memory(17 * U).unwrap();
        let got_b = b.ready_after_wake().unwrap();
        // a: 2 of the floor and 4 above; b: 0 of the floor (none free) and 7 above.
        assert_eq!(st.books(), [17, 15, 2]);
        drop((got_a, got_b));
        assert_eq!(st.books(), [6, 2, 2]);
        quiet(&[&st.r, &st.c, &st.s]);
    });
}

#[test]
fn closing_the_floored_pool_fails_both_and_gives_the_floor_back() {
    watchdog(10, || {
        let st = Stage::new();
        let (mut a, mut b) = st.waiters();
        st.c.close();
        assert_eq!(a.ready_after_wake().unwrap_err(), AllocError::Closed);
        assert_eq!(b.ready_after_wake().unwrap_err(), AllocError::Closed);
        // The holder's 2 stay held in the root until it goes; the rest of the floor is back.
        assert_eq!(st.books(), [4, 2, 2]);
        drop(st.holder.take());
        assert_eq!(st.books(), [2, 0, 2]);
        drop(st.sibling.take());
        assert_eq!(st.books(), [0, 0, 0]);
        quiet(&[&st.r, &st.c, &st.s]);
    });
}

#[test]
fn closing_the_root_fails_both_and_gives_everything_back() {
    watchdog(10, || {
        let st = Stage::new();
        let (mut a, mut b) = st.waiters();
        st.r.close();
        assert_eq!(a.ready_after_wake().unwrap_err(), AllocError::Closed);
        assert_eq!(b.ready_after_wake().unwrap_err(), AllocError::Closed);
        assert_eq!(st.books(), [4, 2, 2]);
        drop(st.holder.take());
        drop(st.sibling.take());
        assert_eq!(st.books(), [0, 0, 0]);
        quiet(&[&st.r, &st.c, &st.s]);
    });
}

/// The same through a middle pool: root → m (no floor) → c (floor).
#[test]
fn closing_a_middle_pool_fails_both() {
    watchdog(10, || {
        let r = root(8);
        let m = plain(&r, "m", 16);
        let c = floored(&m, "c", 16, 4);
        let s = plain(&r, "s", 16);
        let sibling = s.try_allocate(2).unwrap();
        let holder = c.try_allocate(2).unwrap();
        let mut a = Manual::new(c.allocate(6));
        a.pending();
        let mut b = Manual::new(c.allocate(7));
        b.pending();
        assert_eq!(units(&[&r, &m, &c]), [6, 8, 15]);
        assert_eq!((r.stats().waiting, m.stats().waiting), (1, 0));
        m.close();
        assert_eq!(a.ready_after_wake().unwrap_err(), AllocError::Closed);
        assert_eq!(b.ready_after_wake().unwrap_err(), AllocError::Closed);
        assert_eq!(units(&[&r, &m, &c]), [4, 2, 2]);
        drop(holder);
        assert_eq!(units(&[&r, &m, &c]), [2, 0, 0]);
        drop(sibling);
        assert_eq!(units(&[&r, &m, &c, &s]), [0, 0, 0, 0]);
        quiet(&[&r, &m, &c, &s]);
    });
}

// ---------------------------------------------------------------------------------------
// Shrinks of the chain while a request waits above with part of a floor.
// ---------------------------------------------------------------------------------------

/// The floored pool itself shrinks below a request that waits at the root with part of its
/// floor: guarantee 14, "a child's shrink fails every request of its subtree that can no
/// longer fit, wherever it waits (its own queue or an ancestor's)".
#[test]
fn own_shrink_fails_a_request_waiting_above_with_part_of_the_floor() {
    watchdog(10, || {
        let st = Stage::new();
        let (mut a, b) = st.waiters();
        drop(b);
        // a (6) waits at the root for 4, with 2 of the floor.
        st.c.set_max_memory(5 * U).unwrap();
        let out = a.ready_after_wake();
        assert!(
            matches!(out, Err(AllocError::ExceedsBudget { .. })),
            "{out:?}"
        );
        assert_eq!(st.books(), [6, 2, 2]);
        drop(st.holder.take());
        drop(st.sibling.take());
        assert_eq!(st.books(), [4, 0, 0]);
        quiet(&[&st.r, &st.c, &st.s]);
    });
}

/// A middle pool (no floor) between the root and the floored pool shrinks below the
/// request waiting at the root with part of the floor.
#[test]
fn middle_shrink_fails_a_request_waiting_above_with_part_of_the_floor() {
    watchdog(10, || {
        let r = root(8);
        let m = plain(&r, "m", 16);
        let c = floored(&m, "c", 16, 4);
        let s = plain(&r, "s", 16);
        let sibling = s.try_allocate(2).unwrap();
        let holder = c.try_allocate(2).unwrap();
        let mut a = Manual::new(c.allocate(6));
        a.pending();
        assert_eq!(units(&[&r, &m, &c]), [6, 8, 8]);
        assert_eq!(r.stats().waiting, 1);
        m.set_max_memory(5 * U).unwrap();
        let out = a.ready_after_wake();
        assert!(
            matches!(out, Err(AllocError::ExceedsBudget { .. })),
            "{out:?}"
        );
        assert_eq!(units(&[&r, &m, &c]), [6, 4, 2]);
        drop((holder, sibling));
        assert_eq!(units(&[&r, &m, &c, &s]), [4, 4, 0, 0]);
        quiet(&[&r, &m, &c, &s]);
    });
}

/// Shrinks that leave the request able to fit do not fail it: it is served once room comes.
#[test]
fn shrinks_that_still_fit_keep_the_request_waiting_and_serve_it() {
    watchdog(10, || {
        let st = Stage::new();
        let (mut a, mut b) = st.waiters();
        // Both still fit: c shrinks to 15 (a and b hold 13 of it, the holder 2), the root is
        // set to what it was.
        st.c.set_max_memory(15 * U).unwrap();
        st.r.set_max_memory(8 * U).unwrap();
        assert!(a.ready_after_wake_or_pending().is_pending());
        assert!(b.ready_after_wake_or_pending().is_pending());
        assert_eq!(st.books(), [6, 15, 2]);
        drop(st.sibling.take());
        let got_a = a.ready_after_wake().unwrap();
        drop(st.holder.take());
        assert!(b.ready_after_wake_or_pending().is_pending());
        drop(got_a);
        let got_b = b.ready_after_wake().unwrap();
        assert_eq!(st.books(), [7, 7, 0]);
        drop(got_b);
        assert_eq!(st.books(), [4, 0, 0]);
        quiet(&[&st.r, &st.c, &st.s]);
    });
}

// ---------------------------------------------------------------------------------------
// Nested floors: a grandchild's request takes parts of several floors.
// ---------------------------------------------------------------------------------------

/// Root → a (floor 8) → b (floor 4) → c (floor 2), each floor set aside inside its parent's.
fn nested(root_cap: usize, c_cap: usize) -> [Arc<BufPool>; 4] {
    let r = root(root_cap);
    let a = floored(&r, "a", 40, 8);
    let b = floored(&a, "b", 40, 4);
    let c = floored(&b, "c", c_cap, 2);
    assert_eq!(units(&[&r, &a, &b, &c]), [8, 4, 2, 0]);
    [r, a, b, c]
}

/// Through its own queue (slow path), a grandchild's request takes the free parts of three
/// floors and climbs with the rest; everything goes back exactly.
#[test]
fn grandchild_takes_parts_of_three_floors_on_its_slow_path() {
    watchdog(10, || {
        let [r, a, b, c] = nested(40, 12);
        let holder = c.try_allocate(1).unwrap();
        let mut x = Manual::new(c.allocate(12));
        x.pending();
        assert_eq!(c.stats().waiting, 1);
        drop(holder);
        let got = x.ready_after_wake().unwrap();
        // c's 2, b's 2 free, a's 4 free, and 4 from the root.
        assert_eq!(units(&[&r, &a, &b, &c]), [12, 12, 12, 12]);
        drop(got);
        assert_eq!(units(&[&r, &a, &b, &c]), [8, 4, 2, 0]);
        quiet(&[&r, &a, &b, &c]);
    });
}

/// The same request waiting at the root (a sibling fills it) with parts of two floors;
/// the grandchild's holder of its own floor goes, then the sibling: exact books at each
/// step, and every pool back to its floor after a cancel or after the release.
#[test]
fn grandchild_waiting_at_the_root_with_parts_of_two_floors() {
    watchdog(10, || {
        for cancel in [false, true] {
            let [r, a, b, c] = nested(20, 40);
            let s = plain(&r, "s", 40);
            let sibling = s.try_allocate(12).unwrap();
            let holder = c.try_allocate(2).unwrap();
            let mut x = Manual::new(c.allocate(10));
            x.pending();
            // b's 2 and a's 4 taken; 4 wait at the root.
            assert_eq!(units(&[&r, &a, &b, &c]), [20, 12, 12, 12]);
            assert_eq!(r.stats().waiting, 1);
            drop(holder);
            assert_eq!(units(&[&r, &c]), [20, 10]);
            assert!(x.ready_after_wake_or_pending().is_pending());
            if cancel {
                drop(x);
                assert_eq!(units(&[&r, &a, &b, &c]), [20, 4, 2, 0]);
                drop(sibling);
            } else {
                drop(sibling);
                let got = x.ready_after_wake().unwrap();
                // (The root holds 12, not the 10 a holds: see
                // `a_request_served_above_leaves_no_free_floor_behind`.)
                assert_eq!(c.stats().in_use_bytes, 10 * U);
                drop(got);
            }
            assert_eq!(units(&[&r, &a, &b, &c, &s]), [8, 4, 2, 0, 0]);
            quiet(&[&r, &a, &b, &c, &s]);
            // And the whole chain cap is served at once again.
            let all = c.try_allocate(20).unwrap();
            drop(all);
            assert_eq!(units(&[&r, &a, &b, &c]), [8, 4, 2, 0]);
        }
    });
}

/// A request waiting at the root takes a floor below once it has room for all it still
/// needs, leaving the root's queue.
#[test]
fn a_request_waiting_at_the_root_takes_a_refilled_floor() {
    watchdog(10, || {
        let r = root(8);
        let c = floored(&r, "c", 16, 4);
        let s = plain(&r, "s", 16);
        let sibling = s.try_allocate(4).unwrap();
        let holder = c.try_allocate(3).unwrap();
        let mut x = Manual::new(c.allocate(4));
        x.pending();
        // 1 of the floor taken, 3 wait at the root.
        assert_eq!(units(&[&r, &c]), [8, 7]);
        assert_eq!(r.stats().waiting, 1);
        drop(holder);
        let got = x.ready_after_wake().unwrap();
        assert_eq!(units(&[&r, &c]), [8, 4]);
        assert_eq!(r.stats().waiting, 0);
        // The sibling's bytes are its own, and the root serves another of its requests.
        let more = s.try_allocate(1);
        assert_eq!(more.unwrap_err(), AllocError::WouldBlock);
        drop((got, sibling));
        assert_eq!(units(&[&r, &c, &s]), [4, 0, 0]);
        quiet(&[&r, &c, &s]);
    });
}

/// A request waiting at the root with part of the floor (it took the 1 free, 3 wait above);
/// a holder of 1 of the floor goes (the floor has 1 free again: not all the request still
/// needs, so it keeps its place above); the root gets room and serves it. Nothing waits
/// now: "the parent of a floored pool sees only what that pool holds beyond its floor"
/// (guarantee 15): `c` holds 6 (2 beyond its floor of 4), so the root must hold 4 + 2 for
/// it, and have room for 2 of the sibling's.
#[test]
fn a_request_served_above_leaves_no_free_floor_behind() {
    watchdog(10, || {
        let r = root(8);
        let c = floored(&r, "c", 16, 4);
        let s = plain(&r, "s", 16);
        let sibling = s.try_allocate(4).unwrap();
        let h1 = c.try_allocate(1).unwrap();
        let h2 = c.try_allocate(2).unwrap();
        let mut x = Manual::new(c.allocate(4));
        x.pending();
        assert_eq!(units(&[&r, &c]), [8, 7]);
        drop(h1);
        assert!(x.ready_after_wake_or_pending().is_pending());
        drop(sibling);
        let got = x.ready_after_wake().unwrap();
        quiet(&[&r, &c, &s]);
        // c holds 6: its floor (4) and 2 beyond.
        assert_eq!(units(&[&c]), [6]);
        assert_eq!(
            units(&[&r]),
            [6],
            "the root counts more than c's floor and c's excess"
        );
        let more = s.try_allocate(2);
        assert!(
            more.is_ok(),
            "the sibling is refused room the root has: {more:?}"
        );
        drop((more, got, h2));
        assert_eq!(units(&[&r, &c, &s]), [4, 0, 0]);
    });
}

// ---------------------------------------------------------------------------------------
// Timeouts, blocking callers and reservations at each stage.
// ---------------------------------------------------------------------------------------

#[test]
fn timeouts_at_each_stage_give_everything_back() {
    watchdog(10, || {
        let r = root(8);
        let c = floored(&r, "c", 16, 4);
        let s = plain(&r, "s", 16);
        let sibling = s.try_allocate(2).unwrap();
        let holder = c.try_allocate(2).unwrap();
        let short = Duration::from_millis(30);
        // At the root with part of the floor (takes 2, waits for 4): times out.
        assert_eq!(len(c.allocate_timeout(6, short)), Err(AllocError::TimedOut));
        assert_eq!(units(&[&r, &c, &s]), [6, 2, 2]);
        assert_eq!(
            c.reserve_timeout(6 * U, short).unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(units(&[&r, &c, &s]), [6, 2, 2]);
        // Waiting for the floor in no queue, behind one waiting at the root.
        let a = {
            let c = Arc::clone(&c);
            std::thread::spawn(move || len(c.allocate_blocking(6)))
        };
        common::wait_waiting(&r, 1);
        assert_eq!(units(&[&r, &c]), [6, 8]);
        assert_eq!(len(c.allocate_timeout(7, short)), Err(AllocError::TimedOut));
        assert_eq!(
            c.reserve_timeout(7 * U, short).unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(units(&[&r, &c, &s]), [6, 8, 2]);
        drop(sibling);
        assert_eq!(a.join().unwrap(), Ok(6));
        drop(holder);
        assert_eq!(units(&[&r, &c, &s]), [4, 0, 0]);
        quiet(&[&r, &c, &s]);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_wait_and_grow_through_a_floor() {
    common::within(10, async {
        let r = root(8);
        let c = floored(&r, "c", 16, 4);
        let s = plain(&r, "s", 16);
        let sibling = s.try_allocate(2).unwrap();
        let holder = c.try_allocate(2).unwrap();
        // reserve(6): 2 of the floor, 4 wait at the root.
        let waiting = {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.reserve(6 * U).await })
        };
        common::wait_waiting_async(&r, 1).await;
        assert_eq!(units(&[&r, &c]), [6, 8]);
        drop(sibling);
        let mut res = waiting.await.unwrap().unwrap();
        assert_eq!(units(&[&r, &c, &s]), [8, 8, 0]);
        // No barging: the root is full, try_grow refuses; grow waits, for the floor.
        assert_eq!(res.try_grow(U).unwrap_err(), AllocError::WouldBlock);
        let grower = tokio::spawn(async move {
            res.grow(2 * U).await.unwrap();
            res
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!grower.is_finished());
        drop(holder);
        let mut res = grower.await.unwrap();
        assert_eq!(res.size(), 8 * U);
        assert_eq!(units(&[&r, &c]), [8, 8]);
        // Exact sizes, split and merge, buffers out of it.
        res.resize_to(5 * U + 3).unwrap();
        assert_eq!(units(&[&r, &c]), [6, 6]);
        let part = res.split(2 * U);
        let buffers = res.allocate(2).unwrap();
        res.merge(part).map_err(|_| "merge").unwrap();
        res.try_shrink(3).unwrap();
        // 24 reserved, 16 in buffers.
        assert_eq!(units(&[&r, &c]), [5, 5]);
        res.force_grow(7 * U).unwrap();
        // 12 in c: its floor (4) and 8 above it, with the root at 12 over a budget of 8.
        assert_eq!(units(&[&r, &c]), [12, 12]);
        assert_eq!(r.stats().overcommit_bytes, 4 * U);
        drop(res);
        assert_eq!(units(&[&r, &c]), [4, 2]);
        drop(buffers);
        assert_eq!(units(&[&r, &c, &s]), [4, 0, 0]);
        quiet(&[&r, &c, &s]);
    })
    .await;
}

/// Owned allocations, spawned and aborted while they wait at each stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_allocations_aborted_at_each_stage() {
    common::within(10, async {
        let r = root(8);
        let c = floored(&r, "c", 16, 4);
        let s = plain(&r, "s", 16);
        let sibling = s.try_allocate(2).unwrap();
        let holder = c.try_allocate(2).unwrap();
        let a = tokio::spawn(Arc::clone(&c).allocate_owned(6));
        common::wait_waiting_async(&r, 1).await;
        let b = tokio::spawn(Arc::clone(&c).allocate_owned(7));
        common::wait_until_async(5, "b holds c's level", || c.stats().in_use_bytes == 15 * U).await;
        b.abort();
        assert!(b.await.unwrap_err().is_cancelled());
        assert_eq!(units(&[&r, &c]), [6, 8]);
        a.abort();
        assert!(a.await.unwrap_err().is_cancelled());
        assert_eq!(units(&[&r, &c, &s]), [6, 2, 2]);
        // And an owned one served through the floor outlives the handles.
        let waiting = tokio::spawn(Arc::clone(&c).allocate_owned(6));
        common::wait_waiting_async(&r, 1).await;
        drop(sibling);
        let got = waiting.await.unwrap().unwrap();
        assert_eq!(units(&[&r, &c]), [8, 8]);
        drop(holder);
        drop(got);
        assert_eq!(units(&[&r, &c, &s]), [4, 0, 0]);
        quiet(&[&r, &c, &s]);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Races.
// ---------------------------------------------------------------------------------------

/// Fast paths that take part of the floor and are refused above (they put it back) race a
/// close of the floored pool: once the close returned and the fast paths stopped, with
/// nothing held in the closed pool, its whole floor is back in the root (guarantee 15:
/// "once the child is closed ... its floor goes back to the ancestors").
#[test]
fn close_racing_fast_paths_that_put_part_of_the_floor_back() {
    watchdog(20, || {
        for round in 0..rounds(200, 2) {
            let r = root(8);
            let c = floored(&r, "c", 16, 4);
            let s = plain(&r, "s", 16);
            let sibling = s.try_allocate(4).unwrap();
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let c = Arc::clone(&c);
                    std::thread::spawn(move || {
                        loop {
                            match c.try_allocate(6) {
                                Err(AllocError::WouldBlock) => {}
                                Err(AllocError::Closed) => return,
                                other => panic!("{other:?}"),
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_micros(50 + (round as u64 % 7) * 30));
            c.close();
            for thread in threads {
                thread.join().unwrap();
            }
            assert_eq!(
                units(&[&r, &c, &s]),
                [4, 0, 4],
                "round {round}: the closed pool's floor is not all back"
            );
            drop(sibling);
            drop((c, s));
            assert_eq!(units(&[&r]), [0]);
        }
    });
}

/// Threads allocate, reserve, grow and release random sizes in a floored subtree (a floor
/// nested in a floor, a plain child beside it) and in a sibling, with timeouts, cancels
/// after one poll and resizes; the root never goes over its budget, and at the end every
/// pool is back to exactly its floor, and the chain's cap is served from every pool.
#[test]
fn stress_partial_floors_with_cancels_and_resizes() {
    watchdog(30, || stress(64, 3000));
}

/// The same with a root the subtree and the sibling fill: requests wait at the root with
/// parts of floors.
#[test]
fn stress_partial_floors_under_a_tight_root() {
    watchdog(30, || stress(36, 3000));
}

fn stress(root_units: usize, ops: usize) {
    {
        let r = root(root_units);
        let a = floored(&r, "a", 48, 8);
        let b = floored(&a, "b", 32, 6);
        let m = plain(&a, "m", 24);
        let s = plain(&r, "s", 40);
        let pools = [
            Arc::clone(&a),
            Arc::clone(&b),
            Arc::clone(&m),
            Arc::clone(&s),
        ];
        assert_eq!(units(&[&r, &a, &b, &m, &s]), [8, 6, 0, 0, 0]);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let pools = pools.clone();
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut rng = Rng::new(t + 77);
                    let mut held: Vec<Holding> = Vec::new();
                    for _ in 0..rounds(ops, 30) {
                        if stop.load(SeqCst) {
                            break;
                        }
                        let p = rng.range(0, pools.len() - 1);
                        let pool = &pools[p];
                        let cap = pool.stats().max_memory.min(32 * U) / U;
                        let x = rng.range(1, cap.max(1));
                        match rng.range(0, 7) {
                            0 | 1 => {
                                let wait = Duration::from_micros(rng.range(0, 300) as u64);
                                if let Ok(got) = pool.allocate_timeout(x, wait) {
                                    held.push(Holding::Alloc(got));
                                }
                            }
                            2 => {
                                if let Ok(got) = pool.try_allocate(x) {
                                    held.push(Holding::Alloc(got));
                                }
                            }
                            3 => {
                                let wait = Duration::from_micros(rng.range(0, 300) as u64);
                                if let Ok(got) = pool.reserve_timeout(x * U - 3, wait) {
                                    held.push(Holding::Res(got));
                                }
                            }
                            4 => {
                                // Polled once, then dropped (or kept if served).
                                let mut f = Manual::new(pool.allocate(x));
                                if let Poll::Ready(Ok(got)) = f.poll() {
                                    held.push(Holding::Alloc(got));
                                }
                            }
                            5 => {
                                if let Some(Holding::Res(res)) = held.last_mut() {
                                    match rng.range(0, 3) {
                                        0 => drop(res.try_grow(U)),
                                        1 => drop(res.force_grow(rng.range(1, 2 * U))),
                                        2 => drop(res.resize_to(res.size() / 2)),
                                        _ => {
                                            let part = res.split(U);
                                            held.push(Holding::Res(part));
                                        }
                                    }
                                }
                            }
                            _ => {
                                while held.len() > rng.range(0, 3) {
                                    let i = rng.range(0, held.len() - 1);
                                    drop(held.swap_remove(i));
                                }
                            }
                        }
                        if held.len() > 4 {
                            held.remove(0);
                        }
                    }
                    drop(held);
                })
            })
            .collect();
        // Resizes of the floored pools and the plain child while the threads run.
        let mut rng = Rng::new(5);
        for _ in 0..rounds(200, 3) {
            match rng.range(0, 2) {
                0 => a.set_max_memory(rng.range(10, 48) * U).unwrap(),
                1 => b.set_max_memory(rng.range(6, 32) * U).unwrap(),
                _ => m.set_max_memory(rng.range(1, 24) * U).unwrap(),
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        a.set_max_memory(48 * U).unwrap();
        b.set_max_memory(32 * U).unwrap();
        m.set_max_memory(24 * U).unwrap();
        for thread in threads {
            thread.join().unwrap();
        }
        stop.store(true, SeqCst);
        quiet(&[&r, &a, &b, &m, &s]);
        assert_eq!(units(&[&r, &a, &b, &m, &s]), [8, 6, 0, 0, 0]);
        // Every pool's chain cap, served at once on the idle tree.
        // (a holds b's floor: 48 less 6.)
        // (What the root has beyond a's floor, plus a's 2 free, plus b's own floor.)
        let beyond = root_units - 8;
        for (pool, all) in [
            (&a, 42.min(beyond + 2)),
            (&b, 32.min(beyond + 2 + 6)),
            (&m, 24.min(beyond + 2)),
            (&s, 40.min(beyond)),
        ] {
            let got = pool.try_allocate(all).unwrap();
            drop(got);
        }
        assert_eq!(units(&[&r, &a, &b, &m, &s]), [8, 6, 0, 0, 0]);
    }
}
