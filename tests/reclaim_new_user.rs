//! Cooperative reclaim (issue 21; README "Reclaim", guarantee 17) as a new user writes it:
//! every waiting form drives reclaim (reservations, owned futures, poll-style, blocking), the
//! shortfall and the targets, the no-storm rule and what wakes a stalled pool (a release, a
//! registration, a resize), overcommit beside reclaim, `reclaim_ahead` hearing of pressure,
//! and the statistics and report of reclaim. Every test runs under a watchdog.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

mod common;

use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reclaimer};

const B: usize = 64;

fn cfg(buffers: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: buffers * B,
    }
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

/// How the cache answers one `reclaim` call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    /// Frees single-buffer entries until `target` is covered.
    Honest,
    /// Frees nothing.
    Nothing,
    /// Frees at most one entry, whatever the target (an LRU that evicts one entry a call).
    One,
    /// Frees entries until the target is covered, in its future, after `n` pending polls that
    /// wake themselves.
    Later(usize),
}

/// A cache of single-buffer entries; answers each call with the next scripted `Answer`
/// (the last one repeats), logging the targets it was asked for.
struct Cache {
    entries: Mutex<Vec<BufPoolAllocation>>,
    script: Mutex<Vec<Answer>>,
    asked: Mutex<Vec<usize>>,
    futures_alive: Arc<AtomicUsize>,
}

impl Cache {
    fn new(entries: Vec<BufPoolAllocation>, script: &[Answer]) -> Arc<Cache> {
        Arc::new(Cache {
            entries: Mutex::new(entries),
            script: Mutex::new(script.iter().rev().copied().collect()),
            asked: Mutex::new(Vec::new()),
            futures_alive: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn held(&self) -> usize {
        self.entries.lock().unwrap().len() * B
    }

    fn asked(&self) -> Vec<usize> {
        self.asked.lock().unwrap().clone()
    }

    fn take_up_to(&self, target: usize) -> Vec<BufPoolAllocation> {
        let mut entries = self.entries.lock().unwrap();
        let mut taken = Vec::new();
        while taken.len() * B < target {
            let Some(entry) = entries.pop() else { break };
            taken.push(entry);
        }
        taken
    }

    fn next_answer(&self) -> Answer {
        let mut script = self.script.lock().unwrap();
        if script.len() > 1 {
            script.pop().unwrap()
        } else {
            *script.last().expect("a script")
        }
    }
}

struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Reclaimer for Cache {
    fn estimate(&self) -> usize {
        self.held()
    }

    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        self.asked.lock().unwrap().push(target);
        self.futures_alive.fetch_add(1, SeqCst);
        let alive = Alive(Arc::clone(&self.futures_alive));
        match self.next_answer() {
            Answer::Honest => {
                let freed = self.take_up_to(target).len() * B;
                Box::pin(async move {
                    drop(alive);
                    freed
                })
            }
            Answer::Nothing => Box::pin(async move {
                drop(alive);
                0
            }),
            Answer::One => {
                let freed = self.take_up_to(1).len() * B;
                Box::pin(async move {
                    drop(alive);
                    freed
                })
            }
            Answer::Later(polls) => {
                let mut taken = Some(self.take_up_to(target));
                let mut left = polls;
                Box::pin(std::future::poll_fn(move |cx| {
                    let _alive = &alive;
                    if left > 0 {
                        left -= 1;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    let taken = taken.take().unwrap_or_default();
                    Poll::Ready(taken.len() * B)
                }))
            }
        }
    }
}

/// Nothing in use, outstanding, waiting or reserved, and the whole budget allocatable.
#[track_caller]
fn assert_drained(pool: &BufPool) {
    let stats = pool.stats();
    assert_eq!(
        (
            stats.in_use_bytes,
            stats.outstanding,
            stats.waiting,
            stats.reserved_bytes,
            stats.overcommit_bytes
        ),
        (0, 0, 0, 0, 0),
        "not drained: {stats}"
    );
    common::assert_full_budget_back(pool);
}

// ---- overcommit beside reclaim ----

/// README "Reclaim": the shortfall is "what the head of its queue needs beyond the free
/// room", and reservations' `force_grow` overcommit "is repaid first: no request is granted
/// in an overcommitted pool until releases bring it back under its budget". One cache holds
/// plenty; an honest reclaimer freeing what it is asked. The waiter must be served by
/// reclaim (the cache holds enough to repay the overcommit and serve it).
#[test]
fn overcommitted_pool_with_one_honest_cache_serves_the_waiter() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(8)));
        let cache = Cache::new(entries(&pool, 4), &[Answer::Honest]);
        let handle = pool.register_reclaimer("cache", 0, Arc::clone(&cache) as _);
        let mut r = pool.try_reserve(4 * B).unwrap();
        r.force_grow(2 * B).unwrap();
        assert_eq!(pool.stats().overcommit_bytes, 2 * B);
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.allocate_timeout(2, Duration::from_secs(3)))
        };
        let got = waiter.join().unwrap();
        let stats = pool.stats();
        assert!(
            got.is_ok(),
            "waiter not served: {got:?}; cache still holds {} bytes, asked {:?}; {stats}",
            cache.held(),
            cache.asked()
        );
        drop(got);
        drop(r);
        drop(handle);
        drop(cache);
        assert_drained(&pool);
    });
}

// ---- what ends a stall: a resize, a registration, a release ----

/// Issue 21: "A round that frees nothing is not retried until the pool's state changes (a
/// release, a new registration, a resize) ...; and when the state does change, a waiting
/// request is woken to try again". A resize that does not by itself serve the head must
/// still wake it so that it reclaims again. `change` is the resize.
fn a_resize_after_a_stall_wakes_the_head(change: fn(&BufPool)) {
    let pool = Arc::new(BufPool::new(cfg(8)));
    // Busy the first time it is asked (frees nothing), honest afterwards.
    let cache = Cache::new(entries(&pool, 4), &[Answer::Nothing, Answer::Honest]);
    let _handle = pool.register_reclaimer("cache", 0, Arc::clone(&cache) as _);
    let others = entries(&pool, 4);
    let waiter = {
        let pool = Arc::clone(&pool);
        std::thread::spawn(move || {
            let got = pool.allocate_timeout(4, Duration::from_secs(3));
            (got, std::time::Instant::now())
        })
    };
    common::wait_until(5, "the first round to end", || {
        pool.stats().reclaim_rounds == 1 && pool.stats().waiting == 1
    });
    // Stalled now: give the driver time to (not) start another round.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(pool.stats().reclaim_rounds, 1, "no storm");
    let changed = std::time::Instant::now();
    change(&pool);
    let (got, served) = waiter.join().unwrap();
    assert!(
        got.is_ok(),
        "not served after the resize: {got:?}, asked {:?}, {}",
        cache.asked(),
        pool.stats()
    );
    // Served by a wake-up, not by the timeout's last look at its deadline.
    let after = served.duration_since(changed);
    assert!(
        after < Duration::from_secs(1),
        "served {after:?} after the resize: the resize woke nobody, the deadline's last poll reclaimed"
    );
    assert_eq!(pool.stats().reclaim_rounds, 2);
    drop((got, others));
}

#[test]
fn a_budget_grow_that_does_not_serve_the_head_still_wakes_it_to_reclaim() {
    watchdog(|| {
        a_resize_after_a_stall_wakes_the_head(|pool| {
            pool.add_max_memory(B);
        })
    });
}

#[test]
fn set_max_memory_after_a_stall_wakes_the_head_to_reclaim() {
    watchdog(|| {
        a_resize_after_a_stall_wakes_the_head(|pool| pool.set_max_memory(9 * B).unwrap());
    });
}

#[test]
fn a_budget_shrink_after_a_stall_wakes_the_head_to_reclaim() {
    // 8 -> 7 buffers: 4 in use by others, 4 by the cache; the head (4) still fits the cap.
    watchdog(|| {
        a_resize_after_a_stall_wakes_the_head(|pool| {
            pool.forget_max_memory(B);
        })
    });
}

/// README: "A registration alone wakes the heads of its pool's and ancestors' queues (it may
/// serve them)". A root waiter stalled by a cache that frees nothing; a cache registered on
/// a child (the root's scope includes its descendants) serves it, with no release at all.
#[test]
fn a_registration_on_a_child_serves_a_stalled_root_waiter() {
    watchdog(|| {
        let root = Arc::new(BufPool::new(cfg(8)));
        let child = root.child("child", cfg(8)).unwrap();
        let useless = Cache::new(Vec::new(), &[Answer::Nothing]);
        let _h1 = root.register_reclaimer("useless", 0, Arc::clone(&useless) as _);
        let child_cache = Cache::new(entries(&child, 4), &[Answer::Honest]);
        let others = entries(&root, 4);
        let waiter = {
            let root = Arc::clone(&root);
            std::thread::spawn(move || root.allocate_timeout(3, Duration::from_secs(3)))
        };
        common::wait_until(5, "the first round to end", || {
            root.stats().reclaim_rounds == 1 && root.stats().waiting == 1
        });
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(root.stats().reclaim_rounds, 1);
        let h2 = child.register_reclaimer("child-cache", 5, Arc::clone(&child_cache) as _);
        let got = waiter.join().unwrap();
        assert!(got.is_ok(), "{got:?} {}", root.stats());
        assert_eq!(child_cache.asked(), [3 * B]);
        assert_eq!(
            child.stats().reclaim_rounds,
            0,
            "counted where it was short"
        );
        assert_eq!(root.stats().reclaim_rounds, 2);
        drop((got, others, h2));
        drop(child_cache);
        drop(child);
        assert_drained(&root);
    });
}

// ---- every waiting form drives reclaim ----

/// README: "the waiting request itself, in its own poll (async) or the blocking shim's loop"
/// drives a round: every form that waits, reservations and owned futures included. A pool
/// of 8 buffers a cache holds whole; each form asks for 3 buffers' worth and is served by
/// one round that asks the cache for exactly that.
#[test]
fn every_waiting_form_drives_reclaim() {
    type Form = fn(&Arc<BufPool>) -> Box<dyn Send>;
    let forms: [(&str, Form); 12] = [
        ("allocate", |p| {
            Box::new(futures::executor::block_on(p.allocate(3)).unwrap())
        }),
        ("allocate_zeroed", |p| {
            Box::new(futures::executor::block_on(p.allocate_zeroed(3)).unwrap())
        }),
        ("allocate_blocking", |p| {
            Box::new(p.allocate_blocking(3).unwrap())
        }),
        ("allocate_zeroed_timeout", |p| {
            Box::new(
                p.allocate_zeroed_timeout(3, Duration::from_secs(5))
                    .unwrap(),
            )
        }),
        ("allocate_owned", |p| {
            let owned = Arc::clone(p).allocate_owned(3);
            Box::new(futures::executor::block_on(owned).unwrap())
        }),
        ("poll_allocate", |p| {
            let mut poller = membudget::PollAllocate::new(Arc::clone(p));
            let got =
                futures::executor::block_on(std::future::poll_fn(|cx| poller.poll_allocate(cx, 3)));
            Box::new(got.unwrap())
        }),
        ("reserve", |p| {
            Box::new(futures::executor::block_on(p.reserve(3 * B)).unwrap())
        }),
        ("reserve_blocking", |p| {
            Box::new(p.reserve_blocking(3 * B).unwrap())
        }),
        ("reserve_timeout", |p| {
            Box::new(p.reserve_timeout(3 * B, Duration::from_secs(5)).unwrap())
        }),
        ("reserve_owned", |p| {
            Box::new(futures::executor::block_on(Arc::clone(p).reserve_owned(3 * B)).unwrap())
        }),
        ("grow", |p| {
            let mut r = p.try_reserve(0).unwrap();
            futures::executor::block_on(r.grow(3 * B)).unwrap();
            Box::new(r)
        }),
        ("grow_blocking", |p| {
            let mut r = p.try_reserve(0).unwrap();
            r.grow_blocking(3 * B).unwrap();
            Box::new(r)
        }),
    ];
    watchdog(move || {
        for (name, form) in forms {
            let pool = Arc::new(BufPool::new(cfg(8)));
            let cache = Cache::new(entries(&pool, 8), &[Answer::Honest]);
            let handle = pool.register_reclaimer("cache", 0, Arc::clone(&cache) as _);
            let got = form(&pool);
            let stats = pool.stats();
            assert_eq!(cache.asked(), [3 * B], "{name}");
            assert_eq!(
                (
                    stats.reclaim_rounds,
                    stats.reclaimed_bytes,
                    stats.in_use_bytes
                ),
                (1, 3 * B, 8 * B),
                "{name}: {stats}"
            );
            drop(got);
            drop(handle);
            drop(cache);
            assert_drained(&pool);
        }
    });
}

/// The same forms on a child short at the root: the root's round, a sibling's cache asked.
#[test]
fn child_forms_short_at_the_root_ask_a_siblings_cache() {
    watchdog(|| {
        for form in 0..4 {
            let root = Arc::new(BufPool::new(cfg(8)));
            let a = root.child("a", cfg(8)).unwrap();
            let b = Arc::new(root.child("b", cfg(8)).unwrap());
            let cache = Cache::new(entries(&a, 8), &[Answer::Honest]);
            let handle = a.register_reclaimer("a-cache", 0, Arc::clone(&cache) as _);
            let got: Box<dyn Send> = match form {
                0 => Box::new(b.allocate_blocking(2).unwrap()),
                1 => {
                    Box::new(futures::executor::block_on(Arc::clone(&b).allocate_owned(2)).unwrap())
                }
                2 => Box::new(b.reserve_blocking(2 * B).unwrap()),
                _ => {
                    let mut r = b.try_reserve(0).unwrap();
                    r.grow_blocking(2 * B).unwrap();
                    Box::new(r)
                }
            };
            assert_eq!(cache.asked(), [2 * B], "form {form}");
            assert_eq!(root.stats().reclaim_rounds, 1, "form {form}");
            assert_eq!((a.stats().reclaim_rounds, b.stats().reclaim_rounds), (0, 0));
            assert_eq!(root.stats().in_use_bytes, 8 * B);
            drop(got);
            drop(handle);
            drop(cache);
            drop((a, b));
            assert_drained(&root);
        }
    });
}

// ---- the driver leaves, changes, or is not the head ----

/// `PollAllocate::poll_allocate` with a different `n` "gives that request up first": the
/// round it drove ends (its reclaimer's future dropped) before the new request starts its
/// own ("its future dropped before any new round starts"), and the new request is served by
/// reclaim with exact books.
#[test]
fn poll_allocate_changing_n_while_driving_a_pending_round() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(8)));
        // First call: a future that stays pending (waking itself) for a long time.
        let cache = Cache::new(
            entries(&pool, 8),
            &[Answer::Later(usize::MAX), Answer::Honest],
        );
        let handle = pool.register_reclaimer("cache", 0, Arc::clone(&cache) as _);
        let mut poller = membudget::PollAllocate::new(Arc::clone(&pool));
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..3 {
            assert!(poller.poll_allocate(&mut cx, 2).is_pending());
        }
        assert_eq!(cache.asked(), [2 * B]);
        assert_eq!(cache.futures_alive.load(SeqCst), 1);
        // The pending future holds the two entries it took: they are not back yet.
        assert_eq!(pool.stats().in_use_bytes, 8 * B);
        // A new n: the old request and its round go; the new request reclaims for itself.
        let got = loop {
            match poller.poll_allocate(&mut cx, 3) {
                Poll::Ready(got) => break got.unwrap(),
                Poll::Pending => {
                    assert!(cache.futures_alive.load(SeqCst) <= 1);
                    std::thread::yield_now();
                }
            }
        };
        assert_eq!(cache.futures_alive.load(SeqCst), 0);
        let stats = pool.stats();
        assert_eq!(stats.reclaim_rounds, 2, "{stats}");
        // The dropped future gave its two entries back: the new round was short of one.
        assert_eq!(cache.asked(), [2 * B, B]);
        assert_eq!(
            (stats.in_use_bytes, stats.waiting),
            (3 * B + cache.held(), 0)
        );
        drop(got);
        drop(poller);
        drop(handle);
        drop(cache);
        assert_drained(&pool);
    });
}

/// The round is for the head's shortfall, whoever drives it: a request behind the head
/// that drives the round asks for what the head still needs (never more than the head's
/// request); the head is served by FIFO, then the driver reclaims for itself.
#[test]
fn a_driver_behind_the_head_reclaims_for_the_head_first() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(8)));
        let held = entries(&pool, 8);
        // The head queues while there is no reclaimer: no round.
        let mut head = Box::pin(pool.allocate(1));
        assert!(poll_once(head.as_mut()).is_pending());
        let mut big = Box::pin(pool.allocate(5));
        assert!(poll_once(big.as_mut()).is_pending());
        assert_eq!(pool.stats().reclaim_rounds, 0);
        let cache = Cache::new(held, &[Answer::Honest]);
        let handle = pool.register_reclaimer("cache", 0, Arc::clone(&cache) as _);
        // Only the big one is polled: it drives the round for the head (1 buffer short).
        assert!(poll_once(big.as_mut()).is_pending());
        assert_eq!(cache.asked()[0], B, "asked for the head's shortfall");
        // The head was granted by FIFO without being polled; the big one reclaims next.
        let got = futures::executor::block_on(big.as_mut()).unwrap();
        let Poll::Ready(Ok(head_got)) = poll_once(head.as_mut()) else {
            panic!("the head was not served")
        };
        assert_eq!(cache.asked(), [B, 5 * B]);
        assert_eq!(pool.stats().in_use_bytes, 6 * B + cache.held());
        drop((got, head_got, head, big, handle, cache));
        assert_drained(&pool);
    });
}

// ---- reclaim_ahead hears of pressure ----

/// README "Ahead of need": `reclaim_ahead(low_water)` "sleeps while the free room is at or
/// above `low_water`; when a reservation leaves it below, or a `try_` call is refused ...,
/// it runs rounds ... (shortfall: what is missing up to the mark) until the room is back";
/// its rustdoc adds "or a registration or a resize changes the picture". `push` makes the
/// room fall below the mark (4 of 8 buffers in a cache, mark 2 buffers); the cache must be
/// asked for what is missing up to the mark, and the room come back, with nobody waiting.
fn reclaim_ahead_hears(name: &str, push: fn(&BufPool) -> Box<dyn Send>, missing: usize) {
    let pool = Arc::new(BufPool::new(cfg(8)));
    let cache = Cache::new(entries(&pool, 4), &[Answer::Honest]);
    let handle = pool.register_reclaimer("cache", 0, Arc::clone(&cache) as _);
    let ahead = {
        let ahead = pool.reclaim_ahead(2 * B);
        std::thread::spawn(move || futures::executor::block_on(ahead))
    };
    // Asleep above the mark.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(pool.stats().reclaim_rounds, 0, "{name}");
    let pushed = push(&pool);
    common::wait_until(5, name, || pool.stats().reclaim_rounds >= 1);
    common::wait_until(5, name, || pool.stats().available_bytes() >= 2 * B);
    assert_eq!(cache.asked(), [missing], "{name}");
    assert_eq!(pool.stats().waiting, 0);
    pool.close();
    ahead.join().unwrap();
    drop((pushed, handle, cache));
}

#[test]
#[cfg_attr(miri, ignore = "nine pools and sleeps: too slow under Miri")]
fn reclaim_ahead_hears_a_reservation_a_grow_a_refusal_and_a_resize() {
    watchdog(|| {
        reclaim_ahead_hears(
            "try_reserve",
            |p| Box::new(p.try_reserve(3 * B).unwrap()),
            B,
        );
        reclaim_ahead_hears(
            "reserve().await at once",
            |p| Box::new(futures::executor::block_on(p.reserve(3 * B + 8)).unwrap()),
            B + 8,
        );
        reclaim_ahead_hears(
            "try_grow",
            |p| {
                let mut r = p.try_reserve(B).unwrap();
                r.try_grow(2 * B).unwrap();
                Box::new(r)
            },
            B,
        );
        reclaim_ahead_hears(
            "grow().await at once",
            |p| {
                let mut r = p.try_reserve(B).unwrap();
                futures::executor::block_on(r.grow(2 * B)).unwrap();
                Box::new(r)
            },
            B,
        );
        reclaim_ahead_hears(
            "resize_to",
            |p| {
                let mut r = p.try_reserve(B).unwrap();
                r.resize_to(4 * B).unwrap();
                Box::new(r)
            },
            2 * B,
        );
        reclaim_ahead_hears(
            "force_grow",
            |p| {
                let mut r = p.try_reserve(0).unwrap();
                r.force_grow(3 * B).unwrap();
                Box::new(r)
            },
            B,
        );
        reclaim_ahead_hears(
            "a refused try_allocate",
            |p| {
                let a = p.try_allocate(3).unwrap();
                assert_eq!(p.try_allocate(2).unwrap_err(), AllocError::WouldBlock);
                Box::new(a)
            },
            B,
        );
        reclaim_ahead_hears(
            "set_max_memory",
            |p| {
                p.set_max_memory(5 * B).unwrap();
                Box::new(())
            },
            B,
        );
        reclaim_ahead_hears(
            "forget_max_memory",
            |p| {
                p.forget_max_memory(3 * B);
                Box::new(())
            },
            B,
        );
    });
}

/// `reclaim_ahead` started below its mark with no reclaimer: asleep; a registration "changes
/// the picture" and the new cache is asked.
#[test]
fn reclaim_ahead_below_its_mark_asks_a_new_registration() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(8)));
        let held = entries(&pool, 8);
        let ahead = {
            let ahead = pool.reclaim_ahead(3 * B);
            std::thread::spawn(move || futures::executor::block_on(ahead))
        };
        std::thread::sleep(Duration::from_millis(20));
        // (It may count a round that found nobody to ask; it must not spin.)
        let rounds = pool.stats().reclaim_rounds;
        assert!(rounds <= 1, "{}", pool.stats());
        let cache = Cache::new(held, &[Answer::Honest]);
        let handle = pool.register_reclaimer("late", 0, Arc::clone(&cache) as _);
        common::wait_until(5, "the room back at the mark", || {
            pool.stats().available_bytes() >= 3 * B
        });
        assert_eq!(cache.asked(), [3 * B]);
        pool.close();
        ahead.join().unwrap();
        drop((handle, cache));
        assert_eq!(pool.stats().in_use_bytes, 0);
    });
}

// ---- what stats() and report() show ----

/// README "Visible": `stats()` has `reclaim_rounds`, `reclaim_asked_bytes`,
/// `reclaimed_bytes`, `reclaim_time`; `report()` "lists each reclaimer (name, priority,
/// estimate now, times asked, bytes asked and freed), in the order a round asks them"; a
/// child's reclaimers are listed under the child in the tree's report, and the round is
/// counted at the pool where the request was short.
#[test]
fn stats_and_report_add_up_over_a_round_across_the_tree() {
    watchdog(|| {
        let root = Arc::new(BufPool::builder(cfg(8)).name("root").build().unwrap());
        let child = root.child("kid", cfg(8)).unwrap();
        // "lru" frees one entry a call (priority 0, asked first); "kid-cache" is honest.
        let lru = Cache::new(entries(&root, 4), &[Answer::One]);
        let kid_cache = Cache::new(entries(&child, 4), &[Answer::Later(3)]);
        let h1 = root.register_reclaimer("lru", 0, Arc::clone(&lru) as _);
        let h2 = child.register_reclaimer("kid-cache", 1, Arc::clone(&kid_cache) as _);
        let got = root.allocate_blocking(3).unwrap();
        assert_eq!(lru.asked(), [3 * B]);
        assert_eq!(kid_cache.asked(), [2 * B]);
        let stats = root.stats();
        assert_eq!(
            (
                stats.reclaim_rounds,
                stats.reclaim_asked_bytes,
                stats.reclaimed_bytes
            ),
            (1, 5 * B, 3 * B),
            "{stats}"
        );
        assert!(stats.reclaim_time > Duration::ZERO);
        let shown = stats.to_string();
        assert!(
            shown.contains("1 reclaim rounds freed 192 of 320 bytes asked"),
            "{shown}"
        );
        let kid = child.stats();
        assert_eq!(
            (
                kid.reclaim_rounds,
                kid.reclaim_asked_bytes,
                kid.reclaimed_bytes
            ),
            (0, 0, 0)
        );

        let tree = root.tree_report();
        let listed: Vec<_> = tree
            .reclaimers
            .iter()
            .map(|r| {
                (
                    r.name.to_string(),
                    r.priority,
                    r.estimate,
                    r.times_asked,
                    r.asked_bytes,
                    r.reclaimed_bytes,
                )
            })
            .collect();
        assert_eq!(listed, [("lru".to_owned(), 0, 3 * B, 1, 3 * B, B)]);
        let kid_report = tree
            .children
            .iter()
            .find(|c| c.describes(&child))
            .expect("the child in the tree");
        let listed: Vec<_> = kid_report
            .reclaimers
            .iter()
            .map(|r| {
                (
                    r.name.to_string(),
                    r.estimate,
                    r.times_asked,
                    r.asked_bytes,
                    r.reclaimed_bytes,
                )
            })
            .collect();
        assert_eq!(listed, [("kid-cache".to_owned(), 2 * B, 1, 2 * B, 2 * B)]);
        let text = tree.to_string();
        assert!(
            text.contains("reclaimer \"lru\" (priority 0): estimate 192 bytes, asked 1 times for 192 bytes, freed 64"),
            "{text}"
        );
        assert!(
            text.contains("reclaimer \"kid-cache\" (priority 1)"),
            "{text}"
        );
        // The report of the child alone lists its own.
        assert_eq!(child.report().reclaimers.len(), 1);
        drop((got, h1, h2, lru, kid_cache, child));
        assert_drained(&root);
    });
}

/// The order is read from the estimates at each round's start: a reclaimer that was largest
/// in the first round and is smallest in the next is asked second then (same priority), and
/// `report()` follows the same order at every instant.
#[test]
fn estimate_order_is_read_anew_for_every_round() {
    watchdog(|| {
        let pool = BufPool::new(cfg(8));
        let x = Cache::new(entries(&pool, 5), &[Answer::Honest]);
        let y = Cache::new(entries(&pool, 3), &[Answer::Honest]);
        let hx = pool.register_reclaimer("x", 7, Arc::clone(&x) as _);
        let hy = pool.register_reclaimer("y", 7, Arc::clone(&y) as _);
        let order = |pool: &BufPool| -> Vec<String> {
            pool.report()
                .reclaimers
                .iter()
                .map(|r| r.name.to_string())
                .collect()
        };
        assert_eq!(order(&pool), ["x", "y"]);
        // Round 1: x (5) first, asked for 3, keeps 2.
        let first = pool.allocate_blocking(3).unwrap();
        assert_eq!((x.asked(), y.asked()), (vec![3 * B], vec![]));
        assert_eq!(order(&pool), ["y", "x"]);
        // Round 2: y (3) first now, asked for 2, keeps 1.
        let second = pool.allocate_blocking(2).unwrap();
        assert_eq!((x.asked(), y.asked()), (vec![3 * B], vec![2 * B]));
        // Equal estimates (2 and 1 -> make them equal): registration order breaks the tie.
        drop(x.take_up_to(B));
        assert_eq!((x.held(), y.held()), (B, B));
        assert_eq!(order(&pool), ["x", "y"]);
        let third = pool.allocate_blocking(2).unwrap();
        assert_eq!((x.asked(), y.asked()), (vec![3 * B, B], vec![2 * B]));
        assert_eq!(order(&pool), ["y", "x"]);
        drop((first, second, third, hx, hy, x, y));
        assert_drained(&pool);
    });
}

// ---- depth ----

/// README: child pools are "nested to any depth", and "a child's request that waits at an
/// ancestor's level reclaims at that ancestor's scope". A request from the bottom of a chain
/// `depth` pools deep, short only at the root, where a cache holds the whole budget.
fn deep_request_reclaims_at_the_root(depth: usize) {
    let root = Arc::new(BufPool::new(cfg(8)));
    let cache = Cache::new(entries(&root, 8), &[Answer::Honest]);
    let handle = root.register_reclaimer("root-cache", 0, Arc::clone(&cache) as _);
    let mut chain: Vec<BufPool> = Vec::with_capacity(depth);
    for level in 0..depth {
        let parent = chain.last().map_or(&*root, |p| p);
        let child = parent.child(format!("level-{level}"), cfg(8)).unwrap();
        chain.push(child);
    }
    let bottom = chain.last().unwrap();
    let got = bottom.allocate_timeout(2, Duration::from_secs(2));
    let stats = root.stats();
    assert!(
        got.is_ok(),
        "depth {depth}: {got:?}; asked {:?}; root: {stats}",
        cache.asked()
    );
    assert_eq!(cache.asked(), [2 * B]);
    assert_eq!(stats.reclaim_rounds, 1);
    drop(got);
    while let Some(pool) = chain.pop() {
        drop(pool);
    }
    drop((handle, cache));
    assert_drained(&root);
}

#[test]
fn a_request_200_pools_deep_reclaims_at_the_root() {
    watchdog(|| deep_request_reclaims_at_the_root(common::rounds(200, 20)));
}

#[test]
// Minutes under Miri (a chain walks its levels per level); the 200-deep one runs there.
#[cfg_attr(miri, ignore)]
fn a_request_300_pools_deep_reclaims_at_the_root() {
    watchdog(|| deep_request_reclaims_at_the_root(300));
}

// ---- reclaimers as users write them ----

/// A reclaimer built from closures, for one-off shapes.
struct Custom<E, R>
where
    E: Fn() -> usize + Send + Sync + 'static,
    R: Fn(usize) -> Pin<Box<dyn Future<Output = usize> + Send>> + Send + Sync + 'static,
{
    estimate: E,
    reclaim: R,
}

impl<E, R> Reclaimer for Custom<E, R>
where
    E: Fn() -> usize + Send + Sync + 'static,
    R: Fn(usize) -> Pin<Box<dyn Future<Output = usize> + Send>> + Send + Sync + 'static,
{
    fn estimate(&self) -> usize {
        (self.estimate)()
    }
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        (self.reclaim)(target)
    }
}

/// Issue 21: a reclaimer frees "by dropping or shrinking its own allocations /
/// reservations". A buffered-batch holder keeps a reservation and shrinks it by the target
/// (`shrink`, in its future); a waiter is served, and the reservation's exact size shows it.
#[test]
fn a_reclaimer_that_shrinks_its_reservation() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(8)));
        let reservation = Arc::new(Mutex::new(pool.try_reserve(6 * B).unwrap()));
        let held = entries(&pool, 2);
        let shrinker = Arc::new(Custom {
            estimate: {
                let r = Arc::clone(&reservation);
                move || r.lock().unwrap().size()
            },
            reclaim: {
                let r = Arc::clone(&reservation);
                move |target| {
                    let r = Arc::clone(&r);
                    Box::pin(async move {
                        let mut r = r.lock().unwrap();
                        let less = target.min(r.size());
                        r.shrink(less);
                        less
                    }) as Pin<Box<dyn Future<Output = usize> + Send>>
                }
            },
        });
        let handle = pool.register_reclaimer("batch", 0, shrinker);
        let got = futures::executor::block_on(pool.allocate(3)).unwrap();
        assert_eq!(reservation.lock().unwrap().size(), 3 * B);
        let stats = pool.stats();
        assert_eq!((stats.in_use_bytes, stats.reclaimed_bytes), (8 * B, 3 * B));
        // A reservation request of an odd size: asked for what it needs, rounded to 8.
        drop(held);
        let r2 = futures::executor::block_on(pool.reserve(2 * B + 100)).unwrap();
        assert_eq!(r2.size(), 2 * B + 104);
        assert_eq!(reservation.lock().unwrap().size(), 3 * B - 104);
        drop((got, r2, handle));
        drop(reservation);
        assert_drained(&pool);
    });
}

/// A cache of frozen `Bytes` (the `bytes` feature: "the pool's bytes stay reserved until the
/// last clone or slice of that `Bytes` is dropped"): reclaim drops its clones, and only the
/// entries nobody else holds free budget; the round reads the pool's books, not the report.
#[test]
#[cfg(feature = "bytes")]
fn a_cache_of_frozen_bytes_frees_only_what_nobody_else_holds() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let frozen: Vec<bytes::Bytes> = (0..4)
            .map(|i| {
                let mut filled = pool.try_allocate(1).unwrap().into_filled();
                filled.extend_from_slice(&[i as u8; 16]);
                filled.freeze()
            })
            .collect();
        // Someone else keeps a slice of entry 3 (popped first).
        let kept = frozen[3].slice(0..4);
        let cache = Arc::new(Mutex::new(frozen));
        let bytes_cache = Arc::new(Custom {
            estimate: {
                let c = Arc::clone(&cache);
                move || c.lock().unwrap().len() * B
            },
            reclaim: {
                let c = Arc::clone(&cache);
                move |target| {
                    let mut c = c.lock().unwrap();
                    let mut freed = 0;
                    while freed < target {
                        let Some(entry) = c.pop() else { break };
                        drop(entry);
                        freed += B; // it believes so
                    }
                    Box::pin(async move { freed }) as Pin<Box<dyn Future<Output = usize> + Send>>
                }
            },
        });
        let handle = pool.register_reclaimer("frozen", 0, bytes_cache);
        // One round: entry 3 (still held by `kept`) frees nothing, entry 2 does... but the
        // reclaimer stops at its target; the round ends short and stalls, until `kept` goes.
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.allocate_blocking(1).map(|a| a.length()))
        };
        common::wait_until(5, "a round", || pool.stats().reclaim_rounds >= 1);
        assert_eq!(&kept[..], &[3u8; 4]);
        drop(kept);
        assert_eq!(waiter.join().unwrap(), Ok(1));
        assert!(pool.stats().reclaimed_bytes >= B);
        drop(handle);
        drop(cache);
        assert_drained(&pool);
    });
}

/// An LRU that evicts one entry per call frees less than asked: the round stalls (README:
/// "a round that runs out of reclaimers without covering its shortfall stalls the pool")
/// until the pool changes; an unrelated release then lets the head reclaim again, and it is
/// served (and the cache asked again) without waiting for more releases.
#[test]
fn an_lru_that_evicts_one_entry_a_call_is_asked_again_after_a_release() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(8)));
        let cache = Cache::new(entries(&pool, 6), &[Answer::One]);
        let handle = pool.register_reclaimer("lru", 0, Arc::clone(&cache) as _);
        let mut others = entries(&pool, 2);
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || pool.allocate_blocking(3))
        };
        common::wait_until(5, "the first round", || pool.stats().reclaim_rounds >= 1);
        // A release (one buffer): 2 free, 1 short; the cache frees one more.
        drop(others.pop());
        let got = waiter.join().unwrap().unwrap();
        assert!(cache.asked().len() >= 2, "{:?}", cache.asked());
        assert_eq!(pool.stats().in_use_bytes, 3 * B + B + cache.held());
        drop((got, others, handle, cache));
        assert_drained(&pool);
    });
}

/// Issue 21: a reclaimer "may allocate, release, register or drop registrations": here it
/// also reads `stats()` and `report()` of its own pool (which call every reclaimer's
/// `estimate`, its own included) and closes the pool. The driver fails with `Closed`,
/// nothing hangs, and every byte is back.
#[test]
fn a_reclaimer_that_reports_and_closes_its_pool() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(4)));
        let weak = Arc::downgrade(&pool);
        let entries = Arc::new(Mutex::new(entries(&pool, 4)));
        let closer = Arc::new(Custom {
            estimate: {
                let e = Arc::clone(&entries);
                move || e.lock().unwrap().len() * B
            },
            reclaim: {
                let e = Arc::clone(&entries);
                move |_target| {
                    let pool = weak.upgrade().expect("alive while a request waits");
                    let report = pool.report();
                    assert_eq!(report.reclaimers.len(), 1);
                    assert_eq!(report.reclaimers[0].times_asked, 1);
                    assert_eq!(pool.stats().waiting, 1);
                    pool.close();
                    // Frees after the close, in its future.
                    let e = Arc::clone(&e);
                    Box::pin(async move {
                        let n = e.lock().unwrap().drain(..).count();
                        n * B
                    }) as Pin<Box<dyn Future<Output = usize> + Send>>
                }
            },
        });
        let handle = pool.register_reclaimer("closer", 0, closer);
        assert_eq!(pool.allocate_blocking(2).unwrap_err(), AllocError::Closed);
        let stats = pool.stats();
        assert_eq!(stats.reclaim_rounds, 1, "{stats}");
        drop(handle);
        assert_eq!(
            entries.lock().unwrap().len(),
            0,
            "its future ran or was dropped"
        );
        assert_eq!((stats.in_use_bytes, stats.waiting), (0, 0), "{stats}");
    });
}

// ---- many waiters of every kind, one pool ----

/// A cache for the stress: random answers (at once, later, nothing), counts what its futures
/// reported, and records any moment two of its futures were alive at once (one round in
/// flight per pool, and an ended round's future dropped before the next starts).
struct StressCache {
    entries: Mutex<Vec<BufPoolAllocation>>,
    rng: Mutex<common::Rng>,
    alive: Arc<AtomicUsize>,
    overlaps: AtomicUsize,
    reported: Arc<AtomicUsize>,
    last_asked: Mutex<std::time::Instant>,
}

impl Reclaimer for StressCache {
    fn estimate(&self) -> usize {
        self.entries.lock().unwrap().len() * B
    }

    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        if self.alive.fetch_add(1, SeqCst) != 0 {
            self.overlaps.fetch_add(1, SeqCst);
        }
        let alive = Alive(Arc::clone(&self.alive));
        let reported = Arc::clone(&self.reported);
        let (kind, polls) = {
            let mut rng = self.rng.lock().unwrap();
            (rng.range(0, 5), rng.range(1, 20))
        };
        *self.last_asked.lock().unwrap() = std::time::Instant::now();
        let mut taken = {
            let mut entries = self.entries.lock().unwrap();
            let mut taken = Vec::new();
            while kind != 0 && taken.len() * B < target {
                let Some(entry) = entries.pop() else { break };
                taken.push(entry);
            }
            taken
        };
        if kind == 1 {
            // Frees at once, inside `reclaim`.
            let freed = taken.len() * B;
            drop(taken);
            reported.fetch_add(freed, SeqCst);
            return Box::pin(async move {
                drop(alive);
                freed
            });
        }
        let mut left = polls;
        Box::pin(std::future::poll_fn(move |cx| {
            let _alive = &alive;
            if left > 0 {
                left -= 1;
                // Woken from another thread now and then, else at once.
                if left % 3 == 0 {
                    let waker = cx.waker().clone();
                    std::thread::spawn(move || waker.wake());
                } else {
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
            }
            let freed = taken.len() * B;
            taken.clear();
            reported.fetch_add(freed, SeqCst);
            Poll::Ready(freed)
        }))
    }
}

#[test]
#[cfg_attr(miri, ignore = "tokio timers and sleeps: too slow under Miri")]
fn stress_tasks_threads_timeouts_and_a_refilled_cache() {
    watchdog(|| {
        const BUFFERS: usize = 16;
        let pool = Arc::new(BufPool::new(cfg(BUFFERS)));
        let cache = Arc::new(StressCache {
            entries: Mutex::new(Vec::new()),
            rng: Mutex::new(common::Rng::new(7)),
            alive: Arc::new(AtomicUsize::new(0)),
            overlaps: AtomicUsize::new(0),
            reported: Arc::new(AtomicUsize::new(0)),
            last_asked: Mutex::new(std::time::Instant::now()),
        });
        let handle = pool.register_reclaimer("stress", 3, Arc::clone(&cache) as _);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refiller = {
            let (pool, cache, stop) = (Arc::clone(&pool), Arc::clone(&cache), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    // An entry expires now and then while requests wait and the cache was
                    // not asked for a while: a release, which ends a stall (a round that
                    // freed nothing stalls the pool until it changes, by the no-storm rule).
                    let quiet = cache.last_asked.lock().unwrap().elapsed();
                    if quiet > Duration::from_millis(20) && pool.stats().waiting > 0 {
                        drop(cache.entries.lock().unwrap().pop());
                        *cache.last_asked.lock().unwrap() = std::time::Instant::now();
                    }
                    if cache.entries.lock().unwrap().len() < BUFFERS * 3 / 4 {
                        if let Ok(entry) = pool.try_allocate(1) {
                            cache.entries.lock().unwrap().push(entry);
                            continue;
                        }
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        let rounds = common::rounds(150, 10);
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let mut rng = common::Rng::new(100 + t);
                    for _ in 0..rounds {
                        let n = rng.range(1, 6);
                        let hold = Duration::from_micros(rng.range(0, 300) as u64);
                        let got = match rng.range(0, 2) {
                            0 => pool.allocate_blocking(n).map(|a| {
                                std::thread::sleep(hold);
                                drop(a);
                            }),
                            1 => pool
                                .allocate_timeout(n, Duration::from_micros(500))
                                .map(|a| {
                                    std::thread::sleep(hold);
                                    drop(a);
                                }),
                            _ => pool.reserve_blocking(n * B).map(|r| {
                                std::thread::sleep(hold);
                                drop(r);
                            }),
                        };
                        assert!(matches!(got, Ok(()) | Err(AllocError::TimedOut)), "{got:?}");
                    }
                })
            })
            .collect();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let tasks: Vec<_> = (0..4u64)
                .map(|t| {
                    let pool = Arc::clone(&pool);
                    tokio::spawn(async move {
                        let mut rng = common::Rng::new(200 + t);
                        for _ in 0..rounds {
                            let n = rng.range(1, 6);
                            let hold = Duration::from_micros(rng.range(0, 300) as u64);
                            match rng.range(0, 2) {
                                0 => {
                                    let held = pool.allocate(n).await.unwrap();
                                    tokio::time::sleep(hold).await;
                                    drop(held);
                                }
                                1 => {
                                    let wait = Duration::from_micros(rng.range(50, 800) as u64);
                                    let _ = tokio::time::timeout(wait, pool.allocate(n)).await;
                                }
                                _ => {
                                    let owned = Arc::clone(&pool).allocate_owned(n);
                                    let held = owned.await.unwrap();
                                    tokio::task::yield_now().await;
                                    drop(held);
                                }
                            }
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        });
        for thread in threads {
            thread.join().unwrap();
        }
        stop.store(true, SeqCst);
        refiller.join().unwrap();
        assert_eq!(
            cache.overlaps.load(SeqCst),
            0,
            "two reclaim futures alive at once"
        );
        assert_eq!(
            cache.alive.load(SeqCst),
            0,
            "a reclaim future never dropped"
        );
        let stats = pool.stats();
        assert_eq!(stats.waiting, 0);
        assert_eq!(
            stats.reclaimed_bytes,
            cache.reported.load(SeqCst),
            "{stats}"
        );
        let report = pool.report();
        assert_eq!(report.reclaimers[0].reclaimed_bytes, stats.reclaimed_bytes);
        assert_eq!(report.reclaimers[0].asked_bytes, stats.reclaim_asked_bytes);
        assert!(report.reclaimers[0].times_asked <= stats.reclaim_rounds);
        assert!(stats.reclaim_rounds > 0, "{stats}");
        cache.entries.lock().unwrap().clear();
        drop(handle);
        drop(runtime);
        assert_drained(&pool);
    });
}

// ---- handles outliving their pools ----

/// README "Lifetimes": "A `ReclaimerHandle` may outlive its pool": handles of a root's and a
/// child's registrations outlive both pools (dropped child first, then root); their names
/// still read, and dropping them then does nothing. The caches, owned only by their
/// registrations, went with the pools' drops, giving their buffers back (the drops did not
/// wait for them).
#[test]
fn handles_of_a_root_and_a_child_outlive_both() {
    watchdog(|| {
        let root = BufPool::new(cfg(8));
        let child = root.child("child", cfg(8)).unwrap();
        let root_cache = Cache::new(entries(&root, 2), &[Answer::Honest]);
        let child_cache = Cache::new(entries(&child, 3), &[Answer::Honest]);
        let (weak_root_cache, weak_child_cache) =
            (Arc::downgrade(&root_cache), Arc::downgrade(&child_cache));
        let h_root = root.register_reclaimer("root-cache", 1, root_cache as _);
        let h_child = child.register_reclaimer("child-cache", 0, child_cache as _);
        drop(child);
        assert!(
            weak_child_cache.upgrade().is_none(),
            "dropped with its pool"
        );
        assert_eq!(root.stats().in_use_bytes, 2 * B);
        assert!(root.report().children.is_empty());
        drop(root);
        assert!(weak_root_cache.upgrade().is_none());
        assert_eq!(
            (h_root.name(), h_child.name()),
            ("root-cache", "child-cache")
        );
        drop(h_child);
        drop(h_root);
    });
}

/// README: "estimates are read outside every lock". An `estimate` that reads the pool's
/// stats and report (of the tree), allocates and gives back, and registers and drops a
/// registration of its own, called by a round and by `report()`: nothing deadlocks, the
/// waiter is served, and the books are exact.
#[test]
fn an_estimate_that_uses_the_pool_holds_no_lock() {
    struct Nosy {
        pool: std::sync::Weak<BufPool>,
        inner: Arc<Cache>,
        calls: AtomicUsize,
    }
    impl Reclaimer for Nosy {
        fn estimate(&self) -> usize {
            // No recursion through report(): only the first call looks around.
            if self.calls.fetch_add(1, SeqCst) == 0 {
                if let Some(pool) = self.pool.upgrade() {
                    let _ = pool.stats().to_string();
                    let _ = pool.tree_report().to_string();
                    drop(pool.try_allocate(1));
                    let extra = Cache::new(Vec::new(), &[Answer::Nothing]);
                    drop(pool.register_reclaimer("extra", 9, extra as _));
                }
                self.calls.store(0, SeqCst);
            }
            self.inner.estimate()
        }
        fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
            self.inner.reclaim(target)
        }
    }
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(8)));
        let inner = Cache::new(entries(&pool, 8), &[Answer::Honest]);
        let nosy = Arc::new(Nosy {
            pool: Arc::downgrade(&pool),
            inner: Arc::clone(&inner),
            calls: AtomicUsize::new(0),
        });
        let handle = pool.register_reclaimer("nosy", 0, nosy as _);
        assert_eq!(pool.report().reclaimers[0].estimate, 8 * B);
        let got = pool.allocate_blocking(3).unwrap();
        let got2 = futures::executor::block_on(pool.allocate(2)).unwrap();
        assert_eq!(inner.asked(), [3 * B, 2 * B]);
        assert_eq!(
            pool.report().reclaimers.len(),
            1,
            "the extra ones were dropped"
        );
        drop((got, got2, handle, inner));
        assert_drained(&pool);
    });
}

/// `ReclaimAhead`'s rustdoc: below its mark "(or a registration or a resize changes the
/// picture), it runs rounds". A reclaimer that frees nothing but, while asked, registers a
/// cache that could (a new registration during the round: not in that round's snapshot).
/// The round leaves no more room than it found; the registration was announced before
/// `reclaim_ahead` listened again. Is the new cache ever asked?
#[test]
fn reclaim_ahead_hears_a_registration_made_during_its_round() {
    watchdog(|| {
        let pool = Arc::new(BufPool::new(cfg(8)));
        let held = Arc::new(Mutex::new(Some(entries(&pool, 8))));
        type Late = Option<(Arc<Cache>, membudget::ReclaimerHandle)>;
        let late: Arc<Mutex<Late>> = Arc::new(Mutex::new(None));
        let registrar = Arc::new(Custom {
            estimate: || 0usize,
            reclaim: {
                let (weak, held, late) =
                    (Arc::downgrade(&pool), Arc::clone(&held), Arc::clone(&late));
                move |_target| {
                    if let (Some(pool), Some(entries)) =
                        (weak.upgrade(), held.lock().unwrap().take())
                    {
                        let cache = Cache::new(entries, &[Answer::Honest]);
                        let handle = pool.register_reclaimer("late", 0, Arc::clone(&cache) as _);
                        *late.lock().unwrap() = Some((cache, handle));
                    }
                    Box::pin(async { 0usize }) as Pin<Box<dyn Future<Output = usize> + Send>>
                }
            },
        });
        let h = pool.register_reclaimer("registrar", 0, registrar);
        let ahead = {
            let ahead = pool.reclaim_ahead(2 * B);
            std::thread::spawn(move || futures::executor::block_on(ahead))
        };
        let heard = {
            let end = std::time::Instant::now() + Duration::from_secs(2);
            loop {
                if pool.stats().available_bytes() >= 2 * B {
                    break true;
                }
                if std::time::Instant::now() > end {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let stats = pool.stats();
        pool.close();
        ahead.join().unwrap();
        let asked = late
            .lock()
            .unwrap()
            .as_ref()
            .map(|(cache, _)| cache.asked());
        drop(late.lock().unwrap().take());
        drop(h);
        assert!(
            heard,
            "reclaim_ahead slept below its mark: late cache asked {asked:?}; {stats}"
        );
    });
}
