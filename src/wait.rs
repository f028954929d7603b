//! The waits of the pool, written once as futures: [`Allocate`] for budget and [`Drained`]
//! for the shutdown barrier. The blocking calls drive these same futures (`blocking.rs`).
//!
//! An `Allocate` that has to wait carries its queue node inside itself (pinned): queueing
//! links it into the pool's list, a release grants it in place and wakes the task, and the
//! next poll sees the grant without taking the lock. Waiting allocates nothing.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

use event_listener::EventListener;
use pin_project_lite::pin_project;

use crate::heap::Pool as _;
use crate::state::{Admission, Attempt, State};
use crate::sync::Arc;
use crate::waiters::Node;
use crate::{AllocError, BufPoolAllocation};

pin_project! {
    /// The future of [`BufPool::allocate`](crate::BufPool::allocate) and
    /// [`BufPool::allocate_zeroed`](crate::BufPool::allocate_zeroed).
    ///
    /// It is `!Unpin` (its queue node is pinned inside it): `.await` it, or pin it with
    /// [`std::pin::pin!`] or [`Box::pin`] to poll it by hand. It borrows the pool; to store
    /// the wait in a struct or move it into a spawned task, use
    /// [`AllocateOwned`](crate::AllocateOwned).
    ///
    /// # Cancel safety
    ///
    /// Dropping it at any point loses nothing: a request still queued leaves the queue
    /// (letting the waiters behind it move up), and budget already granted to it goes on to
    /// the next waiters at once.
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
        pool: &'a Arc<State>,
        #[pin]
        request: Request,
    }

    impl<'a> PinnedDrop for Allocate<'a> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.request.cancel(this.pool);
        }
    }
}

impl<'a> Allocate<'a> {
    pub(crate) fn new(pool: &'a Arc<State>, n: usize, zeroed: bool) -> Self {
        Allocate {
            pool,
            request: Request::new(n, zeroed),
        }
    }
}

impl Future for Allocate<'_> {
    type Output = Result<BufPoolAllocation, AllocError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.request.poll(this.pool, cx)
    }
}

impl fmt::Debug for Allocate<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Allocate")
            .field("n", &self.request.n)
            .field("zeroed", &self.request.zeroed)
            .field("stage", &self.request.stage)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// One request for `n` buffers, as every allocation future makes it: the fast path
    /// first, then (if it must wait) its node in the queue. Its owner passes the pool to each
    /// call, and must call [`cancel`](Request::cancel) from its own drop: the node's drop
    /// aborts if it is still queued.
    pub(crate) struct Request {
        n: usize,
        zeroed: bool,
        stage: Stage,
        #[pin]
        node: Node,
    }
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Stage {
    Start,
    /// Its node is (or was, until a grant or failure) in the queue, for `n` buffers.
    Queued,
    Done,
}

impl Request {
    pub(crate) fn new(n: usize, zeroed: bool) -> Self {
        Request {
            n,
            zeroed,
            stage: Stage::Start,
            node: Node::new(),
        }
    }

    /// How many buffers it asks for.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Whether it has completed (and must not be polled again).
    pub(crate) fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    #[inline]
    pub(crate) fn poll(
        self: Pin<&mut Self>,
        pool: &Arc<State>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<BufPoolAllocation, AllocError>> {
        let this = self.project();
        let result = match *this.stage {
            Stage::Start => match pool.reserve_now(*this.n) {
                Attempt::Reserved(bytes) => Ok(bytes),
                Attempt::Failed(error) => Err(error),
                Attempt::MustWait(bytes) => {
                    match pool.admit(this.node.as_ref(), bytes, cx.waker()) {
                        Ok(Admission::Reserved) => Ok(bytes),
                        Ok(Admission::Queued) => {
                            *this.stage = Stage::Queued;
                            return Poll::Pending;
                        }
                        Err(error) => Err(error),
                    }
                }
            },
            Stage::Queued => match pool.poll_queued(this.node.as_ref(), cx.waker()) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => result.map(|()| pool.bytes_of(*this.n)),
            },
            Stage::Done => panic!("an allocation future polled after it completed"),
        };
        *this.stage = Stage::Done;
        Poll::Ready(result.and_then(|bytes| BufPoolAllocation::new(pool, bytes, *this.zeroed)))
    }

    /// Gives the request up: a queued node leaves the queue, a grant not taken goes on to
    /// the next waiters. Idempotent; the request is done afterwards.
    pub(crate) fn cancel(self: Pin<&mut Self>, pool: &State) {
        let this = self.project();
        if let Stage::Queued = *this.stage {
            let bytes = pool.bytes_of(*this.n);
            pool.cancel(this.node.as_ref(), bytes);
        }
        *this.stage = Stage::Done;
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
    pool: &'a State,
    listener: Option<EventListener>,
}

impl<'a> Drained<'a> {
    pub(crate) fn new(pool: &'a State) -> Self {
        Drained {
            pool,
            listener: None,
        }
    }
}

impl Future for Drained<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            if this.pool.is_drained() {
                return Poll::Ready(());
            }
            match &mut this.listener {
                // Listen first, then announce and check: a release that empties the pool
                // after the check notifies this listener.
                None => {
                    this.listener = Some(this.pool.drain_event().listen());
                    if this.pool.drained_or_announce() {
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
