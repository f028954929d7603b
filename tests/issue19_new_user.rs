//! Issue 19's budget API read as a new user reads the issue text and the rustdoc: floors
//! (`BufPoolBuilder::min_memory`), counted overcommit (`Reservation::force_grow`), exact
//! sizes (`resize_to`, `try_shrink`, `free`), owned holds (`allocate_owned`,
//! `reserve_owned`), growth (`wait_for_growth`, `add_max_memory`, `forget_max_memory`).
//!
//! First the issue's own sentences as tests, then adversarial ones: floors in 3 and 4 level
//! trees with siblings, floors together with overcommit, `forget_max_memory` racing waiters,
//! `wait_for_growth` with zero budgets in child pools, owned holds outliving their pools on a
//! multi-thread tokio runtime, and exact byte accounting (sizes that are not multiples of 8)
//! checked through `stats()` at every quiescent point.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::thread;
use std::time::Duration;

use common::{Rng, assert_pending, ready, rounds, watchdog};
use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize, ConfigError, Reservation};

const B: usize = 64;

fn cfg(max_memory: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory,
    }
}

fn floored(parent: &BufPool, name: &str, max_memory: usize, floor: usize) -> BufPool {
    BufPool::builder(cfg(max_memory))
        .name(name)
        .parent(parent)
        .min_memory(floor)
        .build()
        .expect("a floor the ancestors can set aside")
}

fn in_use(pool: &BufPool) -> usize {
    pool.stats().in_use_bytes
}

/// (in use, overcommit, waiting) of a quiescent pool; also checks that the overcommit it
/// reports is exactly its bytes in use above its budget (`PoolStats::overcommit_bytes`:
/// "Bytes in use above the budget").
#[track_caller]
fn books(pool: &BufPool) -> (usize, usize, usize) {
    let s = pool.stats();
    assert_eq!(
        s.overcommit_bytes,
        s.in_use_bytes.saturating_sub(s.max_memory),
        "overcommit is not the bytes above the budget: {s}"
    );
    (s.in_use_bytes, s.overcommit_bytes, s.waiting)
}

/// Takes single buffers from `pool` with `try_allocate` until it refuses; returns them.
fn take_all(pool: &BufPool) -> Vec<membudget::BufPoolAllocation> {
    let mut taken = Vec::new();
    loop {
        match pool.try_allocate(1) {
            Ok(a) => taken.push(a),
            Err(AllocError::WouldBlock) => return taken,
            Err(e) => panic!("unexpected refusal {e}"),
        }
    }
}

fn round8(n: usize) -> usize {
    n.next_multiple_of(8)
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// The issue's sentences, literally
// ---------------------------------------------------------------------------------------

/// Issue 19: "The child's own requests use its floor before they climb to its parent." Root
/// 1024, a child with a floor of 256, a sibling holding 512: the root has 256 free beside the
/// idle floor, so the child's 512 fit (256 of floor + 256 of the root).
#[test]
fn issue_floor_is_used_before_climbing_the_rest() {
    watchdog(10, || {
        let root = BufPool::new(cfg(1024));
        let child = floored(&root, "query", 1024, 256);
        let sibling = root.child("io", cfg(1024)).unwrap();
        let io = sibling.try_allocate(8).unwrap();
        assert_eq!(books(&root), (768, 0, 0));
        let mine = child
            .try_allocate(8)
            .expect("256 of the floor + 256 free at the root");
        assert_eq!(books(&root), (1024, 0, 0));
        assert_eq!(books(&child), (512, 0, 0));
        drop(mine);
        assert_eq!(books(&root), (768, 0, 0));
        // The same in bytes, through a reservation.
        let r = child
            .try_reserve(512)
            .expect("256 of the floor + 256 free at the root");
        assert_eq!(books(&root), (1024, 0, 0));
        drop((r, io));
        assert_eq!(books(&root), (256, 0, 0));
    });
}

/// The same sentence on an idle tree: a child whose cap is the root's budget and whose floor
/// is a quarter of it cannot take its own cap, even though nothing else holds a byte (the
/// floor's 256 + the root's other 768 = 1024). Today it fails at once with `ExceedsBudget`
/// (README guarantee 15 states the bound), a request the issue's wording serves.
#[test]
fn issue_floored_child_can_take_its_whole_cap_on_an_idle_tree() {
    watchdog(10, || {
        let root = BufPool::new(cfg(1024));
        let child = floored(&root, "query", 1024, 256);
        let all = child
            .try_allocate(16)
            .expect("the child's own cap, with nothing else in the tree");
        assert_eq!(books(&root), (1024, 0, 0));
        drop(all);
        let mut r = child.try_reserve(1000).expect("floor + the rest");
        assert_eq!(r.size(), 1000);
        assert_eq!(r.free(), 1000);
        assert_eq!(books(&root), (256, 0, 0));
    });
}

/// "counted as in use at every ancestor from the child's creation, never granted to anyone
/// else, given back when the child drops; building the child fails with a typed error when
/// its ancestors cannot set the floor aside at once."
#[test]
fn issue_floor_counted_at_every_ancestor_typed_error_given_back() {
    watchdog(10, || {
        let root = BufPool::new(cfg(1024));
        let mid = root.child("mid", cfg(1024)).unwrap();
        let leaf = floored(&mid, "leaf", 512, 300); // rounds to 304
        assert_eq!(books(&mid), (304, 0, 0));
        assert_eq!(books(&root), (304, 0, 0));
        assert_eq!(books(&leaf), (0, 0, 0));
        assert_eq!(leaf.report().min_memory, 304);
        // The rest of the root: 720 = 11 buffers + 16 bytes.
        let other = root.child("other", cfg(1024)).unwrap();
        let taken = take_all(&other);
        assert_eq!(taken.len(), 11);
        assert_eq!(take_all(&mid).len(), 0, "mid never gets its child's floor");
        // Another floor cannot be set aside now: a typed error, nothing held.
        let refused = BufPool::builder(cfg(512))
            .parent(&mid)
            .min_memory(64)
            .build()
            .unwrap_err();
        assert!(
            matches!(
                refused,
                ConfigError::MinMemoryUnavailable { min_memory: 64, .. }
            ),
            "{refused:?}"
        );
        assert_eq!(books(&root), (304 + 704, 0, 0));
        // The leaf's floor is the leaf's: 4 buffers of 304, and a 5th with the floor's
        // last 48 bytes and the root's last 16.
        let mine = take_all(&leaf);
        assert_eq!(mine.len(), 5);
        assert_eq!(books(&root), (1024, 0, 0));
        drop(mine);
        drop(leaf);
        assert_eq!(books(&mid), (0, 0, 0));
        assert_eq!(books(&root), (704, 0, 0));
        // Now the floor can be built (it never barges: nobody waits).
        let again = floored(&mid, "again", 512, 64);
        assert_eq!(books(&root), (768, 0, 0));
        drop((again, taken));
        assert_eq!(books(&root), (0, 0, 0));
    });
}

/// "`Reservation::force_grow(bytes)`: overcommit that always succeeds, may take a pool above
/// its budget, is counted (`PoolStats::overcommit_bytes`), and is repaid first by later
/// releases: no new grant anywhere in the tree until the tree is back under budget."
#[test]
fn issue_force_grow_counted_and_repaid_first_in_a_three_level_tree() {
    watchdog(10, || {
        let root = BufPool::new(cfg(1024));
        let mid = root.child("mid", cfg(1024)).unwrap();
        let leaf = mid.child("leaf", cfg(1024)).unwrap();
        let aunt = root.child("aunt", cfg(1024)).unwrap();
        let mut r = leaf.try_reserve(1000).unwrap();
        r.force_grow(77).unwrap(); // 1077, held 1080
        assert_eq!(r.size(), 1077);
        for pool in [&leaf, &mid, &root] {
            assert_eq!(books(pool), (1080, 56, 0));
        }
        assert_eq!(books(&aunt), (0, 0, 0));
        // No grant anywhere: not at the root, not in the aunt, not in the leaf.
        for pool in [&root, &mid, &leaf, &aunt] {
            assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
            assert_eq!(pool.try_reserve(1).unwrap_err(), AllocError::WouldBlock);
        }
        let mut aunt_waits = Box::pin(aunt.allocate(1));
        assert_pending(&mut aunt_waits);
        let mut leaf_waits = Box::pin(leaf.reserve(8));
        assert_pending(&mut leaf_waits);
        // Releases repay first: 56 back is exactly the overcommit, nothing granted yet.
        r.try_shrink(56).unwrap();
        assert_eq!(r.size(), 1021);
        assert_eq!(books(&root), (1024, 0, 1));
        assert_pending(&mut aunt_waits);
        assert_pending(&mut leaf_waits);
        // 64 more: the aunt (first in the root's queue) gets its buffer.
        r.try_shrink(64).unwrap(); // 957, held 960
        let a = ready(&mut aunt_waits).unwrap();
        assert_eq!(books(&root), (1024, 0, 0));
        // The leaf's request now has room at its own level, climbs and waits at the root.
        assert_pending(&mut leaf_waits);
        assert_eq!(books(&root), (1024, 0, 1));
        r.try_shrink(8).unwrap(); // 949, held 952
        let w = ready(&mut leaf_waits).unwrap();
        assert_eq!(books(&root), (1024, 0, 0));
        assert_eq!(w.size(), 8);
        assert_eq!(r.free(), 949);
        drop((a, w));
        for pool in [&leaf, &mid, &root, &aunt] {
            assert_eq!(books(pool), (0, 0, 0));
        }
    });
}

/// "`Reservation::resize_to(bytes)`, exact in effect", "`try_shrink(bytes)` (refuses,
/// unchanged, when `bytes` exceeds its size) and `free(&mut self) -> usize` (gives everything
/// back, returns how much)".
#[test]
fn issue_exact_calls_on_odd_sizes() {
    watchdog(10, || {
        let pool = BufPool::new(cfg(1000));
        let mut r = pool.try_reserve(0).unwrap();
        let mut expect = 0;
        for size in [1, 7, 9, 15, 17, 999, 3, 0, 5, 993, 1] {
            r.resize_to(size).unwrap();
            expect = size;
            assert_eq!(r.size(), size);
            let s = pool.stats();
            assert_eq!(
                (s.in_use_bytes, s.reserved_bytes),
                (round8(size), round8(size))
            );
        }
        assert_eq!(
            r.try_shrink(2).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: 2,
                max_memory: 1
            }
        );
        assert_eq!(r.size(), expect);
        r.resize_to(501).unwrap();
        r.try_shrink(3).unwrap();
        assert_eq!((r.size(), in_use(&pool)), (498, 504));
        r.try_shrink(490).unwrap();
        assert_eq!((r.size(), in_use(&pool)), (8, 8));
        r.try_shrink(1).unwrap();
        assert_eq!((r.size(), in_use(&pool)), (7, 8));
        assert_eq!(r.free(), 7);
        assert_eq!(r.free(), 0);
        assert_eq!(books(&pool), (0, 0, 0));
        // The whole budget in odd steps, then nothing left.
        let mut parts: Vec<Reservation> = Vec::new();
        let mut total = 0;
        for size in [123, 45, 67, 89, 201] {
            let mut p = pool.try_reserve(0).unwrap();
            p.resize_to(size).unwrap();
            total += round8(size);
            parts.push(p);
        }
        assert_eq!(in_use(&pool), total);
        drop(parts);
        assert_eq!(books(&pool), (0, 0, 0));
    });
}

/// A budget that is not a multiple of 8 (accepted: "it need not be a multiple of
/// `buffer_size`"). `resize_to`'s rustdoc: "Rounding stays inside: a caller that tracks exact
/// sizes never sees a byte lost or extra", with its stated edge: budgets count in multiples
/// of 8, so the last 4 bytes of a budget of 100 are out of reach, and the refusal names the
/// 104 bytes the pool would hold. The reservation is unchanged by the refusal.
#[test]
fn exact_resize_to_the_whole_of_a_budget_that_is_not_a_multiple_of_8() {
    watchdog(10, || {
        let pool = BufPool::new(BufPoolCfg {
            buffer_size: BufferSize::S8,
            max_memory: 100,
        });
        let mut r = pool.try_reserve(0).unwrap();
        r.resize_to(96).unwrap();
        assert_eq!(books(&pool), (96, 0, 0));
        assert_eq!(
            r.resize_to(100),
            Err(AllocError::ExceedsBudget {
                requested_bytes: 104,
                max_memory: 100
            })
        );
        assert_eq!(r.size(), 96);
        r.resize_to(93).unwrap();
        assert_eq!((r.size(), books(&pool)), (93, (96, 0, 0)));
        assert_eq!(r.free(), 93);
        assert_eq!(books(&pool), (0, 0, 0));
    });
}

/// "`BufPoolBuilder::wait_for_growth()`: a pool built with it accepts a zero budget (at build
/// and in `set_max_memory`), and a request larger than the current budget waits for a grow
/// instead of failing at once"; "`add_max_memory` / `forget_max_memory` ... changes by a
/// delta that compose".
#[test]
fn issue_wait_for_growth_and_deltas() {
    watchdog(10, || {
        let pool = BufPool::builder(cfg(0)).wait_for_growth().build().unwrap();
        assert_eq!(books(&pool), (0, 0, 0));
        let mut big = Box::pin(pool.reserve(1001)); // 1008 held
        assert_pending(&mut big);
        assert_eq!(pool.add_max_memory(500), 500);
        assert_pending(&mut big);
        assert_eq!(pool.forget_max_memory(200), 200);
        assert_eq!(pool.add_max_memory(700), 1000);
        assert_pending(&mut big);
        assert_eq!(pool.add_max_memory(4), 1004);
        assert_pending(&mut big);
        assert_eq!(pool.add_max_memory(4), 1008);
        let r = ready(&mut big).unwrap();
        assert_eq!(r.size(), 1008, "reserve rounds up (not an exact call)");
        assert_eq!(books(&pool), (1008, 0, 0));
        assert_eq!(pool.forget_max_memory(10), 0);
        pool.set_max_memory(0).unwrap();
        assert_eq!(books(&pool), (1008, 1008, 0));
        drop(r);
        assert_eq!(books(&pool), (0, 0, 0));
        assert_eq!(pool.forget_max_memory(1), 0);
        assert_eq!(pool.stats().max_memory, 0);
        // Without wait_for_growth, today's checks stay.
        let fixed = BufPool::new(cfg(128));
        assert!(fixed.set_max_memory(0).is_err());
        assert!(matches!(
            fixed.try_allocate(3),
            Err(AllocError::ExceedsBudget { .. })
        ));
        assert_eq!(fixed.forget_max_memory(1000), 64);
        assert_eq!(fixed.stats().max_memory, 64);
    });
}

// ---------------------------------------------------------------------------------------
// Floors in 3 and 4 level trees with siblings
// ---------------------------------------------------------------------------------------

/// root (2048) > a (cap 1024, floor 512) > a1 (cap 512, floor 256) > a1a (cap 256, floor
/// 128); a2 (no floor) beside a1, b (no floor) beside a. A nested floor is set aside inside
/// its parent's floor; every sibling fills what it may and never a byte of another's floor;
/// releases refill the floors; dropping pools gives the floors back level by level.
/// Every request here fits a floor's free part whole or none of it (no partial use).
#[test]
fn four_level_floors_with_siblings_exact_books() {
    watchdog(10, || {
        let root = BufPool::new(cfg(2048));
        let a = floored(&root, "a", 1024, 512);
        let a1 = floored(&a, "a1", 512, 256);
        let a1a = floored(&a1, "a1a", 256, 128);
        let a2 = a.child("a2", cfg(1024)).unwrap();
        let b = root.child("b", cfg(2048)).unwrap();
        let all = |want: [usize; 6]| {
            let got = [&root, &a, &a1, &a1a, &a2, &b].map(|p| books(p).0);
            assert_eq!(got, want, "in use of root, a, a1, a1a, a2, b");
        };
        // Nested floors are set aside inside the parent's floor.
        all([512, 256, 128, 0, 0, 0]);
        assert_eq!(root.tree_report().children.len(), 2);

        let b_all = take_all(&b);
        assert_eq!(b_all.len(), 24, "b gets everything but a's floor");
        all([2048, 256, 128, 0, 0, 1536]);
        let a2_all = take_all(&a2);
        assert_eq!(a2_all.len(), 4, "a2 gets a's floor but not a1's");
        all([2048, 512, 128, 0, 256, 1536]);
        let a1_all = take_all(&a1);
        assert_eq!(a1_all.len(), 2, "a1 gets its floor but not a1a's");
        all([2048, 512, 256, 0, 256, 1536]);
        let a1a_all = take_all(&a1a);
        assert_eq!(a1a_all.len(), 2, "a1a gets its floor");
        all([2048, 512, 256, 128, 256, 1536]);
        for pool in [&root, &a, &a1, &a1a, &a2, &b] {
            assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        }

        // b gives everything back: a1a climbs 2 buffers past three floors to the root.
        drop(b_all);
        all([512, 512, 256, 128, 256, 0]);
        let climbed = a1a.try_allocate(2).unwrap();
        all([640, 640, 384, 256, 256, 0]);
        // a1a's floor buffers come back: what climbed goes back up first, at every level.
        drop(a1a_all);
        all([512, 512, 256, 128, 256, 0]);
        // b may now take everything but the floors (a's 512, inside it all the others).
        let b_all = take_all(&b);
        assert_eq!(b_all.len(), 24);
        // a1a's floor: 2 buffers of it are free again, its climbed buffers sit in it.
        let again = take_all(&a1a);
        assert_eq!(
            again.len(),
            0,
            "a1a is at its cap (256): 128 floor + 128 in the floor"
        );
        drop(climbed);
        all([2048, 512, 256, 0, 256, 1536]);
        let again = take_all(&a1a);
        assert_eq!(again.len(), 2);
        drop((again, a1_all, a2_all, b_all));
        all([512, 256, 128, 0, 0, 0]);

        // Floors go back as the pools drop, level by level.
        drop(a1a);
        all_after_drop(&[&root, &a, &a1], [512, 256, 0]);
        drop(a1);
        all_after_drop(&[&root, &a], [512, 0]);
        drop(a2);
        drop(a);
        all_after_drop(&[&root, &b], [0, 0]);
        assert_eq!(root.tree_report().children.len(), 1);
        assert_eq!(take_all(&root).len(), 32);
    });
}

#[track_caller]
fn all_after_drop<const N: usize>(pools: &[&BufPool; N], want: [usize; N]) {
    let got = pools.map(|p| books(p).0);
    assert_eq!(got, want);
}

/// The 4-level tree again, concurrently: b and a2 hammer the root and a with requests of
/// every kind while a1 and a1a take and give back their floors with `try_allocate`, which
/// must never be refused within the floor (a floor is "never granted to anyone else").
/// At the end every level holds exactly the floors set aside below it.
#[test]
fn floors_of_a_four_level_tree_hold_against_busy_siblings() {
    watchdog(30, || {
        let root = Arc::new(BufPool::new(cfg(2048)));
        let a = Arc::new(floored(&root, "a", 1024, 512));
        let a1 = Arc::new(floored(&a, "a1", 512, 256));
        let a1a = Arc::new(floored(&a1, "a1a", 256, 128));
        let a2 = Arc::new(a.child("a2", cfg(1024)).unwrap());
        let b = Arc::new(root.child("b", cfg(2048)).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let n = rounds(3000, 30);
        let mut hammers = Vec::new();
        for (i, pool) in [&b, &a2, &b, &a2].into_iter().enumerate() {
            let pool = Arc::clone(pool);
            let stop = Arc::clone(&stop);
            hammers.push(thread::spawn(move || {
                let mut rng = Rng::new(i as u64 + 1);
                let mut held = Vec::new();
                while !stop.load(SeqCst) {
                    match rng.range(0, 4) {
                        0 => {
                            if let Ok(x) = pool.try_allocate(rng.range(1, 6)) {
                                held.push(Ok(x));
                            }
                        }
                        1 => {
                            let wait = Duration::from_micros(rng.range(0, 200) as u64);
                            if let Ok(x) = pool.allocate_timeout(rng.range(1, 8), wait) {
                                held.push(Ok(x));
                            }
                        }
                        2 => {
                            let wait = Duration::from_micros(rng.range(0, 200) as u64);
                            if let Ok(x) = pool.reserve_timeout(rng.range(1, 300), wait) {
                                held.push(Err(x));
                            }
                        }
                        _ => {
                            if !held.is_empty() {
                                let k = rng.range(0, held.len() - 1);
                                drop(held.swap_remove(k));
                            }
                        }
                    }
                    if held.len() > 6 {
                        held.clear();
                    }
                }
            }));
        }
        // The floored pools: within their floors, never refused.
        let floor_user = |pool: Arc<BufPool>, own_floor_buffers: usize, seed: u64| {
            thread::spawn(move || {
                let mut rng = Rng::new(seed);
                for _ in 0..n {
                    let k = rng.range(1, own_floor_buffers);
                    let x = pool.try_allocate(k).unwrap_or_else(|e| {
                        panic!(
                            "{k} buffers within the floor refused: {e}; {}",
                            pool.stats()
                        )
                    });
                    let rest = own_floor_buffers - k;
                    let y = (rest > 0).then(|| pool.try_allocate(rest).unwrap());
                    drop((x, y));
                }
            })
        };
        // a1's own share of its floor is 256 - a1a's 128 = 2 buffers; a1a's is 2.
        let users = [
            floor_user(Arc::clone(&a1), 2, 11),
            floor_user(Arc::clone(&a1a), 2, 12),
        ];
        for user in users {
            user.join().unwrap();
        }
        stop.store(true, SeqCst);
        for hammer in hammers {
            hammer.join().unwrap();
        }
        let got = [&root, &a, &a1, &a1a, &a2, &b].map(|p| books(p));
        assert_eq!(
            got,
            [
                (512, 0, 0),
                (256, 0, 0),
                (128, 0, 0),
                (0, 0, 0),
                (0, 0, 0),
                (0, 0, 0)
            ]
        );
        drop((a1a, a1, a2, a, b));
        assert_eq!(books(&root), (0, 0, 0));
        assert_eq!(take_all(&root).len(), 32);
    });
}

// ---------------------------------------------------------------------------------------
// Floors and overcommit together
// ---------------------------------------------------------------------------------------

/// A sibling's overcommit at the root: the floored child's floor stays its own (the floor's
/// bytes are already counted at the root, so using them grants nothing new there), but
/// anything beyond the floor waits until the root is repaid, and the floor's own releases
/// refill the floor instead of repaying the sibling's debt.
#[test]
fn sibling_overcommit_does_not_take_a_floor_and_is_repaid_first() {
    watchdog(10, || {
        let root = BufPool::new(cfg(1024));
        let query = floored(&root, "query", 512, 256);
        let io = root.child("io", cfg(1024)).unwrap();
        let mut r = io.try_reserve(768).unwrap();
        assert_eq!(books(&root), (1024, 0, 0));
        r.force_grow(100).unwrap(); // 868, held 872
        assert_eq!(books(&root), (1128, 104, 0));
        assert_eq!(books(&io), (872, 0, 0));
        // The floor is the query's, whatever the rest of the tree does.
        let floor = query
            .try_allocate(4)
            .expect("the floor, set aside at creation");
        assert_eq!(books(&root), (1128, 104, 0));
        assert_eq!(books(&query), (256, 0, 0));
        // Beyond it: nothing while the root is over budget.
        assert_eq!(query.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        let mut beyond_fut = Box::pin(query.allocate(1));
        assert_pending(&mut beyond_fut);
        assert_eq!(books(&root), (1128, 104, 1));
        // The floor's own release refills the floor: the root's debt is unchanged.
        drop(floor);
        // The waiter is woken to take the floor's room (on its next poll).
        assert_eq!(books(&root).0, 1128);
        let beyond = ready(&mut beyond_fut).unwrap();
        assert_eq!(books(&root), (1128, 104, 0));
        drop(beyond_fut);
        assert_eq!(books(&query), (64, 0, 0));
        let mut beyond2_fut = Box::pin(query.allocate(4));
        // 3 free in the floor: it takes them, and waits at the root for the 4th.
        assert_pending(&mut beyond2_fut);
        r.try_shrink(100).unwrap(); // 768: repaid
        assert_eq!(books(&root), (1024, 0, 1));
        assert_pending(&mut beyond2_fut);
        r.resize_to(511).unwrap(); // 512 held: 256 free at the root
        let beyond2 = ready(&mut beyond2_fut).unwrap();
        drop(beyond2_fut);
        assert_eq!(books(&root), (512 + 256 + 64, 0, 0));
        assert_eq!(books(&query), (320, 0, 0));
        drop((beyond, beyond2, r));
        assert_eq!(books(&root), (256, 0, 0));
        assert_eq!(books(&query), (0, 0, 0));
        drop(query);
        assert_eq!(books(&root), (0, 0, 0));
    });
}

/// Overcommit inside a floored child: force_grow past the floor and past the child's own cap;
/// the child's own requests wait while it is over (its subtree too), the parent and siblings
/// go on; everything comes back exactly.
#[test]
fn overcommit_in_a_floored_child_and_its_grandchild() {
    watchdog(10, || {
        let root = BufPool::new(cfg(2048));
        let query = floored(&root, "query", 512, 256);
        let op = query.child("op", cfg(512)).unwrap();
        let io = root.child("io", cfg(2048)).unwrap();
        let mut r = query.try_reserve(200).unwrap(); // in the floor
        assert_eq!(books(&root), (256, 0, 0));
        r.force_grow(100).unwrap(); // 300, held 304: 104 more, 56 of the floor free
        assert_eq!(r.size(), 300);
        assert_eq!(books(&query), (304, 0, 0));
        let root_now = books(&root).0;
        assert!(
            root_now == 256 + 104 || root_now == 256 + 48,
            "root {root_now}: the 104 forced bytes climb whole or use the floor's 56 first"
        );
        r.try_grow(208).unwrap(); // 508, held 512: the child's cap
        r.force_grow(13).unwrap(); // 521, held 528
        assert_eq!(books(&query), (528, 16, 0));
        assert_eq!(books(&op), (0, 0, 0));
        // Over its own cap: no grant in the query's subtree, the root and io go on.
        assert_eq!(op.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        assert_eq!(query.try_reserve(8).unwrap_err(), AllocError::WouldBlock);
        let mut op_waits = Box::pin(op.allocate(1));
        assert_pending(&mut op_waits);
        let io_held = io.try_allocate(8).unwrap();
        assert_eq!(books(&root).1, 0);
        // 16 back: at the cap, nothing free. 64 more: the op's buffer.
        r.try_shrink(16).unwrap();
        assert_eq!(books(&query), (512, 0, 1));
        assert_pending(&mut op_waits);
        r.try_shrink(64).unwrap(); // 441, held 448
        let op_held = ready(&mut op_waits).unwrap();
        drop(op_waits);
        assert_eq!(books(&query), (512, 0, 0));
        assert_eq!(books(&op), (64, 0, 0));
        r.resize_to(3).unwrap();
        assert_eq!(books(&query), (72, 0, 0));
        assert_eq!(
            books(&root),
            (256 + 512, 0, 0),
            "only the floor and io's 512"
        );
        assert_eq!(r.free(), 3);
        drop((op_held, io_held));
        assert_eq!(books(&root), (256, 0, 0));
        drop((op, query));
        assert_eq!(books(&root), (0, 0, 0));
    });
}

// ---------------------------------------------------------------------------------------
// Budget deltas racing waiters; growth from zero in child pools
// ---------------------------------------------------------------------------------------

/// Two controllers add and forget budget on a `wait_for_growth` pool that starts at zero
/// while async tasks (multi-thread runtime) and blocking threads wait for it. Deltas compose
/// (the final budget is exactly what was added minus what `forget_max_memory` said it
/// removed), forgetting never takes bytes in use (no overcommit is ever shown), no waiter of
/// a growing pool ever fails, and the books end exact.
#[test]
fn forget_and_add_race_waiters_of_a_growing_pool() {
    watchdog(30, || {
        let pool = Arc::new(BufPool::builder(cfg(0)).wait_for_growth().build().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let added = Arc::new(AtomicUsize::new(0));
        let forgotten = Arc::new(AtomicUsize::new(0));
        let controllers: Vec<_> = (0..2u64)
            .map(|seed| {
                let (pool, stop) = (Arc::clone(&pool), Arc::clone(&stop));
                let (added, forgotten) = (Arc::clone(&added), Arc::clone(&forgotten));
                thread::spawn(move || {
                    let mut rng = Rng::new(seed + 100);
                    while !stop.load(SeqCst) {
                        let add = rng.range(1, 300);
                        added.fetch_add(add, SeqCst);
                        pool.add_max_memory(add);
                        let forget = rng.range(0, 400);
                        let got = pool.forget_max_memory(forget);
                        assert!(got <= forget);
                        forgotten.fetch_add(got, SeqCst);
                        let s = pool.stats();
                        assert_eq!(s.overcommit_bytes, 0, "forget took bytes in use: {s}");
                        if rng.range(0, 8) == 0 {
                            thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let per = rounds(2000, 8);
        let blocking: Vec<_> = (0..2u64)
            .map(|seed| {
                let pool = Arc::clone(&pool);
                thread::spawn(move || {
                    let mut rng = Rng::new(seed + 7);
                    for _ in 0..per {
                        let k = rng.range(1, 4);
                        let x = pool.allocate_blocking(k).expect("a growing pool's waiter");
                        assert_eq!(x.length(), k);
                        thread::yield_now();
                    }
                })
            })
            .collect();
        let rt = multi_thread();
        rt.block_on(async {
            let tasks: Vec<_> = (0..4u64)
                .map(|seed| {
                    let pool = Arc::clone(&pool);
                    tokio::spawn(async move {
                        let mut rng = Rng::new(seed + 1);
                        for i in 0..per {
                            if i % 2 == 0 {
                                let r = Arc::clone(&pool)
                                    .reserve_owned(rng.range(1, 250))
                                    .await
                                    .expect("a growing pool's waiter");
                                tokio::task::yield_now().await;
                                drop(r);
                            } else {
                                let x = pool.allocate(rng.range(1, 4)).await.unwrap();
                                tokio::task::yield_now().await;
                                drop(x);
                            }
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        });
        for b in blocking {
            b.join().unwrap();
        }
        stop.store(true, SeqCst);
        for c in controllers {
            c.join().unwrap();
        }
        let s = pool.stats();
        assert_eq!(
            s.max_memory,
            added.load(SeqCst) - forgotten.load(SeqCst),
            "the deltas compose: {s}"
        );
        assert_eq!(books(&pool), (0, 0, 0));
        eprintln!("{s}");
        let all = s.max_memory;
        assert_eq!(pool.forget_max_memory(usize::MAX), all);
        assert_eq!(pool.stats().max_memory, 0);
    });
}

/// The same race on a fixed pool (not `wait_for_growth`): a waiter that can never fit the
/// smaller budget fails with `ExceedsBudget`, every other is served; the budget never drops
/// below one buffer; the deltas compose; the books end exact.
#[test]
fn forget_racing_blocking_waiters_of_a_fixed_pool() {
    watchdog(30, || {
        let pool = Arc::new(BufPool::new(cfg(256)));
        let stop = Arc::new(AtomicBool::new(false));
        let net = Arc::new(std::sync::Mutex::new(256usize));
        let controller = {
            let (pool, stop, net) = (Arc::clone(&pool), Arc::clone(&stop), Arc::clone(&net));
            thread::spawn(move || {
                let mut rng = Rng::new(9);
                while !stop.load(SeqCst) {
                    let mut net = net.lock().unwrap();
                    let add = rng.range(0, 200);
                    assert_eq!(pool.add_max_memory(add), *net + add);
                    *net += add;
                    let got = pool.forget_max_memory(rng.range(0, 300));
                    *net -= got;
                    let s = pool.stats();
                    assert_eq!(s.max_memory, *net);
                    assert!(s.max_memory >= 64, "below one buffer: {s}");
                    drop(net);
                    thread::yield_now();
                }
            })
        };
        let per = rounds(2000, 6);
        let exceeded = Arc::new(AtomicUsize::new(0));
        let waiters: Vec<_> = (0..3u64)
            .map(|seed| {
                let (pool, exceeded) = (Arc::clone(&pool), Arc::clone(&exceeded));
                thread::spawn(move || {
                    let mut rng = Rng::new(seed + 3);
                    for _ in 0..per {
                        match pool.allocate_blocking(rng.range(1, 3)) {
                            Ok(x) => {
                                thread::yield_now();
                                drop(x);
                            }
                            Err(AllocError::ExceedsBudget { .. }) => {
                                exceeded.fetch_add(1, SeqCst);
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        for w in waiters {
            w.join().unwrap();
        }
        stop.store(true, SeqCst);
        controller.join().unwrap();
        assert_eq!(pool.stats().max_memory, *net.lock().unwrap());
        assert_eq!(books(&pool), (0, 0, 0));
        eprintln!(
            "{} waiters refused as too large, {}",
            exceeded.load(SeqCst),
            pool.stats()
        );
    });
}

/// `wait_for_growth` on a zero-budget root and a zero-budget child: a grandchild's request
/// waits for growth at every level it is short, in order, and is served once all grew;
/// forgetting never takes what it holds (nor a floor); a floor needs budget at once.
#[test]
fn growth_from_zero_through_child_pools() {
    watchdog(10, || {
        let root = BufPool::builder(cfg(0)).wait_for_growth().build().unwrap();
        let mid = BufPool::builder(cfg(0))
            .name("mid")
            .parent(&root)
            .wait_for_growth()
            .build()
            .unwrap();
        let leaf = mid.child("leaf", cfg(128)).unwrap();
        let grow_leaf = BufPool::builder(cfg(0))
            .parent(&mid)
            .wait_for_growth()
            .build()
            .unwrap();
        // The leaf's own cap is fixed: above it fails at once.
        assert!(matches!(
            leaf.try_allocate(3),
            Err(AllocError::ExceedsBudget { .. })
        ));
        assert_eq!(leaf.try_allocate(2).unwrap_err(), AllocError::WouldBlock);
        let mut two_fut = Box::pin(leaf.allocate(2));
        assert_pending(&mut two_fut);
        assert_eq!(mid.add_max_memory(64), 64);
        assert_pending(&mut two_fut);
        assert_eq!(root.add_max_memory(128), 128);
        assert_pending(&mut two_fut);
        assert_eq!(mid.add_max_memory(64), 128);
        let two = ready(&mut two_fut).unwrap();
        drop(two_fut);
        assert_eq!(books(&root), (128, 0, 0));
        assert_eq!(books(&mid), (128, 0, 0));
        // Nothing free anywhere: forgetting takes nothing.
        assert_eq!(root.forget_max_memory(usize::MAX), 0);
        assert_eq!(mid.forget_max_memory(usize::MAX), 0);
        // A growing grandchild at zero: waits for its own growth, then its parents'.
        let mut odd_fut = Box::pin(grow_leaf.reserve(13));
        assert_pending(&mut odd_fut);
        assert_eq!(grow_leaf.add_max_memory(16), 16);
        assert_pending(&mut odd_fut);
        assert_eq!(mid.add_max_memory(16), 144);
        assert_pending(&mut odd_fut);
        // Shrinking a growing pool to zero never fails the waiter; growing serves it.
        root.set_max_memory(0).unwrap();
        assert_pending(&mut odd_fut);
        assert_eq!(books(&root), (128, 128, 1));
        assert_eq!(root.add_max_memory(144), 144);
        let odd = ready(&mut odd_fut).unwrap();
        drop(odd_fut);
        assert_eq!(odd.size(), 16, "reserve rounds up to 8");
        assert_eq!(books(&root), (144, 0, 0));
        drop((two, odd));
        assert_eq!(books(&root), (0, 0, 0));
        // A floor under a zero budget: refused with a typed error; after growth, set aside
        // and never forgotten.
        assert_eq!(root.forget_max_memory(usize::MAX), 144);
        let refused = BufPool::builder(cfg(256))
            .parent(&root)
            .min_memory(64)
            .build()
            .unwrap_err();
        assert!(matches!(refused, ConfigError::MinMemoryUnavailable { .. }));
        assert!(matches!(
            BufPool::builder(cfg(0))
                .parent(&root)
                .wait_for_growth()
                .min_memory(8)
                .build()
                .unwrap_err(),
            ConfigError::MinMemoryAboveMaxMemory { .. }
        ));
        root.add_max_memory(100);
        let f = floored(&root, "f", 256, 64);
        assert_eq!(books(&root), (64, 0, 0));
        assert_eq!(root.forget_max_memory(usize::MAX), 36);
        assert_eq!(root.stats().max_memory, 64);
        let mine = f.try_allocate(1).expect("the floor stays");
        drop((mine, f));
        assert_eq!(books(&root), (0, 0, 0));
        assert_eq!(root.forget_max_memory(usize::MAX), 64);
    });
}

// ---------------------------------------------------------------------------------------
// Owned holds outliving their pools on a multi-thread runtime
// ---------------------------------------------------------------------------------------

/// Tasks on a multi-thread runtime take owned allocations and owned reservations (odd exact
/// sizes) of a floored child, drop their handles to it (the main one goes first), hold across
/// awaits and give back in any order: no drop blocks a worker, the child's drop (its barrier)
/// runs with the last hold, its floor then goes back to the root, and the books are exact.
#[test]
fn owned_holds_of_a_floored_child_outlive_every_handle_on_tokio() {
    watchdog(30, || {
        let root = Arc::new(BufPool::new(cfg(4096)));
        let rt = multi_thread();
        for round in 0..rounds(20, 2) {
            let query = Arc::new(floored(&root, "query", 2048, 512));
            assert_eq!(books(&root), (512, 0, 0));
            let held = Arc::new(AtomicUsize::new(0));
            let go = Arc::new(AtomicBool::new(false));
            rt.block_on(async {
                let mut tasks = Vec::new();
                for i in 0..8usize {
                    let query = Arc::clone(&query);
                    let held = Arc::clone(&held);
                    let go = Arc::clone(&go);
                    tasks.push(tokio::spawn(async move {
                        let size = 13 + 29 * i + round; // odd, not multiples of 8
                        let mut r = Arc::clone(&query).reserve_owned(0).await.unwrap();
                        r.resize_to(size).unwrap();
                        let x = Arc::clone(&query).allocate_owned(1 + i % 2).await.unwrap();
                        let mut part = r.split(8);
                        part.resize_to(3).unwrap();
                        held.fetch_add(1, SeqCst);
                        drop(query); // maybe the last handle: must not block
                        while !go.load(SeqCst) {
                            tokio::task::yield_now().await;
                        }
                        for _ in 0..i {
                            tokio::task::yield_now().await;
                        }
                        tokio::time::sleep(Duration::from_millis((i % 3) as u64)).await;
                        assert_eq!(part.size(), 3);
                        assert_eq!(r.size(), size - 8);
                        if i % 2 == 0 {
                            drop((x, part));
                            tokio::task::yield_now().await;
                            drop(r);
                        } else {
                            drop(r);
                            tokio::task::yield_now().await;
                            drop((part, x));
                        }
                    }));
                }
                // The main handle goes as soon as every task holds something.
                while held.load(SeqCst) < 8 {
                    tokio::task::yield_now().await;
                }
                assert!(books(&root).0 > 512);
                drop(query);
                assert_eq!(root.tree_report().children.len(), 1);
                go.store(true, SeqCst);
                for task in tasks {
                    task.await.unwrap();
                }
            });
            assert_eq!(
                books(&root),
                (0, 0, 0),
                "round {round}: the child and its floor are gone"
            );
            assert_eq!(root.tree_report().children.len(), 0);
        }
        drop(rt);
        assert_eq!(take_all(&root).len(), 64);
    });
}

/// "the barrier completes when the last one is returned": a floored child's owned holds,
/// its last handle dropped; the child lives (its floor set aside) until the very last hold
/// goes, and not a moment longer.
#[test]
fn owned_holds_end_the_childs_life_exactly_with_the_last_one() {
    watchdog(10, || {
        let root = BufPool::new(cfg(1024));
        let query = Arc::new(floored(&root, "query", 1024, 256));
        let mut r = futures::executor::block_on(Arc::clone(&query).reserve_owned(0)).unwrap();
        r.resize_to(333).unwrap(); // 256 of the floor; the rest climbs: 336 held
        let x = futures::executor::block_on(Arc::clone(&query).allocate_owned(2)).unwrap();
        let part = r.split(100); // rounded: 104, 229 left
        assert_eq!((part.size(), r.size()), (104, 229));
        let from_part = {
            let mut part = part;
            let a = part.allocate(1).unwrap(); // owned too
            assert_eq!(part.size(), 40);
            (part, a)
        };
        drop(query);
        let report = root.tree_report();
        assert_eq!(report.children.len(), 1, "alive while its holds are out");
        assert_eq!(report.children[0].min_memory, 256);
        drop(x);
        drop(r);
        assert_eq!(root.tree_report().children.len(), 1);
        let (part, a) = from_part;
        drop(part);
        assert_eq!(root.tree_report().children.len(), 1);
        assert!(books(&root).0 >= 256);
        drop(a); // the last: the child's drop runs here, at once
        assert_eq!(root.tree_report().children.len(), 0);
        assert_eq!(books(&root), (0, 0, 0));
    });
}

// ---------------------------------------------------------------------------------------
// Exact byte accounting against a model
// ---------------------------------------------------------------------------------------

/// Random exact calls (`resize_to`, `try_shrink`, `free`, `force_grow`, `try_grow`, `split`,
/// `merge`, `allocate` out of a reservation) on reservations of a 3-level tree with floors,
/// sizes not multiples of 8. At every quiescent point: each reservation's size is the model's
/// to the byte; each pool's `reserved_bytes` is the sum of its reservations rounded to 8;
/// the leaf's `in_use_bytes` is exact; a floored pool adds to its parent at least its floor
/// and what it holds above it, at most floor + what it holds; `overcommit_bytes` is the
/// bytes above the budget; and an overcommitted pool grants nothing.
#[test]
fn exact_books_of_a_floored_tree_against_a_model() {
    watchdog(30, || {
        for seed in 0..rounds(12, 1) as u64 {
            exact_model(seed);
        }
    });
}

fn exact_model(seed: u64) {
    let root = BufPool::new(cfg(4096));
    let mid = floored(&root, "mid", 2048, 512);
    let leaf = floored(&mid, "leaf", 1024, 256);
    let pools = [&root, &mid, &leaf];
    let floors = [0, 512, 256];
    // (pool index, reservation, exact size)
    let mut res: Vec<(usize, Reservation, usize)> = Vec::new();
    // (pool index, allocation)
    let mut allocs: Vec<(usize, membudget::BufPoolAllocation)> = Vec::new();
    let mut rng = Rng::new(seed);
    let check = |res: &Vec<(usize, Reservation, usize)>,
                 allocs: &Vec<(usize, membudget::BufPoolAllocation)>,
                 step: usize| {
        let mut own = [0usize; 3];
        let mut reserved = [0usize; 3];
        for (p, r, size) in res {
            assert_eq!(r.size(), *size, "seed {seed} step {step}: a size is off");
            own[*p] += round8(*size);
            reserved[*p] += round8(*size);
        }
        for (p, a) in allocs {
            own[*p] += a.allocated_bytes();
        }
        let got: Vec<_> = pools.iter().map(|p| p.stats()).collect();
        for i in 0..3 {
            assert_eq!(
                got[i].reserved_bytes, reserved[i],
                "seed {seed} step {step}: reserved of pool {i}: {}",
                got[i]
            );
            books(pools[i]);
            assert_eq!(got[i].waiting, 0);
        }
        assert_eq!(got[2].in_use_bytes, own[2], "seed {seed} step {step}: leaf");
        for (i, child) in [(1, 2), (0, 1)] {
            let c = got[child].in_use_bytes;
            let lo = own[i] + c.max(floors[child]);
            let hi = own[i] + c + floors[child];
            let p = got[i].in_use_bytes;
            assert!(
                (lo..=hi).contains(&p),
                "seed {seed} step {step}: pool {i} in use {p} not in {lo}..={hi}"
            );
        }
    };
    let steps = rounds(1500, 60);
    for step in 0..steps {
        let over: Vec<bool> = pools
            .iter()
            .map(|p| p.stats().overcommit_bytes > 0)
            .collect();
        match rng.range(0, 11) {
            0 | 1 if res.len() < 12 => {
                let p = rng.range(0, 2);
                let mut r = pools[p].try_reserve(0).unwrap();
                let size = rng.range(0, 300);
                match r.resize_to(size) {
                    Ok(()) => {
                        assert!(!over[p] || size == 0, "seed {seed}: granted while over");
                        res.push((p, r, size));
                    }
                    Err(AllocError::WouldBlock | AllocError::ExceedsBudget { .. }) => {
                        assert_eq!(r.size(), 0);
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            2 if !res.is_empty() => {
                let k = rng.range(0, res.len() - 1);
                let (p, r, size) = &mut res[k];
                let to = rng.range(0, *size + 200);
                let was = *size;
                match r.resize_to(to) {
                    Ok(()) => {
                        assert!(
                            !over[*p] || round8(to) <= round8(was),
                            "seed {seed}: grown while over"
                        );
                        *size = to;
                    }
                    Err(AllocError::WouldBlock | AllocError::ExceedsBudget { .. }) => {
                        assert!(to > was);
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            3 if !res.is_empty() => {
                let k = rng.range(0, res.len() - 1);
                let (_, r, size) = &mut res[k];
                let less = rng.range(0, *size + 10);
                match r.try_shrink(less) {
                    Ok(()) => *size -= less,
                    Err(AllocError::ExceedsBudget {
                        requested_bytes,
                        max_memory,
                    }) => {
                        assert!(less > *size);
                        assert_eq!((requested_bytes, max_memory), (less, *size));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            4 if !res.is_empty() => {
                let k = rng.range(0, res.len() - 1);
                let (_, r, size) = &mut res[k];
                assert_eq!(r.free(), *size);
                *size = 0;
            }
            5 if !res.is_empty() => {
                let k = rng.range(0, res.len() - 1);
                let (_, r, size) = &mut res[k];
                let more = rng.range(0, 150);
                r.force_grow(more).unwrap();
                *size += more;
            }
            6 if !res.is_empty() => {
                let k = rng.range(0, res.len() - 1);
                let (p, r, size) = &mut res[k];
                let more = rng.range(0, 150);
                match r.try_grow(more) {
                    Ok(()) => {
                        assert!(!over[*p] || more == 0, "seed {seed}: grown while over");
                        *size += round8(more);
                    }
                    Err(AllocError::WouldBlock | AllocError::ExceedsBudget { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            7 if !res.is_empty() && res.len() < 12 => {
                let k = rng.range(0, res.len() - 1);
                let (p, r, size) = &mut res[k];
                let want = rng.range(0, *size + 20);
                let part = r.split(want);
                let got = round8(want).min(*size);
                assert_eq!(part.size(), got, "seed {seed}: split");
                *size -= got;
                let p = *p;
                res.push((p, part, got));
            }
            8 if res.len() >= 2 => {
                let a = rng.range(0, res.len() - 1);
                let b = rng.range(0, res.len() - 1);
                if a != b {
                    let (pb, rb, sb) = res.swap_remove(a.max(b));
                    let k = a.min(b);
                    let (pa, ra, sa) = &mut res[k];
                    match ra.merge(rb) {
                        Ok(()) => {
                            assert_eq!(*pa, pb);
                            *sa += sb;
                        }
                        Err(rb) => {
                            assert_ne!(*pa, pb);
                            res.push((pb, rb, sb));
                        }
                    }
                }
            }
            9 if !res.is_empty() => {
                let k = rng.range(0, res.len() - 1);
                let (p, r, size) = &mut res[k];
                let n = rng.range(1, 3);
                match r.allocate(n) {
                    Ok(a) => {
                        *size -= n * B;
                        let p = *p;
                        allocs.push((p, a));
                    }
                    Err(AllocError::ExceedsBudget { .. }) => assert!(n * B > *size),
                    Err(e) => panic!("{e}"),
                }
            }
            10 if !allocs.is_empty() || !res.is_empty() => {
                if rng.range(0, 1) == 0 && !allocs.is_empty() {
                    let k = rng.range(0, allocs.len() - 1);
                    drop(allocs.swap_remove(k));
                } else if !res.is_empty() {
                    let k = rng.range(0, res.len() - 1);
                    drop(res.swap_remove(k));
                }
            }
            _ => {}
        }
        check(&res, &allocs, step);
    }
    drop(res);
    drop(allocs);
    assert_eq!(books(&leaf), (0, 0, 0));
    assert_eq!(books(&mid), (256, 0, 0));
    assert_eq!(books(&root), (512, 0, 0));
    drop(leaf);
    assert_eq!(books(&mid), (0, 0, 0));
    drop(mid);
    assert_eq!(books(&root), (0, 0, 0));
}

/// The root's last handle is dropped on a thread while a task of a multi-thread runtime holds
/// an owned allocation of a floored child whose handles are all gone: the root's drop waits
/// for that allocation (README: dropping an ancestor "waits for the allocations, not for the
/// floor"), the task's release runs the child's drop, and both complete.
#[test]
fn root_dropped_while_a_task_holds_a_floored_childs_owned_allocation() {
    watchdog(20, || {
        let rt = multi_thread();
        for _ in 0..rounds(10, 1) {
            let root = BufPool::new(cfg(1024));
            let query = Arc::new(floored(&root, "query", 1024, 256));
            let (got_tx, got_rx) = std::sync::mpsc::channel();
            let release = Arc::new(AtomicBool::new(false));
            let task = {
                let release = Arc::clone(&release);
                rt.spawn(async move {
                    let x = Arc::clone(&query).allocate_owned(3).await.unwrap();
                    let mut r = Arc::clone(&query).reserve_owned(0).await.unwrap();
                    r.force_grow(1001).unwrap(); // above the floor: climbs (over nobody)
                    drop(query);
                    got_tx.send(()).unwrap();
                    while !release.load(SeqCst) {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    drop(r);
                    tokio::task::yield_now().await;
                    drop(x);
                })
            };
            got_rx.recv().unwrap();
            assert!(books(&root).0 >= 1008);
            let dropper = thread::spawn(move || drop(root));
            thread::sleep(Duration::from_millis(5));
            assert!(
                !dropper.is_finished(),
                "the root's drop waits for the allocation"
            );
            release.store(true, SeqCst);
            rt.block_on(task).unwrap();
            dropper.join().unwrap();
        }
    });
}

/// Overcommit on a `wait_for_growth` pool: growth repays it first; a waiter is served only
/// from growth beyond the debt; forgetting an overcommitted pool takes nothing.
#[test]
fn growth_repays_overcommit_before_serving_waiters() {
    watchdog(10, || {
        let pool = BufPool::builder(cfg(0)).wait_for_growth().build().unwrap();
        let mut r = pool.try_reserve(0).unwrap();
        r.force_grow(99).unwrap(); // held 104
        assert_eq!(books(&pool), (104, 104, 0));
        assert_eq!(pool.forget_max_memory(usize::MAX), 0);
        let mut w_fut = Box::pin(pool.reserve(5)); // 8
        assert_pending(&mut w_fut);
        assert_eq!(pool.add_max_memory(50), 50);
        assert_eq!(books(&pool), (104, 54, 1));
        assert_pending(&mut w_fut);
        assert_eq!(pool.add_max_memory(60), 110);
        assert_eq!(books(&pool), (104, 0, 1));
        assert_pending(&mut w_fut); // 6 free, 8 wanted
        assert_eq!(pool.forget_max_memory(usize::MAX), 6);
        assert_eq!(pool.add_max_memory(8), 112);
        let w = ready(&mut w_fut).unwrap();
        drop(w_fut);
        assert_eq!(books(&pool), (112, 0, 0));
        r.try_shrink(98).unwrap(); // 1 left, held 8
        assert_eq!(books(&pool), (16, 0, 0));
        drop((r, w));
        assert_eq!(books(&pool), (0, 0, 0));
    });
}

/// A floored child under a growing root shrunk to zero: the floor, set aside already, stays
/// usable (nothing new is granted at the root); a sibling waits for growth; growth serves it.
#[test]
fn floor_under_a_growing_root_shrunk_to_zero() {
    watchdog(10, || {
        let root = BufPool::builder(cfg(512))
            .wait_for_growth()
            .build()
            .unwrap();
        let query = floored(&root, "query", 512, 256);
        let io = root.child("io", cfg(512)).unwrap();
        root.set_max_memory(0).unwrap();
        assert_eq!(books(&root), (256, 256, 0));
        let mine = query
            .try_allocate(4)
            .expect("the floor, counted at the root already");
        assert_eq!(books(&root), (256, 256, 0));
        assert_eq!(query.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
        let mut io_fut = Box::pin(io.allocate(2));
        assert_pending(&mut io_fut);
        assert_eq!(root.add_max_memory(300), 300);
        assert_pending(&mut io_fut); // 44 free
        assert_eq!(root.add_max_memory(84), 384);
        let got = ready(&mut io_fut).unwrap();
        drop(io_fut);
        assert_eq!(books(&root), (384, 0, 0));
        drop((mine, got, query));
        assert_eq!(books(&root), (0, 0, 0));
        assert_eq!(root.forget_max_memory(usize::MAX), 384);
    });
}

/// The same floor-first sentence, where whole-or-nothing turns into a wait for good: a
/// (cap 600, floor 512) > a1 (floor 256). a1's 400 bytes climb whole past a1's idle floor to
/// a, whose cap counts that floor (256 + 400 > 600): it can never be served while a1 lives,
/// and is not refused either (README guarantee 15's bound, 1024 - 512 = 512, is above it).
/// Floor first: 256 of a1's floor + 144 at a (256 + 144 <= 600) serve it at once.
#[test]
fn issue_floor_first_or_a_request_waits_for_good() {
    watchdog(10, || {
        let root = BufPool::new(cfg(1024));
        let a = floored(&root, "a", 600, 512);
        let a1 = floored(&a, "a1", 1024, 256);
        assert_eq!(books(&a), (256, 0, 0));
        let got = a1.reserve_timeout(400, Duration::from_millis(200));
        assert!(got.is_ok(), "a1's 400 on an idle tree: {got:?}");
    });
}
