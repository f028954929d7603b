//! Safe filling and reading of an allocation: a cursor that tracks what was written.

use core::fmt;
use core::ops::Deref;
use std::io::{self, IoSlice};

use crate::BufPoolAllocation;
use crate::heap::InitBlock;
use crate::state::State;

// `BufMut`, `freeze` and `From<FilledAllocation> for Bytes`: a child module, so it shares the
// cursor's private fields instead of widening them.
#[cfg(feature = "bytes")]
mod bytes;

/// An allocation being filled from the start, that reads back only what was written.
///
/// Created by [`BufPoolAllocation::into_filled`]. It implements [`std::io::Write`] (a full
/// allocation accepts no more bytes: `write` returns `Ok(0)`, `write_all` a `WriteZero`
/// error), dereferences to the filled bytes, and gives [`IoSlice`]s of the filled buffers for
/// [`write_vectored`](std::io::Write::write_vectored).
/// [`read_from`](FilledAllocation::read_from) reads into it from any [`std::io::Read`]; with the
/// `bytes` feature (on by default) it is a `bytes::BufMut` (tokio's `read_buf` reads into it)
/// and `freeze()`s into a `bytes::Bytes` without a copy. It still holds the allocation's bytes of
/// the budget until dropped or turned back with
/// [`into_allocation`](FilledAllocation::into_allocation).
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
/// use std::io::Write;
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S16, max_memory: 1024 });
/// let mut record = pool.try_allocate(4).unwrap().into_filled();
/// record.extend_from_slice(b"key=");
/// record.write_all(b"value")?;
/// assert_eq!(&record[..], b"key=value");
///
/// let mut file = Vec::new(); // any `Write`, e.g. a `std::fs::File`
/// let written = file.write_vectored(&record.io_slices())?;
/// assert_eq!(&file[..written], b"key=value");
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct FilledAllocation {
    inner: InitBlock<State>,
    filled: usize,
}

impl BufPoolAllocation {
    /// Turns the allocation into a [`FilledAllocation`]: a cursor that fills it from the
    /// start (`std::io::Write`, [`extend_from_slice`](FilledAllocation::extend_from_slice)) and
    /// reads back only what was written. An allocation from an `*_zeroed` call counts as
    /// initialised throughout (see [`FilledAllocation::set_filled`]), unless
    /// [`uninit_mut`](BufPoolAllocation::uninit_mut) or
    /// [`buffers_uninit_mut`](BufPoolAllocation::buffers_uninit_mut) was called on it: then,
    /// as for any other allocation, nothing does until it is written through the
    /// `FilledAllocation`. (Writes through the `FilledAllocation` keep a zeroed allocation
    /// initialised, also through [`FilledAllocation::into_allocation`] and back.)
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::io::Write;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(2).unwrap().into_filled();
    /// write!(filled, "hello, world")?;
    /// assert_eq!(filled.filled(), b"hello, world");
    /// let buffers: Vec<&[u8]> = filled.buffers().collect();
    /// assert_eq!(buffers, [&b"hello, w"[..], &b"orld"[..]]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[inline]
    pub fn into_filled(self) -> FilledAllocation {
        FilledAllocation::new(self.into_init_block())
    }
}

impl FilledAllocation {
    pub(crate) fn new(inner: InitBlock<State>) -> Self {
        FilledAllocation { inner, filled: 0 }
    }

    /// The bytes written so far.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(1).unwrap().into_filled();
    /// assert!(filled.filled().is_empty());
    /// filled.extend_from_slice(b"abc");
    /// assert_eq!(filled.filled(), b"abc");
    /// ```
    pub fn filled(&self) -> &[u8] {
        &self.inner.initialised()[..self.filled]
    }

    /// The bytes written so far, for changing in place.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(1).unwrap().into_filled();
    /// filled.extend_from_slice(b"abc");
    /// filled.filled_mut()[0] = b'A';
    /// assert_eq!(filled.filled(), b"Abc");
    /// ```
    pub fn filled_mut(&mut self) -> &mut [u8] {
        &mut self.inner.initialised_mut()[..self.filled]
    }

    /// How many more bytes fit.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(2).unwrap().into_filled();
    /// filled.extend_from_slice(b"abc");
    /// assert_eq!(filled.remaining(), 13);
    /// ```
    pub fn remaining(&self) -> usize {
        self.capacity() - self.filled
    }

    /// The allocation's size in bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// assert_eq!(pool.try_allocate(2).unwrap().into_filled().capacity(), 16);
    /// ```
    pub fn capacity(&self) -> usize {
        self.inner.block().bytes()
    }

    /// Appends as much of `bytes` as fits; returns how much that was.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(1).unwrap().into_filled();
    /// assert_eq!(filled.extend_from_slice(b"0123456789"), 8);
    /// assert_eq!(filled.filled(), b"01234567");
    /// ```
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> usize {
        let written = self.inner.write_at(self.filled, bytes);
        self.filled += written;
        written
    }

    /// Appends `count` copies of `byte`, as many as fit; returns how many that was.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(1).unwrap().into_filled();
    /// assert_eq!(filled.fill(b'x', 3), 3);
    /// assert_eq!(filled.filled(), b"xxx");
    /// ```
    pub fn fill(&mut self, byte: u8, count: usize) -> usize {
        let end = self.filled.saturating_add(count).min(self.capacity());
        let written = end - self.filled;
        // Overwrite what is initialised already, then initialise the rest.
        let overlap = end.min(self.inner.init_len());
        if let Some(old) = self.inner.initialised_mut().get_mut(self.filled..overlap) {
            old.fill(byte);
        }
        self.inner.init_to(end, byte);
        self.filled = end;
        written
    }

    /// Reads once from `reader` into the unfilled part and counts what it read as filled;
    /// returns how many bytes that was. `Ok(0)` means the reader is at its end, or the
    /// allocation is full (then the reader is not called; check
    /// [`remaining`](FilledAllocation::remaining) to tell the two apart).
    ///
    /// The reader is handed the whole unfilled part as `&mut [u8]`, so it must never see
    /// uninitialised memory: the part of it that was never initialised is zeroed first, at
    /// the first call (bytes already initialised, by earlier writes or reads or by an
    /// `*_zeroed` call, are never zeroed again; a fresh `into_filled()` starts over, and a
    /// zeroed allocation that [`uninit_mut`](BufPoolAllocation::uninit_mut) or
    /// [`buffers_uninit_mut`](BufPoolAllocation::buffers_uninit_mut) was called on counts as
    /// never initialised). So the first call on a large fresh allocation pays one `memset` of
    /// its unfilled part; with the `bytes` feature, tokio's `read_buf` reads into the
    /// uninitialised memory directly and pays none. A read interrupted
    /// ([`ErrorKind::Interrupted`](io::ErrorKind::Interrupted)) is retried; any other error
    /// is returned with nothing counted as filled. A reader that reports more bytes than it
    /// was given (a bug in the reader) gives an
    /// [`ErrorKind::InvalidData`](io::ErrorKind::InvalidData) error, not a panic.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(2).unwrap().into_filled();
    /// let mut source: &[u8] = b"a file, a socket, any std::io::Read";
    /// while filled.read_from(&mut source)? > 0 {}
    /// assert_eq!(filled.filled(), b"a file, a socket");
    /// assert_eq!(filled.remaining(), 0);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn read_from<R: io::Read + ?Sized>(&mut self, reader: &mut R) -> io::Result<usize> {
        let capacity = self.capacity();
        if self.filled == capacity {
            return Ok(0);
        }
        // Zero what was never initialised (a no-op once it was), so the reader gets `&mut
        // [u8]` of initialised bytes only.
        self.inner.init_to(capacity, 0);
        let unfilled = &mut self.inner.initialised_mut()[self.filled..];
        let offered = unfilled.len();
        loop {
            match reader.read(unfilled) {
                Ok(read) if read <= offered => {
                    self.filled += read;
                    return Ok(read);
                }
                Ok(read) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the reader reported {read} bytes read into a buffer of {offered}"),
                    ));
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Forgets what was written (the allocation stays initialised, see
    /// [`set_filled`](FilledAllocation::set_filled)).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(1).unwrap().into_filled();
    /// filled.extend_from_slice(b"old");
    /// filled.clear();
    /// filled.extend_from_slice(b"n");
    /// assert_eq!(filled.filled(), b"n");
    /// ```
    pub fn clear(&mut self) {
        self.filled = 0;
    }

    /// Sets how many bytes count as filled, up to what is known to be initialised. Returns
    /// whether `len` was accepted; a larger `len` is refused and changes nothing, so the
    /// filled bytes are never uninitialised memory.
    ///
    /// Known to be initialised is everything for an allocation from an `*_zeroed` call (so
    /// its zeros can be read), and otherwise the prefix written or zeroed through this
    /// `FilledAllocation` since [`into_filled`](BufPoolAllocation::into_filled). Bytes written
    /// through [`uninit_mut`](BufPoolAllocation::uninit_mut) or
    /// [`buffers_uninit_mut`](BufPoolAllocation::buffers_uninit_mut) never count (safe code may
    /// write `MaybeUninit::uninit()` there), and calling either on a zeroed allocation makes
    /// it forget its zeros: after them `set_filled(k)` needs the first `k` bytes written
    /// through the `FilledAllocation` (or zeroed by [`read_from`](FilledAllocation::read_from)).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut zeros = pool.try_allocate_zeroed(2).unwrap().into_filled();
    /// assert!(zeros.set_filled(16));
    /// assert_eq!(zeros.filled(), &[0; 16]);
    ///
    /// let mut fresh = pool.try_allocate(2).unwrap().into_filled();
    /// assert!(!fresh.set_filled(1), "uninitialised bytes are never exposed");
    ///
    /// let mut viewed = pool.try_allocate_zeroed(2).unwrap();
    /// viewed.uninit_mut()[0] = std::mem::MaybeUninit::uninit();
    /// let mut viewed = viewed.into_filled();
    /// assert!(!viewed.set_filled(1), "the view made it forget its zeros");
    /// viewed.extend_from_slice(b"ab");
    /// assert!(viewed.set_filled(1));
    /// assert_eq!(viewed.filled(), b"a");
    /// ```
    pub fn set_filled(&mut self, len: usize) -> bool {
        let accepted = len <= self.inner.init_len();
        if accepted {
            self.filled = len;
        }
        accepted
    }

    /// The filled bytes cut into the allocation's buffers: every buffer full but perhaps the
    /// last.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(3).unwrap().into_filled();
    /// filled.fill(1, 10);
    /// assert_eq!(filled.buffers().map(<[u8]>::len).collect::<Vec<_>>(), [8, 2]);
    /// ```
    pub fn buffers(&self) -> core::slice::Chunks<'_, u8> {
        self.filled()
            .chunks(self.inner.block().pool().config.buffer_size.bytes())
    }

    /// One [`IoSlice`] per filled buffer, for `write_vectored`.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let mut filled = pool.try_allocate(3).unwrap().into_filled();
    /// filled.fill(1, 20);
    /// assert_eq!(filled.io_slices().len(), 3);
    /// ```
    pub fn io_slices(&self) -> Vec<IoSlice<'_>> {
        self.buffers().map(IoSlice::new).collect()
    }

    /// Back to the plain allocation (the written bytes stay in the memory). One from an
    /// `*_zeroed` call that still counted as initialised throughout still does (the cursor
    /// writes only initialised bytes), until its uninitialised views are taken.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S8, max_memory: 64 });
    /// let filled = pool.try_allocate(2).unwrap().into_filled();
    /// assert_eq!(filled.into_allocation().length(), 2);
    /// ```
    pub fn into_allocation(self) -> BufPoolAllocation {
        BufPoolAllocation::from_block(self.inner.into_block())
    }
}

impl Deref for FilledAllocation {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.filled()
    }
}

impl AsRef<[u8]> for FilledAllocation {
    fn as_ref(&self) -> &[u8] {
        self.filled()
    }
}

impl io::Write for FilledAllocation {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        Ok(self.extend_from_slice(bytes))
    }

    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut written = 0;
        for slice in slices {
            let n = self.extend_from_slice(slice);
            written += n;
            if n < slice.len() {
                break;
            }
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for FilledAllocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilledAllocation")
            .field("filled", &self.filled)
            .field("capacity", &self.capacity())
            .finish()
    }
}
