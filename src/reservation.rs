//! Budget without buffers: a [`Reservation`] holds bytes of a pool's budget for memory that
//! is not an I/O buffer (decoded blocks, index pages, request bodies), in the same FIFO queue
//! as allocations, and can hand out allocations from what it holds.
//!
//! A reservation holds a counted reference to its pool's state, so it may outlive the pool's
//! handle; its bytes count in use (and in `reserved_bytes`) until it gives them back, and the
//! pool's drop waits for them like for allocations.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};
use std::time::{Duration, Instant};

use pin_project_lite::pin_project;

use crate::blocking::block_on;
use crate::chain;
use crate::deferred::PendingWakeUps;
use crate::state::State;
use crate::sync::Arc;
use crate::wait::{Request, Unit};
use crate::{AllocError, BufPool, BufPoolAllocation};

/// Reservations count in bytes rounded up to a multiple of this.
pub(crate) const GRANULARITY: usize = 8;

/// `bytes` rounded up to the granularity; `None` if that overflows.
fn rounded(bytes: usize) -> Option<usize> {
    bytes.checked_next_multiple_of(GRANULARITY)
}

/// The refusal of a request whose rounding overflows: above any budget. Named as every
/// other `ExceedsBudget` of the pool (the most a request of it can get through its chain).
fn overflow(pool: &State) -> AllocError {
    AllocError::ExceedsBudget {
        requested_bytes: usize::MAX,
        max_memory: pool.largest_request(),
    }
}

impl BufPool {
    /// Reserves `bytes` of the budget without buffers, waiting in the pool's FIFO queue
    /// (with allocations) while they are not free. The size is rounded up to a multiple of
    /// 8 bytes; `reserve(0)` gives an empty reservation at once.
    ///
    /// # Errors
    ///
    /// [`ExceedsBudget`](AllocError::ExceedsBudget) at once if the rounded size is above the
    /// budget (of any pool up the chain, for a child pool), [`Closed`](AllocError::Closed),
    /// [`QueueFull`](AllocError::QueueFull).
    ///
    /// # Cancel safety
    ///
    /// As [`allocate`](BufPool::allocate): dropping the future gives up its place in the
    /// queue, and budget already granted to it goes on to the next waiters.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// # futures::executor::block_on(async {
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 1 << 20 });
    /// let index_page = pool.reserve(10_000).await?;
    /// assert_eq!(index_page.size(), 10_000);
    /// assert_eq!(pool.stats().reserved_bytes, 10_000);
    /// # Ok::<(), membudget::AllocError>(())
    /// # }).unwrap();
    /// ```
    pub fn reserve(&self, bytes: usize) -> Reserve<'_> {
        Reserve {
            pool: self.state(),
            request: Request::new(rounded_or_overflow(bytes), Unit::Bytes),
        }
    }

    /// Like [`reserve`](BufPool::reserve), but the future owns a handle to the pool
    /// (`'static`: spawn it, or keep it in a struct), and so does the reservation it
    /// resolves to, as tokio's owned permits: a task may drop its last handle to the pool
    /// while it still holds the reservation, without blocking; the pool's drop (its
    /// barrier) then runs when the reservation is given back. Allocations made out of it
    /// ([`Reservation::allocate`]) hold the pool the same way.
    ///
    /// # Errors
    ///
    /// As [`reserve`](BufPool::reserve).
    ///
    /// # Cancel safety
    ///
    /// As [`reserve`](BufPool::reserve).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::sync::Arc;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), membudget::AllocError> {
    /// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 }));
    /// let task = tokio::spawn(Arc::clone(&pool).reserve_owned(128));
    /// let reservation = task.await.unwrap()?;
    /// drop(pool); // the last handle: the pool lives on for the reservation
    /// assert_eq!(reservation.size(), 128);
    /// drop(reservation); // the pool's drop runs here, and returns at once
    /// # Ok(())
    /// # }
    /// ```
    pub fn reserve_owned(self: std::sync::Arc<Self>, bytes: usize) -> ReserveOwned {
        ReserveOwned {
            request: Request::new(rounded_or_overflow(bytes), Unit::Bytes),
            pool: self,
        }
    }

    /// Like [`reserve`](BufPool::reserve), blocking the calling thread while it waits.
    ///
    /// # Errors
    ///
    /// As [`reserve`](BufPool::reserve).
    ///
    /// # Blocking
    ///
    /// Blocks the thread (never call it from an async task) until the bytes are free or the
    /// request fails; it waits in the same FIFO queue as every other request.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let reservation = pool.reserve_blocking(100)?;
    /// assert_eq!(reservation.size(), 104); // rounded up to a multiple of 8
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn reserve_blocking(&self, bytes: usize) -> Result<Reservation, AllocError> {
        block_on(core::pin::pin!(self.reserve(bytes)), None).expect("no deadline")
    }

    /// Like [`reserve_blocking`](BufPool::reserve_blocking), giving up after `timeout`.
    ///
    /// # Errors
    ///
    /// As [`reserve`](BufPool::reserve), and [`TimedOut`](AllocError::TimedOut).
    ///
    /// # Blocking
    ///
    /// Blocks the thread for at most about `timeout`.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    /// use std::time::Duration;
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 });
    /// let all = pool.reserve_blocking(64)?;
    /// assert_eq!(pool.reserve_timeout(8, Duration::from_millis(5)).unwrap_err(), AllocError::TimedOut);
    /// # drop(all);
    /// # Ok::<(), AllocError>(())
    /// ```
    pub fn reserve_timeout(
        &self,
        bytes: usize,
        timeout: Duration,
    ) -> Result<Reservation, AllocError> {
        let deadline = Instant::now().checked_add(timeout);
        match block_on(core::pin::pin!(self.reserve(bytes)), deadline) {
            Some(result) => result,
            None => Err(self.state().timed_out()),
        }
    }

    /// Reserves `bytes` (rounded up to a multiple of 8) if they are free now and nobody
    /// waits; never waits.
    ///
    /// # Errors
    ///
    /// As [`reserve`](BufPool::reserve), and [`WouldBlock`](AllocError::WouldBlock).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 64 });
    /// let r = pool.try_reserve(60)?;
    /// assert_eq!(r.size(), 64);
    /// assert_eq!(pool.try_reserve(1).unwrap_err(), AllocError::WouldBlock);
    /// # Ok::<(), AllocError>(())
    /// ```
    pub fn try_reserve(&self, bytes: usize) -> Result<Reservation, AllocError> {
        let state = self.state();
        let bytes = try_hold(state, bytes)?;
        Ok(Reservation::holding(state, bytes))
    }
}

/// The amount of a reservation's request whose size rounded up to 8 overflows: never a
/// rounded size (those are multiples of 8), so the future needs no flag of its own.
const OVERFLOWED: usize = usize::MAX;

/// `bytes` rounded up to a multiple of 8, or [`OVERFLOWED`].
fn rounded_or_overflow(bytes: usize) -> usize {
    rounded(bytes).unwrap_or(OVERFLOWED)
}

/// Growing a reservation of `held` bytes by `more` can never succeed if the two together are
/// above the smallest budget of its chain: that fails at once, like any request above the
/// budget, instead of waiting for bytes the reservation itself holds.
fn beyond_budget(pool: &State, held: usize, more: usize) -> Option<AllocError> {
    let budget = pool.smallest_budget();
    // `more` alone above the budget is reported by the request itself, as for `reserve`.
    (more <= budget && more > budget - held.min(budget)).then(|| AllocError::ExceedsBudget {
        requested_bytes: held.saturating_add(more),
        max_memory: budget,
    })
}

/// Holds `bytes` (rounded) now or fails with `WouldBlock`.
fn try_hold(pool: &State, bytes: usize) -> Result<usize, AllocError> {
    let bytes = rounded(bytes).ok_or_else(|| overflow(pool))?;
    if bytes == 0 {
        return Ok(0);
    }
    match pool.reserve_bytes_without_waiting(bytes) {
        crate::state::Attempt::Reserved(bytes) => Ok(bytes),
        crate::state::Attempt::MustWait(_) => Err(pool.would_block()),
        crate::state::Attempt::Failed(error) => Err(error),
    }
}

/// Bytes of a pool's budget held without buffers. See [`BufPool::reserve`].
///
/// Sizes count in bytes rounded up to a multiple of 8 (the budget's granularity). Dropping a
/// reservation gives its bytes back, serving waiters. It is `Send + Sync + 'static` and may
/// outlive the pool's handle.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 1 << 20 });
/// let mut query = pool.try_reserve(64 << 10)?; // a query's memory, up front
/// query.try_grow(16 << 10)?;
/// let part = query.split(32 << 10); // handed to a sub-task
/// assert_eq!((query.size(), part.size()), (48 << 10, 32 << 10));
/// let buffers = query.allocate(4)?; // I/O buffers out of the reservation: never waits
/// assert_eq!(query.size(), 32 << 10);
/// query.merge(part).unwrap();
/// assert_eq!(pool.stats().in_use_bytes, 80 << 10);
/// drop((query, buffers));
/// assert_eq!(pool.stats().in_use_bytes, 0);
/// # Ok::<(), membudget::AllocError>(())
/// ```
#[must_use = "dropping a reservation gives its bytes straight back"]
pub struct Reservation {
    pool: Arc<State>,
    /// The bytes held in the pool's budget: `size` rounded up to a multiple of 8.
    held: usize,
    /// The size its owner sees.
    size: usize,
    /// For [`BufPool::reserve_owned`]: the pool's handle, so the pool's drop (its barrier)
    /// waits until this is given back without the owner keeping a handle. Dropped after the
    /// bytes go back.
    owner: Option<std::sync::Arc<BufPool>>,
}

impl Reservation {
    /// A reservation of `bytes` (a multiple of 8) already held in `pool` (and counted in
    /// none yet).
    fn holding(pool: &Arc<State>, bytes: usize) -> Self {
        pool.note_reserved(bytes as isize);
        let reservation = Reservation {
            pool: Arc::clone(pool),
            held: bytes,
            size: bytes,
            owner: None,
        };
        // Once the bytes are the reservation's (a panic here gives them back as it drops).
        if bytes > 0 && reservation.pool.pressure_armed() {
            reservation.pool.check_pressure();
        }
        reservation
    }

    /// Its size in bytes: a multiple of 8, except after the exact calls
    /// ([`resize_to`](Reservation::resize_to), [`try_shrink`](Reservation::try_shrink),
    /// [`force_grow`](Reservation::force_grow)), which set it to the byte. The pool holds it
    /// rounded up to a multiple of 8 (its granularity); that rounding is never lost: every
    /// byte held goes back when the reservation shrinks to zero or is dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// assert_eq!(pool.try_reserve(1)?.size(), 8);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn size(&self) -> usize {
        self.size
    }

    /// Grows by `more` bytes (rounded up to a multiple of 8) if they are free now and nobody
    /// waits (no barging past the queue).
    ///
    /// # Errors
    ///
    /// [`WouldBlock`](AllocError::WouldBlock), [`ExceedsBudget`](AllocError::ExceedsBudget)
    /// if what it would hold (the bytes it holds, its size rounded up to 8, plus `more`
    /// rounded up to 8) is above the budget (the smallest on the chain, for a child pool),
    /// [`Closed`](AllocError::Closed). The reservation is unchanged on error.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 128 });
    /// let mut r = pool.try_reserve(64)?;
    /// r.try_grow(32)?;
    /// let other = pool.try_reserve(32)?; // the budget is full now
    /// assert_eq!(r.try_grow(8).unwrap_err(), AllocError::WouldBlock);
    /// // 96 + 40 could never fit a budget of 128: refused, not "try again later".
    /// assert!(matches!(r.try_grow(40), Err(AllocError::ExceedsBudget { .. })));
    /// assert_eq!(r.size(), 96);
    /// # drop(other);
    /// # Ok::<(), AllocError>(())
    /// ```
    pub fn try_grow(&mut self, more: usize) -> Result<(), AllocError> {
        let rounded_more = rounded(more).ok_or_else(|| overflow(&self.pool))?;
        if let Some(error) = beyond_budget(&self.pool, self.held, rounded_more) {
            return Err(error);
        }
        let more = try_hold(&self.pool, more)?;
        self.add(more);
        Ok(())
    }

    /// Grows by `more` bytes (rounded up to a multiple of 8), waiting in the pool's FIFO
    /// queue while they are not free.
    ///
    /// # Errors
    ///
    /// As [`BufPool::reserve`], and [`ExceedsBudget`](AllocError::ExceedsBudget) at once if
    /// the size and `more` together are above the budget (it could never be served), or as
    /// soon as a shrink of any pool of its chain makes them so while it waits. The
    /// reservation is unchanged on error.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future loses nothing: the reservation keeps its size, and budget granted
    /// to the growth goes on to the next waiters.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// # futures::executor::block_on(async {
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let mut r = pool.reserve(100).await?;
    /// r.grow(100).await?;
    /// assert_eq!(r.size(), 208);
    /// # Ok::<(), membudget::AllocError>(())
    /// # }).unwrap();
    /// ```
    pub fn grow(&mut self, more: usize) -> Grow<'_> {
        let refused = match rounded(more) {
            None => Some(overflow(&self.pool)),
            Some(more) => beyond_budget(&self.pool, self.held, more),
        };
        Grow {
            // The reservation's bytes beside it: a shrink that leaves the two together above
            // the budget fails the growth, as at this call (see `beyond_budget`).
            request: Request::growth(rounded_or_overflow(more), self.held),
            refused,
            reservation: self,
        }
    }

    /// Like [`grow`](Reservation::grow), blocking the calling thread while it waits.
    ///
    /// # Errors
    ///
    /// As [`grow`](Reservation::grow).
    ///
    /// # Blocking
    ///
    /// Blocks the thread (never call it from an async task) until the bytes are free or the
    /// request fails.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let mut r = pool.reserve_blocking(8)?;
    /// r.grow_blocking(8)?;
    /// assert_eq!(r.size(), 16);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn grow_blocking(&mut self, more: usize) -> Result<(), AllocError> {
        block_on(core::pin::pin!(self.grow(more)), None).expect("no deadline")
    }

    /// Gives back `min(less, size)` bytes (`less` rounded up to a multiple of 8), serving
    /// waiters.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let mut r = pool.try_reserve(64)?;
    /// r.shrink(10);
    /// assert_eq!(r.size(), 48);
    /// r.shrink(usize::MAX);
    /// assert_eq!((r.size(), pool.stats().in_use_bytes), (0, 0));
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn shrink(&mut self, less: usize) {
        let less = rounded(less).unwrap_or(usize::MAX).min(self.size);
        self.set_smaller_size(self.size - less);
    }

    /// Shrinks to `size` (at most the size now), giving back what the pool no longer needs
    /// to hold for it.
    fn set_smaller_size(&mut self, size: usize) {
        debug_assert!(size <= self.size);
        // Never overflows: `size` is at most a size whose rounding is held.
        let held = rounded(size).expect("a held size rounds");
        let less = self.held - held;
        // Recorded before the give-back, whose user code may unwind.
        self.size = size;
        self.held = held;
        if less > 0 {
            self.pool.note_reserved(-(less as isize));
            chain::give_back_held(&self.pool, less);
        }
    }

    /// Shrinks to exactly `size` bytes, as [`resize_to`](Reservation::resize_to) does, but
    /// returns the wake-ups its give-back owes instead of running them: for a caller that
    /// shrinks while it holds a lock of its own (the books of a DataFusion `MemoryPool`,
    /// say), since the waiters' wakers are user code that may call back into its code. The
    /// bytes go back, and to the waiters they serve, before it returns (no other caller sees
    /// them held meanwhile); drop the [`PendingWakeUps`] once your lock is released. A `size`
    /// at or above the current size changes nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 128 });
    /// let mut held = pool.try_reserve(128)?;
    /// # futures::executor::block_on(async {
    /// let waiting = pool.allocate(1);
    /// # let mut waiting = Box::pin(waiting);
    /// # assert!(futures::poll!(&mut waiting).is_pending());
    /// let wake_ups = held.shrink_to_deferring_wakeups(13);
    /// assert_eq!(held.size(), 13);
    /// assert_eq!(pool.stats().in_use_bytes, 16 + 64); // granted to the waiter already
    /// drop(wake_ups); // now the waiter's task is woken
    /// assert!(waiting.await.is_ok());
    /// # });
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn shrink_to_deferring_wakeups(&mut self, size: usize) -> PendingWakeUps {
        let mut pending = PendingWakeUps::new();
        if size < self.size {
            // Never overflows: `size` is below a size whose rounding is held.
            let held = rounded(size).expect("a held size rounds");
            let less = self.held - held;
            self.size = size;
            self.held = held;
            if less > 0 {
                self.pool.note_reserved(-(less as isize));
                chain::give_back_held_deferred(&self.pool, less, pending.deferred());
            }
        }
        pending
    }

    /// Shrinks by exactly `less` bytes, giving back what the pool no longer holds for it
    /// (as DataFusion's `MemoryReservation::try_shrink`).
    ///
    /// # Errors
    ///
    /// [`ExceedsBudget`](AllocError::ExceedsBudget) with the size as `max_memory` if `less`
    /// is more than the size; the reservation is then unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let mut r = pool.try_reserve(64)?;
    /// r.try_shrink(10)?;
    /// assert_eq!((r.size(), pool.stats().in_use_bytes), (54, 56));
    /// assert!(matches!(r.try_shrink(55), Err(AllocError::ExceedsBudget { .. })));
    /// assert_eq!(r.size(), 54);
    /// # Ok::<(), AllocError>(())
    /// ```
    pub fn try_shrink(&mut self, less: usize) -> Result<(), AllocError> {
        if less > self.size {
            return Err(AllocError::ExceedsBudget {
                requested_bytes: less,
                max_memory: self.size,
            });
        }
        self.set_smaller_size(self.size - less);
        Ok(())
    }

    /// Gives every byte back and returns the size it had (as DataFusion's
    /// `MemoryReservation::free`). The reservation stays usable, empty.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let mut r = pool.try_reserve(100)?;
    /// assert_eq!(r.free(), 104);
    /// assert_eq!((r.size(), pool.stats().in_use_bytes), (0, 0));
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn free(&mut self) -> usize {
        let size = self.size;
        self.set_smaller_size(0);
        size
    }

    /// Sets the size to exactly `size` bytes: shrinking always succeeds (the pool gives back
    /// what it no longer holds); growing takes the difference now, as
    /// [`try_grow`](Reservation::try_grow) would, never waiting. Rounding stays inside: a
    /// caller that tracks exact sizes never sees a byte lost or extra, and resizing to 0
    /// gives everything back. (One edge: budgets count in multiples of 8, so in a budget
    /// that is not one, say 100, its last `max_memory % 8` bytes are out of every request's
    /// reach: a resize to 97-100 of a pool of 100 fails with `ExceedsBudget` naming the 104
    /// bytes the pool would have to hold.)
    ///
    /// # Errors
    ///
    /// When growing, as [`try_grow`](Reservation::try_grow): [`WouldBlock`](AllocError::WouldBlock),
    /// [`ExceedsBudget`](AllocError::ExceedsBudget), [`Closed`](AllocError::Closed); the
    /// reservation is then unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let mut r = pool.try_reserve(0)?;
    /// r.resize_to(13)?;
    /// assert_eq!((r.size(), pool.stats().in_use_bytes), (13, 16));
    /// r.resize_to(17)?;
    /// assert_eq!((r.size(), pool.stats().in_use_bytes), (17, 24));
    /// r.resize_to(5)?;
    /// assert_eq!((r.size(), pool.stats().in_use_bytes), (5, 8));
    /// r.resize_to(0)?;
    /// assert_eq!(pool.stats().in_use_bytes, 0);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn resize_to(&mut self, size: usize) -> Result<(), AllocError> {
        if size <= self.size {
            self.set_smaller_size(size);
            return Ok(());
        }
        let held = rounded(size).ok_or_else(|| overflow(&self.pool))?;
        let more = held - self.held;
        if more > 0 {
            if let Some(error) = beyond_budget(&self.pool, self.held, more) {
                return Err(error);
            }
            let more = try_hold(&self.pool, more)?;
            self.pool.note_reserved(more as isize);
            self.held += more;
            self.size = size;
            if self.pool.pressure_armed() {
                self.pool.check_pressure();
            }
        }
        self.size = size;
        Ok(())
    }

    /// Grows by exactly `more` bytes whatever the budget: overcommit that always succeeds
    /// (for callers that cannot wait or fail, as DataFusion's infallible
    /// `MemoryReservation::grow`). The bytes are held at once in this pool and every
    /// ancestor, and may take them above their budgets; every pool counts it
    /// ([`PoolStats::overcommit_bytes`](crate::PoolStats::overcommit_bytes)), and it is
    /// repaid first: no request is granted in an overcommitted pool (nor, through it, in
    /// its subtree) until releases bring it back under its budget. The one exception is a
    /// floor: a floored pool below an overcommitted one still grants what its own free floor
    /// holds (the floor was set aside in the overcommitted pool already, so such a grant
    /// takes nothing more of it, and overcommit elsewhere cannot take a floor from its pool);
    /// what would climb past the floor waits.
    ///
    /// # Errors
    ///
    /// Only for sizes no pool can count (the bytes in use would pass 4 PiB):
    /// [`ExceedsBudget`](AllocError::ExceedsBudget); the reservation is then unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocError, BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 128 });
    /// let mut r = pool.try_reserve(128)?;
    /// r.force_grow(100)?;
    /// let stats = pool.stats();
    /// assert_eq!((r.size(), stats.in_use_bytes, stats.overcommit_bytes), (228, 232, 104));
    /// assert_eq!(pool.try_allocate(1).unwrap_err(), AllocError::WouldBlock);
    /// r.try_shrink(100)?;
    /// assert_eq!(pool.stats().overcommit_bytes, 0);
    /// # Ok::<(), AllocError>(())
    /// ```
    pub fn force_grow(&mut self, more: usize) -> Result<(), AllocError> {
        // Named as every other `ExceedsBudget` of the pool: the largest request its chain
        // can serve.
        let too_big = || AllocError::ExceedsBudget {
            requested_bytes: self.size.saturating_add(more),
            max_memory: self.pool.largest_request(),
        };
        let size = self.size.checked_add(more).ok_or_else(too_big)?;
        let held = rounded(size).ok_or_else(too_big)?;
        let extra = held - self.held;
        if extra > 0 {
            chain::force_hold(&self.pool, extra).map_err(|_| too_big())?;
            self.pool.note_reserved(extra as isize);
            self.held = held;
            self.size = size;
            if self.pool.pressure_armed() {
                self.pool.check_pressure();
            }
        }
        self.size = size;
        Ok(())
    }

    /// Takes `min(bytes, size)` bytes (`bytes` rounded up to a multiple of 8) out into a new
    /// reservation of the same pool.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let mut r = pool.try_reserve(64)?;
    /// let part = r.split(24);
    /// assert_eq!((r.size(), part.size()), (40, 24));
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn split(&mut self, bytes: usize) -> Reservation {
        let part = rounded(bytes).unwrap_or(usize::MAX).min(self.size);
        let size = self.size - part;
        let held = rounded(size).expect("a held size rounds");
        let part_held = self.held - held;
        self.size = size;
        self.held = held;
        Reservation {
            pool: Arc::clone(&self.pool),
            held: part_held,
            size: part,
            owner: self.owner.clone(),
        }
    }

    /// Adds `other`'s bytes to this reservation.
    ///
    /// # Errors
    ///
    /// `other` back, unchanged, if it belongs to another pool.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let cfg = BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 };
    /// let (pool, other_pool) = (BufPool::new(cfg), BufPool::new(cfg));
    /// let mut r = pool.try_reserve(8)?;
    /// r.merge(pool.try_reserve(16)?).unwrap();
    /// assert_eq!(r.size(), 24);
    /// let stranger = other_pool.try_reserve(8)?;
    /// assert_eq!(r.merge(stranger).unwrap_err().size(), 8);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn merge(&mut self, mut other: Reservation) -> Result<(), Reservation> {
        if !Arc::ptr_eq(&self.pool, &other.pool) {
            return Err(other);
        }
        self.held += core::mem::take(&mut other.held);
        self.size += core::mem::take(&mut other.size);
        if self.owner.is_none() {
            // The merged bytes keep the pool alive as `other` did: its handle may be the
            // last, and dropping it here would run the pool's drop while we hold them.
            self.owner = other.owner.take();
        }
        // Two rounded sizes may hold 8 bytes more than their sum rounded.
        self.set_smaller_size(self.size);
        Ok(())
    }

    /// Allocates `n` contiguous buffers out of the reservation: never waits. Their bytes
    /// leave the reservation and go back to the pool when the allocation is dropped.
    ///
    /// # Errors
    ///
    /// [`ZeroBuffers`](AllocError::ZeroBuffers);
    /// [`ExceedsBudget`](AllocError::ExceedsBudget) with the reservation's size as
    /// `max_memory` if `n` buffers are more than it holds;
    /// [`OutOfMemory`](AllocError::OutOfMemory) (the bytes then go back to the pool, not to
    /// the reservation). The reservation is unchanged on the first two.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S1024, max_memory: 8192 });
    /// let mut r = pool.try_reserve(4096)?;
    /// let allocation = r.allocate(3)?;
    /// assert_eq!((allocation.length(), r.size()), (3, 1024));
    /// drop(allocation);
    /// assert_eq!(pool.stats().in_use_bytes, 1024);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn allocate(&mut self, n: usize) -> Result<BufPoolAllocation, AllocError> {
        if n == 0 {
            return Err(AllocError::ZeroBuffers);
        }
        let shift = self.pool.config.buffer_size.shift();
        if n > self.size >> shift {
            return Err(AllocError::ExceedsBudget {
                requested_bytes: n.saturating_mul(self.pool.config.buffer_size.bytes()),
                max_memory: self.size,
            });
        }
        let bytes = n << shift;
        self.size -= bytes;
        self.held -= bytes;
        self.pool.note_reserved(-(bytes as isize));
        self.pool.held_becomes_allocation();
        let allocation = BufPoolAllocation::new(&self.pool, bytes, false)?;
        Ok(match &self.owner {
            // Out of an owned reservation: owned too.
            Some(owner) => allocation
                .owned_by(|| std::sync::Arc::clone(owner) as std::sync::Arc<dyn Send + Sync>),
            None => allocation,
        })
    }

    fn add(&mut self, bytes: usize) {
        self.pool.note_reserved(bytes as isize);
        self.held += bytes;
        self.size += bytes;
        if self.pool.pressure_armed() {
            self.pool.check_pressure();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // The bytes go back first; `owner` (if any) is dropped after this, which may run
        // the pool's drop.
        self.free();
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The future of [`BufPool::reserve`].
    ///
    /// # Cancel safety
    ///
    /// As [`Allocate`](crate::Allocate): dropping it at any point loses nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// # futures::executor::block_on(async {
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let reservation = pool.reserve(0).await?; // empty, at once
    /// assert_eq!(reservation.size(), 0);
    /// # Ok::<(), membudget::AllocError>(())
    /// # }).unwrap();
    /// ```
    #[must_use = "futures do nothing unless polled"]
    pub struct Reserve<'a> {
        pool: &'a Arc<State>,
        #[pin]
        request: Request,
    }

    impl<'a> PinnedDrop for Reserve<'a> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.request.cancel(this.pool);
        }
    }
}

impl Future for Reserve<'_> {
    type Output = Result<Reservation, AllocError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let pool = *this.pool;
        if this.request.amount() == OVERFLOWED {
            return Poll::Ready(Err(overflow(pool)));
        }
        if this.request.amount() == 0 {
            return Poll::Ready(Ok(Reservation::holding(pool, 0)));
        }
        match this.request.poll_hold(pool, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(held) => Poll::Ready(held.map(|bytes| Reservation::holding(pool, bytes))),
        }
    }
}

pin_project! {
    /// The future of [`BufPool::reserve_owned`]: [`Reserve`] with an owned pool handle,
    /// which the reservation it resolves to keeps.
    ///
    /// # Cancel safety
    ///
    /// As [`Allocate`](crate::Allocate): dropping it at any point loses nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize, ReserveOwned};
    /// use std::sync::Arc;
    ///
    /// # futures::executor::block_on(async {
    /// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 }));
    /// let pending: ReserveOwned = Arc::clone(&pool).reserve_owned(64);
    /// assert_eq!(pending.await?.size(), 64);
    /// # Ok::<(), membudget::AllocError>(())
    /// # }).unwrap();
    /// ```
    #[must_use = "futures do nothing unless polled"]
    pub struct ReserveOwned {
        pool: std::sync::Arc<BufPool>,
        #[pin]
        request: Request,
    }

    impl PinnedDrop for ReserveOwned {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.request.cancel(this.pool.state());
        }
    }
}

impl Future for ReserveOwned {
    type Output = Result<Reservation, AllocError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let handle = &*this.pool;
        let pool = handle.state();
        if this.request.amount() == OVERFLOWED {
            return Poll::Ready(Err(overflow(pool)));
        }
        let owned = |mut reservation: Reservation| {
            reservation.owner = Some(std::sync::Arc::clone(handle));
            reservation
        };
        if this.request.amount() == 0 {
            return Poll::Ready(Ok(owned(Reservation::holding(pool, 0))));
        }
        match this.request.poll_hold(pool, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(held) => {
                Poll::Ready(held.map(|bytes| owned(Reservation::holding(pool, bytes))))
            }
        }
    }
}

impl fmt::Debug for ReserveOwned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReserveOwned")
            .field("bytes", &self.request.amount())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Reserve<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reserve")
            .field("bytes", &self.request.amount())
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The future of [`Reservation::grow`].
    ///
    /// # Cancel safety
    ///
    /// Dropping it at any point loses nothing: the reservation keeps its size.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// # futures::executor::block_on(async {
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let mut r = pool.reserve(8).await?;
    /// r.grow(8).await?;
    /// assert_eq!(r.size(), 16);
    /// # Ok::<(), membudget::AllocError>(())
    /// # }).unwrap();
    /// ```
    #[must_use = "futures do nothing unless polled"]
    pub struct Grow<'a> {
        reservation: &'a mut Reservation,
        refused: Option<AllocError>,
        #[pin]
        request: Request,
    }

    impl<'a> PinnedDrop for Grow<'a> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.request.cancel(&this.reservation.pool);
        }
    }
}

impl Future for Grow<'_> {
    type Output = Result<(), AllocError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(error) = *this.refused {
            return Poll::Ready(Err(error));
        }
        if this.request.amount() == 0 {
            return Poll::Ready(Ok(()));
        }
        match this.request.poll_hold(&this.reservation.pool, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(bytes)) => {
                this.reservation.add(bytes);
                Poll::Ready(Ok(()))
            }
            // Failed by a shrink because of the bytes beside it: reported as at the call.
            Poll::Ready(Err(AllocError::ExceedsBudget {
                requested_bytes,
                max_memory,
            })) if requested_bytes <= max_memory => Poll::Ready(Err(AllocError::ExceedsBudget {
                requested_bytes: this.reservation.held.saturating_add(requested_bytes),
                max_memory,
            })),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
        }
    }
}

impl fmt::Debug for Grow<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grow")
            .field("more", &self.request.amount())
            .finish_non_exhaustive()
    }
}
