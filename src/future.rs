//! The two waits of the pool, written once as futures: [`Allocate`] for budget and
//! [`Drained`] for the shutdown barrier. The blocking calls drive these same futures.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

use event_listener::EventListener;

use crate::shared::{Attempt, Reservation, Shared, Ticket};
use crate::sync::Arc;
use crate::{AllocError, BufPoolAllocation};

/// The future of [`BufPool::allocate`](crate::BufPool::allocate) and
/// [`BufPool::allocate_zeroed`](crate::BufPool::allocate_zeroed).
///
/// # Cancel safety
///
/// Dropping it at any point loses nothing: a request still queued leaves the queue (letting
/// the waiters behind it move up), and budget already granted to it goes on to the next
/// waiters at once.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// # futures::executor::block_on(async {
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S512, max_memory: 4096 });
/// let allocation = pool.allocate(8).await?;
/// assert_eq!(allocation.allocated_bytes(), 4096);
/// # Ok::<(), membudget::AllocError>(())
/// # }).unwrap();
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct Allocate<'a> {
    shared: &'a Arc<Shared>,
    n: usize,
    zeroed: bool,
    stage: Stage,
}

#[derive(Clone, Copy, Debug)]
enum Stage {
    Start,
    Queued { ticket: Ticket, bytes: usize },
    Done,
}

impl<'a> Allocate<'a> {
    pub(crate) fn new(shared: &'a Arc<Shared>, n: usize, zeroed: bool) -> Self {
        Allocate {
            shared,
            n,
            zeroed,
            stage: Stage::Start,
        }
    }

    #[inline]
    fn finish(&mut self, bytes: usize) -> Poll<Result<BufPoolAllocation, AllocError>> {
        self.stage = Stage::Done;
        Poll::Ready(Ok(BufPoolAllocation::new(self.shared, bytes, self.zeroed)))
    }

    fn fail(&mut self, error: AllocError) -> Poll<Result<BufPoolAllocation, AllocError>> {
        self.done(Err(error))
    }

    fn done(
        &mut self,
        result: Result<BufPoolAllocation, AllocError>,
    ) -> Poll<Result<BufPoolAllocation, AllocError>> {
        self.stage = Stage::Done;
        Poll::Ready(result)
    }
}

impl Future for Allocate<'_> {
    type Output = Result<BufPoolAllocation, AllocError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match this.stage {
            Stage::Start => match this.shared.reserve_now(this.n) {
                Attempt::Reserved(bytes) => this.finish(bytes),
                Attempt::Failed(error) => this.fail(error),
                Attempt::MustWait(bytes) => match this.shared.reserve_or_enqueue(bytes, cx.waker())
                {
                    Ok(Reservation::Reserved) => this.finish(bytes),
                    Ok(Reservation::Queued(ticket)) => {
                        this.stage = Stage::Queued { ticket, bytes };
                        Poll::Pending
                    }
                    Err(error) => this.fail(error),
                },
            },
            Stage::Queued { ticket, bytes } => match this.shared.poll_queued(ticket, cx.waker()) {
                None => Poll::Pending,
                Some(Ok(())) => this.finish(bytes),
                Some(Err(error)) => this.fail(error),
            },
            Stage::Done => panic!("`Allocate` polled after it completed"),
        }
    }
}

impl Drop for Allocate<'_> {
    fn drop(&mut self) {
        if let Stage::Queued { ticket, bytes } = self.stage {
            self.shared.cancel(ticket, bytes);
        }
    }
}

impl fmt::Debug for Allocate<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Allocate")
            .field("n", &self.n)
            .field("zeroed", &self.zeroed)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

/// The future of [`BufPool::drained`](crate::BufPool::drained): resolves once no allocation
/// of the pool is outstanding.
///
/// # Cancel safety
///
/// Dropping it loses nothing; it only listens.
///
/// # Examples
///
/// ```
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// # futures::executor::block_on(async {
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
/// let allocation = pool.allocate(2).await.unwrap();
/// let releaser = std::thread::spawn(move || drop(allocation));
/// pool.drained().await;
/// assert_eq!(pool.stats().in_use_bytes, 0);
/// releaser.join().unwrap();
/// # });
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct Drained<'a> {
    shared: &'a Shared,
    listener: Option<EventListener>,
}

impl<'a> Drained<'a> {
    pub(crate) fn new(shared: &'a Shared) -> Self {
        Drained {
            shared,
            listener: None,
        }
    }
}

impl Future for Drained<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            if this.shared.is_drained() {
                return Poll::Ready(());
            }
            match &mut this.listener {
                // Listen first, then announce and check: a release that empties the pool
                // after the check notifies this listener.
                None => {
                    this.listener = Some(this.shared.drain_event().listen());
                    if this.shared.drained_or_announce() {
                        return Poll::Ready(());
                    }
                }
                Some(listener) => match Pin::new(listener).poll(cx) {
                    Poll::Ready(()) => this.listener = None,
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }
}

impl fmt::Debug for Drained<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drained")
            .field("listening", &self.listener.is_some())
            .finish_non_exhaustive()
    }
}
