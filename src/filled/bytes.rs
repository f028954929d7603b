//! The `bytes` integration (feature "bytes", on by default): a [`FilledAllocation`] is a
//! [`BufMut`], so tokio's `read_buf` reads straight into pooled memory, and it freezes into a
//! [`Bytes`] without a copy, so hyper, tonic or object_store can take it while the pool's
//! budget still counts it.

use ::bytes::buf::UninitSlice;
use ::bytes::{BufMut, Bytes};

use crate::FilledAllocation;

impl FilledAllocation {
    /// Turns the filled bytes into a [`Bytes`] without copying them.
    ///
    /// The allocation becomes the `Bytes`' owner ([`Bytes::from_owner`]): clones and slices
    /// of it share the same memory, and the pool's bytes stay reserved, the whole allocation
    /// and not only the filled part, until the last of them is dropped, on any thread. That
    /// is what keeps data handed to another library inside the budget. The `Bytes` views the
    /// filled part only. (As with any `Bytes`, an empty piece does not hold the owner: an
    /// empty `slice`, `split_to(0)`, `split_off(len)`, and a `Bytes` emptied in place by
    /// `truncate(0)` or `clear()` give their hold up, while a `Bytes` frozen from an empty
    /// allocation holds it. `Vec::from(bytes)` or `BytesMut::from(bytes)` copy the data and
    /// drop their hold: the budget then covers only the `Bytes` still holding it.
    /// `try_into_mut` always fails.)
    ///
    /// Available with the `bytes` feature (on by default).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(2).unwrap().into_filled();
    /// filled.extend_from_slice(b"header:body");
    ///
    /// let frozen: bytes::Bytes = filled.freeze();
    /// let body = frozen.slice(7..); // shares the pooled memory
    /// drop(frozen);
    /// assert_eq!(&body[..], b"body");
    /// assert_eq!(pool.stats().in_use_bytes, 16, "reserved while a slice lives");
    /// drop(body);
    /// assert_eq!(pool.stats().in_use_bytes, 0);
    /// ```
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

/// Zero-copy, as [`FilledAllocation::freeze`].
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
/// let mut filled = pool.try_allocate(1).unwrap().into_filled();
/// filled.extend_from_slice(b"abc");
/// let frozen = bytes::Bytes::from(filled);
/// assert_eq!(frozen, &b"abc"[..]);
/// ```
impl From<FilledAllocation> for Bytes {
    fn from(filled: FilledAllocation) -> Bytes {
        filled.freeze()
    }
}

/// Writes land in order after what is filled, across buffer boundaries: the allocation is one
/// contiguous block, and [`chunk_mut`](BufMut::chunk_mut) offers all of its unfilled part at
/// once. [`remaining_mut`](BufMut::remaining_mut) is what fits; writes only shrink it (a
/// [`clear`](FilledAllocation::clear) or a smaller
/// [`set_filled`](FilledAllocation::set_filled) moves the cursor back and so grows it again).
/// Writing past it panics, as for any fixed-size `BufMut` (`put_slice` of more than fits,
/// `advance_mut(cnt)` with `cnt > remaining_mut()`).
///
/// Available with the `bytes` feature (on by default).
///
/// # Examples
///
/// ```
/// use bytes::BufMut;
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
/// let mut filled = pool.try_allocate(2).unwrap().into_filled();
/// assert_eq!(filled.chunk_mut().len(), 16, "both buffers at once");
/// filled.put_u32(0xCAFE_F00D);
/// filled.put_slice(b"spans two");
/// assert_eq!(filled.filled(), b"\xCA\xFE\xF0\x0Dspans two");
/// assert_eq!(filled.remaining_mut(), 3);
/// ```
///
/// With tokio, `socket.read_buf(&mut filled).await` reads into it.
// SAFETY: `remaining_mut` is what `chunk_mut` offers (`capacity - filled`); `advance_mut`
// moves `filled` by at most that, and counts what it moves over as initialised only because
// its caller promises it was written (the trait's contract).
unsafe impl BufMut for FilledAllocation {
    #[inline]
    fn remaining_mut(&self) -> usize {
        self.remaining()
    }

    #[inline]
    unsafe fn advance_mut(&mut self, cnt: usize) {
        let remaining = self.remaining();
        assert!(
            cnt <= remaining,
            "advance_mut({cnt}) past the end of the allocation ({remaining} bytes remain)"
        );
        let end = self.filled + cnt;
        // SAFETY: `advance_mut`'s caller promises the first `cnt` bytes of `chunk_mut()`,
        // which starts at `filled`, were written; `[0, filled)` was initialised already.
        unsafe { self.inner.assume_init_to(end) };
        self.filled = end;
    }

    #[inline]
    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.inner.spare_mut(self.filled)
    }
}
