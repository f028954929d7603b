//! One allocation: `n` contiguous buffers holding their bytes of the budget.

use core::fmt;
use core::iter::FusedIterator;

use core::mem::MaybeUninit;

use crate::AllocError;
use crate::chain;
use crate::heap::{Block, InitBlock, Memory};
use crate::state::State;
use crate::sync::Arc;

/// A pointer to the first byte of one buffer, as in `frozen_core::bufpool`.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferPointer, BufferSize};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 256 });
/// let allocation = pool.try_allocate(2).unwrap();
/// let second: BufferPointer = allocation.iter().nth(1).unwrap();
/// assert_eq!(second as usize - allocation.first() as usize, 64);
/// ```
pub type BufferPointer = *mut u8;

/// `n` contiguous buffers, `[[buf0][buf1]…]`, each [`buffer_size`](crate::BufPoolCfg::buffer_size)
/// bytes, holding `n * buffer_size` bytes of the pool's budget until dropped.
///
/// The memory is uninitialised unless it came from an `*_zeroed` call. The allocation is
/// `Send + Sync + 'static`: send it to another thread or task and drop it there; it stays
/// valid even if the pool is moved (the pool's drop waits for it).
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferPointer, BufferSize};
///
/// const BUF: BufferSize = BufferSize::S16;
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BUF, max_memory: BUF as usize * 0x10 });
/// let allocation = pool.allocate_blocking(0x0A).unwrap();
///
/// assert_eq!(allocation.length(), 0x0A);
/// assert!(!allocation.first().is_null());
/// assert_eq!(allocation.allocated_bytes(), BUF as usize * 0x0A);
///
/// let buffers: Vec<BufferPointer> = allocation.iter().collect();
/// assert_eq!(buffers.len(), 0x0A);
/// assert_eq!(buffers[1] as usize - buffers[0] as usize, BUF as usize);
/// ```
#[must_use = "dropping an allocation gives its bytes straight back"]
pub struct BufPoolAllocation {
    block: Block<State>,
}

impl BufPoolAllocation {
    #[inline]
    pub(crate) fn new(pool: &Arc<State>, bytes: usize, zeroed: bool) -> Result<Self, AllocError> {
        Ok(BufPoolAllocation {
            block: chain::block(pool, bytes, zeroed)?,
        })
    }

    /// An allocation of `memory`, a block handed over by the release that granted its
    /// request's bytes (`State::release_block_queued`): zeroed here if asked. Inlined: it is
    /// the waiting path's common case since the hand-over, and an allocation returned from a
    /// call is copied out of the callee's stores (a store-forwarding stall, 4-5 ns).
    #[inline]
    pub(crate) fn handed(pool: &Arc<State>, memory: Memory, zeroed: bool) -> Self {
        BufPoolAllocation {
            block: chain::handed_block(pool, memory, zeroed),
        }
    }

    /// Makes this an owned allocation: `handle` (the pool's, taken only for the first owned
    /// allocation out) keeps the pool alive until the last owned one is back, so the pool's
    /// drop never waits on a task that holds one and dropped its own handle.
    pub(crate) fn owned_by(
        mut self,
        handle: impl FnOnce() -> std::sync::Arc<dyn Send + Sync>,
    ) -> Self {
        self.block.pool().own(handle);
        self.block.set_owned();
        self
    }

    /// The number of buffers: the `n` that was requested.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 * 10 });
    /// assert_eq!(pool.try_allocate(10).unwrap().length(), 10);
    /// ```
    #[inline]
    pub fn length(&self) -> usize {
        self.block.bytes() >> self.block.pool().config.buffer_size.shift()
    }

    /// A pointer to the first buffer, which is also the start of the whole block of
    /// [`allocated_bytes`](BufPoolAllocation::allocated_bytes) bytes. Never null; aligned to
    /// at least `min(buffer_size, 16)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S32, max_memory: 32 * 10 });
    /// let allocation = pool.try_allocate(10).unwrap();
    /// // SAFETY: the block is 320 writable bytes owned by `allocation`.
    /// unsafe { allocation.first().write_bytes(0xAB, allocation.allocated_bytes()) };
    /// assert_eq!(unsafe { *allocation.first().add(319) }, 0xAB);
    /// ```
    #[inline]
    pub fn first(&self) -> BufferPointer {
        self.block.as_ptr()
    }

    /// `length() * buffer_size`: the bytes of the block and of the budget it holds.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S16, max_memory: 160 });
    /// assert_eq!(pool.try_allocate(10).unwrap().allocated_bytes(), 160);
    /// ```
    #[inline]
    pub fn allocated_bytes(&self) -> usize {
        self.block.bytes()
    }

    /// The size of each buffer in bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S16, max_memory: 160 });
    /// assert_eq!(pool.try_allocate(1).unwrap().buffer_size(), 16);
    /// ```
    #[inline]
    pub fn buffer_size(&self) -> usize {
        self.block.pool().config.buffer_size.bytes()
    }

    /// A pointer to buffer `index`, or `None` past the last one.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S16, max_memory: 160 });
    /// let allocation = pool.try_allocate(2).unwrap();
    /// assert_eq!(allocation.buffer(1), Some(allocation.first().wrapping_add(16)));
    /// assert_eq!(allocation.buffer(2), None);
    /// ```
    #[inline]
    pub fn buffer(&self, index: usize) -> Option<BufferPointer> {
        (index < self.length()).then(|| self.first().wrapping_add(index * self.buffer_size()))
    }

    /// The whole block as uninitialised bytes, to fill without `unsafe`.
    ///
    /// Writing through it is safe, `MaybeUninit::uninit()` included, so what is written here
    /// is not tracked: there is no safe way to read it back. To fill bytes and read them back
    /// safely, write them through [`into_filled`](BufPoolAllocation::into_filled) instead.
    ///
    /// Calling it makes the allocation forget that its memory is initialised: one from an
    /// `*_zeroed` call no longer counts as zeroed (whatever was written), so its
    /// [`into_filled`](BufPoolAllocation::into_filled) starts with nothing initialised, as
    /// for a plain allocation, and [`FilledAllocation::set_filled`](crate::FilledAllocation::set_filled) accepts only what was
    /// written through the `FilledAllocation` since.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::mem::MaybeUninit;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut allocation = pool.try_allocate(2).unwrap();
    /// allocation.uninit_mut().fill(MaybeUninit::new(7));
    /// assert_eq!(allocation.uninit_mut().len(), 16);
    /// drop(allocation);
    ///
    /// let mut zeros = pool.try_allocate_zeroed(2).unwrap();
    /// zeros.uninit_mut()[0] = MaybeUninit::uninit(); // safe
    /// let mut filled = zeros.into_filled();
    /// assert!(!filled.set_filled(16), "no longer known to be initialised");
    /// ```
    #[inline]
    pub fn uninit_mut(&mut self) -> &mut [MaybeUninit<u8>] {
        self.block.uninit_mut()
    }

    /// Each buffer as uninitialised bytes, in order, to fill one by one without `unsafe`.
    ///
    /// As with [`uninit_mut`](BufPoolAllocation::uninit_mut), what is written is not tracked,
    /// and the allocation forgets that its memory is initialised (a zeroed one no longer
    /// counts as zeroed), even if no buffer is written.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::mem::MaybeUninit;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S16, max_memory: 64 });
    /// let mut allocation = pool.try_allocate(3).unwrap();
    /// for (i, buffer) in allocation.buffers_uninit_mut().enumerate() {
    ///     assert_eq!(buffer.len(), 16);
    ///     buffer.fill(MaybeUninit::new(i as u8));
    /// }
    /// ```
    #[inline]
    pub fn buffers_uninit_mut(&mut self) -> core::slice::ChunksExactMut<'_, MaybeUninit<u8>> {
        let buffer_size = self.buffer_size();
        self.block.uninit_mut().chunks_exact_mut(buffer_size)
    }

    /// The block, with what is known about its initialised bytes: for
    /// [`into_filled`](BufPoolAllocation::into_filled), which lives with the cursor it makes.
    #[inline]
    pub(crate) fn into_init_block(self) -> InitBlock<State> {
        InitBlock::new(self.block)
    }

    pub(crate) fn from_block(block: Block<State>) -> Self {
        BufPoolAllocation { block }
    }

    /// The buffers in order, one pointer each, `buffer_size` bytes apart.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferPointer, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S16, max_memory: 16 * 0x14 });
    /// let allocation = pool.try_allocate(0x0A).unwrap();
    /// let buffers: Vec<BufferPointer> = allocation.iter().collect();
    /// assert_eq!(buffers.len(), 0x0A);
    /// assert_eq!(buffers[0], allocation.first());
    /// ```
    #[inline]
    pub fn iter(&self) -> BufPoolAllocationIter<'_> {
        BufPoolAllocationIter {
            next: self.first(),
            remaining: self.length(),
            buffer_size: self.buffer_size(),
            _allocation: core::marker::PhantomData,
        }
    }
}

impl<'a> IntoIterator for &'a BufPoolAllocation {
    type Item = BufferPointer;
    type IntoIter = BufPoolAllocationIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl fmt::Debug for BufPoolAllocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPoolAllocation")
            .field("first", &self.first())
            .field("length", &self.length())
            .field("allocated_bytes", &self.allocated_bytes())
            .finish()
    }
}

/// The iterator of [`BufPoolAllocation::iter`]: a pointer to each buffer, in order.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
/// let allocation = pool.try_allocate(3).unwrap();
/// let mut buffers = allocation.iter();
/// assert_eq!(buffers.len(), 3);
/// assert_eq!(buffers.next_back(), Some(allocation.first().wrapping_add(16)));
/// ```
#[derive(Clone, Debug)]
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct BufPoolAllocationIter<'a> {
    next: BufferPointer,
    remaining: usize,
    buffer_size: usize,
    _allocation: core::marker::PhantomData<&'a BufPoolAllocation>,
}

// No unsafe: the iterator only yields pointer values (and, holding a raw pointer, is neither
// `Send` nor `Sync`: the stricter side).
impl Iterator for BufPoolAllocationIter<'_> {
    type Item = BufferPointer;

    #[inline]
    fn next(&mut self) -> Option<BufferPointer> {
        if self.remaining == 0 {
            return None;
        }
        let buffer = self.next;
        self.remaining -= 1;
        // `wrapping_add` keeps this safe; within the block it is an ordinary in-bounds step.
        self.next = self.next.wrapping_add(self.buffer_size);
        Some(buffer)
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl DoubleEndedIterator for BufPoolAllocationIter<'_> {
    #[inline]
    fn next_back(&mut self) -> Option<BufferPointer> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        Some(self.next.wrapping_add(self.remaining * self.buffer_size))
    }
}

impl ExactSizeIterator for BufPoolAllocationIter<'_> {}
impl FusedIterator for BufPoolAllocationIter<'_> {}
