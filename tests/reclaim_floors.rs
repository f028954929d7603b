//! Reclaim for a request that waits for its own pool's floor (issues 19 and 21 together).
//!
//! A floored pool's requests use its floor before they climb; a request bigger than what
//! the chain above can ever serve beside the floors (the smallest cap above less the floor)
//! must take the rest from its floor, and waits, in no queue, for the floor to have it. When
//! the floor is held by memory a reclaimer of that pool could give back (a cache), the
//! waiting request asks it, as a request waiting in a queue does: otherwise it would wait
//! for good.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::watchdog;
use membudget::{BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reclaimer, ReclaimerHandle};

const B: usize = 64;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: buffers * B,
    }
}

fn root(buffers: usize) -> Arc<BufPool> {
    Arc::new(BufPool::new(cfg(buffers)))
}

fn floored(parent: &BufPool, buffers: usize, floor: usize) -> Arc<BufPool> {
    Arc::new(
        BufPool::builder(cfg(buffers))
            .parent(parent)
            .min_memory(floor * B)
            .build()
            .unwrap(),
    )
}

/// A cache of allocations that frees entries when asked.
#[derive(Default)]
struct Cache {
    entries: Mutex<Vec<BufPoolAllocation>>,
    asked: Mutex<Vec<usize>>,
}

impl Cache {
    fn fill(pool: &BufPool, n: usize) -> Arc<Self> {
        let cache = Arc::new(Cache::default());
        for _ in 0..n {
            cache
                .entries
                .lock()
                .unwrap()
                .push(pool.try_allocate(1).unwrap());
        }
        cache
    }

    fn held(&self) -> usize {
        self.entries.lock().unwrap().len() * B
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
        while freed < target {
            let Some(entry) = entries.pop() else { break };
            freed += entry.allocated_bytes();
        }
        Box::pin(async move { freed })
    }
}

fn register(pool: &BufPool, name: &str, cache: &Arc<Cache>) -> ReclaimerHandle {
    pool.register_reclaimer(name, 0, Arc::clone(cache) as Arc<dyn Reclaimer>)
}

/// Root 8, child floor 4 held whole by the child's cache: a request of 7 can get 4 above the
/// floor and needs 3 of the floor, which only the cache can give back.
#[test]
fn a_request_waiting_for_its_floor_asks_its_pools_cache() {
    watchdog(20, || {
        let r = root(8);
        let c = floored(&r, 16, 4);
        let cache = Cache::fill(&c, 4);
        let _handle = register(&c, "cache", &cache);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let got = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), c.allocate(7)).await });
        let got = got
            .expect("waited for good: the cache in the floor was never asked")
            .unwrap();
        assert_eq!(got.allocated_bytes(), 7 * B);
        // Asked for what was short (3 buffers), no more.
        assert_eq!(*cache.asked.lock().unwrap(), vec![3 * B]);
        assert_eq!(cache.held(), B);
        let stats = c.stats();
        assert_eq!(stats.reclaim_rounds, 1, "{stats}");
        assert_eq!(stats.reclaimed_bytes, 3 * B, "{stats}");
        drop(got);
        drop(cache);
    });
}

/// The same for a blocking waiter.
#[test]
fn a_blocking_request_waiting_for_its_floor_asks_its_pools_cache() {
    watchdog(20, || {
        let r = root(8);
        let c = floored(&r, 16, 4);
        let cache = Cache::fill(&c, 4);
        let _handle = register(&c, "cache", &cache);
        let got = c
            .allocate_timeout(7, Duration::from_secs(5))
            .expect("waited for good: the cache in the floor was never asked");
        assert_eq!(got.allocated_bytes(), 7 * B);
        assert_eq!(cache.held(), B);
    });
}

/// A reclaimer whose futures wait until opened, and count their drops.
struct Gated {
    cache: Arc<Cache>,
    open: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
}

struct GatedFuture {
    cache: Arc<Cache>,
    target: usize,
    open: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
}

impl Future for GatedFuture {
    type Output = usize;
    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<usize> {
        if !self.open.load(SeqCst) {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let mut entries = self.cache.entries.lock().unwrap();
        let mut freed = 0;
        while freed < self.target {
            let Some(entry) = entries.pop() else { break };
            freed += entry.allocated_bytes();
        }
        std::task::Poll::Ready(freed)
    }
}

impl Drop for GatedFuture {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, SeqCst);
    }
}

impl Reclaimer for Gated {
    fn estimate(&self) -> usize {
        self.cache.held()
    }

    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        self.cache.asked.lock().unwrap().push(target);
        Box::pin(GatedFuture {
            cache: Arc::clone(&self.cache),
            target,
            open: Arc::clone(&self.open),
            dropped: Arc::clone(&self.dropped),
        })
    }
}

use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};

/// Registers a gated reclaimer over `cache` on `pool`: its futures wait until `open` is set,
/// and `dropped` counts their drops.
fn register_gated(
    pool: &BufPool,
    cache: &Arc<Cache>,
) -> (ReclaimerHandle, Arc<AtomicBool>, Arc<AtomicUsize>) {
    let open = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicUsize::new(0));
    let gated = Arc::new(Gated {
        cache: Arc::clone(cache),
        open: Arc::clone(&open),
        dropped: Arc::clone(&dropped),
    });
    let handle = pool.register_reclaimer("gated", 0, gated as Arc<dyn Reclaimer>);
    (handle, open, dropped)
}
use std::task::{Context, Poll, Waker};

fn poll<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

/// Lower priority first; each asked for what is still short, and only the floored pool's
/// scope (itself and its descendants) is asked for the floor: the root's cache is asked
/// afterwards, by the root's own round, once the request waits in the root's queue.
#[test]
fn a_floor_round_asks_in_order_for_what_is_short_within_the_floored_scope() {
    watchdog(20, || {
        let r = root(12);
        let c = floored(&r, 16, 6);
        let grandchild = Arc::new(BufPool::builder(cfg(16)).parent(&c).build().unwrap());
        // The floor's 6: 1 in a cache of priority 1, 2 in one of priority 0 (the grandchild's),
        // 3 held by the test. The root's other 6: 6 in the root's own cache.
        let late = Cache::fill(&c, 1);
        let early = Cache::fill(&grandchild, 2);
        let held = c.try_allocate(3).unwrap();
        let root_cache = Cache::fill(&r, 6);
        let _h1 = c.register_reclaimer("late", 1, Arc::clone(&late) as Arc<dyn Reclaimer>);
        let _h2 =
            grandchild.register_reclaimer("early", 0, Arc::clone(&early) as Arc<dyn Reclaimer>);
        let _h3 = r.register_reclaimer("root", 0, Arc::clone(&root_cache) as Arc<dyn Reclaimer>);
        // 9: the root can serve 6 beside the floor, so 3 must come from the floor, which
        // has none free: it waits for the floor. The floor round asks `early` for 3 (frees
        // 2), then `late` for 1. Then it waits at the full root, whose round asks the
        // root's cache for the 6 it needs there.
        let got = c.allocate_timeout(9, Duration::from_secs(5)).unwrap();
        assert_eq!(got.allocated_bytes(), 9 * B);
        assert_eq!(*early.asked.lock().unwrap(), vec![3 * B]);
        assert_eq!(*late.asked.lock().unwrap(), vec![B]);
        assert_eq!(*root_cache.asked.lock().unwrap(), vec![6 * B]);
        assert_eq!(early.held() + late.held() + root_cache.held(), 0);
        assert_eq!(c.stats().reclaim_rounds, 1);
        assert_eq!(r.stats().reclaim_rounds, 1);
        drop((got, held));
        drop((_h1, _h2, _h3, late, early, root_cache));
        let stats = c.stats();
        assert_eq!(stats.in_use_bytes, 0, "{stats}");
        assert_eq!(
            r.stats().in_use_bytes,
            6 * B,
            "the idle floor: {}",
            r.stats()
        );
    });
}

/// A floor round that frees nothing stalls until the pool changes (no storm of rounds),
/// and the release that changes it serves the waiter.
#[test]
fn a_floor_round_that_frees_nothing_is_not_retried_until_a_release() {
    watchdog(20, || {
        let r = root(8);
        let c = floored(&r, 16, 4);
        let empty = Arc::new(Cache::default());
        let _h = c.register_reclaimer("empty", 0, Arc::clone(&empty) as Arc<dyn Reclaimer>);
        let holder = c.try_allocate(4).unwrap();
        let mut request = Box::pin(c.allocate(7));
        for _ in 0..5 {
            assert!(poll(request.as_mut()).is_pending());
        }
        assert_eq!(c.stats().reclaim_rounds, 1, "{}", c.stats());
        drop(holder);
        let Poll::Ready(Ok(got)) = poll(request.as_mut()) else {
            panic!("the release refilled the floor: {}", c.stats())
        };
        assert_eq!(got.allocated_bytes(), 7 * B);
        drop(got);
        assert_eq!(c.stats().in_use_bytes, 0);
        assert_eq!(r.stats().in_use_bytes, 4 * B);
    });
}

/// The driver of a floor round is cancelled while its reclaimer's future is pending: the
/// future is dropped, and another request waiting for the floor starts the next round.
#[test]
fn a_cancelled_floor_driver_drops_its_round_and_the_next_waiter_drives() {
    watchdog(20, || {
        let r = root(8);
        let c = floored(&r, 16, 4);
        let cache = Cache::fill(&c, 4);
        let (handle, open, dropped) = register_gated(&c, &cache);
        let mut first = Box::pin(c.allocate(6));
        let mut second = Box::pin(c.allocate(5));
        assert!(poll(first.as_mut()).is_pending());
        assert!(poll(second.as_mut()).is_pending());
        assert_eq!(
            *cache.asked.lock().unwrap(),
            vec![2 * B],
            "one round, the first's"
        );
        drop(first);
        assert_eq!(
            dropped.load(SeqCst),
            1,
            "the round's future dropped with its driver"
        );
        open.store(true, SeqCst);
        let Poll::Ready(Ok(got)) = poll(second.as_mut()) else {
            panic!("the second drives its own round: {}", c.stats())
        };
        assert_eq!(*cache.asked.lock().unwrap(), vec![2 * B, B]);
        assert_eq!(got.allocated_bytes(), 5 * B);
        drop(got);
        drop(second);
        assert_eq!(c.stats().reclaim_rounds, 2);
        assert_eq!(cache.held(), 3 * B);
        drop((handle, cache));
        assert_eq!(c.stats().in_use_bytes, 0);
        assert_eq!(r.stats().in_use_bytes, 4 * B);
    });
}

/// The floor gets room another way (a release) while the round's future is pending: the
/// request takes it, climbs, and queues at the full root; the floor round it drove ends
/// (its future dropped): it no longer waits for the floor.
#[test]
fn a_floor_round_ends_once_its_driver_no_longer_waits_for_the_floor() {
    watchdog(20, || {
        let r = root(8);
        let c = floored(&r, 16, 4);
        let cache = Cache::fill(&c, 3);
        let holder = c.try_allocate(1).unwrap();
        let (handle, _open, dropped) = register_gated(&c, &cache);
        let mut request = Box::pin(c.allocate(5));
        assert!(poll(request.as_mut()).is_pending());
        assert_eq!(*cache.asked.lock().unwrap(), vec![B]);
        // The root's other 4 go to a root allocation; the holder's buffer refills the floor.
        let root_held = r.try_allocate(4).unwrap();
        drop(holder);
        assert!(poll(request.as_mut()).is_pending(), "waits at the root now");
        assert_eq!(dropped.load(SeqCst), 1, "the floor round ended");
        assert_eq!(r.stats().waiting, 1);
        drop(root_held);
        let Poll::Ready(Ok(got)) = poll(request.as_mut()) else {
            panic!("served at the root: {}", r.stats())
        };
        assert_eq!(got.allocated_bytes(), 5 * B);
        drop(got);
        drop(request);
        assert_eq!(cache.held(), 3 * B, "nothing was taken from the cache");
        drop((handle, cache));
        assert_eq!(c.stats().in_use_bytes, 0);
        assert_eq!(r.stats().in_use_bytes, 4 * B);
    });
}

/// Closing the floored pool fails the request waiting for its floor at once, even while its
/// round's future is pending; the round's future goes with it.
#[test]
fn close_fails_a_floor_waiter_while_its_round_is_pending() {
    watchdog(20, || {
        let r = root(8);
        let c = floored(&r, 16, 4);
        let cache = Cache::fill(&c, 4);
        let (handle, _open, dropped) = register_gated(&c, &cache);
        let waiter = {
            let c = Arc::clone(&c);
            std::thread::spawn(move || c.allocate_blocking(7).map(drop))
        };
        common::wait_until(10, "the round's future is asked", || {
            !cache.asked.lock().unwrap().is_empty()
        });
        c.close();
        assert_eq!(waiter.join().unwrap(), Err(membudget::AllocError::Closed));
        assert_eq!(dropped.load(SeqCst), 1);
        drop((handle, cache));
        assert_eq!(c.stats().in_use_bytes, 0);
    });
}
