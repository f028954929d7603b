//! Heap memory: block layouts, allocation and freeing, the owning [`Memory`] the recycler
//! keeps, the [`Block`] an allocation is made of, and the pool's own handle. One of the two
//! modules with `unsafe` code (the other is `waiters.rs`).
//!
//! # Why a block's uncounted pointer back to its pool is sound
//!
//! A block does not hold a reference count on its pool's state (that would cost two more
//! atomic read-modify-writes per allocate and drop). It relies on the shutdown barrier:
//!
//! 1. While a block is live its bytes are counted in the pool's budget word, so
//!    [`Pool::is_drained`] is `false` (the [`Pool`] contract; [`Block::new`]'s caller
//!    reserved the bytes).
//! 2. The pool's owner drops its `Arc` ([`PoolHandle`]) only once the pool is drained, and
//!    leaks it rather than drop it if the barrier was cut short.
//! 3. A release gives the bytes back as its very last access to the pool, or under the
//!    pool's lock and then touches the pool only under that lock (the owner takes the lock
//!    once, [`Pool::quiesce`], after it saw the pool drained and before it drops its `Arc`),
//!    unless it first took a strong reference with the `keep_alive` it is given.
//! 4. That last step (the compare-exchange on a part of the pool made only of atomics, or
//!    the unlock) is made in a frame that holds the pool through a [`PoolAccess`], not a
//!    reference passed in: a reference passed to a function must stay valid until the call
//!    returns, even if it is not used again (Rust's aliasing rules; Miri's Stacked and Tree
//!    Borrows check it), and once the bytes are back another thread may free the pool. So no
//!    method of the pool that takes `&self` is still running when the bytes go back; only
//!    the atomic's own method (whose `&self` covers nothing but an `UnsafeCell`, as in
//!    `Arc`'s drop) or the lock guard's drop is.
//! 5. The user code a release owes (the wakers of the requests it served, which may drop the
//!    pool's last handle or let another thread do it) runs only after that last step, in
//!    the same frame, for the same reason.

use core::alloc::Layout;
use core::mem::{ManuallyDrop, MaybeUninit};
use core::ops::Deref;
use core::ptr::NonNull;

use crate::sync::Arc;

/// The state a [`Block`] points back to without counting.
///
/// # Safety
///
/// `is_drained` returns `false` while the bytes of any live [`Block`] of this pool are
/// counted. `release` and `release_slow` give a block's bytes back as their last access to
/// the pool, made as the module docs' rules 3 and 4 say (through the [`PoolAccess`] they are
/// given, in their own frame), or while they hold the lock `quiesce` takes (touching the
/// pool after that only under it), unless they called `keep_alive` first (and then return
/// that handle instead of dropping it). `release_owned` is called only for blocks marked
/// owned, whose pool an owner's handle keeps alive until that release returns the handle: it
/// may touch the pool after the bytes are back. `release` returns `None` only once the bytes
/// are back, and gives none back otherwise.
pub(crate) unsafe trait Pool: Sized {
    /// What [`release`](Pool::release) leaves to [`release_slow`](Pool::release_slow).
    type Unreleased;

    /// The alignment of every block of this pool (fixed for its life).
    fn align(&self) -> usize;

    /// The fast path: frees or caches `memory` and gives its bytes back to the budget when
    /// that takes no lock and owes no user code (`None`); otherwise gives no bytes back and
    /// leaves the rest to [`release_slow`](Pool::release_slow).
    fn release(pool: PoolAccess<Self>, memory: Memory) -> Option<Self::Unreleased>;

    /// The rest of a release: its books, its last step (module docs, rule 4), then the user
    /// code they owe (wakers), which may drop the pool's last handle. The handle
    /// `keep_alive` gave, if any, is returned for the caller to drop.
    fn release_slow(
        pool: PoolAccess<Self>,
        rest: Self::Unreleased,
        keep_alive: impl FnOnce() -> Arc<Self>,
    ) -> Option<Arc<Self>>;

    /// The release of a block marked with [`Block::set_owned`]: the pool is kept alive
    /// throughout by its owner's handle, which may be returned (the last owned block's),
    /// for the caller to drop. As `release_slow`, the user code owed runs after the books;
    /// `keep_alive` as for it (a path that gives the bytes back outside the lock may take a
    /// handle).
    fn release_owned(
        pool: PoolAccess<Self>,
        memory: Memory,
        keep_alive: impl FnOnce() -> Arc<Self>,
    ) -> Option<std::sync::Arc<dyn Send + Sync>>;

    /// Whether no bytes are counted in use.
    fn is_drained(&self) -> bool;

    /// Waits for every release still finishing under the pool's lock (call once drained,
    /// before dropping the last handle).
    fn quiesce(&self);
}

/// The layout of a block of `bytes` (a non-zero multiple of 8 within the budget) aligned to
/// `align`, without re-validating what the pool validated once.
#[inline(always)]
fn layout(align: usize, bytes: usize) -> Layout {
    debug_assert!(bytes > 0 && Layout::from_size_align(bytes, align).is_ok());
    // SAFETY: `align` is a power of two (the smaller of two powers of two, fixed when the
    // pool was built) and `bytes` is at most the budget the pool counts, at most 2 PiB, so
    // rounding it up to `align` (at most 4096) cannot overflow `isize`.
    unsafe { Layout::from_size_align_unchecked(bytes, align) }
}

/// A block of heap memory owned alone: freed on drop.
///
/// Two words, not a pointer and a [`Layout`] (three): its size and its alignment's log2 share
/// one word ([`SizeAndAlign`]), so a `Memory` moves in two registers. It is handed from a
/// release to a waiter through several calls, and a three-word value moved through the stack
/// right after it was written there makes the CPU wait on store forwarding (a 16-byte load
/// over two 8-byte stores: measured 4-5 ns per move on the release → waiter path).
#[derive(Debug)]
pub(crate) struct Memory {
    ptr: NonNull<u8>,
    size_align: SizeAndAlign,
}

/// A block's size (below 2^56 bytes: at most the budget, at most 2 PiB) in the low 56 bits,
/// and its alignment's log2 in the top 8.
#[derive(Clone, Copy, Debug)]
struct SizeAndAlign(u64);

impl SizeAndAlign {
    const ALIGN_SHIFT: u32 = 56;
    const SIZE: u64 = (1 << Self::ALIGN_SHIFT) - 1;

    #[inline(always)]
    fn new(layout: Layout) -> Self {
        debug_assert!((layout.size() as u64) <= Self::SIZE);
        SizeAndAlign(
            layout.size() as u64 | u64::from(layout.align().trailing_zeros()) << Self::ALIGN_SHIFT,
        )
    }

    #[inline(always)]
    fn size(self) -> usize {
        // Below 2^56, and it was a `usize`.
        (self.0 & Self::SIZE) as usize
    }

    #[inline(always)]
    fn align(self) -> usize {
        1 << (self.0 >> Self::ALIGN_SHIFT)
    }

    #[inline(always)]
    fn layout(self) -> Layout {
        layout(self.align(), self.size())
    }
}

// SAFETY: `Memory` owns its bytes exclusively, like a `Box<[u8]>`; any thread may free it.
unsafe impl Send for Memory {}

impl Memory {
    /// Fresh memory from the global allocator, zeroed if asked: `bytes` is a non-zero
    /// multiple of 8 within the budget, `align` the pool's. Out of memory ends the process, as
    /// for a `Vec`.
    #[inline(always)]
    pub(crate) fn fresh(align: usize, bytes: usize, zeroed: bool) -> Option<Memory> {
        let layout = layout(align, bytes);
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe {
            if zeroed {
                std::alloc::alloc_zeroed(layout)
            } else {
                std::alloc::alloc(layout)
            }
        };
        // Null: out of memory, which the caller reports as an error (no abort).
        NonNull::new(raw).map(|ptr| Memory {
            ptr,
            size_align: SizeAndAlign::new(layout),
        })
    }

    /// Its size in bytes.
    #[inline(always)]
    pub(crate) fn bytes(&self) -> usize {
        self.size_align.size()
    }

    /// The alignment it was allocated with.
    #[inline(always)]
    pub(crate) fn align(&self) -> usize {
        self.size_align.align()
    }

    /// Writes zeros over every byte.
    pub(crate) fn fill_zero(&mut self) {
        // SAFETY: `ptr` points to `bytes()` bytes owned by `self` alone.
        unsafe { self.ptr.as_ptr().write_bytes(0, self.bytes()) };
    }

    /// Gives up ownership: the pointer and alignment to rebuild it with
    /// [`from_raw`](Memory::from_raw) (with its [`bytes`](Memory::bytes)).
    #[inline(always)]
    pub(crate) fn into_raw(self) -> (NonNull<u8>, usize) {
        let memory = ManuallyDrop::new(self);
        (memory.ptr, memory.size_align.align())
    }

    /// Takes back ownership of what [`into_raw`](Memory::into_raw) gave up.
    ///
    /// # Safety
    ///
    /// `ptr` and `align` came from `into_raw` of a `Memory` of `bytes`, and this is the only
    /// `from_raw` for them.
    #[inline(always)]
    pub(crate) unsafe fn from_raw(ptr: NonNull<u8>, align: usize, bytes: usize) -> Memory {
        Memory {
            ptr,
            size_align: SizeAndAlign::new(layout(align, bytes)),
        }
    }
}

impl Drop for Memory {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: `ptr` came from the global allocator with exactly the layout `size_align`
        // encodes, and `Memory` owned it alone.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.size_align.layout()) };
    }
}

/// Marks a block whose every byte was zero when it was allocated, until an
/// [`uninit_mut`](Block::uninit_mut) view of it was handed out.
const ZEROED: usize = 1;

/// Marks a block whose pool is kept alive for it by an owner's handle (`Block::set_owned`).
const OWNED: usize = 2;

/// The flag bits under a block's size (a multiple of 8).
const FLAGS: usize = ZEROED | OWNED;

/// `bytes` of heap memory reserved from one pool's budget; freed or cached, and given back
/// to that budget, on drop. Exactly three words.
#[derive(Debug)]
pub(crate) struct Block<P: Pool> {
    ptr: NonNull<u8>,
    /// The size in bytes (a multiple of 8), with [`ZEROED`] and [`OWNED`] in its low bits.
    bytes_zeroed: usize,
    pool: NonNull<P>,
}

// SAFETY: `Block` owns its memory exclusively (like a `Box<[u8]>`), and the pool state it
// points to is `Sync`; nothing in it is tied to the thread that created it.
unsafe impl<P: Pool + Sync + Send> Send for Block<P> {}
// SAFETY: `&Block` only reads the pointer values and the pool's thread-safe state.
unsafe impl<P: Pool + Sync + Send> Sync for Block<P> {}

impl<P: Pool> Block<P> {
    /// Wraps `memory` as a block of `pool`.
    ///
    /// # Safety
    ///
    /// `memory.bytes()` bytes are reserved in `pool`'s budget for this block alone, and only
    /// its drop gives them back.
    #[inline(always)]
    pub(crate) unsafe fn new(pool: &Arc<P>, memory: Memory, zeroed: bool) -> Self {
        let memory = ManuallyDrop::new(memory);
        Block {
            ptr: memory.ptr,
            bytes_zeroed: memory.bytes() | if zeroed { ZEROED } else { 0 },
            // `as_ptr` keeps the provenance of the whole `Arc` allocation for `keep_alive`.
            pool: NonNull::new(Arc::as_ptr(pool).cast_mut()).expect("an Arc is never null"),
        }
    }

    #[inline(always)]
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    #[inline(always)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes_zeroed & !FLAGS
    }

    /// Marks the block as one whose pool an owner's handle keeps alive: its release
    /// returns that handle to drop (see [`Pool::release`]).
    pub(crate) fn set_owned(&mut self) {
        self.bytes_zeroed |= OWNED;
    }

    /// Whether every byte was zero when the block was allocated and no view that could
    /// de-initialise a byte was handed out since ([`uninit_mut`](Block::uninit_mut) clears
    /// it): then every byte is initialised (zero, or written since with an initialised value).
    pub(crate) fn was_zeroed(&self) -> bool {
        self.bytes_zeroed & ZEROED != 0
    }

    /// The whole block, for writing: safe, since writing `MaybeUninit<u8>` cannot observe
    /// uninitialised memory. But safe code may write `MaybeUninit::uninit()` through it, so
    /// the block forgets it [`was_zeroed`](Block::was_zeroed): from now on it counts as
    /// uninitialised, and an [`InitBlock`] made of it starts with nothing initialised.
    #[inline]
    pub(crate) fn uninit_mut(&mut self) -> &mut [MaybeUninit<u8>] {
        self.bytes_zeroed &= !ZEROED;
        self.uninit_mut_keeping_zeroed()
    }

    /// [`uninit_mut`](Block::uninit_mut) without forgetting that the block was zeroed. Only
    /// for [`InitBlock`] (so private to this module), which writes nothing but initialised
    /// bytes through it: a zeroed block stays initialised throughout.
    #[inline]
    fn uninit_mut_keeping_zeroed(&mut self) -> &mut [MaybeUninit<u8>] {
        // SAFETY: the block is `bytes()` bytes, allocated, exclusively owned by `self` (and
        // borrowed mutably here), and `MaybeUninit<u8>` has no validity requirement.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.ptr.as_ptr().cast::<MaybeUninit<u8>>(),
                self.bytes(),
            )
        }
    }

    /// The pool this block's bytes are counted in.
    #[inline(always)]
    pub(crate) fn pool(&self) -> &P {
        // SAFETY: see the module docs: this block's bytes are still counted, so the pool's
        // `Arc` is still alive.
        unsafe { self.pool.as_ref() }
    }
}

impl<P: Pool> Drop for Block<P> {
    #[inline(always)]
    fn drop(&mut self) {
        let pool_ptr = self.pool;
        let memory = Memory {
            ptr: self.ptr,
            size_align: SizeAndAlign::new(layout(self.pool().align(), self.bytes())),
        };
        let keep_alive = move || {
            // SAFETY: called before the bytes are given back (the `Pool` contract), so the
            // pool's owner still holds its strong reference, and `pool_ptr` came from that
            // `Arc`'s contents.
            unsafe {
                Arc::increment_strong_count(pool_ptr.as_ptr());
                Arc::from_raw(pool_ptr.as_ptr())
            }
        };
        let access = PoolAccess { pool: pool_ptr };
        // Each handle returned is dropped here, where nothing borrows the pool: it may run
        // the pool's drop, or free its state.
        if self.bytes_zeroed & OWNED != 0 {
            drop(P::release_owned(access, memory, keep_alive));
            return;
        }
        let Some(rest) = P::release(access, memory) else {
            return;
        };
        drop(P::release_slow(access, rest, keep_alive));
    }
}

/// A block's pool, for the steps of the block's release (see [`Pool`]): a pointer, not a
/// reference, so that no frame of the release holds the pool as an argument when the
/// block's bytes go back, or while the user code the release owes runs. Only a block's drop
/// makes one.
///
/// Why it matters: a reference passed to a function must stay valid until the call returns
/// (Rust's aliasing rules; Miri's Stacked and Tree Borrows check it), while once the bytes
/// are back, or a waker woken by the release has run, another thread may free the pool
/// (module docs, rules 3 to 5).
pub(crate) struct PoolAccess<P> {
    pool: NonNull<P>,
}

// Not derived: that would ask `P: Copy`.
impl<P> Clone for PoolAccess<P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for PoolAccess<P> {}

impl<P: Pool> PoolAccess<P> {
    /// The pool, as a reference made in the caller's own frame (a local, where Rust's
    /// aliasing rules ask nothing of it once it is no longer used). Use it only until the
    /// step that gives the block's bytes back, and make that step in the same frame: the
    /// compare-exchange on a part of the pool made only of atomics, or the drop of the
    /// lock's guard (module docs, rule 4). A method of the pool called with it must have
    /// returned by then.
    #[inline(always)]
    pub(crate) fn until_given_back<'a>(self) -> &'a P {
        // SAFETY: made by a block's drop, whose bytes are still counted (nothing gave them
        // back before: the caller uses it only until it does), so the pool's `Arc` is alive
        // (see the module docs); the reference is shared, as every other is.
        unsafe { self.pool.as_ref() }
    }
}

/// The pool's own strong reference to its state: dropped only when nothing is in use,
/// leaked otherwise (when a panic cut the shutdown barrier short), so no [`Block`] can
/// dangle.
#[derive(Debug)]
pub(crate) struct PoolHandle<P: Pool> {
    pool: ManuallyDrop<Arc<P>>,
}

impl<P: Pool> PoolHandle<P> {
    pub(crate) fn new(pool: P) -> Self {
        PoolHandle {
            pool: ManuallyDrop::new(Arc::new(pool)),
        }
    }
}

impl<P: Pool> Deref for PoolHandle<P> {
    type Target = Arc<P>;

    #[inline(always)]
    fn deref(&self) -> &Arc<P> {
        &self.pool
    }
}

impl<P: Pool> Drop for PoolHandle<P> {
    fn drop(&mut self) {
        // Only the pool's owner, inside its drop, gets here, so no call on the pool can
        // reserve bytes concurrently: drained now means drained for good.
        if self.pool.is_drained() {
            // A release that gave the last bytes back under the pool's lock may still hold it.
            self.pool.quiesce();
            // SAFETY: dropped once, here, and `self.pool` is never used again. No block
            // points into it (none is counted), and a release still at work either holds its
            // own strong reference or was done with the pool once it let go of the lock
            // `quiesce` just took.
            unsafe { ManuallyDrop::drop(&mut self.pool) };
        }
    }
}

/// A [`Block`] that knows how much of it is initialised: `[0, init)` always is. The only way
/// to read a block's bytes safely.
#[derive(Debug)]
pub(crate) struct InitBlock<P: Pool> {
    block: Block<P>,
    init: usize,
}

impl<P: Pool> InitBlock<P> {
    /// Starts with the whole block initialised if it [`was_zeroed`](Block::was_zeroed) (no
    /// [`uninit_mut`](Block::uninit_mut) view of it was handed out), with nothing otherwise.
    pub(crate) fn new(block: Block<P>) -> Self {
        let init = if block.was_zeroed() { block.bytes() } else { 0 };
        InitBlock { block, init }
    }

    pub(crate) fn block(&self) -> &Block<P> {
        &self.block
    }

    pub(crate) fn into_block(self) -> Block<P> {
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
        let whole = self.block.uninit_mut_keeping_zeroed();
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
        if let Some(gap) = self
            .block
            .uninit_mut_keeping_zeroed()
            .get_mut(self.init..end)
        {
            gap.fill(MaybeUninit::new(byte));
            self.init = end;
        }
    }

    /// Counts `[0, end)` (at most the whole block) as initialised, after it was written
    /// through [`spare_mut`](InitBlock::spare_mut).
    ///
    /// # Safety
    ///
    /// Every byte in `[init_len(), end)` has been written with an initialised value.
    #[cfg(feature = "bytes")]
    pub(crate) unsafe fn assume_init_to(&mut self, end: usize) {
        self.init = self.init.max(end.min(self.block.bytes()));
    }

    /// `[from, end of block)` for writing, the initialised and the uninitialised part alike.
    /// An `UninitSlice` lets safe code write only initialised bytes, so the invariant holds
    /// whatever is written; what was written counts once
    /// [`assume_init_to`](InitBlock::assume_init_to) says so. Empty if `from` is past the end.
    #[cfg(feature = "bytes")]
    pub(crate) fn spare_mut(&mut self, from: usize) -> &mut bytes::buf::UninitSlice {
        let whole = self.block.uninit_mut_keeping_zeroed();
        let from = from.min(whole.len());
        bytes::buf::UninitSlice::uninit(&mut whole[from..])
    }
}
