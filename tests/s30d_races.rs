//! Resize, close and cancel racing every wait path, with hostile wakers and a reclaiming
//! cache (session 30, helper s30d).
//!
//! A root with a floored child and a plain child (a cache registered as a reclaimer in the
//! plain one), and threads that for a short while: wait with a deadline (allocate and
//! reserve, blocking), hand-poll async requests of every form with wakers that panic or
//! re-enter the pool and drop them at random points (cancel), grow reservations, run a
//! `reclaim_ahead`, refill the cache, and resize every pool at random. Then everything
//! stops and is given back: every pool's books must be exact, each must serve its whole
//! budget, and close plus drain must complete. A second test closes the root while all of
//! that runs.

mod common;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Once};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use common::watchdog;
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate, Reclaimer,
};

const BS: usize = 64;
const INJECTED: &str = "s30d injected";

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: buffers * BS,
    }
}

fn quiet() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let p = info.payload();
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if !msg.contains(INJECTED) {
                previous(info);
            }
        }));
    });
}

/// Runs `f`; an injected panic is fine, any other fails the test (recorded in `bad`).
fn guarded(bad: &Mutex<Vec<String>>, f: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if !msg.contains(INJECTED) {
            lock(bad).push(msg);
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A waker that panics in `wake` one time in `panic_one_in`, and otherwise may re-enter
/// the pool (a `try_allocate` it drops at once).
struct Hostile {
    pool: Arc<BufPool>,
    count: AtomicUsize,
    panic_one_in: usize,
}
impl Wake for Hostile {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let c = self.count.fetch_add(1, SeqCst);
        if c % 3 == 0 {
            drop(self.pool.try_allocate(1));
        }
        if self.panic_one_in > 0 && c % self.panic_one_in == 0 {
            panic!("{INJECTED} (wake)");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Cache(Mutex<Vec<BufPoolAllocation>>);
impl Reclaimer for Cache {
    fn estimate(&self) -> usize {
        lock(&self.0).len() * BS
    }
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        // Taken under the cache's lock, dropped after it: a release runs woken wakers,
        // which may panic (guarantee 9 passes that on), and must not poison the cache.
        let mut taken = Vec::new();
        {
            let mut entries = lock(&self.0);
            let mut bytes = 0;
            while bytes < target {
                match entries.pop() {
                    Some(a) => {
                        bytes += a.allocated_bytes();
                        taken.push(a);
                    }
                    None => break,
                }
            }
        }
        let freed = taken.iter().map(|a| a.allocated_bytes()).sum::<usize>();
        drop(taken);
        Box::pin(async move {
            // Yield once, as a spill to disk would.
            let mut yielded = false;
            std::future::poll_fn(move |cx| {
                if yielded {
                    Poll::Ready(freed)
                } else {
                    yielded = true;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            })
            .await
        })
    }
}

struct Tree {
    root: Arc<BufPool>,
    floored: Arc<BufPool>,
    plain: Arc<BufPool>,
}

const ROOT: usize = 16;
const FLOORED: usize = 12;
const FLOOR: usize = 2;
const PLAIN: usize = 12;

fn tree() -> Tree {
    let root = Arc::new(BufPool::new(cfg(ROOT)));
    let floored = Arc::new(
        BufPool::builder(cfg(FLOORED))
            .name("floored")
            .parent(&root)
            .min_memory(FLOOR * BS)
            .build()
            .unwrap(),
    );
    let plain = Arc::new(root.child("plain", cfg(PLAIN)).unwrap());
    Tree {
        root,
        floored,
        plain,
    }
}

fn pick<'a>(t: &'a Tree, rng: &mut Rng) -> &'a Arc<BufPool> {
    match rng.below(3) {
        0 => &t.root,
        1 => &t.floored,
        _ => &t.plain,
    }
}

/// Polls `f` a few times with `waker`, then drops it (a cancel at a random point).
fn hand_poll<F: Future>(mut f: Pin<Box<F>>, waker: &Waker, rng: &mut Rng) -> Option<F::Output> {
    let cx = &mut Context::from_waker(waker);
    for _ in 0..=rng.below(3) {
        if let Poll::Ready(out) = f.as_mut().poll(cx) {
            return Some(out);
        }
        thread::yield_now();
    }
    None
}

fn run(close_midway: bool) {
    quiet();
    let t = Arc::new(tree());
    let cache = Arc::new(Cache(Mutex::new(Vec::new())));
    let registration =
        t.plain
            .register_reclaimer("cache", 0, Arc::clone(&cache) as Arc<dyn Reclaimer>);
    let stop = Arc::new(AtomicBool::new(false));
    let bad: Arc<Mutex<Vec<String>>> = Arc::default();
    let ops = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    let duration = Duration::from_millis(if cfg!(miri) { 50 } else { 600 });

    // Blocking waiters with deadlines.
    for seed in 1..=2u64 {
        let (t, stop, bad, ops) = (
            Arc::clone(&t),
            Arc::clone(&stop),
            Arc::clone(&bad),
            Arc::clone(&ops),
        );
        threads.push(thread::spawn(move || {
            let mut rng = Rng(seed * 7919);
            while !stop.load(SeqCst) {
                let pool = pick(&t, &mut rng);
                let n = 1 + rng.below(3) as usize;
                guarded(&bad, || match rng.below(3) {
                    0 => drop(pool.allocate_timeout(n, Duration::from_millis(2))),
                    1 => drop(pool.reserve_timeout(n * BS, Duration::from_millis(2))),
                    _ => {
                        if let Ok(mut r) = pool.try_reserve(BS) {
                            let _ = r.try_grow(BS);
                            r.shrink(8);
                            drop(r);
                        }
                    }
                });
                ops.fetch_add(1, SeqCst);
            }
        }));
    }
    // Hand-polled async forms with hostile wakers, cancelled at random.
    for seed in 3..=4u64 {
        let (t, stop, bad, ops) = (
            Arc::clone(&t),
            Arc::clone(&stop),
            Arc::clone(&bad),
            Arc::clone(&ops),
        );
        threads.push(thread::spawn(move || {
            let mut rng = Rng(seed * 104_729);
            while !stop.load(SeqCst) {
                let pool = Arc::clone(pick(&t, &mut rng));
                let waker = Waker::from(Arc::new(Hostile {
                    pool: Arc::clone(&pool),
                    count: AtomicUsize::new(0),
                    panic_one_in: 4,
                }));
                let n = 1 + rng.below(3) as usize;
                let form = rng.below(5);
                guarded(&bad, || match form {
                    0 => drop(hand_poll(Box::pin(pool.allocate(n)), &waker, &mut rng)),
                    1 => drop(hand_poll(
                        Box::pin(Arc::clone(&pool).allocate_owned(n)),
                        &waker,
                        &mut rng,
                    )),
                    2 => drop(hand_poll(Box::pin(pool.reserve(n * BS)), &waker, &mut rng)),
                    3 => {
                        let mut p = PollAllocate::new(Arc::clone(&pool));
                        let cx = &mut Context::from_waker(&waker);
                        for _ in 0..=rng.below(3) {
                            if let Poll::Ready(r) = p.poll_allocate(cx, n) {
                                drop(r);
                                break;
                            }
                        }
                        drop(p);
                    }
                    _ => {
                        if let Ok(mut r) = pool.try_reserve(0) {
                            let _ = hand_poll(Box::pin(r.grow(n * BS)), &waker, &mut rng);
                            drop(r);
                        }
                    }
                });
                ops.fetch_add(1, SeqCst);
            }
        }));
    }
    // The cache refills, and a reclaim_ahead keeps room in the plain pool.
    {
        let (t, stop, bad, cache) = (
            Arc::clone(&t),
            Arc::clone(&stop),
            Arc::clone(&bad),
            Arc::clone(&cache),
        );
        threads.push(thread::spawn(move || {
            let mut ahead = Box::pin(t.plain.reclaim_ahead(2 * BS));
            let waker = Waker::noop();
            let cx = &mut Context::from_waker(waker);
            while !stop.load(SeqCst) {
                if lock(&cache.0).len() < 4 {
                    if let Ok(a) = t.plain.try_allocate(1) {
                        lock(&cache.0).push(a);
                    }
                }
                guarded(&bad, || {
                    let _ = ahead.as_mut().poll(cx);
                });
                thread::yield_now();
            }
            guarded(&bad, || drop(ahead));
        }));
    }
    // Resizes.
    {
        let (t, stop, bad) = (Arc::clone(&t), Arc::clone(&stop), Arc::clone(&bad));
        threads.push(thread::spawn(move || {
            let mut rng = Rng(31_337);
            while !stop.load(SeqCst) {
                let (pool, max) = match rng.below(3) {
                    0 => (&t.root, ROOT),
                    1 => (&t.floored, FLOORED),
                    _ => (&t.plain, PLAIN),
                };
                let buffers = 1 + rng.below(max as u64) as usize;
                guarded(&bad, || match rng.below(4) {
                    0 => {
                        pool.add_max_memory(BS);
                    }
                    1 => {
                        pool.forget_max_memory(BS);
                    }
                    _ => {
                        let _ = pool.set_max_memory(buffers * BS);
                    }
                });
                thread::sleep(Duration::from_micros(200));
            }
        }));
    }

    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < duration {
        thread::sleep(Duration::from_millis(5));
        if close_midway && !closed && started.elapsed() > duration / 2 {
            // Close runs the waiters' wakers, which may panic: passed on, as documented.
            guarded(&bad, || t.root.close());
            closed = true;
        }
    }
    stop.store(true, SeqCst);
    for th in threads {
        th.join()
            .expect("a worker thread panicked outside its guard");
    }
    let bad = std::mem::take(&mut *lock(&bad));
    assert!(bad.is_empty(), "unexpected panics: {bad:?}");
    assert!(ops.load(SeqCst) > 0);

    // The race did what it is for: requests waited, timed out, and reclaim ran.
    let all = [t.root.stats(), t.floored.stats(), t.plain.stats()];
    let waited: usize = all.iter().map(|s| s.waited_allocations).sum();
    let timed_out: usize = all.iter().map(|s| s.timed_out).sum();
    let rounds: usize = all.iter().map(|s| s.reclaim_rounds).sum();
    if std::env::var_os("S30D_LOUD").is_some() {
        eprintln!(
            "ops {} waited {waited} timed out {timed_out} rounds {rounds}",
            ops.load(SeqCst)
        );
    }
    if !cfg!(miri) {
        assert!(waited > 0 && timed_out > 0 && rounds > 0, "{all:?}");
    }

    // Quiescence: everything back.
    drop(std::mem::take(&mut *lock(&cache.0)));
    drop(registration);
    for (pool, max) in [(&t.root, ROOT), (&t.floored, FLOORED), (&t.plain, PLAIN)] {
        if !pool.is_closed() {
            pool.set_max_memory(max * BS).unwrap();
        }
    }
    let floor_held = if t.floored.is_closed() { 0 } else { FLOOR * BS };
    for (name, pool, want) in [
        ("root", &t.root, floor_held),
        ("floored", &t.floored, 0),
        ("plain", &t.plain, 0),
    ] {
        let s = pool.stats();
        assert_eq!(
            (
                s.in_use_bytes,
                s.outstanding,
                s.waiting,
                s.reserved_bytes,
                s.overcommit_bytes
            ),
            (want, 0, 0, 0, 0),
            "{name}: books not exact at quiescence: {s}"
        );
        assert_eq!(pool.report().in_use_bytes, want, "{name}: report");
        assert!(s.mean_wait() <= s.max_wait, "{name}: {s}");
    }
    if !closed {
        // Each serves its whole budget (the root: all but the floor).
        for (name, pool, all) in [
            ("root", &t.root, ROOT - FLOOR),
            ("floored", &t.floored, FLOORED),
            ("plain", &t.plain, PLAIN),
        ] {
            match pool.try_allocate(all) {
                Ok(a) => drop(a),
                Err(e) => panic!("{name}: whole budget not back: {e:?}: {}", pool.stats()),
            }
        }
        t.root.close();
    }
    let mut drained = Box::pin(t.root.drained());
    assert!(
        drained
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready(),
        "root not drained after close: {}",
        t.root.stats()
    );
    drop(drained);
    let t = Arc::try_unwrap(t).ok().expect("every worker is gone");
    drop(t.floored);
    drop(t.plain);
    drop(t.root);
    let _ = AllocError::Closed;
}

#[test]
#[cfg_attr(
    miri,
    ignore = "a timed multi-thread stress: native only (minutes under Miri)"
)]
fn resizes_cancels_and_hostile_wakers_race_every_wait_path() {
    watchdog(30, || run(false));
}

#[test]
#[cfg_attr(
    miri,
    ignore = "a timed multi-thread stress: native only (minutes under Miri)"
)]
fn close_races_every_wait_path() {
    watchdog(30, || run(true));
}
