//! Adversarial tests of cooperative reclaim (README "Reclaim", guarantee 17) combined with
//! floors (`min_memory`, guarantee 15) and trees of child pools: shortfalls at an ancestor,
//! reclaimers that free other pools' memory (a sibling's, the parent's, a floored child's),
//! reclaimers that close, drop or shrink pools, register or unregister mid-round, panic or
//! report wrong counts; `reclaim_ahead` on floored children and the root, racing close, drop
//! and shrink; cancellation, timeouts and close during a round. After every scenario the books
//! are checked at a quiescent point: each pool's in-use equals what the test holds, floors are
//! whole, the root drains to 0, nobody waits. Every test runs under a watchdog.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

mod common;

use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PoolReport, Reclaimer,
    ReclaimerHandle,
};

const B: usize = 64;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: buffers * B,
    }
}

/// A child of `parent` with a budget of `buffers` and a floor of `floor` buffers.
fn floored(parent: &BufPool, name: &str, buffers: usize, floor: usize) -> BufPool {
    BufPool::builder(cfg(buffers))
        .name(name)
        .parent(parent)
        .min_memory(floor * B)
        .build()
        .unwrap()
}

/// `n` seconds, stretched under Miri.
fn secs(n: u64) -> Duration {
    Duration::from_secs(n) * common::SLOWDOWN
}

fn watchdog(f: impl FnOnce() + Send + 'static) {
    common::watchdog(20, f);
}

fn poll_once<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

fn entries(pool: &BufPool, buffers: usize) -> Vec<BufPoolAllocation> {
    (0..buffers)
        .map(|_| pool.try_allocate(1).unwrap())
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// In use, outstanding, waiting of each pool.
#[track_caller]
fn assert_books(pools: &[(&BufPool, usize)]) {
    for (pool, in_use) in pools {
        let stats = pool.stats();
        assert_eq!(
            (stats.in_use_bytes, stats.waiting),
            (*in_use, 0),
            "books of {:?}: {stats:?}",
            stats.name
        );
    }
}

/// The floor of `pool` (`floor` buffers) is whole: with its parent's room taken by nobody
/// else, the child can take all of it at once without the root's in-use moving.
#[track_caller]
fn assert_floor_whole(root: &BufPool, pool: &BufPool, floor: usize) {
    let report = pool.report();
    assert_eq!(report.min_memory, floor * B, "floor retired or changed");
    let before = root.stats().in_use_bytes;
    let all = pool
        .try_allocate(floor)
        .unwrap_or_else(|e| panic!("the floor is not whole: {e}: {:?}", pool.stats()));
    assert_eq!(
        root.stats().in_use_bytes,
        before,
        "the floor's bytes were not in the floor"
    );
    drop(all);
    assert_eq!(root.stats().in_use_bytes, before);
}

/// The figures of the reclaimer called `name` anywhere in `report`.
fn reclaimer_figures(report: &PoolReport, name: &str) -> Option<(usize, usize, usize)> {
    report
        .reclaimers
        .iter()
        .find(|r| r.name.as_ref() == name)
        .map(|r| (r.times_asked, r.asked_bytes, r.reclaimed_bytes))
        .or_else(|| {
            report
                .children
                .iter()
                .find_map(|c| reclaimer_figures(c, name))
        })
}

type Log = Arc<Mutex<Vec<(String, usize)>>>;

fn log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

fn names(log: &Log) -> Vec<String> {
    log.lock().unwrap().iter().map(|(n, _)| n.clone()).collect()
}

type Fut = Pin<Box<dyn Future<Output = usize> + Send>>;
type ReclaimFn = dyn Fn(&Rc, usize) -> Fut + Send + Sync;

/// A test reclaimer: a cache of allocations, a stash of anything, a log of who was asked for
/// what, and a closure that decides what `reclaim` does.
struct Rc {
    name: String,
    cache: Mutex<Vec<BufPoolAllocation>>,
    stash: Mutex<Vec<Box<dyn Send>>>,
    log: Log,
    /// A fixed estimate, or `usize::MAX` for "what the cache holds".
    estimate: AtomicUsize,
    act: Box<ReclaimFn>,
}

impl Rc {
    fn new(
        name: &str,
        log: &Log,
        cache: Vec<BufPoolAllocation>,
        act: impl Fn(&Rc, usize) -> Fut + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Rc {
            name: name.to_owned(),
            cache: Mutex::new(cache),
            stash: Mutex::new(Vec::new()),
            log: Arc::clone(log),
            estimate: AtomicUsize::new(usize::MAX),
            act: Box::new(act),
        })
    }

    fn with_estimate(self: Arc<Self>, estimate: usize) -> Arc<Self> {
        self.estimate.store(estimate, SeqCst);
        self
    }

    fn free_up_to(&self, target: usize) -> usize {
        let mut cache = self.cache.lock().unwrap();
        let mut freed = 0;
        while freed < target {
            let Some(entry) = cache.pop() else { break };
            freed += entry.allocated_bytes();
        }
        freed
    }

    fn held(&self) -> usize {
        self.cache
            .lock()
            .unwrap()
            .iter()
            .map(BufPoolAllocation::allocated_bytes)
            .sum()
    }

    fn clear(&self) {
        self.cache.lock().unwrap().clear();
        self.stash.lock().unwrap().clear();
    }
}

impl Reclaimer for Rc {
    fn estimate(&self) -> usize {
        match self.estimate.load(SeqCst) {
            usize::MAX => self.held(),
            fixed => fixed,
        }
    }
    fn reclaim(&self, target: usize) -> Fut {
        self.log.lock().unwrap().push((self.name.clone(), target));
        (self.act)(self, target)
    }
}

/// Frees honestly, at once.
fn honest(rc: &Rc, target: usize) -> Fut {
    let freed = rc.free_up_to(target);
    Box::pin(async move { freed })
}

/// Frees nothing, says so.
fn nothing(_: &Rc, _: usize) -> Fut {
    Box::pin(async { 0 })
}

/// A gate: futures made by [`gated`] stay pending until it opens, then free up to their
/// target from their reclaimer's cache (at that moment). Dropped before, they free nothing.
#[derive(Clone, Default)]
struct Gate {
    open: Arc<AtomicBool>,
    wakers: Arc<Mutex<Vec<Waker>>>,
    dropped: Arc<AtomicUsize>,
}

impl Gate {
    fn open(&self) {
        self.open.store(true, SeqCst);
        for waker in self.wakers.lock().unwrap().drain(..) {
            waker.wake();
        }
    }
}

struct Gated {
    gate: Gate,
    rc: Arc<Rc>,
    target: usize,
}

impl Future for Gated {
    type Output = usize;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
        if self.gate.open.load(SeqCst) {
            return Poll::Ready(self.rc.free_up_to(self.target));
        }
        self.gate.wakers.lock().unwrap().push(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        self.gate.dropped.fetch_add(1, SeqCst);
    }
}

/// A reclaimer whose futures are gated (they free from its cache once the gate opens).
fn gated_rc(name: &str, log: &Log, cache: Vec<BufPoolAllocation>, gate: &Gate) -> Arc<Rc> {
    // The inner `Rc` holds the cache; the closure needs an `Arc` of it: use a slot.
    let slot: Arc<Mutex<Option<std::sync::Weak<Rc>>>> = Arc::new(Mutex::new(None));
    let gate = gate.clone();
    let for_closure = Arc::clone(&slot);
    let rc = Rc::new(name, log, cache, move |_, target| {
        let me = for_closure
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .upgrade()
            .unwrap();
        Box::pin(Gated {
            gate: gate.clone(),
            rc: me,
            target,
        })
    });
    *slot.lock().unwrap() = Some(Arc::downgrade(&rc));
    rc
}

// ---------------------------------------------------------------------------------------
// 1. Who is asked when the shortfall is in an ancestor
// ---------------------------------------------------------------------------------------

/// Guarantee 17: a floored child's request whose floor is used up climbs, is short at the
/// root, and reclaims at the root's scope: the sibling's cache (lowest priority) is asked,
/// its own pool's round count stays 0, another tree's reclaimer is never asked; the figures
/// of stats and report match; the floor is whole after everything goes back.
#[test]
fn floored_child_short_at_root_asks_root_scope_by_priority_never_another_tree() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 2);
        let s = root.child("s", cfg(8)).unwrap();
        let other = BufPool::new(cfg(8));
        let log = log();
        let f_cache = Rc::new("f-cache", &log, entries(&f, 2), honest);
        let s_cache = Rc::new("s-cache", &log, entries(&s, 6), honest);
        let o_cache = Rc::new("other", &log, entries(&other, 8), honest);
        let _hf = f.register_reclaimer("f-cache", 1, f_cache.clone());
        let _hs = s.register_reclaimer("s-cache", 0, s_cache.clone());
        let _ho = other.register_reclaimer("other", 0, o_cache.clone());
        assert_eq!(root.stats().in_use_bytes, 8 * B);
        let got = futures::executor::block_on(f.allocate(2)).unwrap();
        assert_eq!(*log.lock().unwrap(), [("s-cache".to_owned(), 2 * B)]);
        assert_eq!(o_cache.held(), 8 * B);
        let (r, fs, ss) = (root.stats(), f.stats(), s.stats());
        assert_eq!(
            (r.reclaim_rounds, fs.reclaim_rounds, ss.reclaim_rounds),
            (1, 0, 0)
        );
        assert_eq!((r.reclaim_asked_bytes, r.reclaimed_bytes), (2 * B, 2 * B));
        assert_eq!(other.stats().reclaim_rounds, 0);
        assert_eq!(
            reclaimer_figures(&root.report(), "s-cache"),
            Some((1, 2 * B, 2 * B))
        );
        assert_eq!(
            reclaimer_figures(&root.report(), "f-cache"),
            Some((0, 0, 0))
        );
        assert_books(&[(&root, 8 * B), (&f, 4 * B), (&s, 4 * B)]);
        drop(got);
        assert_books(&[(&root, 6 * B), (&f, 2 * B), (&s, 4 * B)]);
        f_cache.clear();
        s_cache.clear();
        // Only the floor stays set aside at the root.
        assert_books(&[(&root, 2 * B), (&f, 0), (&s, 0)]);
        assert_floor_whole(&root, &f, 2);
        drop((f, s));
        assert_books(&[(&root, 0)]);
        o_cache.clear();
    });
}

/// Guarantee 17 and "Who is asked": a child short at its own cap asks only its own scope:
/// neither its sibling's reclaimer nor the root's is asked (the root has room).
#[test]
fn child_short_at_own_cap_never_asks_a_sibling_subtree() {
    watchdog(|| {
        let root = BufPool::new(cfg(16));
        let a = root.child("a", cfg(4)).unwrap();
        let b = root.child("b", cfg(8)).unwrap();
        let b1 = b.child("b1", cfg(8)).unwrap();
        let log = log();
        let a_cache = Rc::new("a", &log, entries(&a, 4), honest);
        let b1_cache = Rc::new("b1", &log, entries(&b1, 8), honest).with_estimate(usize::MAX);
        let _ha = a.register_reclaimer("a", 5, a_cache.clone());
        let _hb = b1.register_reclaimer("b1", 0, b1_cache.clone());
        let got = futures::executor::block_on(a.allocate(3)).unwrap();
        assert_eq!(names(&log), ["a"]);
        assert_eq!(
            (
                a.stats().reclaim_rounds,
                root.stats().reclaim_rounds,
                b.stats().reclaim_rounds
            ),
            (1, 0, 0)
        );
        drop(got);
        a_cache.clear();
        b1_cache.clear();
        assert_books(&[(&root, 0), (&a, 0), (&b, 0), (&b1, 0)]);
    });
}

/// Guarantee 17 / README "Who is asked": reclaimers free memory by dropping *their own*
/// pool's allocations; bytes a descendant frees "help the waiting request" (Reclaimer
/// contract: "of the pool it was registered with (or of its descendants): only those bytes
/// help"). A floored child's cache asked by a root round frees bytes that refill the child's
/// floor, not the root: the root's shortfall is not covered, yet the round counts it covered
/// by the report and stalls the pool, so the root's own cache (next in order, 4 buffers) is
/// never asked and the root's waiter waits although the reclaimers in scope could serve it.
#[test]
fn bytes_freed_into_a_floor_do_not_cover_the_roots_shortfall() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 4, 4);
        let log = log();
        let f_cache = Rc::new("f-cache", &log, entries(&f, 4), honest);
        let root_cache = Rc::new("root-cache", &log, entries(&root, 4), honest);
        let _hf = f.register_reclaimer("f-cache", 0, f_cache.clone());
        let _hr = root.register_reclaimer("root-cache", 1, root_cache.clone());
        assert_eq!(root.stats().in_use_bytes, 8 * B);
        let result = rt().block_on(async {
            tokio::time::timeout(Duration::from_millis(500), root.allocate(2)).await
        });
        let asked = log.lock().unwrap().clone();
        let r = root.stats();
        // Whatever happened, the books are exact.
        let got = result.ok().and_then(Result::ok);
        let held = got.as_ref().map_or(0, BufPoolAllocation::allocated_bytes);
        assert_books(&[
            (&root, 4 * B + root_cache.held() + held),
            (&f, f_cache.held()),
        ]);
        assert!(
            got.is_some(),
            "the root's waiter was not served: asked {asked:?}, root {r:?}; f-cache freed \
             {} B into the floor, root-cache still holds {} B",
            4 * B - f_cache.held(),
            root_cache.held()
        );
        drop(got);
        f_cache.clear();
        root_cache.clear();
        assert_books(&[(&root, 4 * B), (&f, 0)]);
        assert_floor_whole(&root, &f, 4);
        drop(f);
        assert_books(&[(&root, 0)]);
    });
}

/// The same with the waiter a sibling's request: the sibling's request waits at the root,
/// the floored child's cache refills its floor, the root's cache is never asked.
#[test]
fn bytes_freed_into_a_floor_leave_a_siblings_request_waiting() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 4, 4);
        let s = root.child("s", cfg(8)).unwrap();
        let log = log();
        let f_cache = Rc::new("f-cache", &log, entries(&f, 4), honest);
        let root_cache = Rc::new("root-cache", &log, entries(&root, 4), honest);
        let _hf = f.register_reclaimer("f-cache", 0, f_cache.clone());
        let _hr = root.register_reclaimer("root-cache", 1, root_cache.clone());
        let result = s.allocate_timeout(2, Duration::from_millis(500));
        let asked = log.lock().unwrap().clone();
        let got = result.ok();
        assert!(
            got.is_some(),
            "the sibling's waiter was not served: asked {asked:?}"
        );
        drop(got);
        f_cache.clear();
        root_cache.clear();
        assert_books(&[(&root, 4 * B), (&f, 0), (&s, 0)]);
        assert_floor_whole(&root, &f, 4);
    });
}

/// "Who drives it" / guarantee 17: a child's request short at its own cap drives a round
/// there; that round frees the child's bytes, which serve it at the child's level, but the
/// bytes it gave back at the root went to an earlier root waiter, so the request climbs and
/// waits in the root's queue, short at the root, whose own cache could serve it. The README:
/// "When a request cannot be served at once and waits in a pool's queue ... Its reclaimers
/// and those of its descendants are asked". Async form (polled only when woken).
#[test]
fn climbed_request_whose_round_ended_below_reclaims_at_the_root_async() {
    watchdog(|| climbed_request_scenario(true));
}

/// The same, driven by `allocate_timeout` (the blocking shim).
#[test]
fn climbed_request_whose_round_ended_below_reclaims_at_the_root_blocking() {
    watchdog(|| climbed_request_scenario(false));
}

fn climbed_request_scenario(async_form: bool) {
    let root = BufPool::new(cfg(8));
    let c = root.child("c", cfg(4)).unwrap();
    let log = log();
    let c_cache = Rc::new("c-cache", &log, entries(&c, 4), honest);
    let root_cache = Rc::new("root-cache", &log, entries(&root, 4), honest);
    // A root waiter queued before any reclaimer is registered (so it starts no round).
    let mut early = Box::pin(root.allocate(2));
    assert!(poll_once(early.as_mut()).is_pending());
    let _hc = c.register_reclaimer("c-cache", 0, c_cache.clone());
    let _hr = root.register_reclaimer("root-cache", 0, root_cache.clone());
    let result = if async_form {
        rt().block_on(async {
            tokio::time::timeout(secs(3), c.allocate(2))
                .await
                .unwrap_or(Err(AllocError::TimedOut))
        })
    } else {
        c.allocate_timeout(2, secs(3))
    };
    let asked = log.lock().unwrap().clone();
    let (r, cs) = (root.stats(), c.stats());
    let early_got = match poll_once(early.as_mut()) {
        Poll::Ready(Ok(got)) => got,
        other => panic!("the early root waiter: {other:?}"),
    };
    assert!(
        result.is_ok(),
        "the child's request was not served ({result:?}): asked {asked:?}; root rounds {}, \
         child rounds {}; root-cache still holds {} B",
        r.reclaim_rounds,
        cs.reclaim_rounds,
        root_cache.held()
    );
    drop((result, early_got, early));
    c_cache.clear();
    root_cache.clear();
    assert_books(&[(&root, 0), (&c, 0)]);
}

/// README "Who is asked": "lowest priority first, then largest estimate first (then
/// registration order)", across the whole scope (the pool's reclaimers and its
/// descendants'). Priority and estimate decide across pools.
#[test]
fn order_across_the_tree_is_priority_then_estimate() {
    watchdog(|| {
        let root = BufPool::new(cfg(16));
        let a = root.child("a", cfg(16)).unwrap();
        let a1 = floored(&a, "a1", 16, 1);
        let b = root.child("b", cfg(16)).unwrap();
        let held = entries(&root, 15);
        let log = log();
        let mk =
            |name: &str, est: usize| Rc::new(name, &log, Vec::new(), nothing).with_estimate(est);
        let r1 = mk("root-p1-big", 9 * B);
        let a0 = mk("a-p0-small", B);
        let a10 = mk("a1-p0-large", 5 * B);
        let b0 = mk("b-p0-mid", 3 * B);
        let b2 = mk("b-p2", 100 * B);
        let _h = [
            root.register_reclaimer("root-p1-big", 1, r1),
            a.register_reclaimer("a-p0-small", 0, a0),
            a1.register_reclaimer("a1-p0-large", 0, a10),
            b.register_reclaimer("b-p0-mid", 0, b0),
            b.register_reclaimer("b-p2", 2, b2),
        ];
        let mut waiter = Box::pin(root.allocate(2));
        assert!(poll_once(waiter.as_mut()).is_pending());
        assert_eq!(
            names(&log),
            [
                "a1-p0-large",
                "b-p0-mid",
                "a-p0-small",
                "root-p1-big",
                "b-p2"
            ]
        );
        // Each asked for what is still short, never more than the head's request.
        assert!(log.lock().unwrap().iter().all(|(_, t)| *t == 2 * B));
        // Nothing freed: the pool is stalled; more polls start no round.
        for _ in 0..3 {
            assert!(poll_once(waiter.as_mut()).is_pending());
        }
        assert_eq!(log.lock().unwrap().len(), 5);
        assert_eq!(root.stats().reclaim_rounds, 1);
        assert_eq!(root.stats().reclaim_asked_bytes, 10 * B);
        // A descendant's release lifts the stall: the next poll starts a new round.
        drop(held);
        let got = match poll_once(waiter.as_mut()) {
            Poll::Ready(Ok(got)) => got,
            other => panic!("{other:?}"),
        };
        drop(got);
        drop(waiter);
        assert_books(&[(&root, B), (&a, B), (&a1, 0), (&b, 0)]);
        assert_floor_whole(&root, &a1, 1);
    });
}

/// README "Who is asked": "(then registration order)". With equal priority and estimate,
/// reclaimers registered on the root first (X0, X1) and then on a child (Y) are asked in
/// registration order X0, X1, Y.
#[test]
fn ties_across_the_tree_are_broken_by_registration_order() {
    watchdog(|| {
        let root = BufPool::new(cfg(4));
        let child = root.child("c", cfg(4)).unwrap();
        let held = entries(&root, 4);
        let log = log();
        let mk = |name: &str| Rc::new(name, &log, Vec::new(), nothing).with_estimate(B);
        let _x0 = root.register_reclaimer("x0", 0, mk("x0"));
        let _x1 = root.register_reclaimer("x1", 0, mk("x1"));
        let _y = child.register_reclaimer("y", 0, mk("y"));
        let mut waiter = Box::pin(root.allocate(1));
        assert!(poll_once(waiter.as_mut()).is_pending());
        let order = names(&log);
        drop(waiter);
        drop(held);
        assert_eq!(order, ["x0", "x1", "y"], "not registration order");
    });
}

/// Guarantee 17: "at most one round is in flight per pool": a child's round and the root's
/// may run at once, but more waiters of either pool start no second round at it; once the
/// gates open every waiter is served and each pool counts its own round.
#[test]
fn one_round_per_pool_child_and_root_rounds_coexist() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let c = root.child("c", cfg(4)).unwrap();
        let log = log();
        let (gc, gr) = (Gate::default(), Gate::default());
        let c_cache = gated_rc("c-gated", &log, entries(&c, 4), &gc);
        let r_cache = gated_rc("root-gated", &log, entries(&root, 4), &gr);
        let _hc = c.register_reclaimer("c-gated", 0, c_cache.clone());
        let _hr = root.register_reclaimer("root-gated", 0, r_cache.clone());
        let mut c1 = Box::pin(c.allocate(1));
        assert!(poll_once(c1.as_mut()).is_pending());
        assert_eq!(names(&log), ["c-gated"]);
        // The root's request reclaims at the root's scope: both caches hold 4; the child's
        // is older in the snapshot only by pool, so either may be first. Its round is a
        // second one, at another pool.
        let mut r1 = Box::pin(root.allocate(1));
        assert!(poll_once(r1.as_mut()).is_pending());
        assert_eq!(log.lock().unwrap().len(), 2, "the root's round starts");
        let mut c2 = Box::pin(c.allocate(1));
        let mut r2 = Box::pin(root.allocate(1));
        for _ in 0..3 {
            assert!(poll_once(c2.as_mut()).is_pending());
            assert!(poll_once(r2.as_mut()).is_pending());
            assert!(poll_once(c1.as_mut()).is_pending());
            assert!(poll_once(r1.as_mut()).is_pending());
        }
        assert_eq!(log.lock().unwrap().len(), 2, "a second round at one pool");
        gc.open();
        gr.open();
        // Every waiter polled together (a round's driver must be polled for it to advance:
        // the others wait for its effect).
        let (a, b, c_, d) = futures::executor::block_on(futures::future::join4(
            c1.as_mut(),
            r1.as_mut(),
            c2.as_mut(),
            r2.as_mut(),
        ));
        let got = [a.unwrap(), b.unwrap(), c_.unwrap(), d.unwrap()];
        assert_eq!(
            gc.dropped.load(SeqCst) + gr.dropped.load(SeqCst),
            log.lock().unwrap().len()
        );
        drop(got);
        drop((c1, c2, r1, r2));
        c_cache.clear();
        r_cache.clear();
        assert_books(&[(&root, 0), (&c, 0)]);
    });
}

// ---------------------------------------------------------------------------------------
// 2. Reclaimers that free other pools' memory, close, drop, shrink, register, panic, lie
// ---------------------------------------------------------------------------------------

/// A root reclaimer that frees a floored child's allocations beyond its floor: the climbed
/// bytes go back to the root first and serve the root's waiter; the floor stays whole.
#[test]
fn root_reclaimer_frees_a_floored_childs_climbed_bytes_for_the_root() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 2);
        let log = log();
        // 2 from the floor, 2 climbed to the root.
        let evictor = Rc::new("evictor", &log, entries(&f, 4), honest);
        let held = entries(&root, 4);
        assert_books(&[(&root, 8 * B), (&f, 4 * B)]);
        let _h = root.register_reclaimer("evictor", 0, evictor.clone());
        let got = futures::executor::block_on(root.allocate(2)).unwrap();
        assert_eq!(*log.lock().unwrap(), [("evictor".to_owned(), 2 * B)]);
        assert_books(&[(&root, 8 * B), (&f, 2 * B)]);
        drop(got);
        drop(held);
        assert_books(&[(&root, 2 * B), (&f, 2 * B)]);
        evictor.clear();
        assert_books(&[(&root, 2 * B), (&f, 0)]);
        assert_floor_whole(&root, &f, 2);
        drop(f);
        assert_books(&[(&root, 0)]);
    });
}

/// A reclaimer registered on a child frees a reservation of the root (another pool than its
/// own) for the child's request that waits at the root: the bytes reach it.
#[test]
fn child_reclaimer_shrinks_a_root_reservation_for_its_sibling() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let c = root.child("c", cfg(8)).unwrap();
        let s = root.child("s", cfg(8)).unwrap();
        let log = log();
        let reservation = Arc::new(Mutex::new(root.try_reserve(8 * B).unwrap()));
        let shrinker = {
            let reservation = Arc::clone(&reservation);
            Rc::new("shrinker", &log, Vec::new(), move |_, target| {
                reservation.lock().unwrap().shrink(target);
                Box::pin(async move { target })
            })
            .with_estimate(8 * B)
        };
        let _h = s.register_reclaimer("shrinker", 0, shrinker);
        let got = futures::executor::block_on(c.allocate(3)).unwrap();
        assert_eq!(root.stats().reserved_bytes, 5 * B);
        assert_books(&[(&root, 8 * B), (&c, 3 * B), (&s, 0)]);
        drop(got);
        reservation.lock().unwrap().free();
        assert_books(&[(&root, 0), (&c, 0), (&s, 0)]);
    });
}

/// A reclaimer that frees the *parent's* allocations for a floored child's request that
/// climbed: served; the floor keeps its own books.
#[test]
fn floored_child_request_served_by_a_reclaimer_freeing_parent_allocations() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 2);
        let log = log();
        let floor_use = entries(&f, 2);
        let parent_cache = Rc::new("parent-cache", &log, entries(&root, 6), honest);
        // Registered on the floored child, freeing the parent's allocations.
        let _h = f.register_reclaimer("parent-cache", 0, parent_cache.clone());
        let got = f.allocate_timeout(3, secs(5)).unwrap();
        assert_books(&[(&root, 8 * B), (&f, 5 * B)]);
        assert_eq!(root.stats().reclaim_rounds, 1);
        drop(got);
        drop(floor_use);
        parent_cache.clear();
        assert_books(&[(&root, 2 * B), (&f, 0)]);
        assert_floor_whole(&root, &f, 2);
    });
}

/// A reclaimer that closes the floored child whose request drives the root's round: the
/// request fails with `Closed`, the round ends (counted), the floor goes back to the root,
/// and a later root waiter is not held up by a round left in flight.
#[test]
fn reclaimer_closes_the_floored_child_whose_request_drives_the_round() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = Arc::new(floored(&root, "f", 8, 2));
        let log = log();
        let held = entries(&root, 6);
        let closer = {
            let f = Arc::downgrade(&f);
            Rc::new("closer", &log, Vec::new(), move |_, _| {
                if let Some(f) = f.upgrade() {
                    f.close();
                }
                Box::pin(async { 0 })
            })
            .with_estimate(B)
        };
        let _h = root.register_reclaimer("closer", 0, closer);
        // 3 > the floor: the request climbs and waits at the root.
        let result = f.allocate_timeout(3, secs(5));
        assert_eq!(result.unwrap_err(), AllocError::Closed);
        let r = root.stats();
        assert_eq!(r.reclaim_rounds, 1, "{r:?}");
        // The floor was given back at once.
        assert_books(&[(&root, 6 * B), (&f, 0)]);
        assert_eq!(f.report().min_memory, 0);
        let two = root.try_allocate(2).unwrap();
        drop(two);
        drop(held);
        drop(f);
        assert_books(&[(&root, 0)]);
    });
}

/// A reclaimer that drops (not closes) an idle floored child: its floor goes back to the root
/// and serves the root's waiter, even though the reclaimer reports 0 freed.
#[test]
fn reclaimer_drops_an_idle_floored_child_and_its_floor_serves_the_waiter() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 4);
        let slot = Arc::new(Mutex::new(Some(f)));
        let log = log();
        let held = entries(&root, 4);
        let dropper = {
            let slot = Arc::clone(&slot);
            Rc::new("dropper", &log, Vec::new(), move |_, _| {
                drop(slot.lock().unwrap().take());
                Box::pin(async { 0 })
            })
            .with_estimate(4 * B)
        };
        let _h = root.register_reclaimer("dropper", 0, dropper);
        let got = root.allocate_timeout(3, secs(5)).unwrap();
        assert!(slot.lock().unwrap().is_none());
        let r = root.stats();
        assert_eq!((r.reclaim_rounds, r.reclaimed_bytes), (1, 0), "{r:?}");
        assert_books(&[(&root, 7 * B)]);
        drop(got);
        drop(held);
        assert_books(&[(&root, 0)]);
        assert!(root.report().children.is_empty());
    });
}

/// A reclaimer that drops a floored child holding allocations it owns: it first drops the
/// child's allocations (back into the floor), then the child (the floor back to the root).
/// Runs on a thread whose request is a sibling's, waiting at the root.
#[test]
fn reclaimer_empties_and_drops_a_floored_child_for_a_siblings_request() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 3);
        let s = root.child("s", cfg(8)).unwrap();
        let f_allocs = entries(&f, 4); // 3 floor + 1 climbed
        let slot = Arc::new(Mutex::new(Some((f, f_allocs))));
        let log = log();
        let held = entries(&s, 4);
        let dropper = {
            let slot = Arc::clone(&slot);
            Rc::new("dropper", &log, Vec::new(), move |_, _| {
                if let Some((f, allocs)) = slot.lock().unwrap().take() {
                    drop(allocs);
                    drop(f);
                }
                Box::pin(async { 4 * B })
            })
            .with_estimate(4 * B)
        };
        let _h = root.register_reclaimer("dropper", 0, dropper);
        let got = s.allocate_timeout(4, secs(5)).unwrap();
        assert_books(&[(&root, 8 * B), (&s, 8 * B)]);
        drop(got);
        drop(held);
        assert_books(&[(&root, 0), (&s, 0)]);
    });
}

/// Guarantee 14 inside a round: a root reclaimer that shrinks the child whose request
/// waits at the root fails that request (`ExceedsBudget` with the new cap); the round ends;
/// the pool's next waiter is not blocked by a round left in flight.
#[test]
fn reclaimer_shrinks_the_child_whose_request_waits_at_the_root() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let c = Arc::new(root.child("c", cfg(8)).unwrap());
        let log = log();
        let cache = Rc::new("cache", &log, entries(&root, 8), honest);
        let shrinker = {
            let c = Arc::downgrade(&c);
            Rc::new("shrinker", &log, Vec::new(), move |_, _| {
                if let Some(c) = c.upgrade() {
                    let _ = c.set_max_memory(2 * B);
                }
                Box::pin(async { 0 })
            })
            .with_estimate(100 * B)
        };
        let _h1 = root.register_reclaimer("shrinker", 0, shrinker);
        let _h2 = root.register_reclaimer("cache", 1, cache.clone());
        let result = c.allocate_timeout(4, secs(5));
        assert_eq!(
            result.unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 4 * B,
                max_memory: 2 * B
            }
        );
        assert_books(&[(&root, root.stats().in_use_bytes), (&c, 0)]);
        // The round is not in flight any more: a root waiter runs one (the cache serves it).
        let got = root.allocate_timeout(1, secs(5)).unwrap();
        drop(got);
        cache.clear();
        assert_books(&[(&root, 0), (&c, 0)]);
    });
}

/// A reclaimer that frees two buffers of a child and then tries to forget them from the
/// root's budget (`forget_max_memory` removes only *free* budget): the freed bytes already
/// went to the root's waiting head (FIFO, no barging), so nothing is forgotten; then it
/// shrinks the root below what is in use (`set_max_memory`): the grant made before stays
/// valid, the waiter is served, one round, the books exact.
#[test]
fn reclaimer_that_forgets_or_shrinks_after_freeing_cannot_take_the_heads_bytes() {
    watchdog(|| {
        let root = Arc::new(BufPool::new(cfg(8)));
        let c = root.child("c", cfg(8)).unwrap();
        let log = log();
        let forgot = Arc::new(AtomicUsize::new(usize::MAX));
        let cache = {
            let root = Arc::downgrade(&root);
            let forgot = Arc::clone(&forgot);
            Rc::new("forgetter", &log, entries(&c, 8), move |rc, target| {
                let freed = rc.free_up_to(target);
                let root = root.upgrade().unwrap();
                forgot.store(root.forget_max_memory(freed), SeqCst);
                root.set_max_memory(6 * B).unwrap();
                Box::pin(async move { freed })
            })
        };
        let _h = root.register_reclaimer("forgetter", 0, cache.clone());
        let got = rt()
            .block_on(async { tokio::time::timeout(secs(5), root.allocate(2)).await })
            .expect("the waiter hung after a shrink inside the round")
            .unwrap();
        assert_eq!(forgot.load(SeqCst), 0, "forgot bytes granted to the head");
        assert_eq!(log.lock().unwrap().len(), 1);
        assert_eq!(root.stats().max_memory, 6 * B);
        assert_eq!(root.stats().reclaim_rounds, 1);
        assert_books(&[(&root, 8 * B), (&c, 6 * B)]);
        // Over the new budget: nothing is granted until it is back under it.
        assert_eq!(root.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        drop(got);
        cache.clear();
        assert_books(&[(&root, 0), (&c, 0)]);
        assert_eq!(root.try_allocate(6).unwrap().length(), 6);
    });
}

/// A reclaimer that frees nothing but registers another reclaimer on a sibling subtree
/// mid-round: the registration lifts a stall, the next round asks the new one, the waiter
/// (a grandchild's request waiting at the root) is served.
#[test]
fn reclaimer_registers_a_sibling_reclaimer_mid_round() {
    watchdog(|| {
        let root = Arc::new(BufPool::new(cfg(8)));
        let a = root.child("a", cfg(8)).unwrap();
        let a1 = a.child("a1", cfg(8)).unwrap();
        let s = Arc::new(root.child("s", cfg(8)).unwrap());
        let log = log();
        let s_cache = Rc::new("s-cache", &log, entries(&s, 8), honest);
        let registrar = {
            let s = Arc::downgrade(&s);
            let s_cache = Arc::clone(&s_cache);
            Rc::new("registrar", &log, Vec::new(), move |rc, _| {
                if rc.stash.lock().unwrap().is_empty() {
                    let s = s.upgrade().unwrap();
                    let handle: ReclaimerHandle =
                        s.register_reclaimer("s-cache", 0, s_cache.clone());
                    rc.stash.lock().unwrap().push(Box::new(handle));
                }
                Box::pin(async { 0 })
            })
            .with_estimate(B)
        };
        let _h = root.register_reclaimer("registrar", 0, registrar.clone());
        let got = a1.allocate_timeout(3, secs(5)).unwrap();
        let asked = names(&log);
        assert_eq!(asked[0], "registrar");
        assert!(asked.contains(&"s-cache".to_owned()), "{asked:?}");
        assert_books(&[(&root, 8 * B), (&a1, 3 * B), (&s, 5 * B)]);
        drop(got);
        registrar.clear();
        s_cache.clear();
        assert_books(&[(&root, 0), (&a, 0), (&a1, 0), (&s, 0)]);
        assert!(
            root.tree_report()
                .children
                .iter()
                .all(|c| c.reclaimers.is_empty())
        );
    });
}

/// Docs probe: a reclaimer that drops the handle of a reclaimer later in the same round's
/// order. README: "Dropping it does not wait for a round that is asking that reclaimer ...;
/// no later round asks it." Whether the current round, which has not asked it yet, still
/// asks it is not said; this records it and checks that no later round asks it.
#[test]
fn unregistering_a_later_reclaimer_mid_round() {
    watchdog(|| {
        let root = BufPool::new(cfg(4));
        let c = root.child("c", cfg(4)).unwrap();
        let log = log();
        let victim = Rc::new("victim", &log, entries(&c, 4), nothing).with_estimate(B);
        let handle_slot: Arc<Mutex<Option<ReclaimerHandle>>> = Arc::new(Mutex::new(None));
        let killer = {
            let slot = Arc::clone(&handle_slot);
            Rc::new("killer", &log, Vec::new(), move |_, _| {
                drop(slot.lock().unwrap().take());
                Box::pin(async { 0 })
            })
            .with_estimate(B)
        };
        let _hk = root.register_reclaimer("killer", 0, killer);
        *handle_slot.lock().unwrap() = Some(c.register_reclaimer("victim", 1, victim.clone()));
        let mut waiter = Box::pin(root.allocate(1));
        assert!(poll_once(waiter.as_mut()).is_pending());
        let first_round = names(&log);
        eprintln!("unregistered mid-round, same round asked: {first_round:?}");
        assert_eq!(first_round[0], "killer");
        // A change (a release) lets a new round start: the victim is never asked again.
        let one = victim.cache.lock().unwrap().pop();
        drop(one);
        let got = match poll_once(waiter.as_mut()) {
            Poll::Ready(Ok(got)) => got,
            other => panic!("{other:?}"),
        };
        let victim_asks = names(&log).iter().filter(|n| *n == "victim").count();
        assert!(victim_asks <= 1);
        assert_eq!(
            names(&log)[first_round.len()..]
                .iter()
                .filter(|n| *n == "victim")
                .count(),
            0
        );
        drop(got);
        drop(waiter);
        victim.clear();
        assert_books(&[(&root, 0), (&c, 0)]);
    });
}

/// A reclaimer's panic in a root round driven by a floored child's request: passed on to the
/// poll that drove it; the request stays a valid waiter; the round is counted and ended;
/// a release then serves it; floor and books exact.
#[test]
fn panic_in_a_root_round_driven_by_a_floored_childs_request() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 2);
        let log = log();
        let mut held = entries(&root, 6);
        let panicker = Rc::new("panicker", &log, Vec::new(), |_, _| {
            panic!("hostile reclaim")
        })
        .with_estimate(B);
        let _h = root.register_reclaimer("panicker", 0, panicker);
        let mut request = Box::pin(f.allocate(3));
        let caught = catch_unwind(AssertUnwindSafe(|| poll_once(request.as_mut())));
        assert!(caught.is_err(), "the panic was not passed on");
        assert_eq!(root.stats().reclaim_rounds, 1);
        assert_eq!(root.stats().waiting, 1);
        // Stalled (no storm): polling again asks nobody.
        assert!(poll_once(request.as_mut()).is_pending());
        assert_eq!(log.lock().unwrap().len(), 1);
        // A release changes the pool: the next poll may start a round (panicking again) or
        // be served; free 3 so it is served at once.
        held.truncate(3);
        let got = match catch_unwind(AssertUnwindSafe(|| poll_once(request.as_mut()))) {
            Ok(Poll::Ready(Ok(got))) => got,
            other => panic!("{:?}", other.map_err(|_| "panicked")),
        };
        assert_books(&[(&root, 6 * B), (&f, 3 * B)]); // the floor's 2, and 1 above it
        drop(got);
        drop(request);
        drop(held);
        assert_books(&[(&root, 2 * B), (&f, 0)]);
        assert_floor_whole(&root, &f, 2);
    });
}

/// Wrong counts in a tree: a child's reclaimer that frees 1 buffer but reports 3, and a
/// grandchild's that frees 2 but reports 0: the report and stats carry the reported figures,
/// the pools' books carry the truth, and the root's waiter is served.
#[test]
fn over_and_under_reporting_reclaimers_in_a_tree() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let c = root.child("c", cfg(8)).unwrap();
        let g = c.child("g", cfg(8)).unwrap();
        let log = log();
        let over = Rc::new("over", &log, entries(&c, 4), |rc, _| {
            let freed = rc.free_up_to(B);
            Box::pin(async move { freed * 3 })
        })
        .with_estimate(B);
        let under = Rc::new("under", &log, entries(&g, 4), |rc, _| {
            let _ = rc.free_up_to(2 * B);
            Box::pin(async { 0 })
        })
        .with_estimate(8 * B);
        let _ho = c.register_reclaimer("over", 0, over.clone());
        let _hu = g.register_reclaimer("under", 0, under.clone());
        // Short 3: "under" (largest estimate) frees 2, reports 0; "over" is asked for what is
        // really still short (1, by the pool's books, not the reports), frees 1, reports 3:
        // truly covered (3 free).
        let got = root.allocate_timeout(3, secs(5));
        let asked = log.lock().unwrap().clone();
        assert_eq!(asked, [("under".to_owned(), 3 * B), ("over".to_owned(), B)]);
        let got = got.unwrap();
        let r = root.stats();
        let report = root.report();
        let (o, u) = (
            reclaimer_figures(&report, "over").unwrap(),
            reclaimer_figures(&report, "under").unwrap(),
        );
        assert_eq!(r.reclaimed_bytes, o.2 + u.2, "{r:?}");
        assert_eq!(r.reclaim_asked_bytes, o.1 + u.1, "{r:?}");
        assert_books(&[(&root, 3 * B + over.held() + under.held())]);
        drop(got);
        over.clear();
        under.clear();
        assert_books(&[(&root, 0), (&c, 0), (&g, 0)]);
    });
}

// ---------------------------------------------------------------------------------------
// 3. reclaim_ahead on floored children and the root
// ---------------------------------------------------------------------------------------

/// `reclaim_ahead(low_water)` on a floored child: what is missing up to the mark is asked of
/// the child's scope; the freed bytes beyond the floor go back to the root first; it sleeps
/// once the room is back, starts no round on a refusal that leaves its room above the mark,
/// and resolves when the child closes; the floor's books are exact throughout.
#[test]
fn reclaim_ahead_on_a_floored_child() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 4, 2);
        let log = log();
        let cache = Rc::new("f-cache", &log, entries(&f, 4), honest);
        let _h = f.register_reclaimer("f-cache", 0, cache.clone());
        assert_books(&[(&root, 4 * B), (&f, 4 * B)]);
        let mut ahead = Box::pin(f.reclaim_ahead(2 * B));
        assert!(poll_once(ahead.as_mut()).is_pending());
        assert_eq!(*log.lock().unwrap(), [("f-cache".to_owned(), 2 * B)]);
        // The two climbed buffers went back to the root; the floor is still in use.
        assert_books(&[(&root, 2 * B), (&f, 2 * B)]);
        assert_eq!(
            (f.stats().reclaim_rounds, root.stats().reclaim_rounds),
            (1, 0)
        );
        let root_held = root.try_allocate(6).unwrap();
        // A refusal (the root is full) with the child's room at the mark: no new round.
        assert_eq!(f.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        for _ in 0..3 {
            assert!(poll_once(ahead.as_mut()).is_pending());
        }
        assert_eq!(log.lock().unwrap().len(), 1);
        f.close();
        assert!(poll_once(ahead.as_mut()).is_ready());
        drop(ahead);
        assert_books(&[(&root, 8 * B), (&f, 2 * B)]);
        cache.clear();
        assert_books(&[(&root, 6 * B), (&f, 0)]);
        drop(root_held);
        drop(f);
        assert_books(&[(&root, 0)]);
    });
}

/// `reclaim_ahead` on the root whose only reclaimer frees into a floored child's floor:
/// the round leaves no more room than it found, so it sleeps (no storm); a registration
/// notifies it and the new reclaimer's round brings the room back.
#[test]
fn reclaim_ahead_on_root_whose_reclaimer_frees_into_a_floor_does_not_spin() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 4, 4);
        let log = log();
        let f_cache = Rc::new("f-cache", &log, entries(&f, 4), honest);
        let root_held = entries(&root, 4);
        let _hf = f.register_reclaimer("f-cache", 0, f_cache.clone());
        let mut ahead = Box::pin(root.reclaim_ahead(2 * B));
        assert!(poll_once(ahead.as_mut()).is_pending());
        assert_eq!(log.lock().unwrap().len(), 1);
        for _ in 0..5 {
            assert!(poll_once(ahead.as_mut()).is_pending());
        }
        assert_eq!(log.lock().unwrap().len(), 1, "a storm of rounds");
        assert_books(&[(&root, 8 * B), (&f, 2 * B)]);
        // Empty the floored cache (its bytes refill the floor, the root does not move), then
        // register a root cache: the registration notifies it.
        f_cache.clear();
        let root_cache = Rc::new("root-cache", &log, root_held, honest);
        let _hr = root.register_reclaimer("root-cache", 1, root_cache.clone());
        assert!(poll_once(ahead.as_mut()).is_pending());
        assert_eq!(root.stats().available_bytes(), 2 * B);
        assert_eq!(names(&log).last().unwrap(), "root-cache");
        root.close();
        assert!(poll_once(ahead.as_mut()).is_ready());
        root_cache.clear();
        // Closing the root closed the child and gave its (idle) floor back.
        assert_books(&[(&root, 0), (&f, 0)]);
        drop(f);
        assert_books(&[(&root, 0)]);
    });
}

/// Two `reclaim_ahead` on one pool (a floored child) share its one round: the second finds
/// it in flight and sleeps; dropping the first mid-round drops its reclaimer's future, ends
/// and counts the round, and notifies the second, which starts the next one.
#[test]
fn two_reclaim_ahead_on_one_floored_child_and_one_dropped_mid_round() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 4, 2);
        let log = log();
        let gate = Gate::default();
        let cache = gated_rc("gated", &log, entries(&f, 4), &gate);
        let _h = f.register_reclaimer("gated", 0, cache.clone());
        let mut first = Box::pin(f.reclaim_ahead(2 * B));
        let mut second = Box::pin(f.reclaim_ahead(3 * B));
        assert!(poll_once(first.as_mut()).is_pending());
        assert!(poll_once(second.as_mut()).is_pending());
        assert!(poll_once(second.as_mut()).is_pending());
        assert_eq!(log.lock().unwrap().len(), 1, "two rounds at one pool");
        drop(first);
        assert_eq!(gate.dropped.load(SeqCst), 1);
        assert_eq!(f.stats().reclaim_rounds, 1);
        assert!(poll_once(second.as_mut()).is_pending());
        assert_eq!(
            *log.lock().unwrap(),
            [("gated".to_owned(), 2 * B), ("gated".to_owned(), 3 * B)]
        );
        gate.open();
        assert!(poll_once(second.as_mut()).is_pending());
        assert_eq!(f.stats().available_bytes(), 3 * B);
        assert_books(&[(&root, 2 * B), (&f, B)]);
        f.close();
        assert!(poll_once(second.as_mut()).is_ready());
        drop(second);
        assert_eq!(f.stats().reclaim_rounds, 2);
        cache.clear();
        assert_books(&[(&root, 0), (&f, 0)]);
    });
}

/// `reclaim_ahead` on a floored child dropped mid-round: the round ends (counted, its future
/// dropped) before any other starts: a waiter of the child then drives the next one.
#[test]
fn reclaim_ahead_dropped_mid_round_then_a_waiter_reclaims() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 4, 2);
        let log = log();
        let gate = Gate::default();
        let cache = gated_rc("gated", &log, entries(&f, 4), &gate);
        let _h = f.register_reclaimer("gated", 0, cache.clone());
        let mut ahead = Box::pin(f.reclaim_ahead(B));
        assert!(poll_once(ahead.as_mut()).is_pending());
        let mut waiter = Box::pin(f.allocate(2));
        assert!(poll_once(waiter.as_mut()).is_pending());
        assert_eq!(log.lock().unwrap().len(), 1);
        drop(ahead);
        assert_eq!(gate.dropped.load(SeqCst), 1);
        gate.open();
        let got = futures::executor::block_on(waiter.as_mut()).unwrap();
        assert_eq!(log.lock().unwrap().len(), 2);
        assert_eq!(f.stats().reclaim_rounds, 2);
        assert_books(&[(&root, 4 * B), (&f, 4 * B)]);
        drop(got);
        drop(waiter);
        cache.clear();
        assert_books(&[(&root, 2 * B), (&f, 0)]);
        assert_floor_whole(&root, &f, 2);
    });
}

/// `reclaim_ahead` on the root and on floored children, spawned on a multi-thread runtime,
/// racing children's close, drop and shrink (and the root's): every `reclaim_ahead`
/// resolves on close, nothing hangs, and once everything is dropped the root is empty.
#[test]
#[cfg_attr(miri, ignore)]
fn reclaim_ahead_races_close_drop_and_shrink_of_floored_children() {
    watchdog(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let root = Arc::new(BufPool::new(cfg(32)));
            let log = log();
            let root_cache = Rc::new("root-cache", &log, entries(&root, 8), honest);
            let _hr = root.register_reclaimer("root-cache", 3, root_cache.clone());
            let root_ahead = tokio::spawn(root.reclaim_ahead(4 * B));
            let mut rng = common::Rng::new(7);
            for round in 0..60 {
                let floor = rng.range(1, 3);
                let f = match BufPool::builder(cfg(8))
                    .name("f")
                    .parent(&root)
                    .min_memory(floor * B)
                    .build()
                {
                    Ok(f) => Arc::new(f),
                    // Floors are set aside only at once.
                    Err(_) => continue,
                };
                let n = rng.range(0, 6);
                let held: Vec<_> = (0..n).filter_map(|_| f.try_allocate(1).ok()).collect();
                let cache = Rc::new("f-cache", &log, held, honest);
                let handle = f.register_reclaimer("f-cache", rng.range(0, 2) as u32, cache.clone());
                let ahead = tokio::spawn(f.reclaim_ahead(rng.range(1, 4) * B));
                let waiter = {
                    let f = Arc::clone(&f);
                    tokio::spawn(async move {
                        let r =
                            tokio::time::timeout(Duration::from_millis(20), f.allocate(3)).await;
                        drop(r);
                    })
                };
                let other = {
                    let root = Arc::clone(&root);
                    tokio::spawn(async move {
                        let r =
                            tokio::time::timeout(Duration::from_millis(20), root.allocate(5)).await;
                        drop(r);
                    })
                };
                tokio::task::yield_now().await;
                match round % 4 {
                    0 => f.close(),
                    1 => {
                        let _ = f.set_max_memory(rng.range(3, 8) * B);
                    }
                    2 => {
                        let _ = root.set_max_memory(rng.range(24, 32) * B);
                    }
                    _ => {
                        let _ = f.forget_max_memory(2 * B);
                    }
                }
                waiter.await.unwrap();
                other.await.unwrap();
                if round % 3 == 0 {
                    drop(handle);
                    cache.clear();
                } else {
                    cache.clear();
                    drop(handle);
                }
                // Dropping the child closes it, waits for its allocations (none left) and
                // ends its `reclaim_ahead`.
                drop(Arc::into_inner(f).expect("the test holds the only handle"));
                common::within(5, ahead).await.unwrap();
                root.set_max_memory(32 * B).unwrap();
            }
            root.close();
            common::within(5, root_ahead).await.unwrap();
            root_cache.clear();
            assert_books(&[(&root, 0)]);
            assert!(root.report().children.is_empty());
        });
    });
}

// ---------------------------------------------------------------------------------------
// 4. Cancellation, timeouts and close during a round
// ---------------------------------------------------------------------------------------

/// Guarantee 17: "a cancelled driver's round is ended before any other starts". A floored
/// child's request waiting at the root drives the root's round; a sibling's request found it
/// in flight. Dropping the driver drops the reclaimer's future and ends the round; the
/// sibling's request (now the head) starts the next one and is served.
#[test]
fn cancelled_child_driver_at_root_then_a_siblings_request_reclaims() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 2);
        let s = root.child("s", cfg(8)).unwrap();
        let log = log();
        let gate = Gate::default();
        let cache = gated_rc("gated", &log, entries(&s, 6), &gate);
        let _h = root.register_reclaimer("gated", 0, cache.clone());
        let mut driver = Box::pin(f.allocate(3));
        assert!(poll_once(driver.as_mut()).is_pending());
        let mut sibling = Box::pin(s.allocate(2));
        assert!(poll_once(sibling.as_mut()).is_pending());
        assert_eq!(log.lock().unwrap().len(), 1);
        assert_eq!(root.stats().waiting, 2);
        drop(driver);
        assert_eq!(gate.dropped.load(SeqCst), 1);
        assert_eq!(root.stats().reclaim_rounds, 1);
        assert_eq!(root.stats().waiting, 1);
        assert!(poll_once(sibling.as_mut()).is_pending());
        assert_eq!(
            *log.lock().unwrap().last().unwrap(),
            ("gated".to_owned(), 2 * B)
        );
        gate.open();
        let got = futures::executor::block_on(sibling.as_mut()).unwrap();
        assert_eq!(root.stats().reclaim_rounds, 2);
        assert_books(&[(&root, 8 * B), (&f, 0), (&s, 6 * B)]);
        drop(got);
        drop(sibling);
        cache.clear();
        assert_books(&[(&root, 2 * B), (&f, 0), (&s, 0)]);
        assert_floor_whole(&root, &f, 2);
    });
}

/// `allocate_timeout` of a floored child's request (above its floor) driving a root round
/// whose future never completes: `TimedOut` in time, the round ended (future dropped,
/// counted), nobody waiting, the floor whole, and a later round can start.
#[test]
fn floored_child_timeout_during_a_never_ending_root_round() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 2);
        let log = log();
        let gate = Gate::default();
        let cache = gated_rc("never", &log, entries(&root, 6), &gate);
        let _h = root.register_reclaimer("never", 0, cache.clone());
        let started = std::time::Instant::now();
        let result = f.allocate_timeout(3, Duration::from_millis(100));
        assert_eq!(result.unwrap_err(), AllocError::TimedOut);
        assert!(started.elapsed() < secs(3));
        assert_eq!(gate.dropped.load(SeqCst), 1);
        assert_eq!(root.stats().reclaim_rounds, 1);
        assert_books(&[(&root, 8 * B), (&f, 0)]);
        assert_floor_whole(&root, &f, 2);
        // Not stalled by an abandoned round: a new waiter drives one, the gate opens.
        gate.open();
        let got = f.allocate_timeout(3, secs(5)).unwrap();
        assert_eq!(root.stats().reclaim_rounds, 2);
        drop(got);
        cache.clear();
        assert_books(&[(&root, 2 * B), (&f, 0)]);
    });
}

/// Async timeouts (`tokio::time::timeout`) of many requests of floored children and
/// siblings during gated root rounds: every cancel ends the round it drives, and when the
/// gate finally opens everything is served and the books are exact.
#[test]
fn async_timeouts_of_tree_requests_during_rounds() {
    watchdog(|| {
        let root = Arc::new(BufPool::new(cfg(16)));
        let f1 = Arc::new(floored(&root, "f1", 8, 2));
        let f2 = Arc::new(floored(&root, "f2", 8, 3));
        let s = Arc::new(root.child("s", cfg(16)).unwrap());
        let log = log();
        let gate = Gate::default();
        let cache = gated_rc("gated", &log, entries(&s, 11), &gate);
        let _h = root.register_reclaimer("gated", 0, cache.clone());
        rt().block_on(async {
            for i in 0..12 {
                let pool = match i % 3 {
                    0 => Arc::clone(&f1),
                    1 => Arc::clone(&f2),
                    _ => Arc::clone(&s),
                };
                let r = tokio::time::timeout(Duration::from_millis(5), pool.allocate(4)).await;
                assert!(r.is_err(), "served before the gate opened");
            }
        });
        let rounds = root.stats().reclaim_rounds;
        assert_eq!(gate.dropped.load(SeqCst), rounds);
        assert_eq!(log.lock().unwrap().len(), rounds);
        assert_books(&[(&root, 16 * B), (&f1, 0), (&f2, 0), (&s, 11 * B)]);
        gate.open();
        let got = f1.allocate_timeout(4, secs(5)).unwrap();
        drop(got);
        cache.clear();
        assert_books(&[(&root, 5 * B), (&f1, 0), (&f2, 0), (&s, 0)]);
        assert_floor_whole(&root, &f1, 2);
        assert_floor_whole(&root, &f2, 3);
    });
}

/// Close of the root during a round driven by a floored grandchild's request waiting at the
/// root: the request fails with `Closed`, the round ends (future dropped), every floor goes
/// back, and the root drains once the test's allocations are back.
#[test]
fn close_root_during_a_round_driven_by_a_floored_grandchild() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let mid = floored(&root, "mid", 8, 3);
        let g = floored(&mid, "g", 8, 2);
        let log = log();
        let gate = Gate::default();
        let cache = gated_rc("gated", &log, entries(&root, 5), &gate);
        let _h = root.register_reclaimer("gated", 0, cache.clone());
        assert_books(&[(&root, 8 * B), (&mid, 2 * B), (&g, 0)]);
        let mut request = Box::pin(g.allocate(4));
        assert!(poll_once(request.as_mut()).is_pending());
        assert_eq!(log.lock().unwrap().len(), 1);
        root.close();
        assert!(matches!(
            poll_once(request.as_mut()),
            Poll::Ready(Err(AllocError::Closed))
        ));
        drop(request);
        assert_eq!(gate.dropped.load(SeqCst), 1);
        assert_eq!(root.stats().reclaim_rounds, 1);
        assert_books(&[(&root, 5 * B), (&mid, 0), (&g, 0)]);
        cache.clear();
        assert_books(&[(&root, 0)]);
    });
}

/// Close of the floored child whose request waits at the root while a *root* request drives
/// the round: the child's request fails, the round goes on and serves the root's request
/// with the bytes the closed child's floor gave back plus what the reclaimer freed.
#[test]
fn close_a_floored_child_while_the_roots_request_drives_the_round() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 2);
        let log = log();
        let gate = Gate::default();
        let cache = gated_rc("gated", &log, entries(&root, 6), &gate);
        let _h = root.register_reclaimer("gated", 0, cache.clone());
        let mut root_request = Box::pin(root.allocate(3));
        assert!(poll_once(root_request.as_mut()).is_pending());
        let mut child_request = Box::pin(f.allocate(3));
        assert!(poll_once(child_request.as_mut()).is_pending());
        f.close();
        assert!(matches!(
            poll_once(child_request.as_mut()),
            Poll::Ready(Err(AllocError::Closed))
        ));
        drop(child_request);
        // The floor (2) went back to the root, 1 more is short.
        assert_eq!(root.stats().in_use_bytes, 6 * B);
        gate.open();
        let got = futures::executor::block_on(root_request.as_mut()).unwrap();
        assert_eq!(log.lock().unwrap().len(), 1);
        // The round, started short 3, freed 3: 3 of the cache and the request's 3 in use.
        assert_books(&[(&root, 6 * B), (&f, 0)]);
        assert_eq!(cache.held(), 3 * B);
        drop(got);
        drop(root_request);
        cache.clear();
        drop(f);
        assert_books(&[(&root, 0)]);
    });
}

/// Stress: floored children and plain siblings under one root, each with an honest cache
/// that refills itself, tasks and threads allocating (async with timeouts, blocking with
/// timeouts), cancelling and closing; at the end every pool's books equal what is held,
/// every floor is whole and the root drains.
#[test]
#[cfg_attr(miri, ignore)]
fn stress_reclaim_across_floored_children_and_siblings() {
    watchdog(|| {
        let root = Arc::new(BufPool::new(cfg(32)));
        let pools: Vec<(Arc<BufPool>, usize)> = vec![
            (Arc::new(floored(&root, "f1", 12, 4)), 4),
            (Arc::new(floored(&root, "f2", 12, 2)), 2),
            (Arc::new(root.child("s1", cfg(16)).unwrap()), 0),
            (Arc::new(root.child("s2", cfg(16)).unwrap()), 0),
        ];
        let log = log();
        let mut handles = Vec::new();
        let mut caches = Vec::new();
        for (i, (pool, _)) in pools.iter().enumerate() {
            let cache = Rc::new("cache", &log, entries(pool, 4), honest);
            handles.push(pool.register_reclaimer(format!("c{i}"), (i % 2) as u32, cache.clone()));
            caches.push(cache);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (t, (pool, _)) in pools.iter().take(2).cloned().enumerate() {
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let mut rng = common::Rng::new(100 + t as u64);
                while !stop.load(SeqCst) {
                    if let Ok(a) = pool.allocate_timeout(rng.range(1, 5), Duration::from_millis(2))
                    {
                        drop(a);
                    }
                }
            }));
        }
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..8 {
                let (pool, _) = pools[t % pools.len()].clone();
                let cache = Arc::clone(&caches[t % caches.len()]);
                tasks.push(tokio::spawn(async move {
                    let mut rng = common::Rng::new(t as u64);
                    for _ in 0..150 {
                        let n = rng.range(1, 6);
                        match tokio::time::timeout(Duration::from_millis(3), pool.allocate(n)).await
                        {
                            Ok(Ok(a)) => {
                                if rng.range(0, 3) == 0 {
                                    // Refill the cache (it gives back on the next round).
                                    cache.cache.lock().unwrap().push(a);
                                } else {
                                    tokio::task::yield_now().await;
                                    drop(a);
                                }
                            }
                            Ok(Err(e)) => panic!("unexpected {e}"),
                            Err(_) => {}
                        }
                    }
                }));
            }
            for task in tasks {
                common::within(15, task).await.unwrap();
            }
        });
        stop.store(true, SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        for (pool, _) in &pools {
            assert_eq!(pool.stats().waiting, 0);
        }
        let held: usize = caches.iter().map(|c| c.held()).sum();
        let floors: usize = pools.iter().map(|(_, f)| f * B).sum();
        // Each pool holds what its cache holds; the root counts each floor whole plus what
        // climbed beyond it (a request takes a floor all or nothing, so a pool may hold
        // climbed bytes while its floor is partly free).
        let mut at_least = 0;
        for ((pool, floor), cache) in pools.iter().zip(&caches) {
            assert_eq!(pool.stats().in_use_bytes, cache.held());
            at_least += cache.held().max(floor * B);
        }
        let root_in_use = root.stats().in_use_bytes;
        assert!(
            (at_least..=held + floors).contains(&root_in_use),
            "root {root_in_use}, held {held}, floors {floors}"
        );
        drop(handles);
        for cache in &caches {
            cache.clear();
        }
        assert_eq!(root.stats().in_use_bytes, floors);
        for (pool, floor) in &pools {
            if *floor > 0 {
                assert_floor_whole(&root, pool, *floor);
            }
        }
        let rounds = root.stats().reclaim_rounds
            + pools
                .iter()
                .map(|(p, _)| p.stats().reclaim_rounds)
                .sum::<usize>();
        assert!(rounds > 0);
        drop(pools);
        assert_books(&[(&root, 0)]);
    });
}

// ---------------------------------------------------------------------------------------
// 5. Stalls, floors and user code that blocks
// ---------------------------------------------------------------------------------------

/// A root stalled by a round that freed nothing, whose head is a floored child's request:
/// a release inside the child refills its floor (the root does not move), and the request
/// is woken and served from the floor; a registration on a grandchild lifts a root stall.
#[test]
fn stalled_root_head_of_a_floored_child_is_served_by_its_refilled_floor() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 2);
        let g = f.child("g", cfg(8)).unwrap();
        let log = log();
        let mut floor_use = entries(&f, 2);
        let held = entries(&root, 6);
        let nothing_rc = Rc::new("nothing", &log, Vec::new(), nothing).with_estimate(B);
        let _h = root.register_reclaimer("nothing", 0, nothing_rc);
        let got = rt().block_on(async {
            let mut request = std::pin::pin!(f.allocate(2));
            assert!(futures::poll!(request.as_mut()).is_pending());
            assert!(futures::poll!(request.as_mut()).is_pending());
            assert_eq!(root.stats().reclaim_rounds, 1, "stalled: one round");
            floor_use.clear();
            common::within(5, request).await.unwrap()
        });
        assert_books(&[(&root, 8 * B), (&f, 2 * B), (&g, 0)]);
        drop(got);
        // Stall the root again with a root request, then register on the grandchild.
        let mut waiter = Box::pin(root.allocate(1));
        assert!(poll_once(waiter.as_mut()).is_pending());
        assert!(poll_once(waiter.as_mut()).is_pending());
        let rounds = root.stats().reclaim_rounds;
        let g_cache = Rc::new("g-cache", &log, Vec::new(), honest);
        let _hg = g.register_reclaimer("g-cache", 0, g_cache.clone());
        assert!(poll_once(waiter.as_mut()).is_pending());
        assert_eq!(
            root.stats().reclaim_rounds,
            rounds + 1,
            "the registration lifts the stall"
        );
        assert!(names(&log).contains(&"g-cache".to_owned()));
        drop(waiter);
        drop(held);
        assert_books(&[(&root, 2 * B), (&f, 0), (&g, 0)]);
        assert_floor_whole(&root, &f, 2);
    });
}

/// "User code is never under a lock": a reclaimer that blocks its driver thread until the
/// test lets it go; meanwhile the test reads stats and reports (which call estimates),
/// registers and unregisters on a sibling, resizes the root, closes an unrelated child, and
/// makes `try_` calls on every pool: none of it deadlocks; the request is then served.
#[test]
fn a_reclaimer_that_blocks_its_driver_holds_no_lock() {
    watchdog(|| {
        let root = Arc::new(BufPool::new(cfg(8)));
        let f = Arc::new(floored(&root, "f", 8, 2));
        let s = root.child("s", cfg(8)).unwrap();
        let other = root.child("other", cfg(8)).unwrap();
        let log = log();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let entered_tx = Mutex::new(entered_tx);
        let go_rx = Mutex::new(go_rx);
        let blocker = Rc::new("blocker", &log, entries(&s, 6), move |rc, target| {
            entered_tx.lock().unwrap().send(()).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
            let freed = rc.free_up_to(target);
            Box::pin(async move { freed })
        });
        let _h = root.register_reclaimer("blocker", 0, blocker.clone());
        let driver = {
            let f = Arc::clone(&f);
            std::thread::spawn(move || f.allocate_timeout(3, secs(10)))
        };
        entered_rx.recv_timeout(secs(5)).unwrap();
        let _ = root.stats();
        let _ = root.tree_report();
        let extra = Rc::new("extra", &log, Vec::new(), nothing);
        let h = s.register_reclaimer("extra", 9, extra);
        drop(h);
        // (Down and back: a grow would serve the waiter, which needs one buffer more.)
        root.set_max_memory(7 * B).unwrap();
        root.set_max_memory(8 * B).unwrap();
        other.close();
        // No barging past the waiter at the root; the child's floor is all the waiter's
        // (it took it before it climbed with the rest).
        for pool in [&*root, &s, &f] {
            assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        }
        assert_eq!(root.stats().waiting, 1);
        go_tx.send(()).unwrap();
        let got = driver.join().unwrap().unwrap();
        // Reclaim freed the one buffer the request needed above its floor.
        assert_books(&[(&root, 8 * B), (&f, 3 * B), (&s, 5 * B)]);
        drop(got);
        blocker.clear();
        assert_books(&[(&root, 2 * B), (&f, 0), (&s, 0)]);
        assert_floor_whole(&root, &f, 2);
    });
}

/// Floors and the README's bad-input rule ("a request that can never fit gets
/// `ExceedsBudget` at once, never a wait"): a floored child's request uses its floor first
/// and climbs with the rest only, so on a root of 8 whose other 4 a cache holds, a request
/// of up to 8 (the chain's smallest cap) is served once reclaim frees what the rest needs;
/// one above 8 fails at once, naming 8, and no reclaimer is asked.
#[test]
fn floored_childs_request_above_root_budget_less_floor_fails_at_once() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let f = floored(&root, "f", 8, 4);
        let log = log();
        let cache = Rc::new("root-cache", &log, entries(&root, 4), honest);
        let _h = root.register_reclaimer("root-cache", 0, cache.clone());
        for n in [9, 16] {
            assert_eq!(
                f.allocate_timeout(n, Duration::from_millis(500))
                    .unwrap_err(),
                AllocError::ExceedsBudget {
                    requested_bytes: n * B,
                    max_memory: 8 * B
                },
                "f.allocate({n}) with cap 8, floor 4, root 8"
            );
            assert_eq!(
                f.try_allocate(n).unwrap_err(),
                AllocError::ExceedsBudget {
                    requested_bytes: n * B,
                    max_memory: 8 * B
                }
            );
        }
        assert!(
            log.lock().unwrap().is_empty(),
            "nobody asked for a hopeless request"
        );
        assert_eq!(cache.held(), 4 * B);
        // Within the bound: 6 take the floor's 4, and 2 climb once reclaim made room.
        let got = f.allocate_timeout(6, Duration::from_secs(5)).unwrap();
        assert_eq!(root.stats().in_use_bytes, 8 * B);
        assert_eq!(cache.held(), 2 * B);
        drop(got);
        assert_books(&[(&root, 6 * B), (&f, 0)]);
        // All 8: the floor's 4 and the cache's last 2 after the 2 just given back.
        let got = f.allocate_timeout(8, Duration::from_secs(5)).unwrap();
        assert_eq!(root.stats().in_use_bytes, 8 * B);
        assert_eq!(cache.held(), 0);
        drop(got);
        cache.clear();
        assert_books(&[(&root, 4 * B), (&f, 0)]);
    });
}
