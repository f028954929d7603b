//! Adversarial tests of `MembudgetPool` as DataFusion and its users drive it: hostile sizes,
//! many threads and tasks, the program's own I/O in the same tree, budget changes, closes,
//! dropped handles, panics, re-entrant wakers and cancelled queries. After every scenario
//! the books must agree with the core: `reserved()` exact, the core holding it rounded up to
//! 8, and everything back (no in use, no overcommit) once everything is dropped.
//!
//! Twelve of these found defects when they were written (each test's doc says what it saw:
//! panics on huge sizes, the rounding and floor arms forcing refusals of any cause, unnamed
//! pools taken for one another, unspillable consumers capped at the floor, a waker run under
//! the books' lock); all pass since the fixes.

mod common;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, mpsc};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use membudget::{BufPool, BufPoolCfg, BufferSize};
use membudget_datafusion::{MembudgetPool, Policy, RefusalReason};

const POLICIES: [Policy; 3] = [Policy::Fair, Policy::FairSpill, Policy::Greedy];

// ---- plumbing ----

/// Runs `f` on its own thread; fails the test if it does not finish within `secs` seconds
/// (the thread is left behind: a hang fails this test, not the whole run).
fn watchdog<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let worker = std::thread::Builder::new()
        .name("watched".into())
        .spawn(move || {
            let out = f();
            let _ = done_tx.send(());
            out
        })
        .expect("spawn the watched thread");
    match done_rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: the test did not finish within {secs} s: a hang")
        }
    }
}

async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(out) => out,
        Err(_) => panic!("watchdog: not finished within {secs} s: a hang"),
    }
}

fn cfg(buffer_size: BufferSize, max_memory: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size,
        max_memory,
    }
}

fn root(name: &str, bytes: usize) -> BufPool {
    BufPool::builder(cfg(BufferSize::S8, bytes))
        .name(name)
        .build()
        .unwrap()
}

fn plain(limit: usize, policy: Policy) -> Arc<MembudgetPool> {
    Arc::new(
        MembudgetPool::builder()
            .policy(policy)
            .build(BufPool::new(cfg(BufferSize::S8, limit))),
    )
}

fn dyn_pool(query: &Arc<MembudgetPool>) -> Arc<dyn MemoryPool> {
    query.clone()
}

fn consumer(pool: &Arc<dyn MemoryPool>, name: &str, spill: bool) -> MemoryReservation {
    MemoryConsumer::new(name)
        .with_can_spill(spill)
        .register(pool)
}

/// The books at a quiescent point: `reserved()` is `expected`, `stats().reserved` agrees, and
/// the core holds `expected` rounded up to 8 (plus nothing else).
#[track_caller]
fn books(query: &MembudgetPool, expected: usize) {
    let pool: &dyn MemoryPool = query;
    assert_eq!(pool.reserved(), expected, "reserved()");
    assert_eq!(query.stats().reserved, expected, "stats().reserved");
    assert_eq!(
        query.pool().stats().reserved_bytes,
        expected.next_multiple_of(8),
        "the core reservation: {:?}",
        query.pool().stats()
    );
}

/// Everything back in `pool`: nothing in use, reserved or overcommitted.
#[track_caller]
fn all_back(pool: &BufPool) {
    let stats = pool.stats();
    assert_eq!(
        (
            stats.in_use_bytes,
            stats.reserved_bytes,
            stats.overcommit_bytes
        ),
        (0, 0, 0),
        "{stats:?}"
    );
}

fn exhausted(result: datafusion::common::Result<()>) -> String {
    match result {
        Err(DataFusionError::ResourcesExhausted(message)) => message,
        Err(other) => panic!("not ResourcesExhausted: {other:?}"),
        Ok(()) => panic!("granted"),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

// ---- bad input ----

/// `try_grow` of sizes no pool can hold is a typed refusal, never a panic, and changes
/// nothing: on an empty and a non-empty reservation, spillable or not, every policy, and
/// limits that are and are not multiples of 8.
#[test]
fn try_grow_of_huge_sizes_is_a_typed_refusal() {
    let huge = [
        usize::MAX,
        usize::MAX - 1,
        usize::MAX - 7,
        usize::MAX - 8,
        usize::MAX / 2 + 1,
        1 << 62,
        1 << 52,
    ];
    for policy in POLICIES {
        for limit in [1000, 1003, 8] {
            let query = plain(limit, policy);
            let pool = dyn_pool(&query);
            let a = consumer(&pool, "a", true);
            let b = consumer(&pool, "b", false);
            for held in [0usize, 3] {
                if held > 0 {
                    a.try_grow(held).unwrap();
                    b.try_grow(held).unwrap();
                }
                for &n in &huge {
                    for r in [&a, &b] {
                        let message = exhausted(r.try_grow(n));
                        assert!(message.contains(r.consumer().name()), "{message}");
                        assert_eq!(r.size(), held);
                        books(&query, 2 * held);
                    }
                }
                a.free();
                b.free();
            }
            drop((a, b));
            books(&query, 0);
            all_back(query.pool());
        }
    }
}

/// Limit + 1 is refused; limit exactly is granted (the budget not a multiple of 8 included).
#[test]
fn try_grow_exactly_to_the_limit_and_one_past() {
    for policy in POLICIES {
        for limit in [8usize, 9, 15, 16, 1001, 4096] {
            let query = plain(limit, policy);
            let pool = dyn_pool(&query);
            let r = consumer(&pool, "only", false);
            exhausted(r.try_grow(limit + 1));
            r.try_grow(limit)
                .unwrap_or_else(|e| panic!("{policy:?} {limit}: {e}"));
            books(&query, limit);
            exhausted(r.try_grow(1));
            r.shrink(limit);
            books(&query, 0);
            drop(r);
            all_back(query.pool());
        }
    }
}

/// A pool whose budget is `usize::MAX` ("no limit: the pool counts up to 2 PiB"): a
/// `try_grow` near `usize::MAX` must be refused, not panic. Found: with a target that fits
/// the limit and is not a multiple of 8, the rounding arm's `t.next_multiple_of(8)`
/// overflows (debug: a panic inside `try_grow`, under the books' lock).
#[test]
fn try_grow_near_usize_max_on_an_unlimited_pool_is_refused() {
    for policy in POLICIES {
        let query = plain(usize::MAX, policy);
        let pool = dyn_pool(&query);
        let r = consumer(&pool, "r", false);
        for n in [usize::MAX, usize::MAX - 3, usize::MAX - 7, usize::MAX - 8] {
            let outcome = catch_unwind(AssertUnwindSafe(|| r.try_grow(n)));
            match outcome {
                Ok(result) => {
                    exhausted(result);
                }
                Err(panic) => panic!(
                    "{policy:?}: try_grow({n}) panicked: {}",
                    panic_text(&*panic)
                ),
            }
        }
        books(&query, 0);
    }
}

/// The same pool: ordinary sizes work (a baseline for the test above).
#[test]
fn an_unlimited_pool_grants_ordinary_sizes() {
    for policy in POLICIES {
        let query = plain(usize::MAX, policy);
        let pool = dyn_pool(&query);
        let r = consumer(&pool, "r", true);
        r.try_grow(1 << 30).unwrap();
        r.grow(13);
        books(&query, (1 << 30) + 13);
        assert!(matches!(
            pool.memory_limit(),
            MemoryLimit::Finite(usize::MAX)
        ));
        drop(r);
        all_back(query.pool());
    }
}

/// `grow` is infallible in DataFusion ("This must always succeed"): the README promises it
/// takes the bytes or overcommits, counted. Found: a size the core cannot count (more than
/// 4 PiB) panics (`expect("a DataFusion reservation of more than 4 PiB")`), and `grow` on a
/// reservation that holds bytes, by an amount whose sum overflows, panics on the `+`.
/// DataFusion's own pools never panic in `grow`.
#[test]
fn grow_of_huge_sizes_never_panics() {
    for n in [usize::MAX, usize::MAX - 7, 1usize << 60] {
        let query = plain(1 << 20, Policy::Greedy);
        let pool = dyn_pool(&query);
        let r = consumer(&pool, "join", false);
        r.grow(5);
        let outcome = catch_unwind(AssertUnwindSafe(|| r.grow(n)));
        if let Err(panic) = outcome {
            panic!("grow({n}) panicked: {}", panic_text(&*panic));
        }
    }
}

/// After a panicking `grow` (the bug above), the pool is still consistent and usable: the
/// poisoned lock is recovered, nothing was booked, everything comes back.
#[test]
fn a_panicking_grow_leaves_consistent_books() {
    let query = plain(1 << 20, Policy::Fair);
    let pool = dyn_pool(&query);
    let r = consumer(&pool, "join", false);
    r.grow(5);
    let _ = catch_unwind(AssertUnwindSafe(|| r.grow(usize::MAX)));
    // Whatever happened, the reservation and the pool agree.
    books(&query, r.size());
    r.try_grow(100).unwrap();
    books(&query, r.size());
    drop(r);
    books(&query, 0);
    all_back(query.pool());
}

/// Zero-sized calls change nothing, and DataFusion's own checks (shrink past the size
/// panics in `MemoryReservation`, `try_shrink` errs) leave the pool's books intact.
#[test]
fn zero_and_out_of_range_sizes_keep_the_books() {
    for policy in POLICIES {
        let query = plain(1000, policy);
        let pool = dyn_pool(&query);
        let mut r = consumer(&pool, "r", policy != Policy::Greedy);
        r.try_grow(0).unwrap();
        r.grow(0);
        r.shrink(0);
        assert_eq!(r.try_shrink(0).unwrap(), 0);
        r.try_resize(0).unwrap();
        r.resize(0);
        let empty = r.split(0);
        let taken = r.take();
        assert_eq!(r.free(), 0);
        books(&query, 0);
        drop((empty, taken));
        r.try_grow(13).unwrap();
        assert!(r.try_shrink(14).is_err());
        assert!(r.try_resize(usize::MAX).is_err());
        books(&query, 13);
        // DataFusion's `shrink` panics on underflow before it calls the pool.
        let unwound = catch_unwind(AssertUnwindSafe(|| r.shrink(14)));
        assert!(unwound.is_err());
        books(&query, 13);
        assert_eq!(r.size(), 13);
        drop(r);
        books(&query, 0);
        assert!(query.consumers().is_empty());
        all_back(query.pool());
    }
}

/// Odd sizes through every call: resize, try_resize, split, take, new_empty; the books are
/// exact and the core holds their sum rounded up to 8 at every step.
#[test]
fn odd_sizes_through_every_call_keep_exact_books() {
    for policy in POLICIES {
        let query = plain(1 << 16, policy);
        let pool = dyn_pool(&query);
        let mut a = consumer(&pool, "a", true);
        let b = consumer(&pool, "b", false);
        let mut sizes = Vec::new();
        for (i, n) in [1usize, 7, 9, 15, 17, 1023, 3, 5, 31, 63]
            .into_iter()
            .enumerate()
        {
            match i % 5 {
                0 => a.try_resize(n).unwrap(),
                1 => b.resize(n + b.size()),
                2 => {
                    let part = a.split(a.size() / 3);
                    part.try_grow(n).unwrap();
                    sizes.push(part);
                }
                3 => sizes.push(a.take()),
                _ => {
                    let e = b.new_empty();
                    e.grow(n);
                    sizes.push(e);
                }
            }
            let total = a.size() + b.size() + sizes.iter().map(|r| r.size()).sum::<usize>();
            books(&query, total);
            let per_consumer: usize = query.consumers().iter().map(|c| c.bytes).sum();
            assert_eq!(per_consumer, total);
        }
        for r in sizes.drain(..).rev() {
            r.resize(r.size() / 2 + 1);
        }
        drop((a, b));
        books(&query, 0);
        assert!(query.consumers().is_empty());
        all_back(query.pool());
    }
}

// ---- the rounding arm and the tree ----

fn io_child(root: &BufPool, bytes: usize) -> BufPool {
    root.child("io", cfg(BufferSize::S8, bytes)).unwrap()
}

/// A query child whose budget is not a multiple of 8, in a tree whose root the I/O side has
/// filled: "When the room is missing higher up the tree (the I/O side holds it), every
/// request is refused", unspillable consumers "never overcommit through `try_grow`", and
/// the only overcommit `try_grow` may make for a budget not a multiple of 8 is "up to 7
/// bytes, to keep `try_grow` exact against the limit". Found: a request whose total lands
/// in the last partial unit of the limit is granted as overcommit of the whole request
/// (the rounding arm forces any budget refusal, not only the rounding's).
#[test]
fn a_full_tree_refuses_a_request_landing_in_the_last_partial_unit() {
    for policy in POLICIES {
        let root = root("process", 1000);
        let io = io_child(&root, 1000);
        let query = Arc::new(
            MembudgetPool::builder().policy(policy).build(
                BufPool::builder(cfg(BufferSize::S8, 100))
                    .name("query")
                    .parent(&root)
                    .build()
                    .unwrap(),
            ),
        );
        let pool = dyn_pool(&query);
        let held = io.try_allocate(125).unwrap(); // the whole root
        let r = consumer(&pool, "HashJoinInput", false);
        let result = r.try_grow(100);
        let root_stats = root.stats();
        assert!(
            result.is_err() && root_stats.overcommit_bytes == 0,
            "{policy:?}: granted={} with the root full: {root_stats:?}",
            result.is_ok()
        );
        drop((r, held));
    }
}

/// The same with I/O waiting at the root: `try_grow` must not barge past waiters.
#[test]
fn the_rounding_arm_does_not_barge_past_waiters() {
    watchdog(10, || {
        let root = Arc::new(root("process", 1000));
        // I/O's own budget above the root's: its waiter waits at the root.
        let io = Arc::new(io_child(&root, 4000));
        let query = Arc::new(MembudgetPool::new(
            BufPool::builder(cfg(BufferSize::S8, 100))
                .name("query")
                .parent(&root)
                .build()
                .unwrap(),
        ));
        let pool = dyn_pool(&query);
        let held = io.try_allocate(120).unwrap(); // 960 of 1000: 40 free
        let waiter = {
            let io = Arc::clone(&io);
            std::thread::spawn(move || io.allocate_timeout(10, Duration::from_secs(5)))
        };
        while root.stats().waiting == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = consumer(&pool, "merge", false);
        // 100 exact bytes: 104 held; 40 free at the root and a waiter for 80 ahead.
        let result = r.try_grow(100);
        let overcommit = root.stats().overcommit_bytes;
        drop(held);
        let served = waiter.join().unwrap();
        drop((r, served));
        assert!(
            result.is_err() && overcommit == 0,
            "granted={} overcommit={overcommit}",
            result.is_ok()
        );
    });
}

/// Without the rounding case, a full tree is refused by the budget, typed, naming the I/O
/// pool as a holder, and nothing is overcommitted (the baseline for the two tests above).
#[test]
fn a_full_tree_refuses_and_names_the_io_holder() {
    for policy in POLICIES {
        let root = root("process", 1000);
        let io = io_child(&root, 1000);
        let query = Arc::new(
            MembudgetPool::builder().policy(policy).build(
                BufPool::builder(cfg(BufferSize::S8, 96))
                    .name("query")
                    .parent(&root)
                    .build()
                    .unwrap(),
            ),
        );
        let pool = dyn_pool(&query);
        let held = io.try_allocate(125).unwrap();
        let r = consumer(&pool, "HashJoinInput", false);
        let started = Instant::now();
        let message = exhausted(r.try_grow(96));
        assert!(started.elapsed() < Duration::from_secs(1), "never waits");
        assert!(message.contains("pool io 1000.0 B"), "{message}");
        assert!(
            message.contains(&format!("HashJoinInput#{}", r.consumer().id())),
            "{message}"
        );
        assert!(matches!(
            query.last_refusal().unwrap().reason,
            RefusalReason::Budget { .. }
        ));
        assert_eq!(root.stats().overcommit_bytes, 0);
        drop((r, held));
        all_back(&root);
    }
}

// ---- floors ----

/// "Base: the pool's budget or, for a child pool whose floor is above 0 and below its
/// budget, the floor." An unnamed child (built with `BufPool::builder(..).parent(..)`, no
/// name) whose budget equals its root's: `build` decides whether the pool is a child by
/// comparing the tree's root report with the pool's stats, and for unnamed pools compares
/// only `max_memory` and `reserved_bytes`: it takes the child for the root and ignores
/// its floor.
#[test]
fn an_unnamed_child_with_a_floor_sizes_spillers_from_the_floor() {
    let root = BufPool::new(cfg(BufferSize::S8, 1 << 20));
    let child = BufPool::builder(cfg(BufferSize::S8, 1 << 20))
        .parent(&root)
        .min_memory(256 << 10)
        .build()
        .unwrap();
    let query = Arc::new(MembudgetPool::new(child));
    let pool = dyn_pool(&query);
    let a = consumer(&pool, "ExternalSorter[0]", true);
    let b = consumer(&pool, "ExternalSorter[1]", true);
    // Two spillers, a floor of 256 KiB: a share of 128 KiB each.
    let result = a.try_grow(200 << 10);
    assert!(
        result.is_err(),
        "a share sized from the 1 MiB budget, not the 256 KiB floor"
    );
    drop((a, b));
}

/// The same with a name: the floor is honoured (the baseline of the test above).
#[test]
fn a_named_child_with_a_floor_sizes_spillers_from_the_floor() {
    let root = BufPool::new(cfg(BufferSize::S8, 1 << 20));
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 1 << 20, 256 << 10).unwrap());
    let pool = dyn_pool(&query);
    let a = consumer(&pool, "ExternalSorter[0]", true);
    let b = consumer(&pool, "ExternalSorter[1]", true);
    let message = exhausted(a.try_grow(200 << 10));
    assert!(message.contains("fair share"), "{message}");
    a.try_grow(100 << 10).unwrap();
    drop((a, b));
    books(&query, 0);
}

/// A floor equal to the limit: I/O filling the rest of the root never refuses the query
/// anything within its limit, and the floor comes back when the query's pool drops.
#[test]
fn a_floor_equal_to_the_limit_is_never_taken_by_io() {
    let root = Arc::new(root("process", 64 << 10));
    let io = Arc::new(io_child(&root, 64 << 10));
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 16 << 10, 16 << 10).unwrap());
    let pool = dyn_pool(&query);
    let held = io.try_allocate((48 << 10) / 8).unwrap();
    assert!(io.try_allocate(1).is_err());
    let r = consumer(&pool, "HashJoinInput", false);
    r.try_grow(16 << 10).unwrap();
    exhausted(r.try_grow(1));
    books(&query, 16 << 10);
    drop((r, held));
    drop(pool);
    drop(query);
    all_back(&root);
}

// ---- budget changes, close, dropped handles ----

/// `set_max_memory` below what the consumers hold: `memory_limit()` follows, `try_grow` is
/// refused, `grow` overcommits (counted), shrinking repays, growth of the budget admits
/// again, and everything comes back.
#[test]
fn set_max_memory_shrinks_and_growth() {
    for policy in POLICIES {
        let query = plain(4096, policy);
        let pool = dyn_pool(&query);
        let a = consumer(&pool, "a", true);
        let b = consumer(&pool, "b", false);
        a.try_grow(1000).unwrap();
        b.try_grow(1001).unwrap();
        query.pool().set_max_memory(1024).unwrap();
        assert!(matches!(pool.memory_limit(), MemoryLimit::Finite(1024)));
        exhausted(a.try_grow(1));
        exhausted(b.try_grow(1));
        b.grow(7);
        books(&query, 2008);
        assert!(query.pool().stats().overcommit_bytes > 0);
        a.shrink(1000);
        b.shrink(8);
        assert_eq!(query.pool().stats().overcommit_bytes, 0);
        books(&query, 1000);
        query.pool().set_max_memory(1 << 20).unwrap();
        a.try_grow(5000)
            .unwrap_or_else(|e| panic!("{policy:?}: {e}"));
        drop((a, b));
        books(&query, 0);
        all_back(query.pool());
    }
}

/// A closed `BufPool`: `try_grow` is refused typed (never panics), `grow` does not panic,
/// shrinks and drops give everything back.
#[test]
fn a_closed_pool_refuses_and_gives_everything_back() {
    for policy in POLICIES {
        for limit in [4096usize, 4100] {
            let query = plain(limit, policy);
            let pool = dyn_pool(&query);
            let a = consumer(&pool, "a", true);
            let b = consumer(&pool, "b", false);
            a.try_grow(100).unwrap();
            query.pool().close();
            let r = catch_unwind(AssertUnwindSafe(|| b.try_grow(10)));
            let r = r.unwrap_or_else(|p| panic!("try_grow panicked: {}", panic_text(&*p)));
            assert!(r.is_err(), "{policy:?}: granted on a closed pool");
            let g = catch_unwind(AssertUnwindSafe(|| b.grow(10)));
            g.unwrap_or_else(|p| panic!("grow panicked: {}", panic_text(&*p)));
            books(&query, a.size() + b.size());
            a.shrink(50);
            books(&query, a.size() + b.size());
            drop((a, b));
            books(&query, 0);
            all_back(query.pool());
        }
    }
}

/// A closed pool whose budget is not a multiple of 8: a `try_grow` whose total lands in the
/// last partial unit must be refused like any other on a closed pool. Found: the rounding
/// arm forces it (`force_grow` ignores close), so a closed pool grants it.
#[test]
fn a_closed_pool_refuses_the_last_partial_unit_too() {
    let query = plain(100, Policy::Greedy);
    let pool = dyn_pool(&query);
    let r = consumer(&pool, "r", false);
    query.pool().close();
    let result = r.try_grow(100);
    assert!(result.is_err(), "granted on a closed pool");
}

/// Dropping every `BufPool` handle of the program (the root included, on another thread:
/// the root's drop closes the tree and waits for its subtree) while DataFusion reservations
/// still live: they keep the `MembudgetPool` alive through their `Arc<dyn MemoryPool>`,
/// growth is refused (closed) without a panic, and when the last goes the root's drop
/// completes.
#[test]
fn dropping_the_programs_handles_while_reservations_live() {
    watchdog(15, || {
        let root = root("process", 1 << 20);
        let io = io_child(&root, 1 << 20);
        let query = Arc::new(MembudgetPool::child_of(&root, "query", 64 << 10, 32 << 10).unwrap());
        let pool = dyn_pool(&query);
        let a = consumer(&pool, "a", true);
        let b = consumer(&pool, "b", false);
        a.try_grow(1000).unwrap();
        b.grow(77);
        drop(query);
        drop(pool);
        drop(io);
        let dropped = Arc::new(AtomicBool::new(false));
        let root_drop = {
            let dropped = Arc::clone(&dropped);
            std::thread::spawn(move || {
                drop(root);
                dropped.store(true, SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        // Dropping the root closed the tree: growth is refused, typed; `grow` still counts;
        // shrinks work.
        let message = exhausted(a.try_grow(10));
        assert!(message.contains("closed"), "{message}");
        b.grow(3);
        b.shrink(10);
        a.shrink(500);
        drop(b);
        assert!(!dropped.load(SeqCst) || a.size() == 0);
        drop(a);
        root_drop.join().unwrap();
        assert!(dropped.load(SeqCst));
    });
}

// ---- concurrency ----

/// Threads that hammer shared and own reservations (try_grow, grow, shrink, split, take,
/// resize, drop) of spillable and unspillable consumers, beside I/O threads allocating from
/// a sibling pool and a thread changing both budgets; at the end every byte is back at
/// every level, and no consumer is left registered.
#[test]
fn threads_hammering_beside_io_and_budget_changes_give_everything_back() {
    watchdog(30, || {
        for policy in POLICIES {
            let root = Arc::new(root("process", 256 << 10));
            let io = Arc::new(io_child(&root, 256 << 10));
            let query = Arc::new(
                MembudgetPool::builder().policy(policy).build(
                    BufPool::builder(cfg(BufferSize::S8, 128 << 10))
                        .name("query")
                        .parent(&root)
                        .min_memory(32 << 10)
                        .build()
                        .unwrap(),
                ),
            );
            let pool = dyn_pool(&query);
            let stop = Arc::new(AtomicBool::new(false));
            let start = Arc::new(Barrier::new(7));
            let mut threads = Vec::new();
            for t in 0..4usize {
                let (pool, start) = (Arc::clone(&pool), Arc::clone(&start));
                threads.push(std::thread::spawn(move || {
                    let shared = Arc::new(consumer(&pool, &format!("c{t}"), t % 2 == 0));
                    let mut mine = consumer(&pool, &format!("own{t}"), t % 2 == 1);
                    let mut parts: Vec<MemoryReservation> = Vec::new();
                    start.wait();
                    let mut refused = 0usize;
                    for i in 0..3_000usize {
                        let n = 1 + (i * 131 + t * 17) % 4093;
                        match i % 9 {
                            0 => shared.grow(n % 512),
                            1 => refused += usize::from(shared.try_grow(n).is_err()),
                            2 => {
                                let part = shared.split(shared.size() / 2);
                                refused += usize::from(part.try_grow(n).is_err());
                                parts.push(part);
                            }
                            3 => shared.shrink(shared.size() / 3),
                            4 => refused += usize::from(mine.try_resize(n * 3).is_err()),
                            5 => parts.push(mine.take()),
                            6 => {
                                if parts.len() > 8 {
                                    parts.drain(..4);
                                }
                            }
                            7 => {
                                let _ = mine.try_shrink(n);
                            }
                            _ => mine.resize(mine.size() / 2 + n % 7),
                        }
                    }
                    drop(parts);
                    refused
                }));
            }
            let mut others = Vec::new();
            for _ in 0..2 {
                let (io, stop, start) = (Arc::clone(&io), Arc::clone(&stop), Arc::clone(&start));
                others.push(std::thread::spawn(move || {
                    start.wait();
                    let mut held = std::collections::VecDeque::new();
                    while !stop.load(SeqCst) {
                        match io.allocate_timeout(64, Duration::from_millis(1)) {
                            Ok(a) => held.push_back(a),
                            Err(_) => drop(held.pop_front()),
                        }
                        if held.len() > 32 {
                            held.pop_front();
                        }
                    }
                }));
            }
            {
                let (root, query, stop, start) = (
                    Arc::clone(&root),
                    Arc::clone(&query),
                    Arc::clone(&stop),
                    Arc::clone(&start),
                );
                others.push(std::thread::spawn(move || {
                    start.wait();
                    let mut i = 0usize;
                    while !stop.load(SeqCst) {
                        let q = [128usize << 10, 40 << 10, 96 << 10][i % 3];
                        query.pool().set_max_memory(q).unwrap();
                        let r = [256usize << 10, 200 << 10][i % 2];
                        root.set_max_memory(r).unwrap();
                        i += 1;
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    query.pool().set_max_memory(128 << 10).unwrap();
                    root.set_max_memory(256 << 10).unwrap();
                }));
            }
            let refused: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
            stop.store(true, SeqCst);
            for t in others {
                t.join().unwrap();
            }
            books(&query, 0);
            assert!(query.consumers().is_empty(), "{:?}", query.consumers());
            all_back(query.pool());
            assert_eq!(root.stats().overcommit_bytes, 0);
            assert!(refused > 0, "the budget must bind");
            drop(pool);
            drop(query);
            drop(io);
            all_back(&root);
        }
    });
}

/// Many tokio tasks on a multi-thread runtime, each with its own consumer, growing and
/// shrinking with yields between; reserved() never passes the limit by more than what
/// `grow` forced; all back at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_tasks_growing_and_shrinking_keep_the_books() {
    let query = plain(64 << 10, Policy::Fair);
    let pool = dyn_pool(&query);
    let tasks: Vec<_> = (0..16usize)
        .map(|t| {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                let r = consumer(&pool, &format!("task{t}"), t % 3 != 0);
                let extra = r.new_empty();
                for i in 0..500usize {
                    let n = 1 + (i * 37 + t) % 2047;
                    if r.try_grow(n).is_err() {
                        r.free();
                    }
                    if i % 50 == 0 {
                        extra.grow(9);
                    }
                    if i % 7 == 0 {
                        tokio::task::yield_now().await;
                        r.shrink(r.size() / 2);
                    }
                }
                extra.size()
            })
        })
        .collect();
    within(20, async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
    books(&query, 0);
    all_back(query.pool());
    assert!(query.stats().granted > 0 && query.stats().refused > 0);
}

/// Threads that panic while holding reservations (own, split, shared with another thread):
/// the unwinding drops give every byte back, and the survivors' books stay exact.
#[test]
fn threads_panicking_with_reservations_give_them_back() {
    watchdog(10, || {
        let query = plain(1 << 20, Policy::Fair);
        let pool = dyn_pool(&query);
        let survivor = Arc::new(consumer(&pool, "survivor", true));
        survivor.try_grow(1001).unwrap();
        let threads: Vec<_> = (0..6usize)
            .map(|t| {
                let (pool, survivor) = (Arc::clone(&pool), Arc::clone(&survivor));
                std::thread::spawn(move || {
                    let r = consumer(&pool, &format!("doomed{t}"), t % 2 == 0);
                    r.try_grow(1000 + t).unwrap();
                    r.grow(13);
                    let _part = r.split(7);
                    let _shared_part = survivor.new_empty();
                    _shared_part.grow(99);
                    if t != 5 {
                        panic!("operator {t} panics holding its memory");
                    }
                })
            })
            .collect();
        let panicked = threads
            .into_iter()
            .map(|t| t.join())
            .filter(Result::is_err)
            .count();
        assert_eq!(panicked, 5);
        books(&query, 1001);
        assert_eq!(query.consumers().len(), 1);
        drop(survivor);
        books(&query, 0);
        all_back(query.pool());
    });
}

// ---- wakers: the give-back runs the tree's wakers ----

struct Hook(Box<dyn Fn() + Send + Sync>);

impl Wake for Hook {
    fn wake(self: Arc<Self>) {
        (self.0)()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        (self.0)()
    }
}

/// A setup where the query holds the whole root and an I/O request waits at the root with
/// `waker`; a shrink of the query's reservation serves it (and runs the waker).
fn query_blocking_io<T>(
    waker: Waker,
    then: impl FnOnce(&Arc<MembudgetPool>, &MemoryReservation) -> T,
) -> T {
    let root = root("process", 1024);
    let io = io_child(&root, 1024);
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 1024, 0).unwrap());
    let pool = dyn_pool(&query);
    let r = consumer(&pool, "sorter", true);
    r.try_grow(1024).unwrap();
    let mut wait = Box::pin(io.allocate(8));
    let mut cx = Context::from_waker(&waker);
    assert!(wait.as_mut().poll(&mut cx).is_pending());
    let out = then(&query, &r);
    drop(wait);
    drop(r);
    out
}

/// A waker that panics while a shrink gives bytes back: the panic comes out of `shrink`
/// (core guarantee 9 passes it on once every pool is consistent) and the DataFusion books
/// are consistent too ("the books are written before a give-back ... a poisoned lock is
/// recovered").
#[test]
fn a_waker_panicking_during_a_shrink_leaves_consistent_books() {
    watchdog(10, || {
        let armed = Arc::new(AtomicBool::new(false));
        let waker = {
            let armed = Arc::clone(&armed);
            Waker::from(Arc::new(Hook(Box::new(move || {
                if armed.swap(false, SeqCst) {
                    panic!("a hostile waker");
                }
            }))))
        };
        query_blocking_io(waker, |query, r| {
            armed.store(true, SeqCst);
            let _ = catch_unwind(AssertUnwindSafe(|| r.shrink(512)));
            books(query, r.size());
            assert_eq!(r.size(), 512);
            r.try_grow(8)
                .unwrap_or_else(|e| panic!("usable after: {e}"));
            books(query, 520);
        });
    });
}

/// A waker that reads the DataFusion pool (its `stats()`, `consumers()`: what a metrics hook
/// or an operator woken by the I/O side might do) during a give-back of that pool. The
/// README says "the books are written before a give-back, whose wakers (user code of the
/// tree's waiters) are the last thing to run"; core guarantee 9 says a waker that
/// re-enters the pool costs at most its own waiter. Found: the give-back runs under the
/// `MembudgetPool`'s own mutex (`shrink` calls `resize_to` with the books' guard alive),
/// so the waker deadlocks on it (or the std mutex panics).
#[test]
fn a_waker_reading_the_pool_during_a_shrink_does_not_deadlock() {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let slot: Arc<std::sync::Mutex<Option<Arc<MembudgetPool>>>> = Default::default();
        let woke = Arc::new(AtomicUsize::new(0));
        let waker = {
            let (slot, woke) = (Arc::clone(&slot), Arc::clone(&woke));
            Waker::from(Arc::new(Hook(Box::new(move || {
                let query = slot.lock().unwrap().clone();
                if let Some(query) = query {
                    let _ = query.stats();
                    woke.fetch_add(1, SeqCst);
                }
            }))))
        };
        let out = catch_unwind(AssertUnwindSafe(|| {
            query_blocking_io(waker, |query, r| {
                *slot.lock().unwrap() = Some(Arc::clone(query));
                r.shrink(512);
                *slot.lock().unwrap() = None;
            })
        }));
        let _ = tx.send((out.is_ok(), woke.load(SeqCst)));
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok((ok, woke)) => assert!(ok && woke > 0, "ok={ok} woke={woke}"),
        Err(_) => panic!("deadlock: the waker waits for the pool's lock held by the shrink"),
    }
}

// ---- policies, literally ----

/// "Unspillable consumers ... never overcommit through `try_grow`", whatever the policy,
/// even when a spiller's overcommit or `grow` has spent the budget.
#[test]
fn unspillable_consumers_never_overcommit_through_try_grow() {
    for policy in POLICIES {
        let query = plain(1000, policy);
        let pool = dyn_pool(&query);
        let merge = consumer(&pool, "merge", false);
        let join = consumer(&pool, "join", false);
        join.grow(990);
        for n in [1usize, 8, 10, 11, 100] {
            let before = query.pool().stats().overcommit_bytes;
            let _ = merge.try_grow(n);
            assert!(
                merge.size() + join.size() <= 1000,
                "{policy:?}: granted {n} to {}",
                merge.size()
            );
            assert!(query.pool().stats().overcommit_bytes <= before);
        }
        drop((merge, join));
        all_back(query.pool());
    }
}

/// "Within its share, a spillable reservation refused by this pool's own budget
/// overcommits" (`FairSpill`), counted in `forced_shares`; `Greedy` never does.
#[test]
fn fair_spill_overcommits_within_the_share_greedy_never() {
    for policy in [Policy::FairSpill, Policy::Greedy] {
        let query = plain(1000, policy);
        let pool = dyn_pool(&query);
        let join = consumer(&pool, "join", false);
        let sorter = consumer(&pool, "sorter", true);
        join.try_grow(600).unwrap();
        sorter.try_grow(300).unwrap();
        let other = sorter.new_empty();
        let result = other.try_grow(200);
        match policy {
            Policy::FairSpill => {
                // share = (1000 - 600) / 1 = 400; this reservation holds 0.
                result.unwrap();
                assert_eq!(query.stats().forced_shares, 1);
                assert_eq!(query.pool().stats().overcommit_bytes, 104);
            }
            _ => {
                exhausted(result);
                assert_eq!(query.pool().stats().overcommit_bytes, 0);
            }
        }
        drop((join, sorter, other));
        all_back(query.pool());
    }
}

/// The total never passes the limit through `try_grow` under `Policy::Fair` for a spiller's
/// *buffering* reservation (more than half its consumer's bytes): refused, never forced.
#[test]
fn fair_never_overcommits_where_a_spiller_buffers() {
    let query = plain(1000, Policy::Fair);
    let pool = dyn_pool(&query);
    let a = consumer(&pool, "sorterA", true);
    let b = consumer(&pool, "sorterB", true);
    a.try_grow(100).unwrap();
    b.try_grow(100).unwrap();
    let join = consumer(&pool, "join", false);
    join.grow(800);
    let message = exhausted(a.try_grow(50));
    assert!(!message.is_empty());
    assert_eq!(query.pool().stats().overcommit_bytes, 0);
    assert_eq!(query.stats().forced_shares, 0);
    drop((a, b, join));
    all_back(query.pool());
}

/// A refusal's message: the consumer `name#id`, the bytes asked, what the reservation and
/// the consumer hold, the reason, and the largest holders (this pool's consumers by name
/// and the tree's other pools), for each reason.
#[test]
fn refusal_messages_name_consumer_bytes_reason_and_holders() {
    let root = root("process", 1 << 20);
    let io = io_child(&root, 1 << 20);
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 64 << 10, 0).unwrap());
    let pool = dyn_pool(&query);
    let held = io.try_allocate((1 << 20) / 8 - (40 << 10) / 8).unwrap(); // 40 KiB free
    let a = consumer(&pool, "ExternalSorter[0]", true);
    let b = consumer(&pool, "ExternalSorter[1]", true);
    a.try_grow(10 << 10).unwrap();
    // Share: (64 KiB) / 2 = 32 KiB.
    let message = exhausted(a.try_grow(30 << 10));
    assert!(message.contains("fair share"), "{message}");
    assert!(
        message.contains(&format!("ExternalSorter[0]#{}", a.consumer().id())),
        "{message}"
    );
    assert!(message.contains("30.0 KB"), "{message}");
    assert!(message.contains("10.0 KB"), "{message}");
    // The budget: 30 KiB free at the root, within b's share.
    let message = exhausted(b.try_grow(31 << 10));
    assert!(
        message.contains("the budget has not the bytes free"),
        "{message}"
    );
    assert!(message.contains("pool io"), "{message}");
    let holders = message
        .split("Largest holders in the budget: ")
        .nth(1)
        .unwrap();
    assert!(holders.starts_with("pool io"), "{message}");
    assert!(holders.contains("ExternalSorter[0]#"), "{message}");
    drop((a, b, held));
}

// ---- real queries ----

const ROWS: usize = 100_000;

fn ctx(pool: Arc<dyn MemoryPool>) -> SessionContext {
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()
        .unwrap();
    let config = SessionConfig::new()
        .with_target_partitions(common::PARTITIONS)
        .with_batch_size(common::BATCH)
        .with_sort_spill_reservation_bytes(1 << 20);
    SessionContext::new_with_config_rt(config, runtime)
}

const JOIN: &str = "SELECT a.id, b.v FROM t a JOIN t b ON a.k = b.k";

/// Sort, GROUP BY and join run at once against one tight query pool sharing a root with
/// cycling I/O: each either completes with the unlimited result or fails with
/// `ResourcesExhausted` (never another error, never a hang); afterwards the query's pool
/// holds nothing and no consumer is registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_beside_io_give_everything_back() {
    let table = common::table(ROWS);
    let expected_sort = common::reference(common::SORT, &table).await;
    let expected_group = common::reference(common::GROUP_BY, &table).await;
    let root = Arc::new(root("process", 32 << 20));
    let io = Arc::new(root.child("io", cfg(BufferSize::S16384, 32 << 20)).unwrap());
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 12 << 20, 12 << 20).unwrap());
    let io_threads = common::start_io(Arc::clone(&io));
    let run = |sql: &'static str| {
        let (table, query) = (Arc::clone(&table), Arc::clone(&query));
        tokio::spawn(async move { common::run(sql, &table, query).await })
    };
    let (sort, group, join) = within(40, async {
        tokio::join!(run(common::SORT), run(common::GROUP_BY), run(JOIN))
    })
    .await;
    let cycles = io_threads.stop();
    let (sort, group, join) = (sort.unwrap(), group.unwrap(), join.unwrap());
    let spills = sort.spills + group.spills + join.spills;
    println!(
        "sort {:?} {}; group {:?} {}; join {:?} {}",
        sort.result
            .as_ref()
            .map(|d| d.rows)
            .map_err(|e| e.to_string()),
        sort.spills,
        group
            .result
            .as_ref()
            .map(|d| d.rows)
            .map_err(|e| e.to_string()),
        group.spills,
        join.result
            .as_ref()
            .map(|d| d.rows)
            .map_err(|e| e.to_string()),
        join.spills
    );
    assert!(
        spills > 0 || query.stats().refused > 0,
        "the limit must bind: {:?}",
        query.stats()
    );
    for (name, run, expected) in [
        ("sort", sort, Some(expected_sort)),
        ("group", group, Some(expected_group)),
        ("join", join, None),
    ] {
        match run.result {
            Ok(digest) => {
                if let Some(expected) = expected {
                    assert_eq!(digest, expected, "{name}");
                } else {
                    assert_eq!(digest.rows, 2 * ROWS, "{name}");
                }
            }
            Err(e) => assert!(
                matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)),
                "{name}: {e:?}"
            ),
        }
    }
    assert!(cycles > 0);
    settle(&query).await;
    books(&query, 0);
    assert!(query.consumers().is_empty(), "{:?}", query.consumers());
    all_back(query.pool());
    assert_eq!(root.stats().overcommit_bytes, 0);
    drop(io);
    drop(query);
    all_back(&root);
}

/// Waits (up to 5 s) for a query's aborted partition tasks to unwind and give back.
async fn settle(query: &MembudgetPool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while query.stats().reserved != 0 || !query.consumers().is_empty() {
        assert!(
            Instant::now() < deadline,
            "not given back: {:?} {:?}",
            query.stats(),
            query.consumers()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Query streams dropped midway (after a few batches, or by a timeout that cancels the
/// collect): every reservation is given back and no consumer stays registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_queries_give_everything_back() {
    let table = common::table(ROWS);
    let root = Arc::new(root("process", 64 << 20));
    let io = Arc::new(io_child(&root, 64 << 20));
    let _held = io.try_allocate((40 << 20) / 8).unwrap();
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 8 << 20, 4 << 20).unwrap());
    for sql in [common::SORT, common::GROUP_BY, JOIN] {
        for stop_after in [0usize, 1, 3] {
            let ctx = ctx(query.clone());
            ctx.register_table("t", table.clone()).unwrap();
            let mut stream = ctx.sql(sql).await.unwrap().execute_stream().await.unwrap();
            let mut seen = 0;
            while seen < stop_after {
                match within(20, std::future::poll_fn(|cx| stream.as_mut().poll_next(cx))).await {
                    Some(Ok(_)) => seen += 1,
                    Some(Err(e)) => {
                        assert!(
                            matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)),
                            "{e:?}"
                        );
                        break;
                    }
                    None => break,
                }
            }
            drop(stream);
            drop(ctx);
            // Spawned partition tasks are aborted on drop; give them a moment to unwind.
            let deadline = Instant::now() + Duration::from_secs(5);
            while query.stats().reserved != 0 || !query.consumers().is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "{sql} after {stop_after} batches: {:?} {:?}",
                    query.stats(),
                    query.consumers()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            books(&query, 0);
        }
        // A collect cancelled by a timeout.
        let ctx = ctx(query.clone());
        ctx.register_table("t", table.clone()).unwrap();
        let frame = ctx.sql(sql).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(30), frame.collect()).await;
        drop(ctx);
        let deadline = Instant::now() + Duration::from_secs(5);
        while query.stats().reserved != 0 || !query.consumers().is_empty() {
            assert!(
                Instant::now() < deadline,
                "{sql} timed out: {:?}",
                query.stats()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        books(&query, 0);
    }
    all_back(query.pool());
    assert_eq!(root.stats().overcommit_bytes, 0);
}

/// A query whose pool is closed midway (the program shutting down): it ends (an error or a
/// result), never hangs or panics, and the budget comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_whose_pool_closes_midway_ends_and_gives_back() {
    let table = common::table(ROWS);
    let root = Arc::new(root("process", 64 << 20));
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 8 << 20, 8 << 20).unwrap());
    let closer = {
        let query = Arc::clone(&query);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            query.pool().close();
        })
    };
    let run = within(30, common::run(common::SORT, &table, query.clone())).await;
    closer.await.unwrap();
    if let Err(e) = &run.result {
        assert!(
            matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)),
            "{e:?}"
        );
    }
    settle(&query).await;
    books(&query, 0);
    assert!(query.consumers().is_empty());
    all_back(query.pool());
}

// ---- holders in errors, floors above ----

/// `holders_in_errors(k)`: "How many of the tree's largest holders a refusal names". A
/// caller that wants them all passes `usize::MAX`. Found: `holders()` asks the tree for
/// `self.holders + 1` reports: an overflow, so every refusal panics (debug) instead of
/// returning `ResourcesExhausted`.
#[test]
fn holders_in_errors_usize_max_names_everyone() {
    let query = Arc::new(
        MembudgetPool::builder()
            .holders_in_errors(usize::MAX)
            .build(BufPool::new(cfg(BufferSize::S8, 100))),
    );
    let pool = dyn_pool(&query);
    let a = consumer(&pool, "a", false);
    a.try_grow(60).unwrap();
    let b = consumer(&pool, "b", false);
    let outcome = catch_unwind(AssertUnwindSafe(|| b.try_grow(50)));
    let result = outcome.unwrap_or_else(|p| panic!("try_grow panicked: {}", panic_text(&*p)));
    let message = exhausted(result);
    assert!(message.contains("a#"), "{message}");
}

/// `holders_in_errors(0)`: a refusal names nobody, and still is a typed refusal.
#[test]
fn holders_in_errors_zero_names_nobody() {
    let query = Arc::new(
        MembudgetPool::builder()
            .holders_in_errors(0)
            .build(BufPool::new(cfg(BufferSize::S8, 100))),
    );
    let pool = dyn_pool(&query);
    let a = consumer(&pool, "a", false);
    a.try_grow(60).unwrap();
    let message = exhausted(a.try_grow(50));
    assert!(
        message.ends_with("Largest holders in the budget: none"),
        "{message}"
    );
    assert!(query.last_refusal().unwrap().holders.is_empty());
}

/// "the largest holders in the **whole tree**: this pool's consumers by name and the
/// program's other pools alike". With unnamed pools (a `BufPool::builder(..).parent(..)`
/// without a name), an I/O sibling that holds the whole root must be named ("unnamed").
/// Found: `holders()` leaves out every pool that `is_this_pool` mistakes for this one,
/// which for unnamed pools compares only `max_memory` and `reserved_bytes`: an I/O sibling
/// of the same budget, with no reservations, while this pool holds nothing.
#[test]
fn an_unnamed_io_sibling_is_named_as_a_holder() {
    let root = BufPool::new(cfg(BufferSize::S8, 1000));
    let io = BufPool::builder(cfg(BufferSize::S8, 1000))
        .parent(&root)
        .build()
        .unwrap();
    let query = Arc::new(MembudgetPool::new(
        BufPool::builder(cfg(BufferSize::S8, 1000))
            .parent(&root)
            .build()
            .unwrap(),
    ));
    let pool = dyn_pool(&query);
    let held = io.try_allocate(125).unwrap();
    let r = consumer(&pool, "HashJoinInput", false);
    let message = exhausted(r.try_grow(8));
    let refusal = query.last_refusal().unwrap();
    drop((r, held));
    assert!(
        refusal.holders.iter().any(|h| h.bytes == 1000),
        "the I/O pool holding the whole root is not named: {message}"
    );
}

/// "Unspillable consumers may still use the room above the floor" (a child whose floor is
/// below its budget; README, Policies, `Policy::Fair` 1) and "take what the budget has
/// free" (5); spillers are sized from the floor. Found: under `Policy::Fair` the set-aside
/// check compares every non-secondary request with the floor (`limit` there is the floor),
/// so an unspillable consumer is refused anything past the floor with the tree empty:
/// "refused because the room left is set aside for unspillable consumers (0.0 B)".
#[test]
fn unspillable_consumers_use_the_room_above_the_floor() {
    let root = root("process", 1 << 20);
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 64 << 10, 16 << 10).unwrap());
    let pool = dyn_pool(&query);
    let sorter = consumer(&pool, "ExternalSorter[0]", true);
    let join = consumer(&pool, "HashJoinInput", false);
    join.try_grow(40 << 10).unwrap();
    books(&query, 40 << 10);
    // Share of the floor: (16 KiB - 40 KiB set aside) saturates to 0.
    let message = exhausted(sorter.try_grow(8 << 10));
    assert!(message.contains("fair share"), "{message}");
    join.try_grow(24 << 10).unwrap();
    exhausted(join.try_grow(1));
    drop((sorter, join));
    books(&query, 0);
    assert_eq!(root.stats().in_use_bytes, 16 << 10, "the floor alone");
}

/// The last handle on a `MembudgetPool` dropped while the I/O side waits at the root for
/// the bytes the query holds (overcommitted by `grow`): the drop gives them back and the
/// waiter is served.
#[test]
fn dropping_the_query_pool_serves_the_io_waiting_for_its_bytes() {
    watchdog(10, || {
        let root = Arc::new(root("process", 1024));
        let io = Arc::new(io_child(&root, 4096));
        let query = Arc::new(MembudgetPool::child_of(&root, "query", 1024, 0).unwrap());
        let pool = dyn_pool(&query);
        let r = consumer(&pool, "HashJoinInput", false);
        r.grow(1500);
        assert!(root.stats().overcommit_bytes > 0);
        let waiter = {
            let io = Arc::clone(&io);
            std::thread::spawn(move || io.allocate_timeout(64, Duration::from_secs(5)))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while root.stats().waiting + io.stats().waiting == 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(query);
        drop(pool);
        drop(r);
        let served = waiter
            .join()
            .unwrap()
            .expect("served once the query's bytes are back");
        assert_eq!(root.stats().in_use_bytes, 512);
        drop(served);
        drop(io);
        all_back(&root);
    });
}

// ---- counters, floors at the limit, closes with a floor ----

/// `MembudgetStats`: every `try_grow` is either granted or refused (each refusal a
/// `ResourcesExhausted`), refusals split into share and budget ones, `grows` counts every
/// `grow` (DataFusion's `resize` upward included), and `consumers` the registered ones.
#[test]
fn stats_count_every_call() {
    for policy in POLICIES {
        let query = plain(1000, policy);
        let pool = dyn_pool(&query);
        let a = consumer(&pool, "a", true);
        let b = consumer(&pool, "b", false);
        let (mut tries, mut errors, mut grows) = (0u64, 0u64, 0u64);
        for i in 0..200usize {
            let n = (i * 37) % 300;
            let r = if i % 2 == 0 { &a } else { &b };
            match i % 4 {
                0 | 1 => {
                    tries += 1;
                    errors += u64::from(r.try_grow(n).is_err());
                }
                2 => {
                    let target = r.size() + n;
                    if target > r.size() {
                        tries += 1;
                        errors += u64::from(r.try_resize(target).is_err());
                    }
                }
                _ => {
                    if i % 8 == 3 {
                        grows += 1;
                        r.grow(n % 5);
                    }
                    r.free();
                }
            }
        }
        let stats = query.stats();
        assert_eq!(stats.granted + stats.refused, tries, "{policy:?} {stats:?}");
        assert_eq!(stats.refused, errors, "{stats:?}");
        assert_eq!(
            stats.refused_by_share + stats.refused_by_budget,
            stats.refused,
            "{stats:?}"
        );
        assert_eq!(stats.grows, grows, "{stats:?}");
        assert_eq!(stats.consumers, 2);
        books(&query, a.size() + b.size());
        drop((a, b));
        assert_eq!(query.stats().consumers, 0);
        all_back(query.pool());
    }
}

/// `child_of(parent, name, limit, floor)` errs only for "`limit` below 8 bytes, `floor` above
/// `limit`, or the ancestors unable to set the floor aside": a floor equal to a limit that
/// is not a multiple of 8 is neither, and the pool then grants its whole limit.
#[test]
fn a_floor_equal_to_a_limit_not_a_multiple_of_8() {
    let root = root("process", 1 << 20);
    for limit in [100usize, 1001, 4099] {
        let query = MembudgetPool::child_of(&root, "query", limit, limit)
            .unwrap_or_else(|e| panic!("limit = floor = {limit}: {e}"));
        let query = Arc::new(query);
        let pool = dyn_pool(&query);
        let r = consumer(&pool, "r", false);
        r.try_grow(limit).unwrap();
        exhausted(r.try_grow(1));
        drop(r);
        books(&query, 0);
    }
}

/// A closed pool with a floor (`Policy::Fair`): a spiller's first request (a "secondary"
/// reservation, entitled to overcommit when the budget above a floor is spent) must still
/// be refused: the pool is closed, not full. Found: any budget refusal of an entitled
/// request under a floor is forced (`force_grow` ignores close), so a closed pool grants
/// it.
#[test]
fn a_closed_pool_with_a_floor_refuses_spillers_too() {
    let root = root("process", 1 << 20);
    let query = Arc::new(MembudgetPool::child_of(&root, "query", 64 << 10, 32 << 10).unwrap());
    let pool = dyn_pool(&query);
    let sorter = consumer(&pool, "ExternalSorter[0]", true);
    query.pool().close();
    let result = sorter.try_grow(1000);
    let granted = result.is_ok();
    drop(sorter);
    assert!(!granted, "granted on a closed pool");
}

/// The floor bug above in a real query: a hash join (its build side is an unspillable
/// consumer) under a 16 MiB `Policy::Fair` pool with a 2 MiB floor, alone in a 64 MiB root:
/// the tree is free, so "unspillable consumers may still use the room above the floor".
/// Found: it fails where the same pool without a floor (or with the floor at the limit)
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_uses_the_room_above_the_floor() {
    let table = common::table(ROWS);
    let mut outcomes = Vec::new();
    for floor in [0usize, 16 << 20, 2 << 20] {
        let root = Arc::new(root("process", 64 << 20));
        let query = Arc::new(MembudgetPool::child_of(&root, "query", 16 << 20, floor).unwrap());
        let run = within(30, common::run(JOIN, &table, query.clone())).await;
        settle(&query).await;
        outcomes.push((floor, run.result.map(|d| d.rows).map_err(|e| e.to_string())));
    }
    for (floor, outcome) in &outcomes {
        assert_eq!(
            outcome.as_ref().ok(),
            Some(&(2 * ROWS)),
            "floor {floor}: {outcome:?}"
        );
    }
}

/// A `MembudgetPool` made over a pool that is already closed (or a child of a closed
/// parent, "created closed"), or over a `wait_for_growth` pool of budget 0: it is made
/// without a panic, refuses `try_grow`, and gives everything back.
#[test]
fn made_over_a_closed_or_empty_pool() {
    let closed = BufPool::new(cfg(BufferSize::S8, 1000));
    closed.close();
    let parent = root("process", 1 << 20);
    parent.close();
    let zero = BufPool::builder(cfg(BufferSize::S8, 0))
        .wait_for_growth()
        .build()
        .unwrap();
    let pools = [
        catch_unwind(AssertUnwindSafe(|| MembudgetPool::new(closed))),
        catch_unwind(AssertUnwindSafe(|| {
            MembudgetPool::child_of(&parent, "query", 1000, 0).unwrap()
        })),
        catch_unwind(AssertUnwindSafe(|| MembudgetPool::new(zero))),
    ];
    for (i, made) in pools.into_iter().enumerate() {
        let query = Arc::new(made.unwrap_or_else(|p| panic!("{i}: {}", panic_text(&*p))));
        let pool = dyn_pool(&query);
        for policy_spill in [false, true] {
            let r = consumer(&pool, "r", policy_spill);
            exhausted(r.try_grow(8));
            r.grow(3);
            drop(r);
        }
        books(&query, 0);
        all_back(query.pool());
    }
}

/// `unregister` of a consumer that still holds bytes (a pool used through another path:
/// DataFusion itself frees first) "gives back any bytes a consumer never shrank"; the
/// reservation's later drop must not give them back twice, and the share of the remaining
/// spiller must be as if the gone consumer never was.
#[test]
fn unregister_with_bytes_gives_them_back_once() {
    let query = plain(1000, Policy::Fair);
    let pool = dyn_pool(&query);
    let other = consumer(&pool, "other", true);
    let r = consumer(&pool, "gone", true);
    r.try_grow(203).unwrap();
    other.try_grow(101).unwrap();
    pool.unregister(r.consumer());
    books(&query, 101);
    assert_eq!(query.consumers().len(), 1);
    drop(r);
    books(&query, 101);
    assert_eq!(query.consumers().len(), 1);
    // One spiller left: its share is the whole budget.
    other.try_grow(899).unwrap();
    drop(other);
    books(&query, 0);
    assert!(query.consumers().is_empty());
    all_back(query.pool());
}

/// README, `Policy::Fair` 2-4: a spiller's request where it buffers takes neither an
/// unheld claim nor the headroom (it spills); a request on a secondary (empty) reservation
/// within its share may take them (its consumer has nothing to spill there), and the merge
/// whose claim it took is then refused. (The README said "Spillers cannot take a claimed
/// byte" without the qualifier until this test showed the contradiction.)
#[test]
fn only_a_secondary_request_takes_an_unheld_claim() {
    let query = plain(1000, Policy::Fair);
    let pool = dyn_pool(&query);
    let merge = consumer(&pool, "ExternalSorterMerge[0]", false);
    merge.try_grow(200).unwrap(); // its claim
    merge.free(); // freed to spill
    let sorter = consumer(&pool, "ExternalSorter[0]", true);
    sorter.try_grow(600).unwrap(); // its share: 1000 - 200 claimed - 200 headroom
    exhausted(sorter.try_grow(8)); // where it buffers: refused, it spills
    let second = sorter.new_empty();
    second.try_grow(400).unwrap(); // secondary: within its share, takes the claimed room
    exhausted(merge.try_grow(200));
    drop((second, sorter));
    merge
        .try_grow(200)
        .expect("the merge finds its claim once the sorter is gone");
    drop(merge);
    books(&query, 0);
    all_back(query.pool());
}

/// "The budget is a hard cap for `try_grow` (all policies)": under `Policy::Greedy` (no
/// forced shares) with a limit that is a multiple of 8 and no `grow`, a monitor sampling
/// `reserved()` and the core's bytes while four threads race `try_grow`/`shrink` never sees
/// either above the limit.
#[test]
fn try_grow_never_passes_the_limit_under_a_race() {
    watchdog(20, || {
        const LIMIT: usize = 64 << 10;
        let query = plain(LIMIT, Policy::Greedy);
        let pool = dyn_pool(&query);
        let stop = Arc::new(AtomicBool::new(false));
        let monitor = {
            let (query, stop) = (Arc::clone(&query), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut samples = 0usize;
                while !stop.load(SeqCst) {
                    let reserved = MemoryPool::reserved(&*query);
                    let core = query.pool().stats().in_use_bytes;
                    assert!(reserved <= LIMIT && core <= LIMIT, "{reserved} {core}");
                    samples += 1;
                }
                samples
            })
        };
        let workers: Vec<_> = (0..4usize)
            .map(|t| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let r = consumer(&pool, &format!("w{t}"), t % 2 == 0);
                    for i in 0..20_000usize {
                        let n = 1 + (i * 7919 + t * 104_729) % 9000;
                        if r.try_grow(n).is_err() {
                            r.shrink(r.size() / 2 + 1.min(r.size()));
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, SeqCst);
        assert!(monitor.join().unwrap() > 0);
        books(&query, 0);
        all_back(query.pool());
    });
}
