//! Cooperative reclaim: who starts a round, who drives it, and how it ends.
//!
//! A round is driven by whoever needs it, inside its own poll: a request that waits in a
//! pool's queue, or for room in a floor below ([`drive`], called by `wait.rs`), or a
//! [`ReclaimAhead`] future the program spawns. Nothing is spawned and no runtime is assumed; a blocking waiter drives it from the
//! blocking shim's loop like any other poll. The pool's queue lock keeps one round in flight
//! per pool ([`State::begin_round`] / [`State::end_round`]); the round itself (the user's
//! reclaimers, their futures) runs outside every lock, and between no two steps of a
//! give-back: a reclaimer frees memory by dropping or shrinking its own allocations, which
//! are ordinary releases.
//!
//! A driver that leaves (cancelled, or served while a reclaimer's future is pending) drops
//! that future and ends the round (it is not handed to another waiter); the head of the
//! queue is woken to start a new one if the pool is still short.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};
use std::panic::resume_unwind;

use event_listener::EventListener;

use crate::deferred::{self, Deferred, settle};
use crate::registry::{Exclusive, Panic, Round};
use crate::state::{Picture, RoundStart, Shortfall, State};
use crate::sync::Arc;

/// Starts a round for the pool `level` pools above `pool`, if one is wanted and allowed.
/// A reclaimer's `estimate` that panics ends the round at once (counted), and the panic is
/// returned.
fn start(pool: &State, level: usize, short: Shortfall) -> Result<Option<Box<Round>>, Panic> {
    let scope = pool.at_level(level);
    let Some(RoundStart {
        registrations,
        shortfall,
        cap,
    }) = scope.begin_round(short)
    else {
        return Ok(None);
    };
    let (round, panic) = Round::new(registrations, shortfall, cap);
    let mut round = Box::new(round);
    match panic {
        None => Ok(Some(round)),
        Some(panic) => {
            let (outcome, _) = round.abandon();
            drop_quietly(&mut round);
            settle(|deferred| scope.end_round(outcome, deferred));
            Err(panic)
        }
    }
}

/// Drops a finished round (the registrations it holds: the last `Arc` of an unregistered
/// reclaimer drops the user's reclaimer, user code) after the books; a panic of that drop
/// is returned.
fn drop_quietly(round: &mut Round) -> Option<Panic> {
    round.drop_each()
}

/// Polls `round` (for the pool at `level` above `pool`): `Ok(Some(round))` while it is not
/// over; once it is, counts it at its pool and returns `Ok(None)`, or the panic of a
/// reclaimer to pass on.
fn poll_round(
    mut round: Box<Round>,
    pool: &State,
    level: usize,
    cx: &mut Context<'_>,
) -> Result<Option<Box<Round>>, Panic> {
    let scope = pool.at_level(level);
    let Poll::Ready((outcome, panic)) = round.poll(cx, &mut || scope.round_still_short()) else {
        return Ok(Some(round));
    };
    // The round's user code first (dropped, under `catch_unwind`), then the books, then the
    // wake-ups they owe.
    // Emptied whatever happened before: a round dropped whole could drop two reclaimers
    // whose drops panic, one while the other unwinds.
    let dropped = drop_quietly(&mut round);
    let panic = panic.or(dropped);
    settle(|deferred| scope.end_round(outcome, deferred));
    match panic {
        Some(panic) => Err(panic),
        None => Ok(None),
    }
}

/// Which round of reclaim a request drives, as it notes it in two bytes of its future (what
/// was padding: the futures keep their size). The round itself is parked in its pool.
///
/// `0`: none (nearly always). Otherwise the low fifteen bits are the round's level above
/// the request's own pool, plus one, and the top bit says what the round is for: the head
/// of that pool's queue (clear; the request waits, or waited, in that queue) or room in
/// that pool's floor (set; the request waits for the floor, in no queue, see
/// `Request::climb`). Every level of a tree fits: trees are at most `MAX_DEPTH` deep.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(crate) struct Driving(u16);

impl Driving {
    const FOR_FLOOR: u16 = 0x8000;
    /// Levels a note can name: a round deeper than that is never started (`in_scope`).
    const LEVELS: usize = (Self::FOR_FLOOR - 1) as usize;

    /// It drives no round.
    #[inline(always)]
    pub(crate) fn is_none(self) -> bool {
        self.0 == 0
    }

    /// The note of the round of the pool `level` pools up (a level `in_scope` allowed).
    fn new(level: usize, short: Shortfall) -> Self {
        debug_assert!(level < Self::LEVELS);
        let kind = match short {
            Shortfall::Floor(_) => Self::FOR_FLOOR,
            Shortfall::Head | Shortfall::LowWater(_) => 0,
        };
        Driving((level as u16 + 1) | kind)
    }

    /// The round's level, if it drives one.
    fn level(self) -> Option<usize> {
        usize::from(self.0 & !Self::FOR_FLOOR).checked_sub(1)
    }

    /// Whether the round is for room in a floor.
    fn for_floor(self) -> bool {
        self.0 & Self::FOR_FLOOR != 0
    }
}

/// Whether the pool `level` pools above `pool` has reclaimers in scope: the one cost reclaim
/// adds to a waiting request of a pool without any (a load, inline).
#[inline(always)]
pub(crate) fn in_scope(pool: &State, level: usize) -> bool {
    let scope = if level == 0 {
        pool
    } else {
        pool.at_level(level)
    };
    // A request notes its round's level in fifteen bits, enough for any tree.
    level < Driving::LEVELS && scope.reclaim_in_scope()
}

/// A request of `pool` drives reclaim for what it waits for: the head of the queue `level`
/// pools up (`Shortfall::Head`: it waits there), or room in the floor of the pool `level`
/// pools up (`Shortfall::Floor`: it waits for that floor, in no queue). `driving` is the
/// request's note of the round it drives. It starts a round at that pool if its scope has
/// reclaimers and no round is in flight, and polls the round it drives: a queue's round
/// may have been started at a lower level, before the request climbed (it ends once the
/// request no longer heads that queue); a round of the other kind, or for another floor,
/// is no longer what the request waits for, and ends first. A reclaimer's panic ends the
/// round first, then goes on.
///
/// Returns whether a round ended in this call: what it freed may have been granted to this
/// very request, so the caller looks at its request once more before it returns `Pending`.
pub(crate) fn drive(
    driving: &mut Driving,
    pool: &State,
    level: usize,
    short: Shortfall,
    cx: &mut Context<'_>,
) -> bool {
    // The note is cleared while the round is in hand, and set again only when it is parked:
    // whatever unwinds from the user code below, the request never names a round it does
    // not drive (it would take, or end, another driver's later round).
    let mut note = core::mem::take(driving);
    let for_floor = matches!(short, Shortfall::Floor(_));
    let parked = note
        .level()
        .filter(|&parked| note.for_floor() == for_floor && (!for_floor || parked == level));
    if parked.is_none() && !note.is_none() {
        pass_on(leave_now(&mut note, pool));
    }
    let (round, level) = match parked {
        None => {
            if !in_scope(pool, level) {
                return false;
            }
            match start(pool, level, short) {
                Ok(Some(round)) => (round, level),
                Ok(None) => return false,
                Err(panic) => resume_unwind(panic),
            }
        }
        Some(level) => match pool.at_level(level).take_round() {
            Some(round) => (round, level),
            // Not parked (cannot happen: only its driver takes it): nothing to drive.
            None => return false,
        },
    };
    match poll_round(round, pool, level, cx) {
        Ok(Some(round)) => {
            pool.at_level(level).park_round(round);
            // `in_scope` started no round at a level a note cannot name.
            *driving = Driving::new(level, short);
            false
        }
        Ok(None) => true,
        Err(panic) => resume_unwind(panic),
    }
}

/// The driver leaves (cancelled, served, or failed): the round it drives is abandoned (its
/// reclaimer's future dropped), dropped, and ended at its pool, the wake-ups that owes left
/// in `deferred` for the caller to run when it may. Returns a panic of the reclaimer's code,
/// for the caller to pass on when it may.
#[cold]
#[inline(never)]
pub(crate) fn leave(driving: &mut Driving, pool: &State, deferred: &mut Deferred) -> Option<Panic> {
    let level = core::mem::take(driving).level()?;
    let scope = pool.at_level(level);
    let mut round = scope.take_round()?;
    let (outcome, panic) = round.abandon();
    // Emptied whatever happened before: a round dropped whole could drop two reclaimers
    // whose drops panic, one while the other unwinds.
    let dropped = drop_quietly(&mut round);
    let panic = panic.or(dropped);
    scope.end_round(outcome, deferred);
    panic
}

/// [`leave`], running the wake-ups it owes at once: for a driver that holds nothing a
/// panic could strand (a cancel, after its books; a request still waiting).
#[cold]
#[inline(never)]
pub(crate) fn leave_now(driving: &mut Driving, pool: &State) -> Option<Panic> {
    settle(|deferred| leave(driving, pool, deferred))
}

/// Passes `panic` on unless the thread is already unwinding (a drop during unwinding).
pub(crate) fn pass_on(panic: Option<Panic>) {
    if let Some(panic) = panic {
        if !std::thread::panicking() {
            resume_unwind(panic);
        }
    }
}

/// Keeps a registration alive: dropping it unregisters the reclaimer.
///
/// Returned by [`BufPool::register_reclaimer`](crate::BufPool::register_reclaimer). It may
/// outlive its pool (dropping it then does nothing). Dropping it does not wait for a round
/// that is asking this reclaimer: that round's future (from
/// [`Reclaimer::reclaim`](crate::Reclaimer::reclaim)) runs to its end or is dropped by its
/// driver, and no later round asks the reclaimer. The pool keeps the `Arc` of the reclaimer
/// until then; the last `Arc` is dropped outside every lock.
///
/// # Examples
///
/// ```
/// use std::future::Future;
/// use std::pin::Pin;
/// use std::sync::Arc;
/// use membudget::{BufPool, BufPoolCfg, BufferSize, Reclaimer};
///
/// struct Nothing;
/// impl Reclaimer for Nothing {
///     fn estimate(&self) -> usize { 0 }
///     fn reclaim(&self, _: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
///         Box::pin(async { 0 })
///     }
/// }
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
/// let handle = pool.register_reclaimer("nothing", 7, Arc::new(Nothing));
/// assert_eq!(pool.report().reclaimers.len(), 1);
/// drop(handle);
/// assert!(pool.report().reclaimers.is_empty());
/// ```
#[must_use = "dropping the handle unregisters the reclaimer at once"]
pub struct ReclaimerHandle {
    pool: Arc<State>,
    id: u64,
    name: std::sync::Arc<str>,
}

impl ReclaimerHandle {
    pub(crate) fn new(pool: Arc<State>, id: u64, name: std::sync::Arc<str>) -> Self {
        ReclaimerHandle { pool, id, name }
    }

    /// The name it was registered under.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::{future::Future, pin::Pin, sync::Arc};
    /// # use membudget::{BufPool, BufPoolCfg, BufferSize, Reclaimer};
    /// # struct Nothing;
    /// # impl Reclaimer for Nothing {
    /// #     fn estimate(&self) -> usize { 0 }
    /// #     fn reclaim(&self, _: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
    /// #         Box::pin(async { 0 })
    /// #     }
    /// # }
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let handle = pool.register_reclaimer("block cache", 0, Arc::new(Nothing));
    /// assert_eq!(handle.name(), "block cache");
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ReclaimerHandle {
    fn drop(&mut self) {
        // Dropped here, outside the registry's lock: the last `Arc` of the user's reclaimer
        // may go with it.
        drop(self.pool.unregister_reclaimer(self.id));
    }
}

impl fmt::Debug for ReclaimerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReclaimerHandle")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The future of [`BufPool::reclaim_ahead`](crate::BufPool::reclaim_ahead): keeps the pool's
/// free room above a low-water mark by running reclaim rounds, for callers that cannot wait
/// (`try_allocate`, DataFusion's `try_grow`).
///
/// Spawn it once, on any runtime. It sleeps, costing nothing, while the free room is at or
/// above the mark; when a reservation leaves it below, or a `try_` call is refused (or a
/// registration or a resize changes the picture), it runs rounds by the same order and rules as a waiting request's,
/// asking for what is missing up to the mark, until the room is back or a round frees
/// nothing (then it sleeps until the pool changes). At most one round ends per poll: when
/// another is due, the future wakes its own task and the next round starts at the next poll
/// (so a reclaimer that registers, or resizes the pool, every time it is asked makes rounds
/// follow one another, but never keeps a poll from returning). It shares the pool's one
/// round in flight with waiting requests. It resolves once the pool is closed. Buffer allocations
/// that succeed do not wake it (a check on that path cost `try_allocate` half again its
/// time): with buffers alone, it hears of the pressure at the first refusal.
///
/// # Cancel safety
///
/// Dropping it ends a round it drives (its reclaimer's future is dropped); nothing else is
/// lost.
///
/// # Examples
///
/// ```
/// # use std::{future::Future, pin::Pin, sync::Arc};
/// # use membudget::{BufPool, BufPoolCfg, BufferSize, Reclaimer};
/// # struct Nothing;
/// # impl Reclaimer for Nothing {
/// #     fn estimate(&self) -> usize { 0 }
/// #     fn reclaim(&self, _: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
/// #         Box::pin(async { 0 })
/// #     }
/// # }
/// # futures::executor::block_on(async {
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
/// let _cache = pool.register_reclaimer("cache", 0, Arc::new(Nothing));
/// let ahead = pool.reclaim_ahead(128);
/// pool.close(); // (in a program: spawned, and running until the pool closes)
/// ahead.await;
/// # });
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct ReclaimAhead {
    pool: Arc<State>,
    low_water: usize,
    listener: Option<EventListener>,
    /// The round it drives, if any (`Exclusive`: the future stays `Sync`).
    round: Option<Exclusive<Box<Round>>>,
    /// The free room when the round in flight started: a round after which the room did not
    /// grow is not followed by another at once.
    room_before: usize,
    /// The pool when the round in flight started.
    picture_before: Option<Picture>,
    /// No round starts until the next notification, or until the pool is no longer as it
    /// was then (see `poll`).
    quiet: Option<Picture>,
}

impl ReclaimAhead {
    pub(crate) fn new(pool: Arc<State>, low_water: usize) -> Self {
        ReclaimAhead {
            pool,
            low_water,
            listener: None,
            round: None,
            room_before: 0,
            picture_before: None,
            quiet: None,
        }
    }
}

impl ReclaimAhead {
    /// Ends the round it drives, if any; returns a panic of that user code.
    fn leave(&mut self) -> Option<Panic> {
        let mut round = self.round.take()?.into_inner();
        let (outcome, panic) = round.abandon();
        // Emptied whatever happened before: a round dropped whole could drop two reclaimers
        // whose drops panic, one while the other unwinds.
        let dropped = drop_quietly(&mut round);
        let panic = panic.or(dropped);
        settle(|deferred| self.pool.end_round(outcome, deferred));
        panic
    }
}

impl Future for ReclaimAhead {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // At most one round ends per poll. A round whose own reclaimers register a reclaimer
        // or resize the pool (every time they are asked) leaves the pool "changed" at its
        // end, which by the rules below is news and starts the next round; without this
        // bound those rounds followed one another inside one `poll`, which never returned
        // (found by tests/s30d_reclaim_storms.rs). Now the next round waits for the next
        // poll, and the executor gets its thread back in between.
        let mut ended_a_round = false;
        loop {
            let pool = &*this.pool;
            if pool.is_closed() {
                pass_on(this.leave());
                return Poll::Ready(());
            }
            if let Some(round) = this.round.take() {
                match poll_round(round.into_inner(), pool, 0, cx) {
                    Ok(Some(round)) => {
                        this.round = Some(Exclusive::new(round));
                        // The reclaimer's future may never finish: listen to the pressure
                        // event as well, which `close` notifies, so that closing ends the
                        // round (and drops the registrations it holds, which the pool's drop
                        // barrier may be waiting for). Listen first, then look again.
                        let listener = match &mut this.listener {
                            Some(listener) => listener,
                            None => {
                                let listener = this.listener.insert(pool.pressure().listen());
                                if pool.is_closed() {
                                    continue;
                                }
                                listener
                            }
                        };
                        match deferred::poll_listener(Pin::new(listener), cx) {
                            Poll::Ready(()) => {
                                this.listener = None;
                                continue;
                            }
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    Ok(None) => {
                        ended_a_round = true;
                        // A listener taken while the round ran was not armed for the mark.
                        if let Some(listener) = this.listener.take() {
                            deferred::drop_listener_now(listener);
                        }
                    }
                    Err(panic) => resume_unwind(panic),
                }
                // A round that left no more room than it found (everything it freed went to
                // others, or it freed nothing) is not followed by another until notified, or
                // until the pool changes: its own releases are no news, a registration or a
                // resize made while it ran is.
                let before = this.picture_before.take();
                this.quiet = (pool.room_now() <= this.room_before)
                    .then(|| before.map_or(pool.picture(), |b| pool.picture().seen_since(b)));
                continue;
            }
            // Listen first, then look (from the top: a close included): whatever the look
            // decides, a notification after it is heard, and one before it is in what it sees.
            if this.listener.is_none() {
                pool.arm_pressure(this.low_water);
                this.listener = Some(pool.pressure().listen());
                pool.publish_pressure_mark();
                continue;
            }
            let picture = pool.picture();
            let quiet = this.quiet.is_some_and(|since| since == picture);
            if !quiet && pool.room_now() < this.low_water {
                if ended_a_round {
                    // The next round starts at the next poll (see `ended_a_round`).
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                this.room_before = pool.room_now();
                match start(pool, 0, Shortfall::LowWater(this.low_water)) {
                    Ok(Some(round)) => {
                        this.round = Some(Exclusive::new(round));
                        this.picture_before = Some(picture);
                        continue;
                    }
                    Ok(None) => {}
                    Err(panic) => resume_unwind(panic),
                }
                // A round is in flight elsewhere, or the pool is stalled: wait for a change.
                this.quiet = Some(picture);
            }
            let listener = this.listener.as_mut().expect("listening");
            match deferred::poll_listener(Pin::new(listener), cx) {
                Poll::Ready(()) => {
                    this.listener = None;
                    this.quiet = None;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for ReclaimAhead {
    fn drop(&mut self) {
        let panic = self.leave();
        // Its drop may pass a notification on to another listener's waker (user code): run
        // after.
        if let Some(listener) = self.listener.take() {
            if let Err(later) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                deferred::drop_listener_now(listener)
            })) {
                pass_on(panic.or(Some(later)));
                return;
            }
        }
        pass_on(panic);
    }
}

impl fmt::Debug for ReclaimAhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReclaimAhead")
            .field("low_water", &self.low_water)
            .field("reclaiming", &self.round.is_some())
            .finish_non_exhaustive()
    }
}
