//! Conformance of today's documented behaviours, read literally from the README and rustdoc:
//! one cache per tree, zeroed requests and the cache, children of closing pools, reclaim
//! rounds read from the books, the floored child's bound, stats counters, `own_bytes`, the
//! wait histogram and budget futures polled after `Ready`.

mod common;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread;
use std::time::{Duration, Instant};

use common::{err, poll_once, watchdog};
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reclaimer, Reservation,
};

fn cfg(buffer_size: BufferSize, max_memory: usize) -> BufPoolCfg {
    BufPoolCfg {
        buffer_size,
        max_memory,
    }
}

/// A root that caches every freed block (no minimum size).
fn caching_root(size: BufferSize, max_memory: usize, per_size: usize) -> BufPool {
    BufPool::builder(cfg(size, max_memory))
        .recycle(per_size)
        .recycle_min_bytes(0)
        .build()
        .unwrap()
}

#[track_caller]
fn assert_tree_within_root_budget(root: &BufPool) {
    let s = root.stats();
    assert!(
        s.in_use_bytes + s.cached_bytes <= s.max_memory,
        "live + cached above the root's budget: {s}"
    );
}

// ---------------------------------------------------------------------------------------
// 1. One cache per tree
// ---------------------------------------------------------------------------------------

/// `BufPoolBuilder::recycle`: "The freed blocks of every child pool go to the root's cache
/// (when their alignment is the root's)".
#[test]
fn recycle_doc_child_freed_blocks_go_to_the_roots_cache() {
    let root = caching_root(BufferSize::S64, 64 * 16, 4);
    let child = root.child("c", cfg(BufferSize::S64, 64 * 8)).unwrap();
    let a = child.try_allocate(2).unwrap();
    let address = a.first();
    drop(a);
    assert_eq!(root.stats().cached_bytes, 128);
    assert_eq!(child.stats().cached_bytes, 0);
    assert_eq!(child.stats().in_use_bytes, 0);
    assert_eq!(root.stats().in_use_bytes, 0);
    // The root reuses it.
    let again = root.try_allocate(2).unwrap();
    assert_eq!(
        again.first(),
        address,
        "the child's block, reused by the root"
    );
    assert_eq!(root.stats().cached_bytes, 0);
    drop(again);
    // And the child reuses the root's cached block too.
    let again = child.try_allocate(2).unwrap();
    assert_eq!(
        again.first(),
        address,
        "the cached block, reused by the child"
    );
    assert_eq!(root.stats().cached_bytes, 0);
    assert_tree_within_root_budget(&root);
}

/// `BufPoolBuilder::recycle`: "On a child pool these two settings have no effect".
#[test]
fn recycle_doc_recycle_on_a_child_has_no_effect() {
    let root = BufPool::new(cfg(BufferSize::S64, 64 * 16));
    let child = BufPool::builder(cfg(BufferSize::S64, 64 * 16))
        .parent(&root)
        .recycle(8)
        .recycle_min_bytes(0)
        .build()
        .unwrap();
    drop(child.try_allocate(4).unwrap());
    assert_eq!(child.stats().cached_bytes, 0);
    assert_eq!(root.stats().cached_bytes, 0, "the root does not recycle");
    // With a caching root, the child's own (smaller) min_bytes is ignored: the root's
    // 64 KiB default applies, so a 256-byte block is not cached anywhere.
    let root2 = BufPool::builder(cfg(BufferSize::S64, 1 << 20))
        .recycle(8)
        .build()
        .unwrap();
    let child2 = BufPool::builder(cfg(BufferSize::S64, 1 << 20))
        .parent(&root2)
        .recycle(8)
        .recycle_min_bytes(0)
        .build()
        .unwrap();
    drop(child2.try_allocate(4).unwrap());
    assert_eq!(root2.stats().cached_bytes, 0);
    assert_eq!(child2.stats().cached_bytes, 0);
}

/// Edge: a child with another buffer size but the same alignment shares the root's cache.
#[test]
fn recycle_doc_child_of_another_buffer_size_same_alignment_shares_the_cache() {
    // Root S64: align min(64, 16) = 16; child S128: align 16.
    let root = caching_root(BufferSize::S64, 64 * 32, 4);
    let child = root.child("c", cfg(BufferSize::S128, 128 * 8)).unwrap();
    let a = child.try_allocate(2).unwrap(); // 256 bytes
    let address = a.first();
    drop(a);
    assert_eq!(root.stats().cached_bytes, 256);
    let again = root.try_allocate(4).unwrap(); // 256 bytes of 64-byte buffers
    assert_eq!(again.first(), address);
    assert_eq!(root.stats().cached_bytes, 0);
}

/// Edge: a `direct_io_alignment` child under a default-aligned root: its blocks' alignment is
/// not the root's, so they are not cached; and a cached root block is never handed to a
/// request that needs a stricter alignment.
#[test]
fn recycle_doc_direct_io_child_alignment_differs_no_caching_and_alignment_kept() {
    let root = caching_root(BufferSize::S16, 1 << 16, 8);
    let child = BufPool::builder(cfg(BufferSize::S512, 1 << 14))
        .parent(&root)
        .direct_io_alignment()
        .build()
        .unwrap();
    let a = child.try_allocate(1).unwrap();
    assert_eq!(a.first() as usize % 512, 0);
    drop(a);
    assert_eq!(
        root.stats().cached_bytes,
        0,
        "alignment 512 is not the root's 16"
    );
    // Now cache several 512-byte root blocks (alignment 16) and ask the child for 512 bytes.
    let blocks: Vec<_> = (0..8).map(|_| root.try_allocate(32).unwrap()).collect();
    drop(blocks);
    assert_eq!(root.stats().cached_bytes, 8 * 512);
    for _ in 0..8 {
        let a = child.try_allocate(1).unwrap();
        assert_eq!(
            a.first() as usize % 512,
            0,
            "a direct-I/O child's buffer must start at a multiple of 512"
        );
        drop(a);
    }
    assert_tree_within_root_budget(&root);
}

/// Edge: a direct-I/O root and a direct-I/O child of the same buffer size: same alignment,
/// the child's blocks are cached at the root and come back aligned.
#[test]
fn recycle_doc_direct_io_root_and_child_share_the_cache() {
    let root = BufPool::builder(cfg(BufferSize::S4096, 1 << 20))
        .direct_io_alignment()
        .recycle(4)
        .recycle_min_bytes(0)
        .build()
        .unwrap();
    let child = BufPool::builder(cfg(BufferSize::S4096, 1 << 18))
        .parent(&root)
        .direct_io_alignment()
        .build()
        .unwrap();
    let a = child.try_allocate(2).unwrap();
    let address = a.first();
    drop(a);
    assert_eq!(root.stats().cached_bytes, 8192);
    let again = child.try_allocate(2).unwrap();
    assert_eq!(again.first(), address);
    assert_eq!(again.first() as usize % 4096, 0);
}

/// Edge: a grandchild's freed blocks go to the root's cache too.
#[test]
fn recycle_doc_grandchild_blocks_go_to_the_root() {
    let root = caching_root(BufferSize::S64, 64 * 16, 4);
    let child = root.child("c", cfg(BufferSize::S64, 64 * 16)).unwrap();
    let grandchild = child.child("g", cfg(BufferSize::S64, 64 * 8)).unwrap();
    let a = grandchild.try_allocate(3).unwrap();
    let address = a.first();
    drop(a);
    assert_eq!(root.stats().cached_bytes, 192);
    assert_eq!(child.stats().cached_bytes, 0);
    assert_eq!(grandchild.stats().cached_bytes, 0);
    assert_eq!(root.try_allocate(3).unwrap().first(), address);
}

/// README Recycling: "every fresh block in the tree makes room in it, so the tree's memory,
/// cached blocks included, stays within the root's budget".
#[test]
fn recycle_doc_every_fresh_block_of_the_tree_makes_room_in_the_roots_cache() {
    let root = caching_root(BufferSize::S64, 64 * 16, 16);
    let child = root.child("c", cfg(BufferSize::S64, 64 * 16)).unwrap();
    let blocks: Vec<_> = (0..16).map(|_| root.try_allocate(1).unwrap()).collect();
    drop(blocks);
    assert_eq!(root.stats().cached_bytes, 64 * 16);
    // A fresh block of another size in a child: the cache must make room.
    let a = child.try_allocate(4).unwrap();
    assert_tree_within_root_budget(&root);
    let z = child.try_allocate_zeroed(2).unwrap();
    assert_tree_within_root_budget(&root);
    let g = child.child("g", cfg(BufferSize::S128, 128 * 4)).unwrap();
    let b = g.try_allocate(2).unwrap();
    assert_tree_within_root_budget(&root);
    drop((a, z, b));
    assert_tree_within_root_budget(&root);
}

/// Guarantee 1: "live plus cached bytes are at most `max_memory` at every quiescent point,
/// shrinks included; a tree of pools has one cache, its root's, so this holds for the whole
/// tree against the root's budget". Edge: shrink the root while the children's blocks are
/// cached.
#[test]
fn guarantee_1_shrinking_the_root_while_childrens_blocks_are_cached() {
    let root = caching_root(BufferSize::S64, 64 * 32, 32);
    let c1 = root.child("c1", cfg(BufferSize::S64, 64 * 32)).unwrap();
    let c2 = root.child("c2", cfg(BufferSize::S128, 128 * 16)).unwrap();
    let a: Vec<_> = (0..8).map(|_| c1.try_allocate(1).unwrap()).collect();
    let b: Vec<_> = (0..4).map(|_| c2.try_allocate(1).unwrap()).collect();
    let held = root.try_allocate(4).unwrap();
    drop(a);
    drop(b);
    assert_eq!(root.stats().cached_bytes, 8 * 64 + 4 * 128);
    assert_tree_within_root_budget(&root);
    root.set_max_memory(64 * 8).unwrap();
    assert_tree_within_root_budget(&root);
    drop(held);
    assert_tree_within_root_budget(&root);
    // New allocations in the children after the shrink stay within it too.
    let x = c1.try_allocate(2).unwrap();
    let y = c2.try_allocate(1).unwrap();
    assert_tree_within_root_budget(&root);
    drop((x, y));
    assert_tree_within_root_budget(&root);
}

/// Guarantee 1 (reservations): "bytes reserved but not yet allocated are no memory:
/// `stats()` may show them in use beside cached blocks, which are evicted when those bytes
/// become an allocation".
#[test]
fn guarantee_1_reserved_bytes_allocated_evict_cached_blocks() {
    let root = caching_root(BufferSize::S64, 64 * 16, 16);
    let child = root.child("c", cfg(BufferSize::S64, 64 * 16)).unwrap();
    let blocks: Vec<_> = (0..16).map(|_| child.try_allocate(1).unwrap()).collect();
    drop(blocks);
    assert_eq!(root.stats().cached_bytes, 64 * 16);
    let mut r = child.try_reserve(64 * 8).unwrap();
    let a = r.allocate(8).unwrap(); // one 512-byte block: fresh
    let s = root.stats();
    assert!(
        s.in_use_bytes + s.cached_bytes <= s.max_memory,
        "after the reserved bytes became an allocation: {s}"
    );
    drop((a, r));
    assert_tree_within_root_budget(&root);
}

/// `BufPoolBuilder::recycle`: `max_blocks_per_size` is the root's, for children's blocks too.
#[test]
fn recycle_doc_the_roots_per_size_limit_holds_for_childrens_blocks() {
    let root = caching_root(BufferSize::S64, 4096, 1);
    let child = root.child("c", cfg(BufferSize::S64, 4096)).unwrap();
    let x = child.try_allocate(2).unwrap();
    let y = child.try_allocate(2).unwrap();
    drop((x, y));
    assert_eq!(root.stats().cached_bytes, 128);
}

/// Guarantee 1 with a child's release while the root has a waiter: the waiter is served and
/// the tree stays within the root's budget.
#[test]
fn guarantee_1_childs_release_serves_a_waiter_at_the_root_within_budget() {
    let root = caching_root(BufferSize::S64, 256, 8);
    let child = root.child("c", cfg(BufferSize::S64, 256)).unwrap();
    let a = child.try_allocate(4).unwrap();
    let mut waiter = Box::pin(root.allocate(2));
    assert!(poll_once(&mut waiter).is_pending());
    drop(a);
    let got = match poll_once(&mut waiter) {
        Poll::Ready(out) => out.unwrap(),
        Poll::Pending => panic!("the release should serve the root's waiter"),
    };
    let s = root.stats();
    assert!(s.in_use_bytes + s.cached_bytes <= 256, "{s:?}");
    drop(got);
    assert_tree_within_root_budget(&root);
}

/// Guarantee 1: "the bytes of live allocations plus cached bytes are at most `max_memory`"
/// for the tree, with a floored child whose blocks are cached at the root.
#[test]
fn guarantee_1_floored_childs_cached_blocks_live_plus_cached_within_budget() {
    let root = caching_root(BufferSize::S64, 1024, 4);
    let child = floored(&root, 1024, 512);
    let mine = root.try_allocate(8).unwrap();
    let a = child.try_allocate(8).unwrap();
    drop(a);
    let live = mine.allocated_bytes();
    assert!(live + root.stats().cached_bytes <= 1024);
    let b = child.try_allocate(4).unwrap();
    let c = child.try_allocate(2).unwrap();
    let live = live + b.allocated_bytes() + c.allocated_bytes();
    assert!(
        live + root.stats().cached_bytes <= 1024,
        "cached {}",
        root.stats().cached_bytes
    );
    drop((mine, b, c));
    assert!(root.stats().cached_bytes <= 1024);
}

// ---------------------------------------------------------------------------------------
// 2. Zeroed requests never take cached blocks
// ---------------------------------------------------------------------------------------

fn scribble(a: &mut BufPoolAllocation) {
    for byte in a.uninit_mut() {
        byte.write(0xAB);
    }
}

fn all_zero(a: &BufPoolAllocation) -> bool {
    // SAFETY: a zeroed allocation's bytes are initialised; the slice lives as long as `a`.
    let bytes = unsafe { std::slice::from_raw_parts(a.first() as *const u8, a.allocated_bytes()) };
    bytes.iter().all(|&b| b == 0)
}

/// README Zeroed allocations: "zeroed requests never take cached blocks (recycling), whose
/// bytes are old".
#[test]
fn zeroed_doc_zeroed_requests_never_take_cached_blocks() {
    let root = caching_root(BufferSize::S64, 64 * 64, 8);
    let child = root.child("c", cfg(BufferSize::S64, 64 * 64)).unwrap();
    for pool in [&root, &child] {
        let mut a = pool.try_allocate(4).unwrap();
        scribble(&mut a);
        drop(a);
        let cached = root.stats().cached_bytes;
        assert!(cached >= 256);
        let z = pool.try_allocate_zeroed(4).unwrap();
        assert!(all_zero(&z));
        assert_eq!(
            root.stats().cached_bytes,
            cached,
            "a zeroed request took a cached block"
        );
        drop(z);
        let z = watchdog(10, {
            let root = caching_root(BufferSize::S64, 64 * 64, 8);
            move || {
                let mut a = root.try_allocate(4).unwrap();
                scribble(&mut a);
                drop(a);
                let z = root.allocate_zeroed_blocking(4).unwrap();
                (all_zero(&z), root.stats().cached_bytes)
            }
        });
        assert_eq!(z, (true, 256));
    }
}

// ---------------------------------------------------------------------------------------
// 3. A child of a closed pool
// ---------------------------------------------------------------------------------------

/// `BufPool::child`: "A child of a closed pool is created closed."
#[test]
fn child_doc_a_child_of_a_closed_pool_is_created_closed() {
    let root = BufPool::new(cfg(BufferSize::S64, 1024));
    let mid = root.child("mid", cfg(BufferSize::S64, 1024)).unwrap();
    root.close();
    let child = root.child("late", cfg(BufferSize::S64, 512)).unwrap();
    assert!(child.is_closed());
    assert_eq!(err(child.try_allocate(1)), AllocError::Closed);
    // A grandchild of a pool closed by its ancestor's close.
    let grandchild = mid.child("late-g", cfg(BufferSize::S64, 512)).unwrap();
    assert!(grandchild.is_closed());
    assert_eq!(err(grandchild.allocate_blocking(1)), AllocError::Closed);
}

/// Guarantee 8: "a child built while an ancestor closes ends closed, its floor back" (the
/// floor of a child built after the close is back at once).
#[test]
fn guarantee_8_floored_child_of_a_closed_pool_gives_its_floor_back() {
    let root = BufPool::new(cfg(BufferSize::S64, 1024));
    let mid = root.child("mid", cfg(BufferSize::S64, 1024)).unwrap();
    root.close();
    let built = BufPool::builder(cfg(BufferSize::S64, 512))
        .parent(&mid)
        .min_memory(256)
        .build();
    // Either refused, or created closed with its floor back.
    if let Ok(child) = built {
        assert!(child.is_closed());
        assert_eq!(mid.stats().in_use_bytes, 0, "floor not back at mid");
        assert_eq!(root.stats().in_use_bytes, 0, "floor not back at root");
    }
}

/// Guarantee 8, raced: children (floored, at two depths) built while the root closes all end
/// closed, and every floor is back.
#[test]
fn guarantee_8_child_built_while_an_ancestor_closes_ends_closed_floor_back() {
    watchdog(10, || {
        for _ in 0..200 {
            let root = Arc::new(BufPool::new(cfg(BufferSize::S64, 1 << 20)));
            let mid = Arc::new(root.child("mid", cfg(BufferSize::S64, 1 << 20)).unwrap());
            let go = Arc::new(AtomicBool::new(false));
            let builder = {
                let (mid, go) = (Arc::clone(&mid), Arc::clone(&go));
                thread::spawn(move || {
                    while !go.load(SeqCst) {
                        std::hint::spin_loop();
                    }
                    let mut built = Vec::new();
                    for _ in 0..4 {
                        if let Ok(child) = BufPool::builder(cfg(BufferSize::S64, 4096))
                            .parent(&mid)
                            .min_memory(1024)
                            .build()
                        {
                            built.push(child);
                        }
                    }
                    built
                })
            };
            go.store(true, SeqCst);
            root.close();
            let built = builder.join().unwrap();
            for child in &built {
                assert!(child.is_closed(), "a child built during the close is open");
            }
            assert_eq!(root.stats().in_use_bytes, 0, "a floor was not given back");
            assert_eq!(
                mid.stats().in_use_bytes,
                0,
                "a floor was not given back at mid"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// 4. Reclaim rounds
// ---------------------------------------------------------------------------------------

type Action = Box<dyn Fn(usize) -> usize + Send + Sync>;

struct Hook {
    estimate: usize,
    action: Action,
}

impl Reclaimer for Hook {
    fn estimate(&self) -> usize {
        self.estimate
    }
    fn reclaim(&self, target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let freed = (self.action)(target);
        Box::pin(async move { freed })
    }
}

fn hook(estimate: usize, action: impl Fn(usize) -> usize + Send + Sync + 'static) -> Arc<Hook> {
    Arc::new(Hook {
        estimate,
        action: Box::new(action),
    })
}

/// README Reclaim, "Who is asked": "bytes freed into a descendant's floor do not help a
/// waiter at an ancestor, and the round goes on to the next reclaimer."
#[test]
fn reclaim_who_is_asked_bytes_freed_into_a_floor_do_not_end_the_round() {
    watchdog(10, || {
        let root = BufPool::new(cfg(BufferSize::S64, 1024));
        let floored = BufPool::builder(cfg(BufferSize::S64, 1024))
            .parent(&root)
            .min_memory(512)
            .build()
            .unwrap();
        let in_floor = Arc::new(Mutex::new(Some(floored.try_allocate(8).unwrap())));
        let at_root = Arc::new(Mutex::new(Some(root.try_allocate(8).unwrap())));
        assert_eq!(root.stats().in_use_bytes, 1024);
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (f, log) = (Arc::clone(&in_floor), Arc::clone(&asked));
        // Priority 0: asked first; frees into the child's floor and reports it.
        let _h1 = floored.register_reclaimer(
            "floor",
            0,
            hook(512, move |target| {
                assert_eq!(target, 64, "asked for what is short");
                log.lock().unwrap().push("floor");
                f.lock().unwrap().take().map_or(0, |a| a.allocated_bytes())
            }),
        );
        let (r, log) = (Arc::clone(&at_root), Arc::clone(&asked));
        let _h2 = root.register_reclaimer(
            "root",
            1,
            hook(512, move |target| {
                assert_eq!(target, 64, "still short by the books: the head's 64");
                log.lock().unwrap().push("root");
                r.lock().unwrap().take().map_or(0, |a| a.allocated_bytes())
            }),
        );
        let a = root
            .allocate_timeout(1, Duration::from_secs(5))
            .expect("the round should go on to the root's reclaimer");
        assert_eq!(*asked.lock().unwrap(), ["floor", "root"]);
        assert_eq!(root.stats().reclaim_rounds, 1);
        drop(a);
    });
}

/// README Reclaim, "Who is asked": ties broken by "registration order, across the pools of the
/// tree".
#[test]
fn reclaim_who_is_asked_ties_break_by_registration_order_across_the_tree() {
    for child_first in [true, false] {
        let order = watchdog(10, move || {
            let root = BufPool::new(cfg(BufferSize::S64, 128));
            let child = root.child("c", cfg(BufferSize::S64, 128)).unwrap();
            let held = root.try_allocate(2).unwrap();
            let asked = Arc::new(Mutex::new(Vec::new()));
            let mk = |name: &'static str| {
                let log = Arc::clone(&asked);
                hook(64, move |_| {
                    log.lock().unwrap().push(name);
                    0
                })
            };
            let handles = if child_first {
                vec![
                    child.register_reclaimer("child", 3, mk("child")),
                    root.register_reclaimer("root", 3, mk("root")),
                ]
            } else {
                vec![
                    root.register_reclaimer("root", 3, mk("root")),
                    child.register_reclaimer("child", 3, mk("child")),
                ]
            };
            let e = root
                .allocate_timeout(1, Duration::from_millis(100))
                .unwrap_err();
            assert_eq!(e, AllocError::TimedOut);
            drop((handles, held));
            asked.lock().unwrap().clone()
        });
        let expected = if child_first {
            ["child", "root"]
        } else {
            ["root", "child"]
        };
        assert_eq!(order, expected, "child registered first: {child_first}");
    }
}

/// README Reclaim, "No storm": "a reclaimer that reports bytes it did not free only makes the
/// round go on".
#[test]
fn reclaim_no_storm_a_liar_only_makes_the_round_go_on() {
    watchdog(10, || {
        let pool = BufPool::new(cfg(BufferSize::S64, 256));
        let cache = Arc::new(Mutex::new(Some(pool.try_allocate(4).unwrap())));
        let liar_asked = Arc::new(AtomicUsize::new(0));
        let n = Arc::clone(&liar_asked);
        let _liar = pool.register_reclaimer(
            "liar",
            0,
            hook(1 << 20, move |_| {
                n.fetch_add(1, SeqCst);
                1 << 20
            }),
        );
        let c = Arc::clone(&cache);
        let _honest = pool.register_reclaimer(
            "honest",
            1,
            hook(256, move |_| {
                c.lock().unwrap().take().map_or(0, |a| a.allocated_bytes())
            }),
        );
        let a = pool
            .allocate_timeout(1, Duration::from_secs(5))
            .expect("the honest reclaimer is asked after the liar");
        assert_eq!(liar_asked.load(SeqCst), 1);
        assert_eq!(pool.stats().reclaim_rounds, 1);
        assert!(
            pool.stats().reclaimed_bytes >= 1 << 20,
            "reports are counted"
        );
        drop(a);
    });
}

/// README Reclaim, "No storm": "A round that runs out of reclaimers without covering its
/// shortfall ... stalls the pool: no new round until it changes (a release, a registration,
/// a resize)".
#[test]
fn reclaim_no_storm_a_round_that_runs_out_stalls_until_a_change() {
    watchdog(10, || {
        let pool = BufPool::new(cfg(BufferSize::S64, 256));
        let held = pool.try_allocate(4).unwrap();
        let asked = Arc::new(AtomicUsize::new(0));
        let n = Arc::clone(&asked);
        let _liar = pool.register_reclaimer(
            "liar",
            0,
            hook(64, move |_| {
                n.fetch_add(1, SeqCst);
                64
            }),
        );
        assert_eq!(
            pool.allocate_timeout(1, Duration::from_millis(100))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(pool.stats().reclaim_rounds, 1);
        assert_eq!(asked.load(SeqCst), 1, "asked once, not in a storm");
        // Nothing changed: no new round.
        assert_eq!(
            pool.allocate_timeout(1, Duration::from_millis(50))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(pool.stats().reclaim_rounds, 1, "a new round with no change");
        // A registration is a change.
        let _other = pool.register_reclaimer("other", 5, hook(0, |_| 0));
        let _ = pool.allocate_timeout(1, Duration::from_millis(50));
        assert_eq!(pool.stats().reclaim_rounds, 2);
        drop(held);
    });
}

// ---------------------------------------------------------------------------------------
// 5. A floored pool's bound
// ---------------------------------------------------------------------------------------

fn floored(root: &BufPool, cap: usize, floor: usize) -> BufPool {
    BufPool::builder(cfg(BufferSize::S64, cap))
        .parent(root)
        .min_memory(floor)
        .build()
        .unwrap()
}

/// README bad-input table: a child pool's `max` is the smallest cap on its chain, floors
/// or not (a request uses every floor on its way before it climbs with the rest), and
/// guarantee 15: a request above it fails at once with `ExceedsBudget`.
#[test]
fn bad_input_table_floored_child_above_the_chains_cap_fails_at_once_naming_it() {
    let root = BufPool::new(cfg(BufferSize::S64, 1024));
    let child = floored(&root, 1024, 256);
    assert_eq!(
        err(child.try_allocate(17)),
        AllocError::ExceedsBudget {
            requested_bytes: 17 * 64,
            max_memory: 1024
        }
    );
    // Waiting forms fail at once too (never a wait).
    let e = watchdog(10, {
        let root = BufPool::new(cfg(BufferSize::S64, 1024));
        move || {
            let child = floored(&root, 1024, 256);
            child.allocate_blocking(17).unwrap_err()
        }
    });
    assert_eq!(
        e,
        AllocError::ExceedsBudget {
            requested_bytes: 17 * 64,
            max_memory: 1024
        }
    );
    let mut f = Box::pin(child.allocate(17));
    assert!(matches!(
        poll_once(&mut f),
        Poll::Ready(Err(AllocError::ExceedsBudget {
            max_memory: 1024,
            ..
        }))
    ));
    // A floor bigger than half changes nothing.
    let root = BufPool::new(cfg(BufferSize::S64, 1024));
    let child = floored(&root, 1024, 768);
    assert_eq!(
        err(child.try_allocate(17)),
        AllocError::ExceedsBudget {
            requested_bytes: 17 * 64,
            max_memory: 1024
        }
    );
}

/// Edge: a floored child's request of the chain's whole cap is served on an idle tree: the
/// floor first, the rest above it.
#[test]
fn bad_input_table_floored_child_request_exactly_at_the_bound_is_served() {
    let root = BufPool::new(cfg(BufferSize::S64, 1024));
    let child = floored(&root, 1024, 256);
    let a = child.try_allocate(16).unwrap();
    assert_eq!(root.stats().in_use_bytes, 1024);
    drop(a);
    assert_eq!(root.stats().in_use_bytes, 256);
    let mut f = Box::pin(child.allocate(16));
    assert!(matches!(poll_once(&mut f), Poll::Ready(Ok(_))));
    drop(f);
    // Floor bigger than half.
    let root = BufPool::new(cfg(BufferSize::S64, 1024));
    let child = floored(&root, 1024, 768);
    let a = child.try_allocate(16).unwrap();
    drop(a);
    // The bound with a cap further up the chain (no floor there).
    let top = BufPool::new(cfg(BufferSize::S64, 1024));
    let mid = top.child("mid", cfg(BufferSize::S64, 4096)).unwrap();
    let child = floored(&mid, 4096, 256);
    assert!(matches!(
        err(child.try_allocate(17)),
        AllocError::ExceedsBudget {
            max_memory: 1024,
            ..
        }
    ));
    drop(child.try_allocate(16).unwrap());
    assert_eq!(top.stats().in_use_bytes, 256);
}

/// Edge: a grandchild of a floored pool gets the chain's smallest cap too (1024), and a
/// request of all of it is served on an idle tree (its parent's floor on the way).
#[test]
fn bad_input_table_grandchild_of_a_floored_pool_gets_the_chains_cap() {
    let root = BufPool::new(cfg(BufferSize::S64, 1024));
    let child = floored(&root, 1024, 256);
    let grandchild = child.child("g", cfg(BufferSize::S64, 4096)).unwrap();
    assert_eq!(
        err(grandchild.try_allocate(17)),
        AllocError::ExceedsBudget {
            requested_bytes: 17 * 64,
            max_memory: 1024
        }
    );
    let all = grandchild.try_allocate(16).unwrap();
    assert_eq!(root.stats().in_use_bytes, 1024);
    drop(all);
    assert_eq!(root.stats().in_use_bytes, 256);
}

/// README bad-input table, child pools: `max` = "smallest cap on its chain" and the row
/// "`n * bs == max`": "`Ok` (waits for all of it)". For a grandchild of a floored pool the
/// chain's smallest cap is 1024, but the floored parent can serve at most 768 above its
/// floor (its request takes the floor whole or not at all), so a request of 1024 on an idle
/// tree waits for good instead of being served or failing at once.
#[test]
fn bad_input_table_grandchild_of_a_floored_pool_request_at_the_chains_cap_is_served() {
    let e = watchdog(10, || {
        let root = BufPool::new(cfg(BufferSize::S64, 1024));
        let child = floored(&root, 1024, 256);
        let grandchild = child.child("g", cfg(BufferSize::S64, 4096)).unwrap();
        // Everything idle: only the parent's floor is set aside.
        assert_eq!(root.stats().in_use_bytes, 256);
        let at_cap = grandchild
            .allocate_timeout(16, Duration::from_millis(300))
            .map(drop);
        let above_bound = grandchild
            .allocate_timeout(13, Duration::from_millis(300))
            .map(drop);
        (at_cap, above_bound)
    });
    // Literally: Ok (served), or at the least an `ExceedsBudget` at once, never a wait that
    // times out on an idle tree.
    assert!(
        !matches!(e.0, Err(AllocError::TimedOut)) && !matches!(e.1, Err(AllocError::TimedOut)),
        "n * bs == max on an idle tree: {e:?}"
    );
}

/// Guarantee 15 after a resize: the bound follows the root's budget (the chain's smallest
/// cap), and a request up to it is served with the floor first.
#[test]
fn guarantee_15_bound_follows_a_shrink_of_the_root() {
    watchdog(10, || {
        let root = BufPool::new(cfg(BufferSize::S64, 1024));
        let child = floored(&root, 1024, 256);
        root.set_max_memory(512).unwrap();
        assert_eq!(
            err(child.allocate_timeout(9, Duration::from_secs(5))),
            AllocError::ExceedsBudget {
                requested_bytes: 576,
                max_memory: 512
            }
        );
        drop(child.allocate_timeout(8, Duration::from_secs(5)).unwrap());
    });
}

/// The same table row for a floored pool under a floored pool: "without floored ancestors"
/// the bound is not applied, so `max` is the chain's smallest cap (1024), and `n * bs` of
/// 832 (above the parent's bound 768) waits for good on an idle tree.
#[test]
fn bad_input_table_floored_grandchild_of_a_floored_pool_never_waits_for_good() {
    let out = watchdog(10, || {
        let root = BufPool::new(cfg(BufferSize::S64, 1024));
        let mid = floored(&root, 1024, 256);
        let grandchild = floored(&mid, 1024, 128);
        grandchild
            .allocate_timeout(13, Duration::from_millis(300))
            .map(drop)
    });
    assert!(
        !matches!(out, Err(AllocError::TimedOut)),
        "a request of 832 on an idle tree under a 1024 cap: {out:?}"
    );
}

/// Edge: `try_reserve` on a floored child near the bound (the chain's smallest cap).
#[test]
fn reservations_table_floored_child_try_reserve_near_the_bound() {
    let root = BufPool::new(cfg(BufferSize::S64, 1024));
    let child = floored(&root, 1024, 256);
    let r = child.try_reserve(1024).unwrap();
    assert_eq!(r.size(), 1024);
    assert_eq!(root.stats().in_use_bytes, 1024);
    drop(r);
    assert_eq!(
        child.try_reserve(1025).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 1032,
            max_memory: 1024
        }
    );
    // A growth is a request of its own: the floor first (all of it went to the first 704),
    // then above.
    let mut r = child.try_reserve(700).unwrap();
    assert_eq!(root.stats().in_use_bytes, 704);
    r.try_grow(100).unwrap();
    assert_eq!(r.size(), 808); // 704 + 104, each rounded up to 8
    assert_eq!(root.stats().in_use_bytes, 808);
    drop(r);
    // A growth above the chain's cap fails at once.
    let mut r = child.try_reserve(8).unwrap();
    assert!(matches!(
        r.try_grow(1100),
        Err(AllocError::ExceedsBudget { .. })
    ));
    assert_eq!(r.size(), 8);
    drop(r);
    // Rounding overflow names the same number.
    assert_eq!(
        child.try_reserve(usize::MAX).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: usize::MAX,
            max_memory: 1024
        }
    );
    // A blocking reserve above the bound fails at once.
    let e = watchdog(10, {
        let root = BufPool::new(cfg(BufferSize::S64, 1024));
        move || {
            floored(&root, 1024, 256)
                .reserve_blocking(1100)
                .unwrap_err()
        }
    });
    assert!(matches!(
        e,
        AllocError::ExceedsBudget {
            max_memory: 1024,
            ..
        }
    ));
}

// ---------------------------------------------------------------------------------------
// 6. stats()
// ---------------------------------------------------------------------------------------

/// Changelog 6 / reservation.rs: "A reservation whose rounding overflows names the same
/// max_memory as every other ExceedsBudget of the pool (the chain's)".
#[test]
fn reservations_table_rounding_overflow_names_the_chains_smallest_cap() {
    let root = BufPool::new(cfg(BufferSize::S64, 512));
    let child = root.child("c", cfg(BufferSize::S64, 4096)).unwrap();
    let plain = child.try_reserve(1024).unwrap_err();
    assert_eq!(
        plain,
        AllocError::ExceedsBudget {
            requested_bytes: 1024,
            max_memory: 512
        }
    );
    assert_eq!(
        child.try_reserve(usize::MAX).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: usize::MAX,
            max_memory: 512
        }
    );
    let mut r = child.try_reserve(8).unwrap();
    assert!(matches!(
        r.try_grow(usize::MAX),
        Err(AllocError::ExceedsBudget {
            max_memory: 512,
            ..
        })
    ));
}

/// `PoolStats::would_block`: "`try_allocate` (and its zeroed form), `try_reserve`,
/// `Reservation::try_grow` and `Reservation::resize_to`, counted by the pool the call was
/// made to (a child's, when the room was missing at an ancestor)".
#[test]
fn stats_would_block_counted_by_the_pool_called() {
    let root = BufPool::new(cfg(BufferSize::S64, 256));
    let child = root.child("c", cfg(BufferSize::S64, 1024)).unwrap();
    let mut r: Reservation = child.try_reserve(64).unwrap();
    let held = root.try_allocate(3).unwrap();
    assert_eq!(err(child.try_allocate(1)), AllocError::WouldBlock);
    assert_eq!(err(child.try_allocate_zeroed(1)), AllocError::WouldBlock);
    assert_eq!(child.try_reserve(64).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(r.try_grow(64).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(r.resize_to(256).unwrap_err(), AllocError::WouldBlock);
    assert_eq!(child.stats().would_block, 5);
    assert_eq!(root.stats().would_block, 0);
    assert_eq!(err(root.try_allocate(1)), AllocError::WouldBlock);
    assert_eq!(root.stats().would_block, 1);
    assert_eq!(child.stats().would_block, 5);
    drop((held, r));
}

/// `PoolStats::timed_out`: "counted by the pool the call was made to".
#[test]
fn stats_timed_out_counted_by_the_pool_called() {
    watchdog(10, || {
        let root = BufPool::new(cfg(BufferSize::S64, 128));
        let child = root.child("c", cfg(BufferSize::S64, 1024)).unwrap();
        let held = root.try_allocate(2).unwrap();
        assert_eq!(
            err(child.allocate_timeout(1, Duration::from_millis(20))),
            AllocError::TimedOut
        );
        assert_eq!(
            child
                .reserve_timeout(64, Duration::from_millis(20))
                .unwrap_err(),
            AllocError::TimedOut
        );
        assert_eq!(child.stats().timed_out, 2);
        assert_eq!(root.stats().timed_out, 0);
        drop(held);
    });
}

/// `PoolStats::queue_full`: "counted by the pool whose queue was full".
#[test]
fn stats_queue_full_counted_by_the_pool_whose_queue_was_full() {
    watchdog(10, || {
        let root = BufPool::builder(cfg(BufferSize::S64, 128))
            .max_waiters(0)
            .build()
            .unwrap();
        let child = root.child("c", cfg(BufferSize::S64, 1024)).unwrap();
        let held = root.try_allocate(2).unwrap();
        assert_eq!(err(child.allocate_blocking(1)), AllocError::QueueFull);
        assert_eq!(root.stats().queue_full, 1);
        assert_eq!(child.stats().queue_full, 0);
        // The child's own queue full.
        let child2 = BufPool::builder(cfg(BufferSize::S64, 64))
            .parent(&root)
            .max_waiters(0)
            .build()
            .unwrap();
        drop(held);
        let h2 = child2.try_allocate(1).unwrap();
        assert_eq!(err(child2.allocate_blocking(1)), AllocError::QueueFull);
        assert_eq!(child2.stats().queue_full, 1);
        assert_eq!(root.stats().queue_full, 1);
        drop(h2);
    });
}

/// Guarantee 10: "under load a read may differ from the truth, for an instant, by one wrap
/// of a word counter (64), either way, for each thread caught at that instant".
#[test]
fn guarantee_10_outstanding_under_load_within_one_wrap_per_thread() {
    const THREADS: usize = 4;
    watchdog(10, || {
        let pool = Arc::new(BufPool::new(cfg(BufferSize::S64, 64 * 64)));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let (pool, stop) = (Arc::clone(&pool), Arc::clone(&stop));
                thread::spawn(move || {
                    while !stop.load(SeqCst) {
                        drop(pool.try_allocate(1).unwrap());
                    }
                })
            })
            .collect();
        let end = Instant::now() + Duration::from_millis(300);
        let mut last_total = 0usize;
        while Instant::now() < end {
            let s = pool.stats();
            assert!(
                s.outstanding <= THREADS + 64 * THREADS,
                "outstanding {} (truth at most {THREADS})",
                s.outstanding
            );
            assert!(
                s.total_allocations + 2 * 64 * THREADS >= last_total,
                "total_allocations went back by more than the bound"
            );
            last_total = last_total.max(s.total_allocations);
        }
        stop.store(true, SeqCst);
        for w in workers {
            w.join().unwrap();
        }
        let s = pool.stats();
        assert_eq!(s.outstanding, 0);
        assert!(s.total_allocations >= last_total);
    });
}

// ---------------------------------------------------------------------------------------
// 7. PoolReport::own_bytes
// ---------------------------------------------------------------------------------------

/// `PoolReport::own_bytes`: "each child counted at its bytes in use plus the idle part of its
/// floor ... so a floor never counts as this pool's own".
#[test]
fn own_bytes_doc_child_counted_at_use_plus_idle_floor() {
    let root = BufPool::new(cfg(BufferSize::S64, 4096));
    let child = floored(&root, 4096, 512);
    assert_eq!(
        root.report().own_bytes(),
        0,
        "an idle floor is not the root's"
    );
    let a = child.try_allocate(2).unwrap(); // inside the floor
    assert_eq!(root.stats().in_use_bytes, 512);
    assert_eq!(root.report().own_bytes(), 0);
    // More than the floor has left: its 384 first, the other 256 from above.
    let b = child.try_allocate(10).unwrap();
    assert_eq!(root.stats().in_use_bytes, 512 + 256);
    assert_eq!(root.report().own_bytes(), 0);
    let c = child.try_allocate(6).unwrap(); // 384 more, all from above
    assert_eq!(root.stats().in_use_bytes, 512 + 640);
    assert_eq!(root.report().own_bytes(), 0);
    drop(a);
    assert_eq!(root.report().own_bytes(), 0);
    drop(c);
    assert_eq!(root.report().own_bytes(), 0);
    let mine = root.try_allocate(3).unwrap();
    assert_eq!(root.report().own_bytes(), 192);
    // tree_report agrees.
    assert_eq!(root.tree_report().own_bytes(), 192);
    drop((b, mine));
    assert_eq!(root.report().own_bytes(), 0);
    // A child's own report: its own bytes are its allocations, its idle floor not among them.
    let c = child.try_allocate(1).unwrap();
    assert_eq!(child.report().own_bytes(), 64);
    drop(c);
}

// ---------------------------------------------------------------------------------------
// 8. Wait histogram; budget futures polled after Ready
// ---------------------------------------------------------------------------------------

/// `Allocate` "# Panics": "Polling it again after it returned `Ready` may panic ...; the
/// budget is not affected. The same goes for every budget future of the crate".
#[test]
fn allocate_doc_polled_after_ready_leaves_the_budget_alone() {
    let pool = Arc::new(BufPool::new(cfg(BufferSize::S64, 1024)));
    fn poll_twice<F: Future + Unpin>(f: &mut F) -> F::Output {
        let first = match poll_once(f) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("expected ready"),
        };
        let _ = catch_unwind(AssertUnwindSafe(|| poll_once(f)));
        first
    }
    let mut f = Box::pin(pool.allocate(2));
    let a = poll_twice(&mut f).unwrap();
    drop(f);
    assert_eq!(pool.stats().in_use_bytes, 128);
    let mut f = Box::pin(pool.allocate_zeroed(1));
    let z = poll_twice(&mut f).unwrap();
    drop(f);
    assert_eq!(pool.stats().in_use_bytes, 192);
    let mut f = Box::pin(Arc::clone(&pool).allocate_owned(1));
    let o = poll_twice(&mut f).unwrap();
    drop(f);
    assert_eq!(pool.stats().in_use_bytes, 256);
    let mut f = Box::pin(pool.reserve(64));
    let mut r = poll_twice(&mut f).unwrap();
    drop(f);
    assert_eq!(pool.stats().in_use_bytes, 320);
    let mut f = Box::pin(Arc::clone(&pool).reserve_owned(64));
    let ro = poll_twice(&mut f).unwrap();
    drop(f);
    assert_eq!(pool.stats().in_use_bytes, 384);
    {
        let mut g = Box::pin(r.grow(64));
        poll_twice(&mut g).unwrap();
    }
    assert_eq!(r.size(), 128);
    assert_eq!(pool.stats().in_use_bytes, 448);
    drop((a, z, o, r, ro));
    let s = pool.stats();
    assert_eq!((s.in_use_bytes, s.outstanding, s.reserved_bytes), (0, 0, 0));
    assert!(pool.try_allocate(16).is_ok());
}

#[cfg(feature = "metrics")]
mod histogram {
    use super::*;
    use membudget::metric_names;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    fn samples(
        snapshotter: &metrics_util::debugging::Snapshotter,
        name: &str,
        pool: &str,
    ) -> usize {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| {
                key.key().name() == name
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == metric_names::POOL_LABEL && l.value() == pool)
            })
            .map(|(.., value)| match value {
                DebugValue::Histogram(samples) => samples.len(),
                other => panic!("{other:?}"),
            })
            .sum()
    }

    /// `metric_names::WAIT_SECONDS`: "recorded by the pool whose queue it waited in: a
    /// child's request that waited in an ancestor's queue is that ancestor's".
    #[test]
    fn wait_seconds_doc_a_childs_wait_at_the_root_is_the_roots_sample() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let root = BufPool::builder(cfg(BufferSize::S64, 128))
                .name("h-root")
                .build()
                .unwrap();
            let child = BufPool::builder(cfg(BufferSize::S64, 1024))
                .name("h-child")
                .parent(&root)
                .build()
                .unwrap();
            let held = root.try_allocate(2).unwrap();
            let mut f = Box::pin(child.allocate(1));
            assert!(poll_once(&mut f).is_pending());
            drop(held);
            let a = match poll_once(&mut f) {
                Poll::Ready(out) => out.unwrap(),
                Poll::Pending => panic!("served by the release"),
            };
            drop(a);
            assert_eq!(root.stats().waited_allocations, 1);
            assert_eq!(child.stats().waited_allocations, 0);
            assert_eq!(
                samples(&snapshotter, metric_names::WAIT_SECONDS, "h-root"),
                1
            );
            assert_eq!(
                samples(&snapshotter, metric_names::WAIT_SECONDS, "h-child"),
                0
            );
        });
    }

    /// `metric_names::WAIT_SECONDS`: "A grant given back untaken (its request dropped after
    /// the grant) counts in `membudget_waited_total` but records no sample"; and
    /// reservations' waits are samples too ("taking its allocation or reservation").
    #[test]
    fn wait_seconds_doc_untaken_grant_records_no_sample_reservation_does() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let pool = BufPool::builder(cfg(BufferSize::S64, 128))
                .name("h-untaken")
                .build()
                .unwrap();
            let held = pool.try_allocate(2).unwrap();
            let mut f = Box::pin(pool.allocate(1));
            assert!(poll_once(&mut f).is_pending());
            drop(held); // granted, not taken
            drop(f);
            assert_eq!(pool.stats().waited_allocations, 1);
            assert_eq!(pool.stats().in_use_bytes, 0);
            assert_eq!(
                samples(&snapshotter, metric_names::WAIT_SECONDS, "h-untaken"),
                0
            );
            let held = pool.try_allocate(2).unwrap();
            let mut f = Box::pin(pool.reserve(64));
            assert!(poll_once(&mut f).is_pending());
            drop(held);
            let r = match poll_once(&mut f) {
                Poll::Ready(out) => out.unwrap(),
                Poll::Pending => panic!("served"),
            };
            drop(r);
            assert_eq!(pool.stats().waited_allocations, 2);
            assert_eq!(
                samples(&snapshotter, metric_names::WAIT_SECONDS, "h-untaken"),
                1
            );
        });
    }
}
