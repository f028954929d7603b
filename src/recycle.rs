//! Freed blocks kept for reuse, per size: large blocks are where the allocator maps, unmaps
//! and page-faults, and a storage engine asks for the same sizes again and again. Safe code:
//! the cache holds [`Memory`], which frees itself.
//!
//! Cached blocks are not counted in the budget word (so they never make anyone wait), but the
//! pool's memory footprint, live bytes plus cached bytes, still stays within the budget at
//! every quiescent point:
//!
//! * a freed block is cached only if the footprint then still fits the budget
//!   ([`Recycler::put`]);
//! * fresh memory first frees cached blocks until the footprint fits
//!   ([`Recycler::make_room`]), and so does a cached block taken for reuse after a shrink
//!   ([`Recycler::take`]);
//! * a shrink of the budget frees cached blocks at once ([`Recycler::trim`]).
//!
//! Every one of these decisions is made under the cache's lock, reading the cached bytes
//! first and the bytes in use second. Blocks move between the two in a fixed order (a freed
//! block is cached before its bytes are given back; a reused block's bytes are reserved before
//! it leaves the cache), and the lock orders every move into or out of the cache against the
//! two reads: a block in motion is then counted once or twice, never zero times, so the
//! footprint a decision sees is never below the true one. Evicted blocks are freed under the
//! lock too (see [`Recycler::evict_locked`]), so no block is ever out of the cache and not
//! yet freed while another decision is made.

use core::sync::atomic::Ordering::{Acquire, Relaxed};

use crate::heap::Memory;
use crate::sync::{AtomicUsize, Mutex, lock};

/// What the recycler needs to know of its pool when it decides: read at the moment of the
/// decision, under the cache's lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Footprint {
    /// The bytes counted in the budget word now.
    pub(crate) in_use: usize,
    /// The budget enforced now.
    pub(crate) budget: usize,
}

#[derive(Debug)]
pub(crate) struct Recycler {
    /// Blocks smaller than this are never cached (`usize::MAX`: recycling is off; `0` with
    /// no room for any block: [`delegating`](Recycler::delegating)).
    min_bytes: usize,
    max_per_size: usize,
    /// The bytes of the blocks in the cache (an evicted block's leave it once it is freed:
    /// memory is never left uncounted while it exists). Changed under `cache`'s lock; read
    /// without it on the allocation path.
    cached_bytes: AtomicUsize,
    cache: Mutex<Vec<SizeClass>>,
}

#[derive(Debug)]
struct SizeClass {
    bytes: usize,
    blocks: Vec<Memory>,
}

impl Recycler {
    /// The recycler of a child pool, which keeps no block: it is never idle and never says
    /// a block is not kept, so every allocation and release of the child takes the pool's
    /// slow path to the cache of its root (`State::root`), leaving the root's fast
    /// path one comparison as before.
    pub(crate) fn delegating() -> Self {
        Recycler {
            min_bytes: 0,
            max_per_size: 0,
            cached_bytes: AtomicUsize::new(0),
            cache: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn new(min_bytes: usize, max_per_size: usize) -> Self {
        Recycler {
            min_bytes: if max_per_size == 0 {
                usize::MAX
            } else {
                min_bytes
            },
            max_per_size,
            cached_bytes: AtomicUsize::new(0),
            cache: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn cached_bytes(&self) -> usize {
        self.cached_bytes.load(Relaxed)
    }

    /// Whether an allocation of `bytes` has nothing to do with the cache: its size is not
    /// recycled and nothing is cached that would have to make room.
    ///
    /// Read after the allocation's own reservation (whose `Acquire` pairs with the `Release`
    /// of every release before it): a block cached before a release that this reservation
    /// saw is seen here, and one cached after it was still counted in use when this
    /// reservation was checked against the budget.
    #[inline(always)]
    pub(crate) fn is_idle_for(&self, bytes: usize) -> bool {
        bytes < self.min_bytes && self.cached_bytes.load(Acquire) == 0
    }

    /// Whether a freed block of `bytes` is never kept.
    #[inline(always)]
    pub(crate) fn never_keeps(&self, bytes: usize) -> bool {
        bytes < self.min_bytes
    }

    /// A cached block of exactly `bytes`, if there is one. Its bytes are already reserved in
    /// the budget word; if the footprint is then above the budget (after a shrink), cached
    /// blocks are freed until it fits.
    pub(crate) fn take(
        &self,
        bytes: usize,
        footprint: impl FnOnce() -> Footprint,
    ) -> Option<Memory> {
        if bytes < self.min_bytes {
            return None;
        }
        let mut cache = lock(&self.cache);
        let class = cache.iter_mut().find(|class| class.bytes == bytes)?;
        let memory = class.blocks.pop()?;
        self.cached_bytes.fetch_sub(bytes, Relaxed);
        self.evict_locked(&mut cache, footprint());
        Some(memory)
    }

    /// Keeps a freed block, still counted in use, if its size is recycled, its size class has
    /// room and the footprint with it cached still fits the budget; gives it back otherwise,
    /// for the caller to free. Not while others wait for budget (`contended`): they may need
    /// the room for other sizes, and would only have to evict it again.
    #[cold]
    #[inline(never)]
    pub(crate) fn put(
        &self,
        memory: Memory,
        contended: impl FnOnce() -> bool,
        footprint: impl FnOnce() -> Footprint,
    ) -> Option<Memory> {
        let bytes = memory.bytes();
        if bytes < self.min_bytes || contended() {
            return Some(memory);
        }
        let mut cache = lock(&self.cache);
        // Cached first, in use second (see the module docs). The block's bytes are still in
        // use, so caching it leaves the footprint as it is now: it must fit already.
        let cached = self.cached_bytes.load(Relaxed);
        let Footprint { in_use, budget } = footprint();
        if cached.saturating_add(in_use) > budget {
            return Some(memory);
        }
        let index = match cache.iter().position(|class| class.bytes == bytes) {
            Some(index) => index,
            None => {
                cache.push(SizeClass {
                    bytes,
                    blocks: Vec::new(),
                });
                cache.len() - 1
            }
        };
        let class = &mut cache[index];
        if class.blocks.len() >= self.max_per_size {
            return Some(memory);
        }
        class.blocks.push(memory);
        // Before the release gives the bytes back (whose `Release` publishes this): whoever
        // sees them back sees them cached.
        self.cached_bytes.fetch_add(bytes, Relaxed);
        None
    }

    /// Frees cached blocks, largest first, until the footprint (in use plus cached) fits the
    /// budget. Called after the caller's own reservation for fresh memory, so the block about
    /// to be allocated is counted.
    pub(crate) fn make_room(&self, footprint: impl FnOnce() -> Footprint) {
        if self.cached_bytes.load(Acquire) == 0 {
            return;
        }
        self.trim(footprint);
    }

    /// Frees cached blocks until the footprint fits the budget: after a shrink, or before
    /// fresh memory.
    pub(crate) fn trim(&self, footprint: impl FnOnce() -> Footprint) {
        let mut cache = lock(&self.cache);
        self.evict_locked(&mut cache, footprint());
    }

    /// Frees cached blocks, largest first, until `cached + in_use <= budget`. `footprint`
    /// must be read under the lock, after `cached_bytes` (see the module docs).
    ///
    /// The blocks are freed here, under the lock, though freeing a large block may be a
    /// system call: a block taken out of the cache and freed after the lock was released
    /// would be counted by no other decision meanwhile (they count the cache), and a fresh
    /// block allocated beside it would put the footprint over the budget until the free
    /// finished (`tests/handoff_adversarial.rs`'s recycling stress saw one block over a budget
    /// of four in 6 runs of 600 that way; none in 1,020 since). Only evictions pay it: a shrink,
    /// or fresh memory while blocks of other sizes are cached.
    #[cold]
    fn evict_locked(&self, cache: &mut [SizeClass], footprint: Footprint) {
        let mut cached: usize = cache
            .iter()
            .map(|class| class.bytes * class.blocks.len())
            .sum();
        let allowed = footprint.budget.saturating_sub(footprint.in_use);
        if cached <= allowed {
            return;
        }
        cache.sort_unstable_by_key(|class| core::cmp::Reverse(class.bytes));
        for class in cache.iter_mut() {
            while cached > allowed {
                let Some(block) = class.blocks.pop() else {
                    break;
                };
                cached -= class.bytes;
                drop(block);
                // Only now that it is gone. A plain count: no other memory is published
                // through it.
                self.cached_bytes.fetch_sub(class.bytes, Relaxed);
            }
        }
    }
}

impl Drop for Recycler {
    fn drop(&mut self) {
        self.trim(|| Footprint {
            in_use: 0,
            budget: 0,
        });
    }
}
