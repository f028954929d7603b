//! The crate's only `unsafe` code: the raw memory block of an allocation and the uncounted
//! pointer from an allocation back to its pool.
//!
//! # Why the pointer back to the pool is sound
//!
//! An allocation does not hold a reference count on the pool's [`Shared`] (that would cost
//! two more atomic read-modify-writes per allocate and drop). It relies on the shutdown
//! barrier instead:
//!
//! 1. While a block is live its bytes are counted in the pool's budget word.
//! 2. [`BufPool`](crate::BufPool) drops its `Arc<Shared>` only after the barrier has seen
//!    zero bytes in use, and leaks it rather than drop it if the barrier is cut short.
//! 3. The release gives the bytes back as its very last access to `Shared`, unless it first
//!    took a strong reference with [`Block::keep_alive`] (which needs step 1 to hold).

use core::alloc::Layout;
use core::mem::{ManuallyDrop, MaybeUninit};
use core::ops::Deref;
use core::ptr::NonNull;

use core::sync::atomic::Ordering::{Acquire, Relaxed};

use crate::shared::Shared;
use crate::sync::{Arc, AtomicUsize, Mutex, lock};

/// `bytes` of heap memory reserved from, and aligned as configured by, one pool; freed and
/// given back to that pool's budget on drop. Exactly three words.
#[derive(Debug)]
pub(crate) struct Block {
    ptr: NonNull<u8>,
    /// The size in bytes (a multiple of 8), with [`ZEROED`] in its lowest bit.
    bytes_zeroed: usize,
    shared: NonNull<Shared>,
}

/// Marks a block whose every byte was zero when it was allocated.
const ZEROED: usize = 1;

// SAFETY: `Block` owns its memory exclusively (like a `Box<[u8]>`), and `Shared` is `Sync`;
// nothing in it is tied to the thread that created it.
unsafe impl Send for Block {}
// SAFETY: `&Block` only reads the pointer values and `Shared`'s thread-safe state.
unsafe impl Sync for Block {}

impl Block {
    /// Allocates `bytes` for a reservation already counted in `shared`'s budget.
    ///
    /// `bytes` is `n * buffer_size` for `n >= 1`, so never zero, and at most the pool's
    /// budget, which [`crate::shared`] keeps far below `isize::MAX`.
    ///
    /// Always inlined, like the release: called through a function, the three-word block
    /// goes back and forth through memory, and that measured a third more than the whole
    /// allocate and drop otherwise costs.
    #[inline(always)]
    pub(crate) fn new(shared: &Arc<Shared>, bytes: usize, zeroed: bool) -> Block {
        let ptr = if shared.recycler.is_idle_for(bytes) {
            fresh(layout(shared.align, bytes), zeroed)
        } else {
            Block::recycled_or_fresh(shared, bytes, zeroed)
        };
        Block {
            ptr,
            bytes_zeroed: bytes | if zeroed { ZEROED } else { 0 },
            // `as_ptr` keeps the provenance of the whole `Arc` allocation for `keep_alive`.
            shared: NonNull::new(Arc::as_ptr(shared).cast_mut()).expect("an Arc is never null"),
        }
    }

    /// The allocation when recycling is on for this size or blocks are cached.
    #[cold]
    #[inline(never)]
    fn recycled_or_fresh(shared: &Shared, bytes: usize, zeroed: bool) -> NonNull<u8> {
        if !zeroed {
            if let Some(ptr) = shared.recycler.take(bytes, || shared.footprint()) {
                return ptr;
            }
        }
        // Fresh zeroed memory (often untouched pages) is cheaper than zeroing a used block.
        shared.recycler.make_room(|| shared.footprint());
        fresh(layout(shared.align, bytes), zeroed)
    }

    #[inline]
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    #[inline]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes_zeroed & !ZEROED
    }

    /// The whole block, for writing: safe, since writing `MaybeUninit<u8>` cannot observe
    /// uninitialised memory.
    #[inline]
    pub(crate) fn uninit_mut(&mut self) -> &mut [MaybeUninit<u8>] {
        // SAFETY: the block is `bytes()` bytes, allocated, exclusively owned by `self` (and
        // borrowed mutably here), and `MaybeUninit<u8>` has no validity requirement.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.ptr.as_ptr().cast::<MaybeUninit<u8>>(),
                self.bytes(),
            )
        }
    }

    #[inline]
    pub(crate) fn shared(&self) -> &Shared {
        // SAFETY: see the module docs: this block's bytes are still counted, so the pool's
        // `Arc<Shared>` is still alive.
        unsafe { self.shared.as_ref() }
    }

    /// A strong reference to the pool, for work that must go on after the bytes are back.
    fn keep_alive(shared: NonNull<Shared>) -> Arc<Shared> {
        // SAFETY: called before the bytes are given back, so the pool still holds its strong
        // reference (module docs) and `shared` came from that `Arc`'s `as_ptr`.
        unsafe {
            Arc::increment_strong_count(shared.as_ptr());
            Arc::from_raw(shared.as_ptr())
        }
    }
}

/// The layout of a block, without re-validating what the pool validated once.
#[inline]
fn layout(align: usize, bytes: usize) -> Layout {
    debug_assert!(Layout::from_size_align(bytes, align).is_ok());
    // SAFETY: `align` is a power of two (the smaller of two powers of two, fixed when the
    // pool was built) and `bytes` is at most the budget the pool counts, at most 2 PiB, so
    // rounding it up to `align` (at most 4096) cannot overflow `isize`.
    unsafe { Layout::from_size_align_unchecked(bytes, align) }
}

/// Memory from the global allocator; out of memory ends the process, as for a `Vec`.
#[inline(always)]
fn fresh(layout: Layout, zeroed: bool) -> NonNull<u8> {
    // SAFETY: `layout` has a non-zero size: blocks are never empty.
    let raw = unsafe {
        if zeroed {
            std::alloc::alloc_zeroed(layout)
        } else {
            std::alloc::alloc(layout)
        }
    };
    match NonNull::new(raw) {
        Some(ptr) => ptr,
        None => std::alloc::handle_alloc_error(layout),
    }
}

impl Drop for Block {
    #[inline(always)]
    fn drop(&mut self) {
        let shared = self.shared();
        let bytes = self.bytes();
        if shared.recycler.never_keeps(bytes)
            || !shared.recycler.put(
                self.ptr,
                bytes,
                || shared.is_contended(),
                || shared.footprint(),
            )
        {
            // SAFETY: `ptr` came from the global allocator with exactly this layout (the
            // pool's alignment never changes), and is freed once, here.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout(shared.align, bytes)) };
        }
        let pool = self.shared;
        // Dropped here, after the last use of `shared`: it may free the pool's state.
        drop(shared.release(bytes, move || Block::keep_alive(pool)));
    }
}

/// The pool's own strong reference to [`Shared`]: dropped only when nothing is in use, leaked
/// otherwise (when a panic cut the shutdown barrier short), so no [`Block`] can dangle.
#[derive(Debug)]
pub(crate) struct PoolHandle {
    shared: ManuallyDrop<Arc<Shared>>,
}

impl PoolHandle {
    pub(crate) fn new(shared: Shared) -> Self {
        PoolHandle {
            shared: ManuallyDrop::new(Arc::new(shared)),
        }
    }
}

impl Deref for PoolHandle {
    type Target = Arc<Shared>;

    #[inline]
    fn deref(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        // Only the pool's owner, inside its drop, gets here, so no call on the pool can
        // reserve bytes concurrently: zero now means zero for good.
        if self.shared.is_drained() {
            // SAFETY: dropped once, here, and `self.shared` is never used again. No block
            // points into it (none is counted) and a release still at work holds its own
            // strong reference.
            unsafe { ManuallyDrop::drop(&mut self.shared) };
        }
    }
}

/// A [`Block`] that knows how much of it is initialised: `[0, init)` always is. The only way
/// to read a block's bytes safely.
#[derive(Debug)]
pub(crate) struct InitBlock {
    block: Block,
    init: usize,
}

impl InitBlock {
    pub(crate) fn new(block: Block) -> Self {
        let init = if block.bytes_zeroed & ZEROED != 0 {
            block.bytes()
        } else {
            0
        };
        InitBlock { block, init }
    }

    pub(crate) fn block(&self) -> &Block {
        &self.block
    }

    pub(crate) fn into_block(self) -> Block {
        self.block
    }

    /// How many bytes from the start are initialised.
    pub(crate) fn init_len(&self) -> usize {
        self.init
    }

    /// The initialised prefix.
    pub(crate) fn initialised(&self) -> &[u8] {
        // SAFETY: `[0, init)` lies in the block and is initialised (the type's invariant);
        // `&self` keeps the block alive and unaliased by `&mut`.
        unsafe { core::slice::from_raw_parts(self.block.as_ptr(), self.init) }
    }

    /// The initialised prefix, for overwriting.
    pub(crate) fn initialised_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `initialised`, and `&mut self` makes the borrow exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.block.as_ptr(), self.init) }
    }

    /// Copies as much of `src` as fits at `offset` (at most `init_len()`, so no gap is left
    /// uninitialised) and returns how much that was.
    pub(crate) fn write_at(&mut self, offset: usize, src: &[u8]) -> usize {
        let whole = self.block.uninit_mut();
        let Some(room) = whole.get_mut(offset.min(self.init)..) else {
            return 0;
        };
        let written = src.len().min(room.len());
        for (dst, &byte) in room[..written].iter_mut().zip(src) {
            dst.write(byte);
        }
        self.init = self.init.max(offset.min(self.init) + written);
        written
    }

    /// Sets every byte from `init_len()` to `end` to `byte`, making `[0, end)` initialised.
    pub(crate) fn init_to(&mut self, end: usize, byte: u8) {
        let end = end.min(self.block.bytes());
        if let Some(gap) = self.block.uninit_mut().get_mut(self.init..end) {
            gap.fill(MaybeUninit::new(byte));
            self.init = end;
        }
    }
}

/// Freed blocks kept for reuse, per size: large blocks are where the allocator maps, unmaps
/// and page-faults, and a storage engine asks for the same sizes again and again.
///
/// Cached blocks are not counted in the budget word (so they never make anyone wait), but the
/// pool's memory footprint, live bytes plus cached bytes, still stays within the budget at
/// every quiescent point:
///
/// * a freed block is cached only if the footprint then still fits the budget
///   ([`put`](Recycler::put));
/// * fresh memory first frees cached blocks until the footprint fits
///   ([`make_room`](Recycler::make_room)), and so does a cached block taken for reuse after a
///   shrink ([`take`](Recycler::take));
/// * a shrink of the budget frees cached blocks at once ([`trim`](Recycler::trim)).
///
/// Every one of these decisions is made under the cache's lock, reading the cached bytes
/// first and the bytes in use second. Blocks move between the two in a fixed order (a freed
/// block is cached before its bytes are given back; a reused block's bytes are reserved before
/// it leaves the cache), and the lock orders every move into or out of the cache against the
/// two reads: a block in motion is then counted once or twice, never zero times, so the
/// footprint a decision sees is never below the true one.
#[derive(Debug)]
pub(crate) struct Recycler {
    /// Blocks smaller than this are never cached (`usize::MAX`: recycling is off).
    min_bytes: usize,
    max_per_size: usize,
    align: usize,
    /// The bytes of the blocks in the cache, and of evicted ones until they are freed: memory
    /// is never left uncounted while it exists. Changed only under `cache`'s lock (except the
    /// decrement after an eviction's `dealloc`); read without it on the allocation path.
    cached_bytes: AtomicUsize,
    cache: Mutex<Vec<SizeClass>>,
}

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
struct SizeClass {
    bytes: usize,
    blocks: Vec<CachedPtr>,
}

/// A freed block in the cache: unaliased memory nobody points to.
#[derive(Debug)]
struct CachedPtr(NonNull<u8>);

// SAFETY: a cached block is memory owned by the cache alone; any thread may take or free it.
unsafe impl Send for CachedPtr {}

/// Blocks taken out of the cache under its lock, freed once the lock is released (`dealloc` of
/// a large block is a syscall) and only then uncounted.
#[must_use = "evicted blocks are freed when this is dropped"]
struct Evicted<'a> {
    recycler: &'a Recycler,
    blocks: Vec<(CachedPtr, usize)>,
}

impl Drop for Evicted<'_> {
    fn drop(&mut self) {
        for (CachedPtr(ptr), bytes) in self.blocks.drain(..) {
            // SAFETY: the block came from the global allocator with this layout, and the
            // cache owned it alone until it was taken out for this.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout(self.recycler.align, bytes)) };
            // Only now that it is gone: see `cached_bytes`. A plain count: no other memory is
            // published through it.
            self.recycler.cached_bytes.fetch_sub(bytes, Relaxed);
        }
    }
}

impl Recycler {
    pub(crate) fn new(min_bytes: usize, max_per_size: usize, align: usize) -> Self {
        Recycler {
            min_bytes: if max_per_size == 0 {
                usize::MAX
            } else {
                min_bytes
            },
            max_per_size,
            align,
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
    fn take(&self, bytes: usize, footprint: impl FnOnce() -> Footprint) -> Option<NonNull<u8>> {
        if bytes < self.min_bytes {
            return None;
        }
        let mut cache = lock(&self.cache);
        let class = cache.iter_mut().find(|class| class.bytes == bytes)?;
        let CachedPtr(ptr) = class.blocks.pop()?;
        self.cached_bytes.fetch_sub(bytes, Relaxed);
        let evicted = self.evict_locked(&mut cache, footprint());
        drop(cache);
        drop(evicted);
        Some(ptr)
    }

    /// Keeps a freed block, still counted in use, if its size is recycled, its size class has
    /// room and the footprint with it cached still fits the budget; `false` means the caller
    /// frees it. Not while others wait for budget (`contended`): they may need the room for
    /// other sizes, and would only have to evict it again.
    #[cold]
    #[inline(never)]
    fn put(
        &self,
        ptr: NonNull<u8>,
        bytes: usize,
        contended: impl FnOnce() -> bool,
        footprint: impl FnOnce() -> Footprint,
    ) -> bool {
        if bytes < self.min_bytes || contended() {
            return false;
        }
        let mut cache = lock(&self.cache);
        // Cached first, in use second (see the type's docs). The block's bytes are still in
        // use, so caching it leaves the footprint as it is now: it must fit already.
        let cached = self.cached_bytes.load(Relaxed);
        let Footprint { in_use, budget } = footprint();
        if cached.saturating_add(in_use) > budget {
            return false;
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
            return false;
        }
        class.blocks.push(CachedPtr(ptr));
        // Before the release gives the bytes back (its `Release` publishes this): whoever
        // sees them back sees them cached.
        self.cached_bytes.fetch_add(bytes, Relaxed);
        true
    }

    /// Frees cached blocks, largest first, until the footprint (in use plus cached) fits the
    /// budget. Called after the caller's own reservation for fresh memory, so the block about
    /// to be allocated is counted.
    fn make_room(&self, footprint: impl FnOnce() -> Footprint) {
        if self.cached_bytes.load(Acquire) == 0 {
            return;
        }
        self.trim(footprint);
    }

    /// Frees cached blocks until the footprint fits the budget: after a shrink, or before
    /// fresh memory.
    pub(crate) fn trim(&self, footprint: impl FnOnce() -> Footprint) {
        let mut cache = lock(&self.cache);
        let evicted = self.evict_locked(&mut cache, footprint());
        drop(cache);
        drop(evicted);
    }

    /// Takes cached blocks out, largest first, until `cached + in_use <= budget`; the caller
    /// drops the result after unlocking. `footprint` must be read under the lock, after
    /// `cached_bytes` (see the type's docs).
    #[cold]
    fn evict_locked(&self, cache: &mut [SizeClass], footprint: Footprint) -> Evicted<'_> {
        let mut evicted = Evicted {
            recycler: self,
            blocks: Vec::new(),
        };
        // The blocks in the cache, not `cached_bytes`: that also counts evicted blocks still
        // being freed, which are already on their way out.
        let mut cached: usize = cache
            .iter()
            .map(|class| class.bytes * class.blocks.len())
            .sum();
        let allowed = footprint.budget.saturating_sub(footprint.in_use);
        if cached <= allowed {
            return evicted;
        }
        cache.sort_unstable_by_key(|class| core::cmp::Reverse(class.bytes));
        for class in cache.iter_mut() {
            while cached > allowed {
                let Some(block) = class.blocks.pop() else {
                    break;
                };
                cached -= class.bytes;
                evicted.blocks.push((block, class.bytes));
            }
        }
        evicted
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
