//! Waits that own their pool handle: [`AllocateOwned`] (a `'static` future, for spawned tasks
//! and structs) and [`PollAllocate`] (a poll-style wait for `Service::poll_ready`). Both make
//! the same [`Request`] as [`Allocate`](crate::Allocate), so they share its queue, its
//! semantics and its cancel safety.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};
use std::sync::Arc;

use pin_project_lite::pin_project;

use crate::wait::{Request, Unit};
use crate::{AllocError, BufPool, BufPoolAllocation};

impl BufPool {
    /// Like [`allocate`](BufPool::allocate), but the future owns a handle to the pool
    /// (`'static`): spawn it, or keep it in a struct.
    ///
    /// The allocation it resolves to keeps the pool alive too, as tokio's owned permits do:
    /// a task may drop its last handle to the pool while it still holds the allocation,
    /// without blocking; the pool's drop (its barrier) then runs when the last owned
    /// allocation is given back (through `into_filled` and `freeze` too), on the thread that
    /// gives it back, which it blocks while the pool's other allocations are out (in a task,
    /// an executor's worker: give those back first, or drop the last one with
    /// `spawn_blocking`).
    ///
    /// # Errors
    ///
    /// As [`allocate`](BufPool::allocate).
    ///
    /// # Cancel safety
    ///
    /// As [`allocate`](BufPool::allocate): dropping the future (or aborting the task that
    /// polls it) gives up its place in the queue, and any budget already granted to it goes
    /// on to the next waiters.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::sync::Arc;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S4096, max_memory: 1 << 20 }));
    /// let task = tokio::spawn(Arc::clone(&pool).allocate_owned(4));
    /// let allocation = task.await??;
    /// drop(pool); // the last handle: the pool lives on for the allocation
    /// assert_eq!(allocation.length(), 4);
    /// drop(allocation); // the pool's drop runs here, and returns at once
    /// # Ok(())
    /// # }
    /// ```
    pub fn allocate_owned(self: Arc<Self>, n: usize) -> AllocateOwned {
        AllocateOwned::new(self, n, false)
    }

    /// Like [`allocate_owned`](BufPool::allocate_owned), with every byte of the allocation
    /// zero.
    ///
    /// # Errors
    ///
    /// As [`allocate`](BufPool::allocate).
    ///
    /// # Cancel safety
    ///
    /// As [`allocate_owned`](BufPool::allocate_owned).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    /// use std::sync::Arc;
    ///
    /// # futures::executor::block_on(async {
    /// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 4096 }));
    /// let allocation = Arc::clone(&pool).allocate_zeroed_owned(2).await?;
    /// let filled = allocation.into_filled();
    /// assert_eq!(filled.capacity(), 128);
    /// # Ok::<(), membudget::AllocError>(())
    /// # }).unwrap();
    /// ```
    pub fn allocate_zeroed_owned(self: Arc<Self>, n: usize) -> AllocateOwned {
        AllocateOwned::new(self, n, true)
    }
}

pin_project! {
    /// The future of [`BufPool::allocate_owned`] and [`BufPool::allocate_zeroed_owned`]:
    /// [`Allocate`](crate::Allocate) with an owned pool handle, so it is `'static` and
    /// `Send`.
    ///
    /// It is `!Unpin` (its queue node is pinned inside it): `.await` it, spawn it, or pin it
    /// with [`Box::pin`] to poll it by hand.
    ///
    /// # Cancel safety
    ///
    /// As [`Allocate`](crate::Allocate): dropping it at any point loses nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{AllocateOwned, BufPool, BufPoolCfg, BufferSize};
    /// use std::sync::Arc;
    ///
    /// struct Pending {
    ///     buffers: AllocateOwned,
    /// }
    ///
    /// # futures::executor::block_on(async {
    /// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S512, max_memory: 4096 }));
    /// let pending = Pending { buffers: Arc::clone(&pool).allocate_owned(8) };
    /// assert_eq!(pending.buffers.await?.allocated_bytes(), 4096);
    /// # Ok::<(), membudget::AllocError>(())
    /// # }).unwrap();
    /// ```
    #[must_use = "futures do nothing unless polled"]
    pub struct AllocateOwned {
        pool: Arc<BufPool>,
        #[pin]
        request: Request,
    }

    impl PinnedDrop for AllocateOwned {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.request.cancel(this.pool.state());
        }
    }
}

impl AllocateOwned {
    fn new(pool: Arc<BufPool>, n: usize, zeroed: bool) -> Self {
        AllocateOwned {
            pool,
            request: Request::allocation(n, zeroed),
        }
    }
}

impl Future for AllocateOwned {
    type Output = Result<BufPoolAllocation, AllocError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let handle = &*this.pool;
        let pool = handle.state();
        match this.request.poll_allocation(pool, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(allocation) => Poll::Ready(allocation.map(|allocation| {
                allocation.owned_by(|| Arc::clone(handle) as Arc<dyn Send + Sync>)
            })),
        }
    }
}

impl fmt::Debug for AllocateOwned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AllocateOwned")
            .field("n", &self.request.amount())
            .finish_non_exhaustive()
    }
}

/// A poll-style wait for buffers, for `poll_ready` of a `tower::Service` or any hand-written
/// `poll` function (after tokio-util's `PollSemaphore`).
///
/// [`poll_allocate`](PollAllocate::poll_allocate) keeps its place in the pool's FIFO queue
/// between calls for as long as it asks for the same `n`; asking for a different `n` gives
/// the old place up and queues anew, and dropping the `PollAllocate` gives it up too. It
/// holds no lock between polls, is `Send` and `Unpin`, and its queue node lives in one heap
/// allocation made on the first wait and reused for every later one.
///
/// Cloning gives a new `PollAllocate` for the same pool, with no place in the queue.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PollAllocate};
/// use std::future::poll_fn;
/// use std::sync::Arc;
///
/// /// A service that needs two buffers per request.
/// struct Service {
///     buffers: PollAllocate,
///     ready: Option<BufPoolAllocation>,
/// }
///
/// impl Service {
///     fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), membudget::AllocError>> {
///         if self.ready.is_none() {
///             let allocation = std::task::ready!(self.buffers.poll_allocate(cx, 2))?;
///             self.ready = Some(allocation);
///         }
///         std::task::Poll::Ready(Ok(()))
///     }
/// }
///
/// # futures::executor::block_on(async {
/// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S1024, max_memory: 4096 }));
/// let mut service = Service { buffers: PollAllocate::new(Arc::clone(&pool)), ready: None };
/// poll_fn(|cx| service.poll_ready(cx)).await?;
/// assert_eq!(pool.stats().in_use_bytes, 2048);
/// # Ok::<(), membudget::AllocError>(())
/// # }).unwrap();
/// ```
pub struct PollAllocate {
    pool: Arc<BufPool>,
    /// The request in progress, or the last one (done); boxed once so that its queue node
    /// stays pinned while `PollAllocate` moves.
    request: Option<Pin<Box<Request>>>,
}

impl PollAllocate {
    /// A poll-style wait on `pool`, with no place in its queue yet.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize, PollAllocate};
    /// use std::sync::Arc;
    ///
    /// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 }));
    /// let poller = PollAllocate::new(pool);
    /// assert_eq!(poller.pool().stats().waiting, 0);
    /// ```
    pub fn new(pool: Arc<BufPool>) -> Self {
        PollAllocate {
            pool,
            request: None,
        }
    }

    /// The pool it allocates from.
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize, PollAllocate};
    /// use std::sync::Arc;
    ///
    /// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 }));
    /// let poller = PollAllocate::new(Arc::clone(&pool));
    /// assert!(Arc::ptr_eq(poller.pool(), &pool));
    /// ```
    pub fn pool(&self) -> &Arc<BufPool> {
        &self.pool
    }

    /// Polls for `n` contiguous buffers: `Ready` with the allocation (or the error
    /// [`allocate`](BufPool::allocate) would give), or `Pending` with the task registered to
    /// be woken and its place in the queue kept.
    ///
    /// After `Ready`, the next call starts a new request. A call with a different `n` than
    /// the pending request's gives that request up first (its place in the queue, and any
    /// budget granted to it but not taken, go to the next waiters).
    ///
    /// # Errors
    ///
    /// As [`allocate`](BufPool::allocate).
    ///
    /// # Cancel safety
    ///
    /// Not polling again, or dropping the `PollAllocate`, loses nothing: the pending request
    /// is given up as by dropping an [`Allocate`](crate::Allocate).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize, PollAllocate};
    /// use std::sync::Arc;
    /// use std::task::{Context, Poll};
    ///
    /// let pool = Arc::new(BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 128 }));
    /// let held = pool.try_allocate(2).unwrap();
    /// let mut poller = PollAllocate::new(Arc::clone(&pool));
    /// let mut cx = Context::from_waker(std::task::Waker::noop());
    /// assert!(poller.poll_allocate(&mut cx, 1).is_pending()); // queued
    /// assert_eq!(pool.stats().waiting, 1);
    /// drop(held); // grants the queued request
    /// let Poll::Ready(Ok(allocation)) = poller.poll_allocate(&mut cx, 1) else { panic!() };
    /// assert_eq!(allocation.length(), 1);
    /// ```
    pub fn poll_allocate(
        &mut self,
        cx: &mut Context<'_>,
        n: usize,
    ) -> Poll<Result<BufPoolAllocation, AllocError>> {
        let state = self.pool.state();
        let request = match &mut self.request {
            Some(request) => {
                if request.is_done() || request.amount() != n {
                    // Gives up a pending request before its node is overwritten (a node
                    // dropped while queued aborts).
                    request.as_mut().cancel(state);
                    request.set(Request::new(n, Unit::Buffers));
                }
                request
            }
            None => self
                .request
                .insert(Box::pin(Request::new(n, Unit::Buffers))),
        };
        match request.as_mut().poll_allocation(state, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(allocation) => Poll::Ready(allocation.map(|allocation| {
                let handle = &self.pool;
                allocation.owned_by(|| Arc::clone(handle) as Arc<dyn Send + Sync>)
            })),
        }
    }
}

impl Drop for PollAllocate {
    fn drop(&mut self) {
        if let Some(request) = &mut self.request {
            request.as_mut().cancel(self.pool.state());
        }
    }
}

impl Clone for PollAllocate {
    /// A new `PollAllocate` for the same pool, with no place in the queue.
    fn clone(&self) -> Self {
        PollAllocate::new(Arc::clone(&self.pool))
    }
}

impl fmt::Debug for PollAllocate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PollAllocate")
            .field(
                "pending_n",
                &self
                    .request
                    .as_ref()
                    .filter(|request| !request.is_done())
                    .map(|request| request.amount()),
            )
            .finish_non_exhaustive()
    }
}
