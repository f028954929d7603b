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

use event_listener::{Event, EventListener};
use pin_project_lite::pin_project;

use crate::chain;
use crate::deferred::{self, Deferred, settle};
use crate::reclaim::{self, Driving};
use crate::state::{Admission, Asker, Attempt, Shortfall, State};
use crate::sync::Arc;
use crate::waiters::{Node, Status};
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
    /// # Panics
    ///
    /// Polling it again after it returned `Ready` may panic (the `Future` contract leaves
    /// that to each future); the budget is not affected. The same goes for every budget
    /// future of the crate ([`AllocateOwned`](crate::AllocateOwned),
    /// [`Reserve`](crate::Reserve), [`ReserveOwned`](crate::ReserveOwned),
    /// [`Grow`](crate::Grow)); `.await` never does it.
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
            request: Request::allocation(n, zeroed),
        }
    }
}

impl Future for Allocate<'_> {
    type Output = Result<BufPoolAllocation, AllocError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.request.poll_allocation(this.pool, cx)
    }
}

impl fmt::Debug for Allocate<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Allocate")
            .field("n", &self.request.amount)
            .field("zeroed", &self.request.zeroed)
            .field("stage", &self.request.stage)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// One request for budget, as every waiting future makes it (`n` buffers for an
    /// allocation, or bytes for a reservation): the fast path first, then (if it must wait)
    /// its node in the queue. Its owner passes the pool to each call, and must call
    /// [`cancel`](Request::cancel) from its own drop: the node's drop aborts if it is still
    /// queued.
    ///
    /// A child pool's request holds its bytes level by level up the chain of pools: here
    /// first (waiting in this pool's queue if it must), then in the parent (waiting at the
    /// tail of the parent's queue if it must), and so on. `levels` counts the pools, from
    /// this one up, whose bytes it holds; the node waits in at most one queue at a time.
    #[project = RequestProj]
    pub(crate) struct Request {
        amount: usize,
        unit: Unit,
        stage: Stage,
        // At most `config::MAX_DEPTH + 1`.
        levels: u16,
        // For an allocation: whether its memory is to be zeroed (kept here, in what would be
        // padding, rather than in each future: the futures stay 128 bytes).
        zeroed: bool,
        // What it took of floors on its way up (the floored pools below the levels it holds),
        // as bytes of its own that no longer climb: it holds `bytes` at its own level, and
        // `bytes - floored` (the part still on its way up) at every level it holds. The bytes
        // taken count as completed holdings in the floors' books at once (see `climb`).
        floored: usize,
        // Which round of reclaim this request drives (see `reclaim::drive`): none, nearly
        // always. A byte in what was padding: the future stays its size.
        driving: Driving,
        #[pin]
        node: Node,
    }
}

/// The parts of a [`Request`] a climb changes.
struct Progress<'a> {
    stage: &'a mut Stage,
    levels: &'a mut u16,
    /// See [`Request`]'s field of that name.
    floored: &'a mut usize,
    /// It has waited in a queue (the stage says so, see [`Stage::waited`]): from then on a
    /// full queue above makes it wait for room instead of failing with `QueueFull`.
    waited: bool,
}

impl Progress<'_> {
    /// The stage of a request that climbs: it has waited, or not.
    fn climbing(&self) -> Stage {
        if self.waited {
            Stage::ClimbingAfterWait
        } else {
            Stage::Climbing
        }
    }
}

/// What a climbing request's room listener listens to (see `Request::climb`).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Listening {
    Nothing,
    /// The room event of the floored pool below: room in its floor.
    Floor,
    /// The room event of the pool above: a place in its full queue.
    Room,
}

/// A climbing request's wait in no queue, for room that `event` announces (see
/// `Request::climb`): for room in a floor below, or for a place in a full queue above.
struct RoomWait<'a> {
    event: &'a Event,
    kind: Listening,
}

impl<'a> RoomWait<'a> {
    fn new(event: &'a Event, kind: Listening) -> Self {
        RoomWait { event, kind }
    }

    /// One step of the wait; `true` when the request looks again, `false` when its poll
    /// returns `Pending`. It listens first, then looks again (room made between the look and
    /// the listen is not missed: it notifies `event`); once it listens, it waits until it
    /// hears `event` (its stage `AwaitingRoom` meanwhile), and then looks again.
    fn step(
        self,
        node: Pin<&Node>,
        listening: &mut Listening,
        progress: &mut Progress<'_>,
        cx: &mut Context<'_>,
        deferred: &mut Deferred,
    ) -> bool {
        if *listening != self.kind {
            // A listener for the other wait is not this one's (see `Listening`).
            Request::drop_room_listener(node, deferred);
            node.with_room(|room| *room = Some(self.event.listen()));
            *listening = self.kind;
            return true;
        }
        *progress.stage = Stage::AwaitingRoom;
        let heard = node.with_room(|room| {
            let listener = room.as_mut().expect("listening");
            deferred::poll_listener(Pin::new(listener), cx).is_ready()
        });
        if !heard {
            return false;
        }
        Request::drop_room_listener(node, deferred);
        *listening = Listening::Nothing;
        *progress.stage = progress.climbing();
        true
    }
}

/// What a [`Request`] asks for.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Unit {
    /// `amount` buffers for an allocation, counted as one of the pool's allocations.
    Buffers,
    /// `amount` bytes (a multiple of 8) for a reservation: held, not an allocation.
    Bytes,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Stage {
    Start,
    /// Its node is (or was, until a grant or failure) in the queue of the pool `levels` up.
    Queued,
    /// Holds the bytes of the pools `levels` up; the next one is to be tried.
    Climbing,
    /// As `Climbing`, for a request that has waited in a queue.
    ClimbingAfterWait,
    /// As `ClimbingAfterWait`, and the next pool's queue is full: it waits for room there
    /// (its node's room listener).
    AwaitingRoom,
    Done,
}

impl Stage {
    /// Whether a request at this stage has waited in a queue (kept in the stage, not a field
    /// of its own: every future carries a request, and a fresh one writes as few bytes as it
    /// can, see `Node`).
    fn waited(self) -> bool {
        matches!(
            self,
            Stage::Queued | Stage::ClimbingAfterWait | Stage::AwaitingRoom
        )
    }
}

impl Request {
    pub(crate) fn new(amount: usize, unit: Unit) -> Self {
        Request {
            amount,
            unit,
            stage: Stage::Start,
            levels: 0,
            zeroed: false,
            floored: 0,
            driving: Driving::default(),
            node: Node::new(),
        }
    }

    /// A request for `more` bytes beside the `beside` bytes its owner holds at every level
    /// of the pool's chain: a reservation's growth (see [`Node::beside`]).
    pub(crate) fn growth(more: usize, beside: usize) -> Self {
        Request {
            node: Node::beside(beside),
            ..Request::new(more, Unit::Bytes)
        }
    }

    /// A request for an allocation of `n` buffers, zeroed or not.
    pub(crate) fn allocation(n: usize, zeroed: bool) -> Self {
        Request {
            zeroed,
            ..Request::new(n, Unit::Buffers)
        }
    }

    /// How many buffers (or bytes) it asks for.
    pub(crate) fn amount(&self) -> usize {
        self.amount
    }

    /// Whether it has completed (and must not be polled again).
    pub(crate) fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Whether the request's own level counts as an allocation as soon as it is held on the
    /// waiting path: for a root pool's allocation, yes (its grant is taken as the request
    /// completes); for a child pool's, only once every level is held (until then it is not
    /// outstanding); for a reservation, never.
    fn counted_while_waiting(unit: Unit, pool: &State) -> bool {
        unit == Unit::Buffers && pool.depth() == 0
    }

    fn bytes(amount: usize, unit: Unit, pool: &State) -> usize {
        match unit {
            Unit::Buffers => pool.bytes_of(amount),
            Unit::Bytes => amount,
        }
    }

    /// Polls for the bytes: `Ready(Ok(bytes))` once they are held in every pool of the
    /// chain (for `Unit::Buffers`, counted as an allocation of `pool`). The request is done
    /// once `Ready`.
    #[inline(always)]
    pub(crate) fn poll_hold(
        mut self: Pin<&mut Self>,
        pool: &State,
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, AllocError>> {
        // The common case inline: a first poll whose bytes are free at every level.
        if self.stage == Stage::Start && self.unit == Unit::Buffers {
            let this = self.as_mut().project();
            match pool.reserve_now(*this.amount) {
                Attempt::Reserved(bytes) => {
                    *this.stage = Stage::Done;
                    return Poll::Ready(Ok(bytes));
                }
                Attempt::Failed(error) => {
                    *this.stage = Stage::Done;
                    return Poll::Ready(Err(error));
                }
                // Passed on as a plain number (in a register): an enum written here and
                // read back there would stall on store forwarding.
                Attempt::MustWait(bytes) => {
                    return Self::poll_hold_after(self, pool, cx, Some(bytes));
                }
            }
        }
        Self::poll_hold_after(self, pool, cx, None)
    }

    /// [`poll_hold`](Request::poll_hold) for an allocation of `pool` (`Unit::Buffers`): its
    /// block is fresh memory, or the very block whose release served this request (a root
    /// pool's head waiter takes the releaser's memory with its bytes, see
    /// `State::release_block_queued`), zeroed here if asked.
    #[inline(always)]
    pub(crate) fn poll_allocation(
        mut self: Pin<&mut Self>,
        pool: &Arc<State>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<BufPoolAllocation, AllocError>> {
        debug_assert_eq!(self.unit, Unit::Buffers);
        let zeroed = self.zeroed;
        match self.as_mut().poll_hold(pool, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Ready(Ok(bytes)) => {
                Poll::Ready(match self.project().node.as_ref().take_block() {
                    Some(memory) => Ok(BufPoolAllocation::handed(pool, memory, zeroed)),
                    None => BufPoolAllocation::new(pool, bytes, zeroed),
                })
            }
        }
    }

    /// [`poll_hold`](Request::poll_hold) past the fast path: `must_wait` holds the bytes of a
    /// first poll whose fast path said to wait. A request that waits in a queue drives
    /// reclaim there (see `reclaim.rs`) once its own step is done; for a pool without
    /// reclaimers in scope that costs one inline load.
    #[inline(never)]
    fn poll_hold_after(
        mut self: Pin<&mut Self>,
        pool: &State,
        cx: &mut Context<'_>,
        must_wait: Option<usize>,
    ) -> Poll<Result<usize, AllocError>> {
        let poll = Self::poll_wait(self.as_mut().project(), pool, cx, must_wait);
        match poll {
            Poll::Pending => {
                // Waiting in no queue (for room in a floor, or a place in a full queue) is
                // rare: `reclaim_then_poll` looks at which.
                if self.driving.is_none()
                    && (self.stage != Stage::Queued
                        || !reclaim::in_scope(pool, self.levels as usize))
                    && self.stage != Stage::AwaitingRoom
                {
                    return Poll::Pending;
                }
                Self::reclaim_then_poll(self, pool, cx)
            }
            Poll::Ready(_) if self.driving.is_none() => poll,
            Poll::Ready(result) => Self::served_while_driving(self, pool, result),
        }
    }

    /// A pending request that waits with reclaimers in scope drives reclaim: one waiting in
    /// a queue for its head's shortfall there, one waiting for room in a floor below (in no
    /// queue) for what it needs of that floor. If a round ended in this call, what it freed
    /// may be this request's now, so it looks once more (without starting another round).
    #[cold]
    #[inline(never)]
    fn reclaim_then_poll(
        mut self: Pin<&mut Self>,
        pool: &State,
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, AllocError>> {
        let this = self.as_mut().project();
        let level = *this.levels as usize;
        let wants = match *this.stage {
            Stage::Queued => Some((level, Shortfall::Head)),
            Stage::AwaitingRoom => {
                let bytes = Self::bytes(*this.amount, *this.unit, pool);
                Self::floor_need(pool, level, bytes - *this.floored)
                    .map(|need| (level - 1, Shortfall::Floor(need)))
            }
            _ => None,
        };
        let Some((level, short)) = wants else {
            // It drives a round but waits for neither (granted below, it waits for a place
            // in a full queue above): the round is left, so that another may start there.
            reclaim::pass_on(reclaim::leave_now(this.driving, pool));
            return Poll::Pending;
        };
        if !reclaim::drive(this.driving, pool, level, short, cx) {
            return Poll::Pending;
        }
        match Self::poll_wait_again(self.as_mut().project(), pool, cx) {
            Poll::Ready(result) if !self.driving.is_none() => {
                Self::served_while_driving(self, pool, result)
            }
            poll => poll,
        }
    }

    /// What a request that climbs to the pool `level` pools up, with `rest` bytes still to
    /// climb, needs of the floor of the pool below that level (its floor step, see `climb`):
    /// `Some` only if that is more than the floor has free, i.e. the request waits for the
    /// floor (in no queue). One waiting for a place in a full queue above took its floor
    /// part already, and needs none.
    fn floor_need(pool: &State, level: usize, rest: usize) -> Option<usize> {
        let lower = pool.at_level(level.checked_sub(1)?);
        if !lower.has_floor() {
            return None;
        }
        let need = rest.saturating_sub(pool.servable_from(level));
        (need > lower.floor_free()).then_some(need)
    }

    /// [`poll_wait`](Request::poll_wait), out of line, for the cold path above.
    #[inline(never)]
    fn poll_wait_again(
        this: RequestProj<'_>,
        pool: &State,
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, AllocError>> {
        Self::poll_wait(this, pool, cx, None)
    }

    /// Served (or failed) while driving a round: the round ends first. Should its
    /// reclaimer's code unwind, bytes the request got go back before the panic goes on
    /// (nobody would wrap them).
    #[cold]
    #[inline(never)]
    fn served_while_driving(
        self: Pin<&mut Self>,
        pool: &State,
        result: Result<usize, AllocError>,
    ) -> Poll<Result<usize, AllocError>> {
        let this = self.project();
        let counted = *this.unit == Unit::Buffers;
        let node = this.node.as_ref();
        let give_back = || {
            if let Ok(bytes) = result {
                // A block handed with the grant is freed before its bytes go back.
                drop(node.take_block());
                settle(|deferred| {
                    chain::give_back_completed_request(pool, bytes, counted, deferred);
                });
            }
        };
        let mut deferred = Deferred::default();
        let panic = reclaim::leave(this.driving, pool, &mut deferred);
        if let Some(panic) = panic {
            // Nothing wraps the bytes if this unwinds: they go back first; the wake-ups owed
            // still run (the `Deferred`'s drop), then the panic goes on.
            give_back();
            drop(deferred);
            std::panic::resume_unwind(panic);
        }
        deferred.run_or_undo(give_back);
        Poll::Ready(result)
    }

    /// The steps of a poll past the fast path (inlined into its one caller).
    #[inline(always)]
    fn poll_wait(
        this: RequestProj<'_>,
        pool: &State,
        cx: &mut Context<'_>,
        must_wait: Option<usize>,
    ) -> Poll<Result<usize, AllocError>> {
        if *this.stage == Stage::Start && pool.depth() == 0 {
            return Self::first_wait_at_root(this, pool, cx, must_wait);
        }
        if *this.stage == Stage::Queued && pool.depth() == 0 {
            // A root pool's waiter (the common case): one level, nothing to give back on
            // failure, no wake-up owed, so no `Deferred`.
            let node = this.node.as_ref();
            let counted = *this.unit == Unit::Buffers;
            return match pool.poll_queued(node, cx.waker(), counted) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(result) => {
                    *this.stage = Stage::Done;
                    Poll::Ready(result.map(|()| Self::bytes(*this.amount, *this.unit, pool)))
                }
            };
        }
        // Every change of the request's own state (stage, levels) is recorded before the
        // user code its steps owe runs: should that code unwind, the request's drop gives
        // back exactly the levels it still holds.
        let unit = *this.unit;
        let mut deferred = Deferred::default();
        let poll = Self::poll_steps(this, pool, cx, must_wait, &mut deferred);
        if let Poll::Ready(Ok(bytes)) = poll {
            // The request is done and holds every level, but its caller has yet to wrap the
            // bytes: if the user code owed (a waker cloned for a queue it did not need, a
            // listener) unwinds, nobody would, so they go back first (as the release of an
            // allocation, or a reservation's give-back), and the panic goes on after that.
            deferred.run_or_undo(|| {
                settle(|deferred| {
                    let counted = unit == Unit::Buffers;
                    chain::give_back_completed_request(pool, bytes, counted, deferred);
                });
            });
        } else {
            deferred.run();
        }
        poll
    }

    /// A root pool's request past its fast path (the common case of a first wait): admitted
    /// or queued under the lock, with no `Deferred`: the one piece of user code it may owe
    /// (the waker it cloned for a queue it did not need) is dropped once its stage is
    /// recorded, and should that unwind, bytes it got go back first.
    #[inline(always)]
    fn first_wait_at_root(
        this: RequestProj<'_>,
        pool: &State,
        cx: &mut Context<'_>,
        must_wait: Option<usize>,
    ) -> Poll<Result<usize, AllocError>> {
        let counted = *this.unit == Unit::Buffers;
        let bytes = match Self::first_attempt(pool, *this.amount, *this.unit, must_wait) {
            Attempt::Reserved(bytes) => {
                *this.stage = Stage::Done;
                return Poll::Ready(Ok(bytes));
            }
            Attempt::Failed(error) => {
                *this.stage = Stage::Done;
                return Poll::Ready(Err(error));
            }
            Attempt::MustWait(bytes) => bytes,
        };
        let asker = Asker {
            descendant: None,
            counted,
            waited: false,
        };
        let mut unused = None;
        let poll = match pool.admit(this.node.as_ref(), bytes, cx.waker(), asker, &mut unused) {
            Ok(Admission::Queued) => {
                *this.stage = Stage::Queued;
                Poll::Pending
            }
            Ok(Admission::Reserved) => {
                *this.stage = Stage::Done;
                Poll::Ready(Ok(bytes))
            }
            // Only a descendant's request waits for room.
            Ok(Admission::Full) => unreachable!("a root pool's own request never waits for room"),
            Err(error) => {
                *this.stage = Stage::Done;
                Poll::Ready(Err(error))
            }
        };
        if let Some(waker) = unused {
            let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(waker)));
            if let Err(panic) = dropped {
                if let Poll::Ready(Ok(bytes)) = poll {
                    settle(|deferred| {
                        chain::give_back_completed_request(pool, bytes, counted, deferred);
                    });
                }
                std::panic::resume_unwind(panic);
            }
        }
        poll
    }

    /// The fast path of a first poll, unless it already said to wait for `must_wait` bytes.
    #[inline(always)]
    fn first_attempt(pool: &State, amount: usize, unit: Unit, must_wait: Option<usize>) -> Attempt {
        match (must_wait, unit) {
            (Some(bytes), _) => Attempt::MustWait(bytes),
            (None, Unit::Buffers) => pool.reserve_now(amount),
            (None, Unit::Bytes) => pool.reserve_bytes_now(amount),
        }
    }

    fn poll_steps(
        this: RequestProj<'_>,
        pool: &State,
        cx: &mut Context<'_>,
        must_wait: Option<usize>,
        deferred: &mut Deferred,
    ) -> Poll<Result<usize, AllocError>> {
        let RequestProj {
            amount,
            unit,
            stage,
            levels,
            floored,
            node,
            ..
        } = this;
        let node = node.as_ref();
        let waited = stage.waited();
        let mut progress = Progress {
            stage,
            levels,
            floored,
            waited,
        };
        let counted = Self::counted_while_waiting(*unit, pool);
        let held = match *progress.stage {
            Stage::Start => {
                match Self::first_attempt(pool, *amount, *unit, must_wait) {
                    // Every level at once (the one level of a root pool): the common case.
                    Attempt::Reserved(bytes) => Ok(Some(bytes)),
                    Attempt::Failed(error) => Err(error),
                    Attempt::MustWait(bytes) => {
                        let asker = Asker {
                            descendant: None,
                            counted,
                            waited: false,
                        };
                        let mut unused = None;
                        let admission = pool.admit(node, bytes, cx.waker(), asker, &mut unused);
                        if let Some(waker) = unused {
                            deferred.drop_later(waker);
                        }
                        match admission {
                            Ok(Admission::Reserved) => {
                                *progress.levels = 1;
                                Self::climb(pool, node, bytes, counted, &mut progress, cx, deferred)
                            }
                            Ok(Admission::Queued) => {
                                *progress.stage = Stage::Queued;
                                Ok(None)
                            }
                            // A request made to this pool never waits for room in its own
                            // queue: `QueueFull` at once.
                            Ok(Admission::Full) => unreachable!("only for a descendant"),
                            Err(error) => Err(error),
                        }
                    }
                }
            }
            Stage::Queued => {
                let bytes = Self::bytes(*amount, *unit, pool);
                let rest = bytes - *progress.floored;
                let level = *progress.levels as usize;
                let own = level == 0 && counted;
                if level > 0 && pool.floors_in_chain() {
                    let left = Self::leave_if_never_served(
                        pool,
                        node,
                        bytes,
                        counted,
                        &mut progress,
                        cx,
                        deferred,
                    );
                    if let Some(held) = left {
                        return Self::finish(held, &mut progress, pool, *unit, counted, deferred);
                    }
                }
                // Waiting above a floor that got room for all it still needs (any floor of
                // the levels it holds, the lowest first, as a request takes them): the floor
                // first, as always. (One with room for part of it does not move it: it waits
                // here for what it asked, keeping its place.)
                let floored = (0..level).find(|&below| pool.at_level(below).floor_free() >= rest);
                if let Some(below) = floored {
                    if pool.at_level(level).withdraw(node, deferred) == Status::Idle {
                        let held = if Self::finish_in_floor(
                            pool,
                            below,
                            level,
                            bytes,
                            &mut progress,
                            deferred,
                        ) {
                            Ok(Some(bytes))
                        } else {
                            // Taken meanwhile: up again, at the tail.
                            Self::climb(pool, node, bytes, counted, &mut progress, cx, deferred)
                        };
                        return Self::finish(held, &mut progress, pool, *unit, counted, deferred);
                    }
                }
                match pool.at_level(level).poll_queued(node, cx.waker(), own) {
                    Poll::Pending => Ok(None),
                    Poll::Ready(Err(error)) => {
                        // Done before the levels below go back: never given back twice.
                        *progress.stage = Stage::Done;
                        Self::give_back_held(
                            pool,
                            bytes,
                            *progress.floored,
                            level,
                            counted,
                            deferred,
                        );
                        Err(error)
                    }
                    Poll::Ready(Ok(())) => {
                        *progress.levels += 1;
                        Self::climb(pool, node, bytes, counted, &mut progress, cx, deferred)
                    }
                }
            }
            Stage::Climbing | Stage::ClimbingAfterWait | Stage::AwaitingRoom => {
                let bytes = Self::bytes(*amount, *unit, pool);
                Self::climb(pool, node, bytes, counted, &mut progress, cx, deferred)
            }
            Stage::Done => panic!("a budget future polled after it completed"),
        };
        Self::finish(held, &mut progress, pool, *unit, counted, deferred)
    }

    /// The poll's outcome from what its steps held: pending, or done.
    fn finish(
        held: Result<Option<usize>, AllocError>,
        progress: &mut Progress<'_>,
        pool: &State,
        unit: Unit,
        counted: bool,
        deferred: &mut Deferred,
    ) -> Poll<Result<usize, AllocError>> {
        let result = match held {
            Ok(None) => return Poll::Pending,
            Ok(Some(bytes)) if *progress.floored > 0 && bytes > pool.largest_request() => {
                // A pool of its chain shrank below it while it waited above with less (what
                // it did not take of the floors): a shrink fails the requests that can never
                // fit, and its queue saw only that part.
                // Complete already (the floors' books count all of it): given back as a
                // release's would be.
                *progress.stage = Stage::Done;
                chain::give_back_completed_request(pool, bytes, counted, deferred);
                Err(AllocError::ExceedsBudget {
                    requested_bytes: bytes,
                    max_memory: pool.largest_request(),
                })
            }
            Ok(Some(bytes)) => {
                if *progress.levels > 0 && unit == Unit::Buffers && !counted {
                    // A child pool's request that waited: its own level becomes an
                    // allocation only now that every level is held.
                    pool.held_becomes_allocation();
                }
                Ok(bytes)
            }
            Err(error) => Err(error),
        };
        *progress.stage = Stage::Done;
        Poll::Ready(result)
    }

    /// Holds `bytes` in the pools above the levels already held: at once where there is
    /// room and nobody waits, else by queueing there (`Ok(None)`, stage `Queued`), or, if
    /// that queue is full and the request already waited below, by waiting for room there
    /// (`Ok(None)`, stage `AwaitingRoom`). `Ok(Some(bytes))` once every level is held; on
    /// failure every level held is given back (and the stage is `Done`). A root pool has no
    /// level above, so this returns at once.
    fn climb(
        pool: &State,
        node: Pin<&Node>,
        bytes: usize,
        counted: bool,
        progress: &mut Progress<'_>,
        cx: &mut Context<'_>,
        deferred: &mut Deferred,
    ) -> Result<Option<usize>, AllocError> {
        let was_awaiting_room = *progress.stage == Stage::AwaitingRoom;
        if was_awaiting_room {
            // Room above or in the floor below, or a close or shrink of a level it holds
            // (which must fail it, or make it look again: a close reaches `pool`, and both
            // notify the room events above, see `State::notify_rooms_above`, and the floored
            // pools' own; it is in no queue that could fail it).
            let heard = pool.is_closed()
                || node.with_room(|room| {
                    let listener = room.as_mut().expect("listening while awaiting room");
                    deferred::poll_listener(Pin::new(listener), cx).is_ready()
                });
            if !heard {
                return Ok(None);
            }
            Self::drop_room_listener(node, deferred);
        }
        // Queued, granted and climbing again: it has waited.
        progress.waited |= progress.stage.waited();
        *progress.stage = progress.climbing();
        // What the node's room listener listens to, if this call set one (a listener from an
        // earlier poll was heard, and dropped, above): the two waits below each look again
        // once they listen, and must not take the other's listener for their own.
        let mut listening = Listening::Nothing;
        while (*progress.levels as usize) <= pool.depth() {
            let level = *progress.levels as usize;
            let ancestor = pool.at_level(level);
            let lower = pool.at_level(level - 1);
            // It waited for a place and a level it holds was closed meanwhile (closing a
            // pool closes its descendants, so `pool` is): a waiting request fails, whatever
            // room the next level or a floor has. (One granted a level below before the
            // close, that never waited up here, completes as a granted root request does; a
            // full queue's `admit` refuses it if its pool closed.)
            let mut closed = was_awaiting_room && pool.is_closed();
            // A level of its chain shrank below it since (`set_max_memory` fails such
            // requests where they wait; this one was between two queues, or waited for a
            // floor in none). Without floors, the levels it holds (a level above fails it
            // when it gets there, naming that level's cap); with floors, the whole chain,
            // before its floor step works out what it needs of the floor.
            let largest = if pool.floors_in_chain() {
                pool.largest_request()
            } else {
                pool.smallest_budget_below(ancestor)
            };
            if !closed && lower.has_floor() && bytes <= largest {
                // The floor of the pool below first: as much of it as is free. The rest must
                // fit above at all (floors below stay set aside there), so if it would not,
                // the request takes at least what makes it fit, or waits for the floor to
                // have that much: it never waits above for room that cannot come, and never
                // holds part of a floor while it waits for more (two requests could each
                // hold part and wait for the other's for good).
                let rest = bytes - *progress.floored;
                let at_least = rest.saturating_sub(pool.servable_from(level));
                match lower.take_floor_part(rest, at_least) {
                    Some(taken) => {
                        if taken > 0 {
                            // Those bytes are complete (they hold the levels up to the floored
                            // pool): the floors below count them as climbed now.
                            *progress.floored += taken;
                            pool.note_climbed(taken, level, deferred);
                        }
                        if taken == rest {
                            // The floor holds all that was left, and its ancestors counted
                            // the floor long ago: nothing more to climb.
                            break;
                        }
                        if listening == Listening::Floor {
                            Self::drop_room_listener(node, deferred);
                            listening = Listening::Nothing;
                        }
                    }
                    None if at_least > lower.floor_now().0 => {
                        // Not even the whole floor would do: a cap above shrank after it
                        // took floors below. It starts again, taking them anew.
                        Self::start_again(pool, node, bytes, counted, progress, cx, deferred);
                        return Ok(None);
                    }
                    None => {
                        // It waits for room in the floor (a refill notifies the floored
                        // pool's room event), unless it listens already and the pool closed
                        // (its floors are retired): then it fails.
                        if listening != Listening::Floor || !pool.is_closed() {
                            let wait = RoomWait::new(lower.room(), Listening::Floor);
                            if !wait.step(node, &mut listening, progress, cx, deferred) {
                                return Ok(None);
                            }
                            continue;
                        }
                        closed = true;
                    }
                }
            }
            let rest = bytes - *progress.floored;
            let held = if closed {
                Err(AllocError::Closed)
            } else if bytes > largest {
                Err(AllocError::ExceedsBudget {
                    requested_bytes: bytes,
                    max_memory: largest,
                })
            } else if pool.floors_in_chain() && rest > pool.servable_from(level) {
                // It fits the chain, but not with what it took of the floors below: a cap
                // above shrank after it took them (without floors, or with the floors'
                // share taken as the caps were, the rest always fits). It starts again from
                // its own pool, taking the floors anew.
                Self::start_again(pool, node, bytes, counted, progress, cx, deferred);
                return Ok(None);
            } else {
                ancestor.hold_now(rest)
            };
            let error = match held {
                Ok(true) => {
                    *progress.levels += 1;
                    if listening != Listening::Nothing {
                        // Listened for this level's room, which it no longer needs.
                        Self::drop_room_listener(node, deferred);
                        listening = Listening::Nothing;
                    }
                    continue;
                }
                Ok(false) => {
                    // Before it queues up here: a floor further below may have got room for
                    // all it still needs while it waited lower down (the release that
                    // refilled it may be the one that granted it the level below, whose
                    // wake-up it is running now). It takes that floor, as a queued request
                    // does on its next poll (`poll_steps`, `Stage::Queued`), instead of
                    // waiting here for room it does not need: nothing would wake it for
                    // that floor again.
                    // (The floor just below is looked at again too: counting what it took of
                    // that floor as climbed may have re-homed bytes into a floor further
                    // below, giving that much back to it.)
                    if pool.floors_in_chain() {
                        let floored =
                            (0..level).find(|&below| pool.at_level(below).floor_free() >= rest);
                        if let Some(below) = floored {
                            if Self::finish_in_floor(pool, below, level, bytes, progress, deferred)
                            {
                                Self::drop_room_listener(node, deferred);
                                return Ok(Some(bytes));
                            }
                        }
                    }
                    // Out of every queue now (granted one level down, or never queued): it
                    // queues again up here.
                    if node.status() == Status::Granted {
                        node.reset();
                    }
                    let asker = Asker {
                        descendant: Some(pool),
                        counted: false,
                        waited: progress.waited,
                    };
                    let mut unused = None;
                    let admission = ancestor.admit(node, rest, cx.waker(), asker, &mut unused);
                    if let Some(waker) = unused {
                        deferred.drop_later(waker);
                    }
                    match admission {
                        Ok(Admission::Reserved) => {
                            *progress.levels += 1;
                            if listening != Listening::Nothing {
                                Self::drop_room_listener(node, deferred);
                                listening = Listening::Nothing;
                            }
                            continue;
                        }
                        Ok(Admission::Queued) => {
                            *progress.stage = Stage::Queued;
                            Self::drop_room_listener(node, deferred);
                            if pool.floors_in_chain() {
                                // A shrink between its look at the caps and its queueing here
                                // may have walked this queue before it was in it: it looks
                                // again now (this queue's lock orders the look after that
                                // walk, which the shrink made after storing the budget).
                                let left = Self::leave_if_never_served(
                                    pool, node, bytes, counted, progress, cx, deferred,
                                );
                                if let Some(held) = left {
                                    return held;
                                }
                                // A floor below refilled between its look (above) and its
                                // queueing here saw this queue without it and woke nobody:
                                // it looks once more, and with room polls again at once (its
                                // next poll takes that floor, `Stage::Queued`).
                                let refilled = (0..level).any(|below| {
                                    pool.at_level(below).floor_free_after_queueing() >= rest
                                });
                                if refilled {
                                    deferred.wake(cx.waker().clone());
                                }
                            }
                            return Ok(None);
                        }
                        Ok(Admission::Full) => {
                            // It waits for a place in the full queue above.
                            let wait = RoomWait::new(ancestor.room(), Listening::Room);
                            if !wait.step(node, &mut listening, progress, cx, deferred) {
                                return Ok(None);
                            }
                            continue;
                        }
                        Err(error) => error,
                    }
                }
                Err(error) => error,
            };
            // Done before the levels go back: never given back twice.
            *progress.stage = Stage::Done;
            Self::drop_room_listener(node, deferred);
            Self::give_back_held(pool, bytes, *progress.floored, level, counted, deferred);
            return Err(error);
        }
        Self::drop_room_listener(node, deferred);
        let levels = *progress.levels as usize;
        let mut rest = bytes - *progress.floored;
        if rest > 0 && pool.floors_in_chain() {
            // A floor below may have got room while it waited above (too little then to
            // serve all it needed): it takes that now and gives as much back above, so that
            // a floored pool's parent holds only what the pool holds beyond its floor.
            for level in 0..levels.saturating_sub(1) {
                let lower = pool.at_level(level);
                if let Some(taken) = lower.take_floor_part(rest, 0).filter(|&taken| taken > 0) {
                    for above in (level + 1..levels).rev() {
                        pool.at_level(above).give_back_here(taken, false, deferred);
                    }
                    *progress.floored += taken;
                    pool.note_climbed(taken, level + 1, deferred);
                    rest -= taken;
                    if rest == 0 {
                        break;
                    }
                }
            }
        }
        // Complete: only now do the floors below the levels it holds count its part on the
        // way up as climbed.
        if rest > 0 {
            pool.note_climbed(rest, levels, deferred);
        }
        Ok(Some(bytes))
    }

    /// For a request waiting in a queue above its own pool, on a chain with floors: the
    /// queue sees only what it still needs beyond the floors it took, so a shrink of a pool
    /// of its chain (which wakes it) may have left it unable ever to be served as it is. Then
    /// it leaves the queue and fails with `ExceedsBudget` (if it no longer fits the chain at
    /// all) or starts again (`Some(Ok(None))`). `None` if it can still be served, or was
    /// granted meanwhile (climbing on looks again).
    #[cold]
    fn leave_if_never_served(
        pool: &State,
        node: Pin<&Node>,
        bytes: usize,
        counted: bool,
        progress: &mut Progress<'_>,
        cx: &mut Context<'_>,
        deferred: &mut Deferred,
    ) -> Option<Result<Option<usize>, AllocError>> {
        let level = *progress.levels as usize;
        let largest = pool.largest_request();
        let rest = bytes - *progress.floored;
        if bytes <= largest && rest <= pool.servable_from(level) {
            return None;
        }
        if pool.at_level(level).withdraw(node, deferred) != Status::Idle {
            return None;
        }
        if bytes > largest {
            // Done before the levels below go back: never given back twice.
            *progress.stage = Stage::Done;
            let floored = *progress.floored;
            Self::give_back_held(pool, bytes, floored, level, counted, deferred);
            return Some(Err(AllocError::ExceedsBudget {
                requested_bytes: bytes,
                max_memory: largest,
            }));
        }
        Self::start_again(pool, node, bytes, counted, progress, cx, deferred);
        Some(Ok(None))
    }

    /// A request that holds the levels up to `level` (in none of their queues) takes all it
    /// still needs from the floor of the pool `below` levels up, if that floor has it: the
    /// levels it held above that floor go back (exactly what it holds there: its part on the
    /// way up), top down, and the floor's ancestors counted the floor long ago. `true` if it
    /// did; the request then holds all of `bytes`.
    fn finish_in_floor(
        pool: &State,
        below: usize,
        level: usize,
        bytes: usize,
        progress: &mut Progress<'_>,
        deferred: &mut Deferred,
    ) -> bool {
        let rest = bytes - *progress.floored;
        if !pool.at_level(below).take_floor(rest) {
            return false;
        }
        for above in (below + 1..level).rev() {
            pool.at_level(above).give_back_here(rest, false, deferred);
        }
        *progress.levels = below as u16 + 1;
        pool.note_climbed(rest, below + 1, deferred);
        *progress.floored = bytes;
        true
    }

    /// Gives back all a request on its way up holds (`levels` levels, and `floored` bytes it
    /// took of floors, see [`Request`]) into `deferred`. The caller has recorded that it no
    /// longer holds them.
    fn give_back_held(
        pool: &State,
        bytes: usize,
        floored: usize,
        levels: usize,
        counted: bool,
        deferred: &mut Deferred,
    ) {
        if bytes > floored {
            chain::give_back_reserved(pool, bytes - floored, levels, counted, deferred);
        }
        if floored > 0 {
            // Complete holdings, in the floors' books: given back as a release's would be.
            chain::give_back_completed_request(pool, floored, counted, deferred);
        }
    }

    /// Gives back all the request holds and makes it new (stage `Start`, its next poll
    /// starting from its own pool, woken at once). For a request whose part on the way up no
    /// longer fits above with what it took of the floors below.
    #[cold]
    fn start_again(
        pool: &State,
        node: Pin<&Node>,
        bytes: usize,
        counted: bool,
        progress: &mut Progress<'_>,
        cx: &mut Context<'_>,
        deferred: &mut Deferred,
    ) {
        let levels = core::mem::replace(progress.levels, 0) as usize;
        let floored = core::mem::replace(progress.floored, 0);
        *progress.stage = Stage::Start;
        Self::drop_room_listener(node, deferred);
        if node.status() == Status::Granted {
            node.reset();
        }
        Self::give_back_held(pool, bytes, floored, levels, counted, deferred);
        // User code: run with the rest the poll owes, after the books.
        deferred.wake(cx.waker().clone());
    }

    /// The node's room listener, if any, goes (its drop may wake another listener: later).
    fn drop_room_listener(node: Pin<&Node>, deferred: &mut Deferred) {
        if let Some(listener) = node.with_room(Option::take) {
            deferred.drop_listener(listener);
        }
    }

    /// Gives the request up: a queued node leaves the queue, a grant not taken goes on to
    /// the next waiters, and bytes held in lower levels go back. Idempotent; the request is
    /// done afterwards.
    #[inline]
    pub(crate) fn cancel(self: Pin<&mut Self>, pool: &State) {
        if let Stage::Start | Stage::Done = self.stage {
            // Never queued, or finished: nothing to give up (the common case), unless a poll
            // that finished unwound before it could end the round it drove.
            let this = self.project();
            *this.stage = Stage::Done;
            if !this.driving.is_none() {
                reclaim::pass_on(reclaim::leave_now(this.driving, pool));
            }
            return;
        }
        self.cancel_waiting(pool);
    }

    #[cold]
    #[inline(never)]
    fn cancel_waiting(self: Pin<&mut Self>, pool: &State) {
        let this = self.project();
        let bytes = Self::bytes(*this.amount, *this.unit, pool);
        let counted = Self::counted_while_waiting(*this.unit, pool);
        let levels = *this.levels as usize;
        let floored = *this.floored;
        let stage = core::mem::replace(this.stage, Stage::Done);
        let room = this.node.as_ref().with_room(Option::take);
        // Done before anything goes back (above): whatever unwinds from the user code owed,
        // nothing is given back twice. One `settle` for every level: the queue this request
        // leaves, each level below it, and a round of reclaim it drives are settled before
        // any wake-up runs (a wake-up that panics must not skip ending the round: the pool
        // would keep it in flight for good).
        let driving = this.driving;
        let reclaimer_panic = settle(|deferred| {
            if let Some(listener) = room {
                deferred.drop_listener(listener);
            }
            match stage {
                Stage::Queued => {
                    pool.at_level(levels)
                        .cancel(this.node.as_ref(), bytes - floored, deferred);
                    Self::give_back_held(pool, bytes, floored, levels, counted, deferred);
                }
                Stage::Climbing | Stage::ClimbingAfterWait | Stage::AwaitingRoom => {
                    Self::give_back_held(pool, bytes, floored, levels, counted, deferred)
                }
                Stage::Start | Stage::Done => {}
            }
            // The reclaimer's future it drops is user code, under `catch_unwind`: its panic
            // goes on after everything else.
            if !driving.is_none() {
                reclaim::leave(driving, pool, deferred)
            } else {
                None
            }
        });
        reclaim::pass_on(reclaimer_panic);
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
                Some(listener) => match deferred::poll_listener(Pin::new(listener), cx) {
                    Poll::Ready(()) => this.listener = None,
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        // Its drop may pass a notification on to another listener's waker (user code).
        if let Some(listener) = self.listener.take() {
            deferred::drop_listener_now(listener);
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
