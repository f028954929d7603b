//! Adversarial tests of the block recycler (`BufPoolBuilder::recycle`): an exact model of the
//! cache checked against `stats()` and against the real memory the global allocator holds
//! (a counting allocator that counts only 4096-aligned blocks, which only pools built with
//! `direct_io_alignment()` and 4 KiB buffers make), zeroed requests served while dirty blocks
//! are cached, shrinks below the cached bytes, shutdown with cached blocks, child pools,
//! hand-overs to waiters of other sizes, and threads.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::Read;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::{BudgetChecker, Rng, assert_full_budget_back, assert_idle, rounds, watchdog};
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate};

// ---- a counting allocator for 4096-aligned blocks only ----

struct Counting;

static LIVE_ALIGNED_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_ALIGNED_BLOCKS: AtomicIsize = AtomicIsize::new(0);
const COUNTED_ALIGN: usize = 4096;

// SAFETY: forwards to `System`, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() && layout.align() == COUNTED_ALIGN {
            LIVE_ALIGNED_BYTES.fetch_add(layout.size() as isize, SeqCst);
            LIVE_ALIGNED_BLOCKS.fetch_add(1, SeqCst);
        }
        ptr
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() && layout.align() == COUNTED_ALIGN {
            LIVE_ALIGNED_BYTES.fetch_add(layout.size() as isize, SeqCst);
            LIVE_ALIGNED_BLOCKS.fetch_add(1, SeqCst);
        }
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.align() == COUNTED_ALIGN {
            LIVE_ALIGNED_BYTES.fetch_sub(layout.size() as isize, SeqCst);
            LIVE_ALIGNED_BLOCKS.fetch_sub(1, SeqCst);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() && layout.align() == COUNTED_ALIGN {
            LIVE_ALIGNED_BYTES.fetch_add(new_size as isize - layout.size() as isize, SeqCst);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tests that read the counting allocator run one at a time.
static COUNTED: Mutex<()> = Mutex::new(());

fn counted() -> MutexGuard<'static, ()> {
    COUNTED.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn live_bytes() -> usize {
    let live = LIVE_ALIGNED_BYTES.load(SeqCst);
    assert!(live >= 0, "the counting allocator went negative: {live}");
    live as usize
}

fn live_blocks() -> usize {
    LIVE_ALIGNED_BLOCKS.load(SeqCst) as usize
}

const BS: BufferSize = BufferSize::S4096;
const B: usize = 4096;

/// A pool whose blocks (and only those) the counting allocator counts.
fn counted_pool(buffers: usize, per_size: usize, min_bytes: usize) -> BufPool {
    BufPool::builder(BufPoolCfg {
        buffer_size: BS,
        max_memory: buffers * B,
    })
    .direct_io_alignment()
    .recycle(per_size)
    .recycle_min_bytes(min_bytes)
    .build()
    .unwrap()
}

fn recycling(size: BufferSize, buffers: usize, per_size: usize, min_bytes: usize) -> BufPool {
    BufPool::builder(BufPoolCfg {
        buffer_size: size,
        max_memory: size.bytes() * buffers,
    })
    .recycle(per_size)
    .recycle_min_bytes(min_bytes)
    .build()
    .unwrap()
}

/// Writes `byte` over every byte of the allocation, through the safe uninitialised view.
fn dirty(allocation: &mut BufPoolAllocation, byte: u8) {
    for b in allocation.uninit_mut() {
        *b = MaybeUninit::new(byte);
    }
}

/// Every byte of a zeroed allocation, read through the safe filled view only.
#[track_caller]
fn assert_zeroed(allocation: BufPoolAllocation) -> BufPoolAllocation {
    let mut filled = allocation.into_filled();
    let capacity = filled.capacity();
    assert!(
        filled.set_filled(capacity),
        "a zeroed allocation is initialised"
    );
    assert!(
        filled.filled().iter().all(|&b| b == 0),
        "a zeroed allocation showed non-zero bytes"
    );
    filled.into_allocation()
}

/// The footprint invariant of guarantee 1 at a quiescent point.
#[track_caller]
fn assert_footprint(pool: &BufPool) {
    let s = pool.stats();
    assert!(
        s.cached_bytes <= s.max_memory.saturating_sub(s.in_use_bytes),
        "live plus cached above the budget: {s}"
    );
}

// ---- the model ----

#[derive(Debug, Default)]
struct Model {
    budget: usize,
    in_use: usize,
    cache: BTreeMap<usize, usize>,
    per_size: usize,
    min_bytes: usize,
}

impl Model {
    fn cached(&self) -> usize {
        self.cache.iter().map(|(bytes, count)| bytes * count).sum()
    }

    fn evict(&mut self) {
        let allowed = self.budget.saturating_sub(self.in_use);
        let mut cached = self.cached();
        if cached <= allowed {
            return;
        }
        for (&bytes, count) in self.cache.iter_mut().rev() {
            while cached > allowed && *count > 0 {
                *count -= 1;
                cached -= bytes;
            }
        }
    }

    fn allocate(&mut self, bytes: usize, zeroed: bool) -> Result<(), AllocError> {
        if bytes > self.budget {
            return Err(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory: self.budget,
            });
        }
        if self.in_use + bytes > self.budget {
            return Err(AllocError::WouldBlock);
        }
        self.in_use += bytes;
        if !zeroed && bytes >= self.min_bytes {
            if let Some(count) = self.cache.get_mut(&bytes).filter(|c| **c > 0) {
                *count -= 1;
            }
        }
        self.evict();
        Ok(())
    }

    fn release(&mut self, bytes: usize) {
        if bytes >= self.min_bytes && self.cached() + self.in_use <= self.budget {
            let count = self.cache.entry(bytes).or_default();
            if *count < self.per_size {
                *count += 1;
            }
        }
        self.in_use -= bytes;
    }

    fn resize(&mut self, budget: usize) {
        self.budget = budget;
        self.evict();
    }
}

fn run_model(seed: u64, steps: usize, per_size: usize, min_bytes: usize) {
    let _guard = counted();
    let base = live_bytes();
    let base_blocks = live_blocks();
    let pool = counted_pool(16, per_size, min_bytes);
    let mut model = Model {
        budget: 16 * B,
        per_size,
        min_bytes,
        ..Model::default()
    };
    let mut rng = Rng::new(seed);
    let mut live: Vec<BufPoolAllocation> = Vec::new();
    for step in 0..steps {
        let what = rng.range(0, 9);
        let context = format!("seed {seed} step {step} op {what}");
        match what {
            0..=3 => {
                let n = rng.range(1, 6);
                let zeroed = rng.range(0, 2) == 0;
                let got = if zeroed {
                    pool.try_allocate_zeroed(n)
                } else {
                    pool.try_allocate(n)
                };
                let expected = model.allocate(n * B, zeroed);
                match (got, expected) {
                    (Ok(mut allocation), Ok(())) => {
                        if zeroed {
                            allocation = assert_zeroed(allocation);
                        }
                        dirty(&mut allocation, 0xA5);
                        live.push(allocation);
                    }
                    (Err(got), Err(expected)) => assert_eq!(got, expected, "{context}"),
                    (got, expected) => panic!("{context}: pool {got:?}, model {expected:?}"),
                }
            }
            4..=6 => {
                if !live.is_empty() {
                    let index = rng.range(0, live.len() - 1);
                    let allocation = live.swap_remove(index);
                    let bytes = allocation.allocated_bytes();
                    drop(allocation);
                    model.release(bytes);
                }
            }
            7 => {
                let budget = rng.range(0, 20) * B + if rng.range(0, 3) == 0 { 8 } else { 0 };
                match pool.set_max_memory(budget) {
                    Ok(()) => model.resize(budget),
                    Err(_) => assert!(budget < B, "{context}: set_max_memory({budget}) refused"),
                }
            }
            8 => {
                let bytes = rng.range(0, 6) * B;
                let free = model
                    .budget
                    .saturating_sub(model.in_use)
                    .min(model.budget.saturating_sub(B));
                let forgotten = free.min(bytes);
                assert_eq!(pool.forget_max_memory(bytes), forgotten, "{context}");
                model.resize(model.budget - forgotten);
            }
            _ => {
                let bytes = rng.range(0, 4) * B;
                pool.add_max_memory(bytes);
                model.resize(model.budget + bytes);
            }
        }
        let s = pool.stats();
        assert_eq!(
            (s.in_use_bytes, s.cached_bytes, s.max_memory),
            (model.in_use, model.cached(), model.budget),
            "{context}: stats against the model ({s}); model {model:?}"
        );
        assert_eq!(
            live_bytes() - base,
            model.in_use + model.cached(),
            "{context}: the memory held is not live plus cached ({s})"
        );
        assert_eq!(
            live_blocks() - base_blocks,
            live.len() + model.cache.values().sum::<usize>(),
            "{context}: blocks held are not the live allocations plus the cached blocks"
        );
        assert!(
            model.cached() <= model.budget.saturating_sub(model.in_use),
            "{context}: footprint above the budget ({s})"
        );
    }
    drop(live);
    drop(pool);
    assert_eq!(
        live_bytes(),
        base,
        "seed {seed}: blocks leaked past the pool's drop"
    );
}

#[test]
fn model_cached_and_real_memory_match_at_every_step() {
    watchdog(60, || {
        for seed in 0..rounds(8, 1) as u64 {
            run_model(seed, rounds(400, 40), 2, 0);
        }
    });
}

#[test]
fn model_with_a_threshold_and_one_block_per_size() {
    watchdog(60, || {
        for seed in 100..100 + rounds(6, 1) as u64 {
            run_model(seed, rounds(400, 40), 1, 3 * B);
        }
    });
}

// ---- zeroed requests while dirty blocks are cached ----

#[test]
fn every_zeroed_form_gives_zeros_while_a_dirty_block_of_its_size_is_cached() {
    watchdog(20, || {
        let pool = Arc::new(recycling(BufferSize::S4096, 8, 4, 0));
        let poison = |pool: &BufPool| {
            // Two dirty blocks of 2 buffers cached.
            let mut a = pool.try_allocate(2).unwrap();
            let mut b = pool.try_allocate(2).unwrap();
            dirty(&mut a, 0xEE);
            dirty(&mut b, 0xEF);
            drop((a, b));
            assert!(pool.stats().cached_bytes >= 4 * 4096);
            assert_footprint(pool);
        };
        poison(&pool);
        let a = assert_zeroed(pool.try_allocate_zeroed(2).unwrap());
        drop(a);
        poison(&pool);
        let a = assert_zeroed(pool.allocate_zeroed_blocking(2).unwrap());
        drop(a);
        poison(&pool);
        let a = assert_zeroed(
            pool.allocate_zeroed_timeout(2, Duration::from_millis(10))
                .unwrap(),
        );
        drop(a);
        poison(&pool);
        let a = assert_zeroed(futures::executor::block_on(pool.allocate_zeroed(2)).unwrap());
        drop(a);
        poison(&pool);
        let a = assert_zeroed(
            futures::executor::block_on(Arc::clone(&pool).allocate_zeroed_owned(2)).unwrap(),
        );
        drop(a);
        assert_footprint(&pool);
        // A plain request does reuse a cached block (the attack above was real).
        let mut reused = pool.try_allocate(2).unwrap().into_filled();
        assert!(
            !reused.set_filled(1),
            "a recycled dirty block reads as initialised"
        );
        drop(reused);
        assert_idle(&pool);
    });
}

#[test]
fn a_dirty_block_handed_to_a_waiter_is_zero_for_a_zeroed_one_and_uninitialised_for_a_plain_one() {
    watchdog(20, || {
        let pool = recycling(BufferSize::S4096, 4, 4, 0);
        // A zeroed waiter of exactly the released block's size.
        let mut held = pool.try_allocate(4).unwrap();
        dirty(&mut held, 0x77);
        let mut waiter = Box::pin(pool.allocate_zeroed(4));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        drop(held);
        let Poll::Ready(Ok(got)) = waiter.as_mut().poll(&mut cx) else {
            panic!("not served")
        };
        let mut got = assert_zeroed(got);
        assert_eq!(pool.stats().cached_bytes, 0, "the block went to the waiter");
        dirty(&mut got, 0x78);
        // A plain waiter gets the dirty block: no safe view may show its old bytes.
        let mut plain = Box::pin(pool.allocate(4));
        assert!(plain.as_mut().poll(&mut cx).is_pending());
        drop(got);
        let Poll::Ready(Ok(got)) = plain.as_mut().poll(&mut cx) else {
            panic!("not served")
        };
        let mut filled = got.into_filled();
        assert!(!filled.set_filled(1));
        assert!(filled.filled().is_empty());
        assert_eq!(filled.buffers().count(), 0);
        assert!(filled.io_slices().iter().all(|s| s.is_empty()));
        // `read_from` offers only initialised bytes: zeros, not the old 0x78.
        struct Peek(usize);
        impl Read for Peek {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                assert!(buf.iter().all(|&b| b == 0), "read_from offered old bytes");
                self.0 = buf.len();
                Ok(0)
            }
        }
        let mut peek = Peek(0);
        assert_eq!(filled.read_from(&mut peek).unwrap(), 0);
        assert_eq!(peek.0, 4 * 4096);
        drop(filled);
        assert_idle(&pool);
        assert_footprint(&pool);
    });
}

#[test]
fn owned_and_polled_allocations_of_recycled_blocks_never_read_as_initialised() {
    watchdog(20, || {
        let pool = Arc::new(recycling(BufferSize::S4096, 4, 4, 0));
        let mut a = pool.try_allocate(2).unwrap();
        dirty(&mut a, 0x99);
        let address = a.first();
        drop(a);
        let owned = futures::executor::block_on(Arc::clone(&pool).allocate_owned(2)).unwrap();
        assert_eq!(owned.first(), address, "reused");
        let mut filled = owned.into_filled();
        assert!(!filled.set_filled(1));
        let mut a = filled.into_allocation();
        dirty(&mut a, 0x98);
        drop(a);
        let mut poller = PollAllocate::new(Arc::clone(&pool));
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(Ok(polled)) = poller.poll_allocate(&mut cx, 2) else {
            panic!()
        };
        assert_eq!(polled.first(), address, "reused");
        let mut filled = polled.into_filled();
        assert!(!filled.set_filled(1));
        filled.fill(1, 3);
        assert!(filled.set_filled(3));
        assert!(!filled.set_filled(4));
        assert_eq!(filled.filled(), &[1, 1, 1]);
        drop(filled);
        drop(poller);
        assert_idle(&pool);
    });
}

// ---- shrinks below the cached bytes ----

#[test]
fn shrinks_below_the_cached_bytes_free_them_at_once() {
    let _guard = counted();
    let base = live_bytes();
    let pool = counted_pool(16, 8, 0);
    let blocks: Vec<_> = (1..=4).map(|n| pool.try_allocate(n).unwrap()).collect();
    drop(blocks); // 1+2+3+4 = 10 buffers cached
    assert_eq!(pool.stats().cached_bytes, 10 * B);
    assert_eq!(live_bytes() - base, 10 * B);
    // Shrink to 5 buffers: the largest go first (4, then 3 → 3 left: 1 + 2).
    pool.set_max_memory(5 * B).unwrap();
    assert_eq!(pool.stats().cached_bytes, 3 * B);
    assert_eq!(live_bytes() - base, 3 * B);
    // forget while something is live: free budget only; cache trimmed to what is left.
    let held = pool.try_allocate(1).unwrap(); // reuses the 1-buffer block
    assert_eq!(pool.stats().cached_bytes, 2 * B);
    // Free budget 4 of 5 (keeping one buffer): the budget is now what is live.
    assert_eq!(pool.forget_max_memory(usize::MAX), 4 * B);
    assert_eq!(pool.stats().max_memory, B);
    assert_eq!(pool.stats().cached_bytes, 0);
    assert_footprint(&pool);
    assert_eq!(live_bytes() - base, B, "memory held above the budget");
    // Below live memory: nothing may stay cached.
    pool.set_max_memory(B).unwrap();
    drop(held);
    assert_footprint(&pool);
    pool.set_max_memory(B).unwrap();
    assert!(pool.stats().cached_bytes <= B);
    drop(pool);
    assert_eq!(live_bytes(), base);
}

#[test]
fn wait_for_growth_pool_shrunk_to_zero_keeps_nothing_cached() {
    let _guard = counted();
    let base = live_bytes();
    let pool = BufPool::builder(BufPoolCfg {
        buffer_size: BS,
        max_memory: 0,
    })
    .wait_for_growth()
    .direct_io_alignment()
    .recycle(4)
    .recycle_min_bytes(0)
    .build()
    .unwrap();
    pool.add_max_memory(4 * B);
    drop(pool.try_allocate(4).unwrap());
    assert_eq!(pool.stats().cached_bytes, 4 * B);
    pool.set_max_memory(0).unwrap();
    assert_eq!(pool.stats().cached_bytes, 0);
    assert_eq!(live_bytes(), base);
    pool.add_max_memory(2 * B);
    drop(pool.try_allocate(2).unwrap());
    assert_eq!(pool.forget_max_memory(usize::MAX), 2 * B);
    assert_eq!(pool.stats().cached_bytes, 0);
    assert_eq!(live_bytes(), base);
}

// ---- shutdown with cached blocks ----

#[test]
fn every_shutdown_form_with_cached_blocks_frees_them_and_does_not_hang() {
    let _guard = counted();
    let base = live_bytes();
    watchdog(30, move || {
        let fill = |pool: &BufPool| {
            let a = pool.try_allocate(3).unwrap();
            let b = pool.try_allocate(2).unwrap();
            let c = pool.try_allocate(2).unwrap();
            drop((a, b, c));
            assert_eq!(pool.stats().cached_bytes, 7 * B);
        };
        // A plain drop.
        let pool = counted_pool(8, 4, 0);
        fill(&pool);
        drop(pool);
        assert_eq!(live_bytes(), base, "drop");
        // close, then drop.
        let pool = counted_pool(8, 4, 0);
        fill(&pool);
        pool.close();
        assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::Closed);
        drop(pool);
        assert_eq!(live_bytes(), base, "close + drop");
        // shutdown().await, with an allocation given back from another thread meanwhile.
        let pool = counted_pool(8, 4, 0);
        fill(&pool);
        let held = pool.try_allocate(3).unwrap(); // reuses the cached 3
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
        });
        futures::executor::block_on(pool.shutdown());
        releaser.join().unwrap();
        assert_eq!(live_bytes(), base, "shutdown");
        // shutdown_timeout, then drop.
        let pool = counted_pool(8, 4, 0);
        fill(&pool);
        let stats = pool.shutdown_timeout(Duration::from_millis(10));
        assert_eq!(stats.outstanding, 0);
        drop(pool);
        assert_eq!(live_bytes(), base, "shutdown_timeout");
        // The last handle dropped while an owned allocation lives: the pool's drop runs
        // when it goes, and frees the cache.
        let pool = Arc::new(counted_pool(8, 4, 0));
        fill(&pool);
        let owned = futures::executor::block_on(Arc::clone(&pool).allocate_owned(2)).unwrap();
        drop(pool);
        assert!(live_bytes() > base);
        drop(owned);
        assert_eq!(
            live_bytes(),
            base,
            "owned allocation outliving the pool handle"
        );
        // A drop blocked on an allocation released by another thread, with cached blocks.
        let pool = counted_pool(8, 4, 0);
        fill(&pool);
        let held = pool.try_allocate(2).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
        });
        drop(pool);
        releaser.join().unwrap();
        assert_eq!(live_bytes(), base, "drop waiting for another thread");
    });
}

// ---- child pools ----

/// A child's freed blocks are memory the tree holds: they go to the root's cache, where
/// the root's budget counts them, so the root allocating its whole budget fresh evicts them
/// (a cache of the child's own, which its ancestors did not count, let the tree hold twice
/// the root's budget here).
#[test]
fn child_cached_blocks_keep_the_root_footprint_within_its_budget() {
    let _guard = counted();
    let base = live_bytes();
    let root = BufPool::builder(BufPoolCfg {
        buffer_size: BS,
        max_memory: 4 * B,
    })
    .direct_io_alignment()
    .recycle(4)
    .recycle_min_bytes(0)
    .build()
    .unwrap();
    let child = BufPool::builder(BufPoolCfg {
        buffer_size: BS,
        max_memory: 4 * B,
    })
    .parent(&root)
    .direct_io_alignment()
    .recycle(4)
    .recycle_min_bytes(0)
    .build()
    .unwrap();
    drop(child.try_allocate(4).unwrap());
    assert_eq!(
        child.stats().cached_bytes,
        0,
        "a child keeps no cache of its own"
    );
    assert_eq!(
        root.stats().cached_bytes,
        4 * B,
        "the root's cache keeps it"
    );
    assert_eq!(root.stats().in_use_bytes, 0);
    let all = root.try_allocate(4).unwrap();
    let (r, c) = (root.stats(), child.stats());
    let held = live_bytes() - base;
    drop(all);
    assert!(
        held <= r.max_memory,
        "the tree holds {held} bytes (root in use {}, root cached {}, child cached {}) \
         under a root budget of {}",
        r.in_use_bytes,
        r.cached_bytes,
        c.cached_bytes,
        r.max_memory
    );
}

/// A shrink of the root trims the cache that holds the children's freed blocks.
#[test]
fn parent_shrink_trims_the_childrens_caches() {
    let root = recycling(BufferSize::S4096, 8, 4, 0);
    let child = BufPool::builder(BufPoolCfg {
        buffer_size: BufferSize::S4096,
        max_memory: 8 * 4096,
    })
    .parent(&root)
    .recycle(4)
    .recycle_min_bytes(0)
    .build()
    .unwrap();
    drop(child.try_allocate(8).unwrap());
    // One block of 8 buffers; the root keeps up to 4 per size.
    assert_eq!(root.stats().cached_bytes, 8 * 4096);
    root.set_max_memory(4096).unwrap();
    let cached = root.stats().cached_bytes + child.stats().cached_bytes;
    assert!(
        cached <= root.stats().max_memory,
        "the tree still caches {cached} bytes under a root budget of {}",
        root.stats().max_memory
    );
}

#[test]
fn child_recycling_keeps_every_level_exact() {
    watchdog(20, || {
        let root = BufPool::new(BufPoolCfg {
            buffer_size: BufferSize::S4096,
            max_memory: 16 * 4096,
        });
        let child = BufPool::builder(BufPoolCfg {
            buffer_size: BufferSize::S4096,
            max_memory: 8 * 4096,
        })
        .parent(&root)
        .recycle(2)
        .recycle_min_bytes(0)
        .build()
        .unwrap();
        let mut rng = Rng::new(7);
        let mut live = Vec::new();
        for _ in 0..rounds(300, 20) {
            if rng.range(0, 1) == 0 || live.is_empty() {
                let n = rng.range(1, 4);
                let zeroed = rng.range(0, 3) == 0;
                let got = if zeroed {
                    child.try_allocate_zeroed(n)
                } else {
                    child.try_allocate(n)
                };
                if let Ok(mut a) = got {
                    if zeroed {
                        a = assert_zeroed(a);
                    }
                    dirty(&mut a, 0x5A);
                    live.push(a);
                }
            } else {
                let i = rng.range(0, live.len() - 1);
                drop(live.swap_remove(i));
            }
            let held: usize = live.iter().map(BufPoolAllocation::allocated_bytes).sum();
            assert_eq!(child.stats().in_use_bytes, held);
            assert_eq!(root.stats().in_use_bytes, held);
            assert_eq!(root.stats().cached_bytes, 0);
            assert_footprint(&child);
        }
        drop(live);
        assert_idle(&child);
        assert_idle(&root);
        assert_full_budget_back(&child);
        assert_full_budget_back(&root);
    });
}

// ---- hand-over to waiters of other sizes ----

#[test]
fn a_release_serving_a_waiter_of_another_size_frees_its_block_and_keeps_the_footprint() {
    let _guard = counted();
    let base = live_bytes();
    watchdog(20, move || {
        let pool = counted_pool(4, 4, 0);
        let mut cx = Context::from_waker(Waker::noop());
        let a = pool.try_allocate(2).unwrap();
        let b = pool.try_allocate(2).unwrap();
        let mut waiter = Box::pin(pool.allocate(3));
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        drop(a); // 2 free: not enough for 3; with a waiter queued the block is not cached
        assert_eq!(pool.stats().cached_bytes, 0);
        assert_eq!(live_bytes() - base, 2 * B);
        drop(b); // serves the waiter
        let Poll::Ready(Ok(three)) = waiter.as_mut().poll(&mut cx) else {
            panic!("not served")
        };
        assert_eq!(pool.stats().in_use_bytes, 3 * B);
        assert!(live_bytes() - base <= 4 * B, "{} held", live_bytes() - base);
        assert_footprint(&pool);
        drop(three);
        assert_eq!(pool.stats().cached_bytes, 3 * B);
        // A waiter of one buffer behind a full pool: the cached 3 must make room.
        let four = pool.try_allocate(4).unwrap();
        assert_eq!(pool.stats().cached_bytes, 0, "evicted for the fresh 4");
        assert_eq!(live_bytes() - base, 4 * B);
        let mut fut_one = Box::pin(pool.allocate(1));
        let mut fut_two = Box::pin(pool.allocate_zeroed(2));
        assert!(fut_one.as_mut().poll(&mut cx).is_pending());
        assert!(fut_two.as_mut().poll(&mut cx).is_pending());
        drop(four);
        let Poll::Ready(Ok(one)) = fut_one.as_mut().poll(&mut cx) else {
            panic!()
        };
        let Poll::Ready(Ok(two)) = fut_two.as_mut().poll(&mut cx) else {
            panic!()
        };
        let two = assert_zeroed(two);
        assert_eq!(pool.stats().in_use_bytes, 3 * B);
        assert!(live_bytes() - base <= 4 * B);
        assert_footprint(&pool);
        drop((one, two));
        assert_footprint(&pool);
        assert!(live_bytes() - base <= 4 * B);
        assert_full_budget_back(&pool);
        drop((waiter, fut_one, fut_two));
        drop(pool);
        assert_eq!(live_bytes(), base);
    });
}

#[test]
fn a_handed_block_given_up_by_its_waiter_is_neither_lost_nor_leaked() {
    let _guard = counted();
    let base = live_bytes();
    watchdog(20, move || {
        let pool = counted_pool(4, 4, 0);
        let mut cx = Context::from_waker(Waker::noop());
        let a = pool.try_allocate(4).unwrap();
        let mut same = Box::pin(pool.allocate(4));
        assert!(same.as_mut().poll(&mut cx).is_pending());
        drop(a); // handed to `same`, which never takes it
        drop(same);
        assert_idle(&pool);
        assert_footprint(&pool);
        assert_eq!(
            live_bytes() - base,
            pool.stats().cached_bytes,
            "a handed block given up is neither freed nor cached"
        );
        assert_full_budget_back(&pool);
        drop(pool);
        assert_eq!(live_bytes(), base);
    });
}

// ---- reservations beside cached blocks ----

#[test]
fn reservations_beside_cached_blocks_never_let_memory_exceed_the_budget() {
    let _guard = counted();
    let base = live_bytes();
    let pool = counted_pool(8, 4, 0);
    drop(pool.try_allocate(4).unwrap());
    drop(pool.try_allocate(3).unwrap());
    assert_eq!(pool.stats().cached_bytes, 7 * B);
    let mut reservation = pool.try_reserve(8 * B).unwrap();
    // Real memory: only the cache.
    assert!(live_bytes() - base <= 8 * B);
    let s = pool.stats();
    let cached_after_reserve = s.cached_bytes;
    let from = reservation.allocate(3).unwrap(); // may reuse the cached 3
    assert!(
        live_bytes() - base <= 8 * B,
        "memory {} above the budget after allocating out of a reservation",
        live_bytes() - base
    );
    let from4 = reservation.allocate(4).unwrap();
    assert!(live_bytes() - base <= 8 * B, "{}", live_bytes() - base);
    drop((from, from4, reservation));
    assert_idle(&pool);
    assert_footprint(&pool);
    drop(pool);
    assert_eq!(live_bytes(), base);
    // Reported, not asserted: the stats view after a reservation (see the report).
    eprintln!(
        "after try_reserve(all): in_use {} + cached {} vs max {}",
        s.in_use_bytes, cached_after_reserve, s.max_memory
    );
}

// ---- threads ----

#[test]
#[cfg_attr(miri, ignore)]
fn threads_with_mixed_sizes_return_the_budget_to_exactly_zero() {
    watchdog(30, || {
        for (per_size, min_bytes) in [(1, 0), (4, 0), (2, 2 * 16384)] {
            let pool = Arc::new(recycling(BufferSize::S16384, 16, per_size, min_bytes));
            let checker = BudgetChecker::new(16 * 16384);
            let threads: Vec<_> = (0..4u8)
                .map(|t| {
                    let pool = Arc::clone(&pool);
                    let checker = Arc::clone(&checker);
                    std::thread::spawn(move || {
                        let mut rng = Rng::new(u64::from(t) + 1);
                        let mut held: Vec<(BufPoolAllocation, u8)> = Vec::new();
                        for i in 0..300 {
                            let n = [1, 2, 3, 4, 8][rng.range(0, 4)];
                            let tag = t.wrapping_mul(31).wrapping_add(i as u8) | 1;
                            let got = match rng.range(0, 4) {
                                0 => pool.try_allocate(n),
                                1 => pool.allocate_timeout(n, Duration::from_millis(2)),
                                2 => pool.allocate_zeroed_timeout(n, Duration::from_millis(2)),
                                _ => {
                                    if held.is_empty() {
                                        pool.allocate_blocking(n)
                                    } else {
                                        pool.try_allocate(n)
                                    }
                                }
                            };
                            if let Ok(allocation) = got {
                                checker.acquired(&pool, &allocation, tag);
                                held.push((allocation, tag));
                            }
                            if held.len() > 2 || rng.range(0, 1) == 0 {
                                if let Some((allocation, tag)) = held.pop() {
                                    checker.releasing(&allocation, tag);
                                }
                            }
                        }
                        for (allocation, tag) in held {
                            checker.releasing(&allocation, tag);
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            assert_idle(&pool);
            assert_footprint(&pool);
            assert!(checker.peak() <= 16 * 16384);
            assert_full_budget_back(&pool);
            assert_footprint(&pool);
        }
    });
}

#[test]
#[cfg_attr(miri, ignore)]
fn threads_with_resizes_and_recycling_keep_real_memory_within_the_largest_budget() {
    let _guard = counted();
    let base = live_bytes();
    watchdog(30, move || {
        let pool = Arc::new(counted_pool(16, 2, 0));
        let peak = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads: Vec<_> = (0..3u64)
            .map(|t| {
                let pool = Arc::clone(&pool);
                let peak = Arc::clone(&peak);
                std::thread::spawn(move || {
                    let mut rng = Rng::new(t + 11);
                    for _ in 0..400 {
                        let n = rng.range(1, 5);
                        if let Ok(a) = pool.allocate_timeout(n, Duration::from_millis(1)) {
                            peak.fetch_max(live_bytes() - base, SeqCst);
                            drop(a);
                        }
                    }
                })
            })
            .collect();
        let resizer = {
            let pool = Arc::clone(&pool);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut rng = Rng::new(99);
                while !stop.load(SeqCst) {
                    pool.set_max_memory(rng.range(4, 16) * B).unwrap();
                    std::thread::yield_now();
                }
                pool.set_max_memory(16 * B).unwrap();
            })
        };
        for thread in threads {
            thread.join().unwrap();
        }
        stop.store(true, SeqCst);
        resizer.join().unwrap();
        assert_idle(&pool);
        assert_footprint(&pool);
        assert_eq!(live_bytes() - base, pool.stats().cached_bytes);
        // The largest budget ever set is 16 buffers; the memory sampled never exceeds it
        // (a sample races a concurrent shrink, so only the largest budget is a bound).
        assert!(peak.load(SeqCst) <= 16 * B, "peak {}", peak.load(SeqCst));
        drop(Arc::try_unwrap(pool).unwrap());
        assert_eq!(live_bytes(), base);
    });
}

// ---- configuration edges ----

#[test]
fn recycle_configuration_edges() {
    // recycle(0) is off whatever the threshold.
    let off = recycling(BufferSize::S64, 4, 0, 0);
    drop(off.try_allocate(1).unwrap());
    assert_eq!(off.stats().cached_bytes, 0);
    // A threshold of usize::MAX keeps nothing.
    let never = recycling(BufferSize::S64, 4, 8, usize::MAX);
    drop(never.try_allocate(4).unwrap());
    assert_eq!(never.stats().cached_bytes, 0);
    // An unbounded per-size count is still bounded by the budget.
    let many = recycling(BufferSize::S64, 8, usize::MAX, 0);
    let blocks: Vec<_> = (0..8).map(|_| many.try_allocate(1).unwrap()).collect();
    drop(blocks);
    assert_eq!(many.stats().cached_bytes, 8 * 64);
    assert_footprint(&many);
    let all = many.try_allocate(8).unwrap();
    assert_eq!(many.stats().cached_bytes, 0);
    drop(all);
    assert_eq!(many.stats().cached_bytes, 8 * 64);
    // An unlimited budget with recycling.
    let unlimited = BufPool::builder(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: usize::MAX,
    })
    .recycle(2)
    .recycle_min_bytes(0)
    .build()
    .unwrap();
    drop(unlimited.try_allocate(3).unwrap());
    assert_eq!(unlimited.stats().cached_bytes, 192);
    assert_eq!(unlimited.try_allocate(3).unwrap().length(), 3);
}

/// Fresh memory for a child (which keeps no cache) makes room in the root's cache: the
/// root's live plus cached bytes stay within its budget whoever allocates.
#[test]
fn a_childs_fresh_memory_evicts_the_roots_cache() {
    let root = recycling(BufferSize::S4096, 4, 4, 0);
    let child = root
        .child(
            "plain",
            BufPoolCfg {
                buffer_size: BufferSize::S4096,
                max_memory: 4 * 4096,
            },
        )
        .unwrap();
    drop(root.try_allocate(4).unwrap());
    assert_eq!(root.stats().cached_bytes, 4 * 4096);
    // Another size, so the cached block cannot serve it: it must go.
    let fresh = child.try_allocate(3).unwrap();
    let s = root.stats();
    assert!(
        s.in_use_bytes + s.cached_bytes <= s.max_memory,
        "root in use {} + cached {} above its budget {}",
        s.in_use_bytes,
        s.cached_bytes,
        s.max_memory
    );
    drop(fresh);
    let s = root.stats();
    assert!(s.in_use_bytes + s.cached_bytes <= s.max_memory);
}

/// A child with the root's alignment reuses the blocks the root cached, and its own freed
/// blocks serve the root; a child with another alignment neither takes nor leaves any
/// (the cache keeps blocks of the root's alignment), and its blocks keep their alignment.
#[test]
fn children_share_the_roots_cache_only_at_its_alignment() {
    let root = recycling(BufferSize::S4096, 8, 4, 0);
    let same = root
        .child(
            "same",
            BufPoolCfg {
                buffer_size: BufferSize::S4096,
                max_memory: 8 * 4096,
            },
        )
        .unwrap();
    let first = root.try_allocate(2).unwrap();
    let address = first.first();
    drop(first);
    let again = same.try_allocate(2).unwrap();
    assert_eq!(
        again.first(),
        address,
        "the child reused the root's cached block"
    );
    drop(again);
    assert_eq!(root.stats().cached_bytes, 2 * 4096);
    assert_eq!(same.stats().cached_bytes, 0);
    let aligned = BufPool::builder(BufPoolCfg {
        buffer_size: BufferSize::S4096,
        max_memory: 8 * 4096,
    })
    .parent(&root)
    .direct_io_alignment()
    .build()
    .unwrap();
    for _ in 0..3 {
        let allocation = aligned.try_allocate(2).unwrap();
        assert_eq!(
            allocation.first() as usize % 4096,
            0,
            "direct-I/O alignment kept"
        );
        drop(allocation);
    }
    assert_eq!(
        root.stats().cached_bytes,
        2 * 4096,
        "blocks of another alignment are not cached"
    );
    drop((same, aligned));
    assert_eq!(root.stats().in_use_bytes, 0);
}
