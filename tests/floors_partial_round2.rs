//! Floors used in part, a second adversarial round (README guarantee 15, "Design → Floors"):
//! what `floors.rs` and `floors_partial_adversarial.rs` leave out. Reclaim rounds driven by a
//! floored child's request waiting above with part of a floor; wait statistics and reports
//! while requests start again or wait for a floor; owned futures dropped on other threads;
//! `PollAllocate` changing `n`; `max_waiters` on floored chains; `wait_for_growth` roots and
//! `add_max_memory` / `forget_max_memory` racing floor waiters; resizes of every pool of a
//! four-level chain racing requests; sibling floors that must close first.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;

use common::{Rng, rounds, watchdog};
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate, Reclaimer,
};

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

fn waiting(pools: &[&BufPool]) -> Vec<usize> {
    pools.iter().map(|pool| pool.stats().waiting).collect()
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
}

impl<F: Future> Manual<F> {
    fn new(future: F) -> Self {
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(Arc::clone(&counter));
        Manual {
            future: Box::pin(future),
            counter,
            waker,
        }
    }

    fn poll(&mut self) -> Poll<F::Output> {
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

    /// Polls until ready, as an executor would: only while woken (a few rounds).
    #[track_caller]
    fn ready(&mut self) -> F::Output {
        for _ in 0..100 {
            if let Poll::Ready(out) = self.poll() {
                return out;
            }
            let before = self.wakes();
            // Not ready: it must have been woken again (start again) or be truly waiting.
            if self.wakes() == before {
                thread::yield_now();
            }
        }
        panic!("not ready after 100 polls")
    }
}

fn len(result: Result<BufPoolAllocation, AllocError>) -> Result<usize, AllocError> {
    result.map(|allocation| allocation.length())
}

// ---------------------------------------------------------------------------------------
// Reclaim.
// ---------------------------------------------------------------------------------------

/// A cache of allocations (of any pool) that frees entries, oldest first, until the target
/// is met; records every target it was asked for.
struct Cache {
    entries: Mutex<Vec<BufPoolAllocation>>,
    asked: Mutex<Vec<usize>>,
}

impl Cache {
    fn new(entries: Vec<BufPoolAllocation>) -> Arc<Self> {
        Arc::new(Cache {
            entries: Mutex::new(entries),
            asked: Mutex::new(Vec::new()),
        })
    }

    fn held(&self) -> usize {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(BufPoolAllocation::allocated_bytes)
            .sum()
    }

    fn asked(&self) -> Vec<usize> {
        self.asked.lock().unwrap().clone()
    }
}

impl Reclaimer for Cache {
    fn estimate(&self) -> usize {
        self.held()
    }

    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        self.asked.lock().unwrap().push(target);
        let mut entries = self.entries.lock().unwrap();
        let mut freed = 0;
        while freed < target && !entries.is_empty() {
            freed += entries.remove(0).allocated_bytes();
        }
        Box::pin(async move { freed })
    }
}

/// Root 8, floored child `c` (cap 16, floor 4), plain sibling `s` (cap 16) holding 4 in a
/// cache (the root is full). `c`'s cache holds 2 of the floor. A request of 6 in `c` takes
/// the other 2 of the floor and waits at the root for 4: it drives a round at the root. The
/// round asks `c`'s cache first (priority 0): its 2 go back into `c`'s floor (no help at the
/// root: "bytes freed into a descendant's floor do not help a waiter at an ancestor, and the
/// round goes on"), then `s`'s cache for what is still short (4). Nobody is asked for more
/// than the head needs at the root (4), the round ends, the request is served, and the
/// books are exact: `c` holds 6 (its floor and 2 beyond it), the root 4 + 2.
#[test]
fn reclaim_round_for_a_request_waiting_above_with_part_of_a_floor() {
    watchdog(10, || {
        let root = root(8);
        let c = floored(&root, "c", 16, 4);
        let s = plain(&root, "s", 16);
        let c_cache = Cache::new(vec![c.try_allocate(2).unwrap()]);
        let s_cache = Cache::new(vec![s.try_allocate(4).unwrap()]);
        assert_eq!(units(&[&root, &c, &s]), [8, 2, 4]);
        let _hc = c.register_reclaimer("c-cache", 0, c_cache.clone());
        let _hs = s.register_reclaimer("s-cache", 1, s_cache.clone());
        let got = c.allocate_blocking(6).expect("served after reclaim");
        assert_eq!(got.length(), 6);
        assert_eq!(c_cache.held(), 0);
        assert_eq!(s_cache.held(), 0);
        for asked in c_cache.asked().iter().chain(s_cache.asked().iter()) {
            assert!(
                *asked <= 4 * U,
                "asked {asked} bytes, more than the head's 32"
            );
        }
        let stats = root.stats();
        assert!(stats.reclaim_rounds >= 1, "{stats}");
        assert_eq!(units(&[&root, &c, &s]), [6, 6, 0]);
        assert_eq!(waiting(&[&root, &c, &s]), [0, 0, 0]);
        // The parent of a floored pool sees only what it holds beyond the floor: the root
        // has room for 2 of the sibling's.
        let s2 = s.try_allocate(2).expect("the root holds 4 + 2 for c");
        drop((got, s2));
        assert_eq!(units(&[&root, &c, &s]), [4, 0, 0]);
        // The idle tree serves each pool's whole cap (less the floors set aside).
        assert_eq!(len(c.try_allocate(8)), Ok(8));
        assert_eq!(len(s.try_allocate(4)), Ok(4));
    });
}

/// Root 8, `c` (cap 16, floor 4) whose cache holds all its floor, `s` holding 4 in a cache of
/// a higher priority number. A request of 4 in `c` finds the floor empty and waits at the
/// root for 4. The round asks `c`'s cache first: its 4 refill the floor, which now holds all
/// the request needs. The round goes on (README: "bytes freed into a descendant's floor do
/// not help a waiter at an ancestor, and the round goes on"), so `s`'s cache is asked too,
/// for at most the head's 4; the request is served and the books are exact.
#[test]
fn reclaim_into_the_floor_serves_the_waiter_with_exact_books() {
    watchdog(10, || {
        let root = root(8);
        let c = floored(&root, "c", 16, 4);
        let s = plain(&root, "s", 16);
        let c_cache = Cache::new(vec![c.try_allocate(4).unwrap()]);
        let s_cache = Cache::new(vec![s.try_allocate(4).unwrap()]);
        let _hc = c.register_reclaimer("c-cache", 0, c_cache.clone());
        let _hs = s.register_reclaimer("s-cache", 1, s_cache.clone());
        let got = c
            .allocate_blocking(4)
            .expect("served from the refilled floor");
        assert_eq!(c_cache.held(), 0);
        assert_eq!(c_cache.asked(), [4 * U]);
        // The README says the round goes on after bytes freed into a descendant's floor, so
        // the sibling may be asked too (though the waiter could take the refilled floor);
        // never for more than the head's 4, and at most once.
        let s_asked = s_cache.asked();
        assert!(
            s_asked.len() <= 1 && s_asked.iter().all(|&a| a <= 4 * U),
            "{s_asked:?}"
        );
        let s_left = s_cache.held() / U;
        assert_eq!(waiting(&[&root, &c, &s]), [0, 0, 0]);
        // Wherever the request took its 4 (the floor, or the root's freed room), the books
        // agree: the floor is set aside once.
        let c_now = units(&[&c])[0];
        assert_eq!(c_now, 4);
        let root_now = units(&[&root])[0];
        assert!(
            root_now == 4 + s_left || root_now == 8 + s_left,
            "{root_now} {s_left}"
        );
        drop(got);
        assert_eq!(units(&[&root, &c, &s]), [4 + s_left, 0, s_left]);
        let stats = root.stats();
        assert!(stats.reclaim_rounds >= 1);
        assert_eq!(stats.waiting, 0);
    });
}

/// The same tree, async: several requests of `c` (of 3, 5 and 6) wait at once while both
/// caches hold everything; rounds at the root free just enough, every request is served in
/// turn as the earlier ones go, every round ends, and the books come back to the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_rounds_with_several_floored_waiters_end_with_exact_books() {
    let root = root(12);
    let c = floored(&root, "c", 16, 4);
    let s = plain(&root, "s", 16);
    let c_cache = Cache::new((0..4).map(|_| c.try_allocate(1).unwrap()).collect());
    let s_cache = Cache::new((0..8).map(|_| s.try_allocate(1).unwrap()).collect());
    assert_eq!(units(&[&root, &c, &s]), [12, 4, 8]);
    let _hc = c.register_reclaimer("c-cache", 0, c_cache.clone());
    let _hs = s.register_reclaimer("s-cache", 0, s_cache.clone());
    let mut tasks = Vec::new();
    for n in [3, 5, 6] {
        let c = Arc::clone(&c);
        tasks.push(tokio::spawn(async move {
            let got = Arc::clone(&c).allocate_owned(n).await;
            let got = got.expect("served");
            tokio::time::sleep(Duration::from_millis(2)).await;
            drop(got);
        }));
    }
    for task in tasks {
        common::within(10, task).await.unwrap();
    }
    assert_eq!(waiting(&[&root, &c, &s]), [0, 0, 0]);
    assert_eq!(
        units(&[&root, &c, &s]),
        [
            4 + s_cache.held() / U + (c_cache.held() / U).saturating_sub(4),
            c_cache.held() / U,
            s_cache.held() / U
        ]
    );
    for asked in c_cache.asked().iter().chain(s_cache.asked().iter()) {
        assert!(*asked > 0 && *asked <= 6 * U, "asked {asked}");
    }
    let stats = root.stats();
    assert_eq!(stats.reclaim_asked_bytes % U, 0);
}

// ---------------------------------------------------------------------------------------
// Statistics and reports.
// ---------------------------------------------------------------------------------------

/// Monotone figures never go down, and the mean is never above the maximum.
#[track_caller]
fn stats_sane(before: &membudget::PoolStats, after: &membudget::PoolStats) {
    assert!(after.waited_allocations >= before.waited_allocations);
    assert!(after.total_wait >= before.total_wait);
    assert!(after.max_wait >= before.max_wait);
    assert!(after.would_block >= before.would_block);
    assert!(after.timed_out >= before.timed_out);
    assert!(after.mean_wait() <= after.max_wait, "{after}");
    assert!(after.waiting < 1000, "waiting wrapped: {after}");
}

/// A request that waits at the root with part of the floor, and is made to start again by
/// a shrink of the root (it still fits the chain, not with its floor part) and then waits
/// for its floor in no queue: the root's `waiting` goes back to 0 (it left), `c`'s is 0 (it
/// waits in no queue), nothing of the wait figures goes down, and a timeout of it counts
/// once, in `c` (the pool the call was made to).
#[test]
fn wait_statistics_while_a_request_starts_again_and_waits_for_its_floor() {
    watchdog(10, || {
        // Root 12; c (cap 16, floor 4); s holds 6; a holder of 2 of c's floor.
        let root = root(12);
        let c = floored(&root, "c", 16, 4);
        let s = plain(&root, "s", 16);
        let s_held = s.try_allocate(6).unwrap();
        let holder = c.try_allocate(2).unwrap();
        let r0 = root.stats();
        let c0 = c.stats();
        // 6: takes the 2 free of the floor and waits at the root for 4 (2 free there).
        let mut request = Manual::new(c.allocate(6));
        request.pending();
        assert_eq!(waiting(&[&root, &c]), [1, 0]);
        assert_eq!(units(&[&root, &c]), [10, 8]);
        // The root shrinks to 7: the rest (4) no longer fits above (7 - 4 set aside = 3),
        // the request (6) still fits the chain (7): it starts again.
        root.set_max_memory(7 * U).unwrap();
        let polled = request.poll();
        assert!(
            polled.is_pending(),
            "it starts again and waits for its floor"
        );
        // It must be out of the root's queue (it waits for its floor in no queue).
        assert_eq!(
            waiting(&[&root, &c]),
            [0, 0],
            "the request left the root's queue"
        );
        let r1 = root.stats();
        let c1 = c.stats();
        stats_sane(&r0, &r1);
        stats_sane(&c0, &c1);
        // It holds nothing meanwhile ("holding none of it meanwhile").
        assert_eq!(units(&[&root, &c]), [10, 2]);
        drop(request);
        assert_eq!(units(&[&root, &c]), [10, 2]);
        // The same wait, timed: TimedOut once, counted by `c`.
        let result = c.allocate_timeout(6, Duration::from_millis(30));
        assert_eq!(result.unwrap_err(), AllocError::TimedOut);
        let c2 = c.stats();
        let r2 = root.stats();
        stats_sane(&c1, &c2);
        stats_sane(&r1, &r2);
        assert_eq!(c2.timed_out, c1.timed_out + 1, "{c2}");
        assert_eq!(r2.timed_out, r1.timed_out, "{r2}");
        assert_eq!(units(&[&root, &c]), [10, 2]);
        // The holder and the sibling go: the floor has 4, the request takes it and 2 above.
        drop((holder, s_held));
        let got = c
            .allocate_timeout(6, Duration::from_secs(5))
            .expect("served");
        assert_eq!(got.length(), 6);
        drop(got);
        root.set_max_memory(12 * U).unwrap();
        assert_eq!(units(&[&root, &c, &s]), [4, 0, 0]);
        assert_eq!(waiting(&[&root, &c, &s]), [0, 0, 0]);
        stats_sane(&r2, &root.stats());
        stats_sane(&c2, &c.stats());
    });
}

/// `try_allocate` in a floored child that takes part of the floor and is refused at the root
/// fails with `WouldBlock`, counted once by the child (the pool the call was made to), and
/// puts the floor part back.
#[test]
fn would_block_after_a_floor_part_is_counted_by_the_child_and_puts_it_back() {
    let root = root(8);
    let c = floored(&root, "c", 16, 4);
    let s = plain(&root, "s", 16);
    let _s_held = s.try_allocate(3).unwrap();
    let holder = c.try_allocate(1).unwrap();
    let (r0, c0) = (root.stats(), c.stats());
    // 6: 3 of the floor, 3 at the root where 1 is free.
    assert_eq!(c.try_allocate(6).unwrap_err(), AllocError::WouldBlock);
    let (r1, c1) = (root.stats(), c.stats());
    assert_eq!(c1.would_block, c0.would_block + 1);
    assert_eq!(r1.would_block, r0.would_block);
    assert_eq!(units(&[&root, &c]), [7, 1]);
    // The floor part is back: a request of 3 is served from it alone.
    let three = c.try_allocate(3).expect("the floor's 3 are back");
    assert_eq!(units(&[&root, &c]), [7, 4]);
    drop((three, holder));
    assert_eq!(units(&[&root, &c]), [7, 0]);
}

/// `report()` / `tree_report()` with a floor partly used and a child holding beyond its
/// floor: each pool's `own_bytes` is what its own allocations hold, and the floors never
/// count as the parent's own.
#[test]
fn own_bytes_with_partly_used_floors() {
    let root = root(32);
    let a = floored(&root, "a", 16, 6);
    let b = floored(&a, "b", 8, 2);
    let s = plain(&root, "s", 16);
    let mine = root.try_allocate(3).unwrap();
    let in_a = a.try_allocate(2).unwrap();
    let in_b = b.try_allocate(5).unwrap(); // 2 of b's floor, 3 beyond it (in a's floor)
    let in_s = s.try_allocate(4).unwrap();
    let report = root.tree_report();
    let find = |pool: &BufPool| -> usize {
        fn walk<'r>(
            report: &'r membudget::PoolReport,
            pool: &BufPool,
        ) -> Option<&'r membudget::PoolReport> {
            if report.describes(pool) {
                return Some(report);
            }
            report.children.iter().find_map(|child| walk(child, pool))
        }
        walk(&report, pool).expect("in the report").own_bytes()
    };
    assert_eq!(find(&root), 3 * U, "{report}");
    assert_eq!(find(&a), 2 * U, "{report}");
    assert_eq!(find(&b), 5 * U, "{report}");
    assert_eq!(find(&s), 4 * U, "{report}");
    // b's report from a's view agrees.
    let from_a = a.report();
    assert_eq!(from_a.own_bytes(), 2 * U, "{from_a}");
    drop((mine, in_a, in_b, in_s));
    let report = root.tree_report();
    assert_eq!(report.own_bytes(), 0, "{report}");
    assert_eq!(units(&[&root, &a, &b, &s]), [6, 2, 0, 0]);
}

// ---------------------------------------------------------------------------------------
// Owned futures dropped on other threads, PollAllocate.
// ---------------------------------------------------------------------------------------

/// Owned allocation futures of a floored child, polled here until they wait (one at the
/// root with part of the floor, one for the floor in no queue), then dropped on other
/// threads: everything goes back, and the floor serves a later request whole.
#[test]
fn owned_futures_dropped_on_other_threads_mid_wait() {
    watchdog(10, || {
        for round in 0..rounds(20, 2) {
            // Root 8; c (cap 16, floor 4); s holds 2; a holder of 2 of the floor.
            let root = root(8);
            let c = floored(&root, "c", 16, 4);
            let s = plain(&root, "s", 16);
            let s_held = s.try_allocate(2).unwrap();
            let holder = c.try_allocate(2).unwrap();
            let mut above = Manual::new(Arc::clone(&c).allocate_owned(6));
            above.pending();
            let mut floor_wait = Manual::new(Arc::clone(&c).allocate_owned(7));
            floor_wait.pending();
            assert_eq!(waiting(&[&root, &c]), [1, 0]);
            let (first, second) = if round % 2 == 0 {
                (above, floor_wait)
            } else {
                (floor_wait, above)
            };
            let t1 = thread::spawn(move || drop(first));
            let t2 = thread::spawn(move || drop(second));
            t1.join().unwrap();
            t2.join().unwrap();
            assert_eq!(waiting(&[&root, &c]), [0, 0]);
            assert_eq!(units(&[&root, &c, &s]), [6, 2, 2]);
            drop(holder);
            assert_eq!(len(c.try_allocate(6)), Ok(6), "floor 4 and 2 at the root");
            drop(s_held);
            assert_eq!(units(&[&root, &c, &s]), [4, 0, 0]);
        }
    });
}

/// `PollAllocate` on a floored child, changing `n` while it waits: 6 (waits at the root with
/// part of the floor), 7 (gives that up and waits for the floor in no queue), 2 (served from
/// the floor at once), then 6 again after the holder goes. Exact books at every step.
#[test]
fn poll_allocate_changing_n_on_a_floored_pool() {
    watchdog(10, || {
        let root = root(8);
        let c = floored(&root, "c", 16, 4);
        let s = plain(&root, "s", 16);
        let s_held = s.try_allocate(2).unwrap();
        let holder = c.try_allocate(2).unwrap();
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        let mut poller = PollAllocate::new(Arc::clone(&c));
        assert!(poller.poll_allocate(&mut cx, 6).is_pending());
        assert_eq!(waiting(&[&root, &c]), [1, 0]);
        assert_eq!(units(&[&root, &c, &s]), [6, 8, 2]);
        assert!(poller.poll_allocate(&mut cx, 7).is_pending());
        assert_eq!(waiting(&[&root, &c]), [0, 0]);
        // It holds its own level (7 in c), none of the floor, nothing above.
        assert_eq!(
            units(&[&root, &c, &s]),
            [6, 9, 2],
            "it holds none of the floor"
        );
        let two = match poller.poll_allocate(&mut cx, 2) {
            Poll::Ready(Ok(two)) => two,
            other => panic!("2 fit in the floor: {other:?}"),
        };
        assert_eq!(units(&[&root, &c, &s]), [6, 4, 2]);
        assert!(poller.poll_allocate(&mut cx, 6).is_pending());
        assert_eq!(
            units(&[&root, &c, &s]),
            [6, 10, 2],
            "floor empty: 6 - 4 > 4 above"
        );
        let before = counter.0.load(SeqCst);
        drop((holder, two));
        assert!(counter.0.load(SeqCst) > before, "the refill woke it");
        let six = loop {
            match poller.poll_allocate(&mut cx, 6) {
                Poll::Ready(result) => break result.expect("served"),
                Poll::Pending => thread::yield_now(),
            }
        };
        assert_eq!(units(&[&root, &c, &s]), [8, 6, 2]);
        drop((six, s_held, poller));
        assert_eq!(units(&[&root, &c, &s]), [4, 0, 0]);
    });
}

// ---------------------------------------------------------------------------------------
// max_waiters.
// ---------------------------------------------------------------------------------------

fn root_with_max_waiters(units: usize, max_waiters: usize) -> Arc<BufPool> {
    Arc::new(
        BufPool::builder(cfg(units))
            .max_waiters(max_waiters)
            .build()
            .unwrap(),
    )
}

/// A floored child's first request that takes part of the floor and finds the root's queue
/// full fails with `QueueFull` at once (it waited nowhere), counted by the root, and puts
/// the floor part back.
#[test]
fn queue_full_above_puts_the_floor_part_back() {
    watchdog(10, || {
        let root = root_with_max_waiters(8, 1);
        let c = floored(&root, "c", 16, 4);
        let s = plain(&root, "s", 16);
        let s_held = s.try_allocate(4).unwrap();
        let holder = c.try_allocate(2).unwrap();
        let mut other = Manual::new(s.allocate(1));
        other.pending();
        assert_eq!(waiting(&[&root]), [1]);
        let mut request = Manual::new(c.allocate(6));
        match request.poll() {
            Poll::Ready(Err(AllocError::QueueFull)) => {}
            other => panic!("expected QueueFull at once: {other:?}"),
        }
        assert_eq!(root.stats().queue_full, 1);
        assert_eq!(units(&[&root, &c]), [8, 2], "the floor part is back");
        assert_eq!(len(c.try_allocate(2)), Ok(2));
        drop((other, s_held, holder));
        assert_eq!(units(&[&root, &c, &s]), [4, 0, 0]);
    });
}

/// A floored child's request that waited in its own queue and then finds the root's queue
/// full waits for a place there (README "Load shedding": "it keeps what it holds and waits
/// for a place"; guarantee 13). Meanwhile its floor gets room for all it needs: a waiter
/// that fits in what is free must be woken and served (guarantees 3 and 15: "a request
/// uses every floor on its way up first (as much of it as is free)").
///
/// (This once spun forever inside one `poll`: the floor step dropped the room listener the
/// full-queue step had just made. And the refill did not wake a request waiting for a place
/// above: it listened on the root's room event only.)
#[test]
fn a_request_waiting_for_a_place_above_takes_a_refilled_floor() {
    watchdog(10, || {
        let root = root_with_max_waiters(8, 1);
        let c = floored(&root, "c", 8, 4);
        let s = plain(&root, "s", 16);
        // x holds the whole floor, y climbed to the root (4 + 2), s holds 2: the root is full.
        let x = c.try_allocate(4).unwrap();
        let y = c.try_allocate(2).unwrap();
        let s_held = s.try_allocate(2).unwrap();
        assert_eq!(units(&[&root, &c, &s]), [8, 6, 2]);
        // The root's one place: a sibling's request of 4.
        let mut other = Manual::new(s.allocate(4));
        other.pending();
        // r (4) waits in c's queue (2 free in c).
        let mut r = Manual::new(c.allocate(4));
        r.pending();
        assert_eq!(waiting(&[&root, &c]), [1, 1]);
        // y goes: c grants r; r climbs, the floor is empty, the root's queue is full: r waits
        // for a place.
        drop(y);
        assert!(r.poll().is_pending());
        assert_eq!(waiting(&[&root, &c]), [1, 0]);
        // x goes: the floor has 4 again, all r needs.
        drop(x);
        let mut served = None;
        for _ in 0..50 {
            // (Polled by hand: the refill's wake-up is what makes a task poll it.)
            if let Poll::Ready(result) = r.poll() {
                served = Some(result);
                break;
            }
            thread::yield_now();
        }
        let served = served
            .expect("the floor has all the request needs, yet it still waits for a place above");
        assert_eq!(len(served), Ok(4));
        drop((other, s_held));
        assert_eq!(units(&[&root, &c, &s]), [4, 0, 0]);
    });
}

// ---------------------------------------------------------------------------------------
// wait_for_growth and budget deltas.
// ---------------------------------------------------------------------------------------

/// A `wait_for_growth` root above a floored child: a request beyond the floor waits at the
/// root with the floor's part and is served by `add_max_memory`; `forget_max_memory` removes
/// only free budget (never the floor's set-aside).
#[test]
fn wait_for_growth_root_above_a_floored_child() {
    watchdog(10, || {
        let root = Arc::new(BufPool::builder(cfg(4)).wait_for_growth().build().unwrap());
        let c = floored(&root, "c", 16, 4);
        assert_eq!(units(&[&root, &c]), [4, 0]);
        assert_eq!(
            root.forget_max_memory(100 * U),
            0,
            "the floor is not free budget"
        );
        let mut request = Manual::new(c.allocate(6));
        request.pending();
        assert_eq!(waiting(&[&root, &c]), [1, 0]);
        assert_eq!(units(&[&root, &c]), [4, 6]);
        root.add_max_memory(U);
        assert!(request.poll().is_pending());
        root.add_max_memory(U);
        let got = request.ready().expect("served by growth");
        assert_eq!(units(&[&root, &c]), [6, 6]);
        assert_eq!(root.forget_max_memory(100 * U), 0);
        drop(got);
        assert_eq!(units(&[&root, &c]), [4, 0]);
        assert_eq!(root.forget_max_memory(100 * U), 2 * U);
        assert_eq!(root.stats().max_memory, 4 * U);
        // try_ forms: WouldBlock beyond the floor.
        assert_eq!(c.try_allocate(5).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(len(c.try_allocate(4)), Ok(4));
    });
}

/// Threads add and forget budget at the root by deltas while threads of a floored child and
/// a sibling request sizes around the floor (with timeouts); the controllers' deltas compose,
/// and at the end the root's budget is its start plus what was added less what was
/// forgotten, and the books are back to the floor.
#[test]
fn add_and_forget_racing_floor_waiters() {
    watchdog(20, || {
        let root = Arc::new(BufPool::builder(cfg(8)).wait_for_growth().build().unwrap());
        let c = floored(&root, "c", 12, 4);
        let s = plain(&root, "s", 12);
        let stop = Arc::new(AtomicBool::new(false));
        let net = Arc::new(AtomicUsize::new(8 * U));
        let mut controllers = Vec::new();
        for seed in 0..2u64 {
            let (root, stop, net) = (Arc::clone(&root), Arc::clone(&stop), Arc::clone(&net));
            controllers.push(thread::spawn(move || {
                let mut rng = Rng::new(seed + 7);
                while !stop.load(SeqCst) {
                    let bytes = rng.range(1, 4) * U;
                    root.add_max_memory(bytes);
                    net.fetch_add(bytes, SeqCst);
                    thread::yield_now();
                    let forgot = root.forget_max_memory(rng.range(1, 4) * U);
                    net.fetch_sub(forgot, SeqCst);
                }
            }));
        }
        let mut workers = Vec::new();
        for seed in 0..3u64 {
            let pool = if seed == 2 {
                Arc::clone(&s)
            } else {
                Arc::clone(&c)
            };
            workers.push(thread::spawn(move || {
                let mut rng = Rng::new(seed + 100);
                for _ in 0..rounds(1000, 5) {
                    let n = rng.range(1, 9);
                    match pool.allocate_timeout(n, Duration::from_millis(2)) {
                        Ok(got) => {
                            assert_eq!(got.length(), n);
                            thread::yield_now();
                        }
                        Err(AllocError::TimedOut) => {}
                        Err(error) => panic!("unexpected {error}"),
                    }
                }
            }));
        }
        for worker in workers {
            worker.join().unwrap();
        }
        stop.store(true, SeqCst);
        for controller in controllers {
            controller.join().unwrap();
        }
        assert_eq!(root.stats().max_memory, net.load(SeqCst));
        assert_eq!(waiting(&[&root, &c, &s]), [0, 0, 0]);
        assert_eq!(units(&[&root, &c, &s]), [4, 0, 0]);
    });
}

// ---------------------------------------------------------------------------------------
// Sibling floors.
// ---------------------------------------------------------------------------------------

/// Root 8: `f` with a floor of 4 (idle), `c` with a floor of 2. A request of 6 in `c` fits
/// only once `f` closes (its floor is held, not room that cannot come): it waits, and so does
/// a request behind it (FIFO); `f` closes: both are served in turn.
#[test]
fn a_request_that_fits_once_a_sibling_closes_is_served_when_it_does() {
    watchdog(10, || {
        let root = root(8);
        let f = floored(&root, "f", 8, 4);
        let c = floored(&root, "c", 8, 2);
        let t = plain(&root, "t", 8);
        assert_eq!(units(&[&root, &f, &c]), [6, 0, 0]);
        let mut six = Manual::new(c.allocate(6));
        six.pending();
        let mut behind = Manual::new(t.allocate(1));
        behind.pending();
        assert_eq!(root.stats().waiting, 2);
        f.close();
        let got = six
            .ready()
            .expect("served once the sibling's floor is back");
        assert_eq!(got.length(), 6);
        let one = behind.ready().expect("the one behind it is served too");
        assert_eq!(units(&[&root, &c, &t]), [7, 6, 1]);
        drop((got, one));
        assert_eq!(units(&[&root, &c, &t]), [2, 0, 0]);
    });
}

/// The same, with the sibling holding an allocation beyond its floor when it closes (its
/// bytes come back as it releases) and then dropped on another thread; and the waiter is a
/// grandchild through a floored middle pool.
#[test]
fn a_grandchild_waiting_for_a_busy_sibling_to_close_and_drop() {
    watchdog(10, || {
        let root = root(12);
        let f = floored(&root, "f", 12, 4);
        let m = floored(&root, "m", 12, 2);
        let g = floored(&m, "g", 12, 1);
        let f_held = f.try_allocate(6).unwrap(); // 4 floor + 2 above
        assert_eq!(units(&[&root, &f, &m, &g]), [8, 6, 1, 0]);
        // 8 for g: 1 of its floor, 1 of m's, 6 at the root where 4 are free.
        let mut request = Manual::new(g.allocate(8));
        request.pending();
        f.close();
        assert!(request.poll().is_pending(), "f's allocation still holds 6");
        // The last handle dropped on another thread (its drop waits for f's allocation).
        let dropper = thread::spawn(move || drop(f));
        thread::sleep(Duration::from_millis(5));
        drop(f_held);
        dropper.join().unwrap();
        let got = request.ready().expect("served once f is gone");
        assert_eq!(got.length(), 8);
        assert_eq!(units(&[&root, &m, &g]), [8, 8, 8]);
        drop(got);
        assert_eq!(units(&[&root, &m, &g]), [2, 1, 0]);
        assert_eq!(len(g.try_allocate(12)), Ok(12));
    });
}

// ---------------------------------------------------------------------------------------
// Resizes of every pool of a four-level chain racing requests.
// ---------------------------------------------------------------------------------------

/// root (32) → a (cap 24, floor 8) → b (cap 16, no floor) → c (cap 12, floor 3), and d
/// (cap 12, floor 2) under a, s (cap 16) under the root. Threads request sizes 1..12 in c, d,
/// b, a and s with timeouts and cancels; a thread shrinks and grows every pool between its
/// cap and a smaller one. The root never holds more than its budget at the end of a resize,
/// and at the end (caps restored) every pool is back to exactly its floors and can take its
/// whole cap less its floored children's floors on the idle tree.
#[test]
fn resizes_of_every_level_racing_requests_end_at_the_floors() {
    watchdog(30, || {
        let root = root(32);
        let a = floored(&root, "a", 24, 8);
        let b = plain(&a, "b", 16);
        let c = floored(&b, "c", 12, 3);
        let d = floored(&a, "d", 12, 2);
        let s = plain(&root, "s", 16);
        let pools: Vec<(Arc<BufPool>, usize)> = vec![
            (Arc::clone(&root), 32),
            (Arc::clone(&a), 24),
            (Arc::clone(&b), 16),
            (Arc::clone(&c), 12),
            (Arc::clone(&d), 12),
            (Arc::clone(&s), 16),
        ];
        // Idle: c's 3 in b and a; d's 2 in a; a's 8 at the root (c's and d's inside it).
        assert_eq!(units(&[&root, &a, &b, &c, &d, &s]), [8, 5, 3, 0, 0, 0]);
        let stop = Arc::new(AtomicBool::new(false));
        let resizer = {
            let pools = pools.clone();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut rng = Rng::new(99);
                while !stop.load(SeqCst) {
                    let (pool, cap) = &pools[rng.range(0, pools.len() - 1)];
                    let to = rng.range(cap / 2, *cap);
                    // A shrink below what the floors set aside may be refused: fine.
                    let _ = pool.set_max_memory(to * U);
                    thread::sleep(Duration::from_micros(200));
                    let _ = pool.set_max_memory(cap * U);
                }
            })
        };
        let mut workers = Vec::new();
        for (i, pool) in [&c, &d, &b, &a, &s, &c].into_iter().enumerate() {
            let pool = Arc::clone(pool);
            workers.push(thread::spawn(move || {
                let mut rng = Rng::new(i as u64 + 1);
                let mut kept = Vec::new();
                for _ in 0..rounds(1500, 4) {
                    let n = rng.range(1, 12);
                    match rng.range(0, 4) {
                        0 => match pool.try_allocate(n) {
                            Ok(got) => kept.push(got),
                            Err(AllocError::WouldBlock | AllocError::ExceedsBudget { .. }) => {}
                            Err(error) => panic!("{error}"),
                        },
                        1 => {
                            // Cancel after one poll.
                            let mut once = Manual::new(pool.allocate(n));
                            let _ = once.poll();
                        }
                        _ => match pool.allocate_timeout(n, Duration::from_millis(3)) {
                            Ok(got) => kept.push(got),
                            Err(AllocError::TimedOut | AllocError::ExceedsBudget { .. }) => {}
                            Err(error) => panic!("{error}"),
                        },
                    }
                    if kept.len() > 2 || rng.range(0, 2) == 0 {
                        kept.clear();
                    }
                }
            }));
        }
        for worker in workers {
            worker.join().unwrap();
        }
        stop.store(true, SeqCst);
        resizer.join().unwrap();
        for (pool, cap) in &pools {
            pool.set_max_memory(cap * U).unwrap();
        }
        let all: Vec<&BufPool> = pools.iter().map(|(pool, _)| &**pool).collect();
        assert_eq!(waiting(&all), [0; 6]);
        assert_eq!(
            units(&all),
            [8, 5, 3, 0, 0, 0],
            "every pool back to its floors"
        );
        // Every pool takes its whole cap, less its floored children's floors (the chain's
        // smallest cap for c and d), one at a time on the idle tree.
        for (pool, whole) in [
            (&root, 32 - 8),
            (&a, 24 - 3 - 2),
            (&b, 16 - 3),
            (&c, 12),
            (&d, 12),
            (&s, 16),
        ] {
            let got = pool.try_allocate(whole);
            assert_eq!(len(got), Ok(whole), "{}", pool.report());
        }
        assert_eq!(units(&all), [8, 5, 3, 0, 0, 0]);
    });
}

/// A request that waits for its floor in no queue (its rest could never fit above without
/// more of the floor) while the floor's missing part is held by a registered cache of its
/// own pool. Reclaim is driven by requests waiting in a queue (README "Reclaim"), and this
/// one waits in none: it is not promised that the cache is asked. What is promised: the
/// wait ends (here by its timeout), it holds none of the floor meanwhile, the books are
/// exact after, and once the cache lets go the request is served.
#[test]
fn a_request_waiting_for_its_floor_beside_a_cache_of_its_pool() {
    watchdog(10, || {
        let root = root(8);
        let c = floored(&root, "c", 16, 4);
        let s = plain(&root, "s", 16);
        let s_held = s.try_allocate(4).unwrap();
        let c_cache = Cache::new(vec![c.try_allocate(2).unwrap()]);
        let _hc = c.register_reclaimer("c-cache", 0, c_cache.clone());
        // 7: at least 3 of the floor (8 - 4 above), 2 free: waits for the floor.
        let result = c.allocate_timeout(7, Duration::from_millis(100));
        assert_eq!(len(result), Err(AllocError::TimedOut));
        assert_eq!(c.stats().timed_out, 1);
        assert_eq!(waiting(&[&root, &c, &s]), [0, 0, 0]);
        assert_eq!(units(&[&root, &c, &s]), [8, c_cache.held() / U, 4]);
        c_cache.entries.lock().unwrap().clear();
        assert_eq!(len(c.try_allocate(7)), Err(AllocError::WouldBlock));
        drop(s_held);
        assert_eq!(len(c.try_allocate(7)), Ok(7));
        assert_eq!(units(&[&root, &c, &s]), [4, 0, 0]);
        assert!(root.stats().reclaim_rounds <= 1);
    });
}
