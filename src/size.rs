//! The fixed buffer sizes a pool can hand out.

use core::fmt;

/// The size of one buffer in a [`BufPool`](crate::BufPool): a power of two from 8 bytes to
/// 16 KiB.
///
/// The discriminant is the size in bytes, so `BufferSize::S64 as usize == 64`, exactly as in
/// `frozen_core::utils::BufferSize`.
///
/// # Examples
///
/// ```
/// use membudget::BufferSize;
///
/// assert_eq!(BufferSize::S4096.bytes(), 4096);
/// assert_eq!(BufferSize::S16 as usize, 16);
/// assert_eq!(BufferSize::try_from(512), Ok(BufferSize::S512));
/// assert!(BufferSize::try_from(100).is_err());
/// ```
#[repr(usize)]
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum BufferSize {
    /// 8 bytes.
    S8 = 0x8,
    /// 16 bytes.
    S16 = 0x10,
    /// 32 bytes.
    S32 = 0x20,
    /// 64 bytes.
    S64 = 0x40,
    /// 128 bytes.
    S128 = 0x80,
    /// 256 bytes.
    S256 = 0x100,
    /// 512 bytes.
    S512 = 0x200,
    /// 1 KiB.
    S1024 = 0x400,
    /// 2 KiB.
    S2048 = 0x800,
    /// 4 KiB.
    S4096 = 0x1000,
    /// 8 KiB.
    S8192 = 0x2000,
    /// 16 KiB.
    S16384 = 0x4000,
}

impl BufferSize {
    /// Every size, smallest first.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::BufferSize;
    ///
    /// assert_eq!(BufferSize::ALL.len(), 12);
    /// assert!(BufferSize::ALL.iter().all(|size| size.bytes().is_power_of_two()));
    /// ```
    pub const ALL: [BufferSize; 12] = [
        BufferSize::S8,
        BufferSize::S16,
        BufferSize::S32,
        BufferSize::S64,
        BufferSize::S128,
        BufferSize::S256,
        BufferSize::S512,
        BufferSize::S1024,
        BufferSize::S2048,
        BufferSize::S4096,
        BufferSize::S8192,
        BufferSize::S16384,
    ];

    /// The size in bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(membudget::BufferSize::S1024.bytes(), 1024);
    /// ```
    #[inline]
    pub const fn bytes(self) -> usize {
        self as usize
    }

    /// `log2` of the size: `1 << size.shift() == size.bytes()`.
    #[inline]
    pub(crate) const fn shift(self) -> u32 {
        (self as usize).trailing_zeros()
    }
}

impl fmt::Display for BufferSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.bytes())
    }
}

/// The error of [`BufferSize::try_from`]: the number is not one of the sizes.
///
/// # Examples
///
/// ```
/// use membudget::{BufferSize, InvalidBufferSize};
///
/// assert_eq!(BufferSize::try_from(3), Err(InvalidBufferSize(3)));
/// assert_eq!(InvalidBufferSize(3).to_string(), "3 is not a buffer size (a power of two from 8 to 16384)");
/// ```
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct InvalidBufferSize(pub usize);

impl fmt::Display for InvalidBufferSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is not a buffer size (a power of two from 8 to 16384)",
            self.0
        )
    }
}

impl std::error::Error for InvalidBufferSize {}

impl TryFrom<usize> for BufferSize {
    type Error = InvalidBufferSize;

    fn try_from(bytes: usize) -> Result<Self, Self::Error> {
        BufferSize::ALL
            .into_iter()
            .find(|size| size.bytes() == bytes)
            .ok_or(InvalidBufferSize(bytes))
    }
}

impl From<BufferSize> for usize {
    fn from(size: BufferSize) -> usize {
        size.bytes()
    }
}
