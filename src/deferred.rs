//! The user code a change of the books owes, held back until every book is settled.
//!
//! Wakers are user code: `wake`, `clone` and `drop` may panic, block or re-enter the pool.
//! So no step that changes a pool's accounting runs any of them. It collects them in a
//! [`Deferred`] instead (the wakers to wake, the wakers to drop, the drain events to notify),
//! and the operation that owns the `Deferred` runs them once its last step is done: after the
//! lock is released, and after every level of a release that spans a chain of pools has been
//! given back. Every method of `state.rs` that changes the books takes a `&mut Deferred`, and
//! only [`Deferred::run`] (or the drop of a `Deferred`, should an internal step unwind) calls
//! user code, so this holds by construction rather than by care at each call site.
//!
//! A panic in one piece of user code cannot strand the others: each runs under
//! `catch_unwind`, the rest still run, and the first panic is passed on afterwards (unless the
//! thread is already unwinding), when the pools are consistent again.

use core::cell::RefCell;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

use event_listener::{Event, EventListener};

use crate::sync::{Arc, Mutex, lock, thread_local};

/// User code held back until the books are settled; see the module docs.
///
/// It is used in place, by `&mut`: moving it would copy its inline array. Dropping it runs
/// what it holds, so an unwinding owner still wakes everyone it owed a wake-up.
#[derive(Debug, Default)]
pub(crate) struct Deferred {
    /// The common case, a few wake-ups, without touching the heap.
    inline: [Option<Waker>; 4],
    inline_len: usize,
    /// One waker to drop, inline: a request that got its bytes under the lock drops the waker
    /// it cloned in case it had to queue.
    dropped: Option<Waker>,
    /// Everything else: more wake-ups than fit inline, wakers only to drop, drain events.
    /// A heap allocation per such step, never per wait.
    rare: Vec<Later>,
}

/// One piece of user code held back.
#[derive(Debug)]
enum Later {
    Wake(Waker),
    Drop(Waker),
    /// An event of a pool (its drain, or room in its queue): a shared handle, so the pool
    /// itself may be gone by the time it is notified.
    Notify(Arc<Event>),
    /// A listener whose drop may pass a notification on to another listener's waker.
    DropListener(EventListener),
    /// Run already (a notification taken out in the first pass).
    Ran,
}

/// Runs `books` (every step of one change of the books), then the user code it deferred.
/// The one way the pool's operations run user code they collected.
#[inline(always)]
pub(crate) fn settle<R>(books: impl FnOnce(&mut Deferred) -> R) -> R {
    let mut deferred = Deferred::default();
    let result = books(&mut deferred);
    deferred.run();
    // `run` left it empty: nothing to drop (its drop glue would check every slot again).
    // Should `books` or `run` unwind, the drop runs instead, and runs what is left.
    debug_assert!(deferred.is_empty());
    core::mem::forget(deferred);
    result
}

impl Deferred {
    /// Owes `waker` a wake-up; wake-ups run in the order they were owed.
    #[inline]
    pub(crate) fn wake(&mut self, waker: Waker) {
        if self.inline_len < self.inline.len() {
            self.inline[self.inline_len] = Some(waker);
            self.inline_len += 1;
        } else {
            self.rare.push(Later::Wake(waker));
        }
    }

    /// Drops `waker` later (its `drop` is user code).
    #[inline]
    pub(crate) fn drop_later(&mut self, waker: Waker) {
        if self.dropped.is_none() {
            self.dropped = Some(waker);
        } else {
            self.rare.push(Later::Drop(waker));
        }
    }

    /// Notifies every listener of `event` later.
    #[cold]
    pub(crate) fn notify(&mut self, event: Arc<Event>) {
        self.rare.push(Later::Notify(event));
    }

    /// Drops `listener` later (its drop may wake another listener).
    #[cold]
    pub(crate) fn drop_listener(&mut self, listener: EventListener) {
        self.rare.push(Later::DropListener(listener));
    }

    /// Whether nothing is owed.
    #[inline(always)]
    fn is_empty(&self) -> bool {
        self.inline_len == 0 && self.dropped.is_none() && self.rare.is_empty()
    }

    /// How many wake-ups are owed (for tests).
    #[cfg(test)]
    pub(crate) fn wake_ups(&self) -> usize {
        self.inline_len
            + self
                .rare
                .iter()
                .filter(|later| matches!(later, Later::Wake(_)))
                .count()
    }

    /// Runs everything held back: event listeners first (a waker that panics must not cost
    /// them their notification), then the wake-ups in order, then the drops.
    #[inline]
    pub(crate) fn run(&mut self) {
        if self.dropped.is_none() && self.rare.is_empty() {
            match self.inline_len {
                0 => return,
                // A release that served one waiter: the common case of a wake-up.
                1 => return self.run_one(),
                _ => {}
            }
        }
        self.run_slow();
    }

    /// [`run`](Deferred::run) when one wake-up is all it owes.
    #[inline(never)]
    fn run_one(&mut self) {
        self.inline_len = 0;
        if let Some(waker) = self.inline[0].take() {
            let mut first_panic = None;
            guarded(&mut first_panic, || waker.wake());
            pass_on(first_panic);
        }
    }

    /// Runs everything held back, then gives `result` back: for the caller that wrote the
    /// books itself (not through [`settle`]) and must run the user code where no frame
    /// borrows the pool. Should the user code panic, `result` is dropped by the unwinding.
    #[inline]
    pub(crate) fn run_all<R>(mut self, result: R) -> R {
        self.run();
        // Empty now: its drop glue would only look at every slot again.
        core::mem::forget(self);
        result
    }

    /// [`run`](Deferred::run), and if the user code panics, `undo` first, then the panic goes
    /// on (for an operation whose result would be lost by the unwinding).
    pub(crate) fn run_or_undo(&mut self, undo: impl FnOnce()) {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run())) {
            undo();
            std::panic::resume_unwind(panic);
        }
    }

    #[inline(never)]
    fn run_slow(&mut self) {
        let mut first_panic = None;
        let mut rare = core::mem::take(&mut self.rare);
        // Notifications first.
        if !rare.is_empty() {
            for later in rare.iter_mut() {
                if let Later::Notify(_) = later {
                    if let Later::Notify(event) = core::mem::replace(later, Later::Ran) {
                        guarded(&mut first_panic, || {
                            event.notify(usize::MAX);
                            run_listener_wakes();
                        });
                    }
                }
            }
        }
        // The common case: a few wake-ups inline.
        let inline_len = core::mem::take(&mut self.inline_len);
        for slot in &mut self.inline[..inline_len] {
            if let Some(waker) = slot.take() {
                guarded(&mut first_panic, || waker.wake());
            }
        }
        if !rare.is_empty() {
            for later in rare {
                guarded(&mut first_panic, || match later {
                    Later::Wake(waker) => waker.wake(),
                    Later::Drop(waker) => drop(waker),
                    Later::DropListener(listener) => {
                        drop(listener);
                        run_listener_wakes();
                    }
                    Later::Notify(_) | Later::Ran => {}
                });
            }
        }
        if let Some(waker) = self.dropped.take() {
            guarded(&mut first_panic, || drop(waker));
        }
        pass_on(first_panic);
    }
}

/// Resumes the first panic of the user code that ran, unless the thread already unwinds.
#[inline(always)]
fn pass_on(first_panic: Option<Box<dyn core::any::Any + Send>>) {
    if let Some(panic) = first_panic {
        if !std::thread::panicking() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Runs `call` (user code); its panic, if it is the first, is kept in `first_panic`.
#[inline(always)]
fn guarded(first_panic: &mut Option<Box<dyn core::any::Any + Send>>, call: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        first_panic.get_or_insert(panic);
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        self.run();
    }
}

// ---- listeners whose wakers are user code ----
//
// event-listener wakes a listener's waker, and drops the wakers it replaces or no longer
// needs, while it holds its list's lock, and counts a notification only once `wake`
// returns. A task's waker run there could panic (leaving that count short: a later drop of
// the listener underflowed it) or re-enter the pool, whose own notification of the same
// event then waits for that lock for good (both found by
// `tests/race_adversarial.rs::hostile_wakers_under_load_on_the_tree`). So a listener polled
// for a task is given a waker of ours ([`poll_listener`]) that runs no user code at all:
// woken, it moves the task's waker to a list on this thread, and dropped, the same; the code
// that made event-listener wake or drop (a notification or a listener's drop held in a
// `Deferred`, a `reclaim_ahead` nudge, a poll or the drop of a future holding a listener)
// then runs them ([`run_listener_wakes`]), after event-listener returned, each under
// `catch_unwind`, the first panic passed on.

thread_local! {
    /// Tasks' wakers event-listener woke (`true`) or let go (`false`) on this thread, to
    /// run or drop once it returned.
    // Not `const { .. }`: loom's `thread_local!` takes a plain expression.
    #[allow(clippy::missing_const_for_thread_local)]
    static HANDED_BACK: RefCell<Vec<(Waker, bool)>> = RefCell::new(Vec::new());
}

/// A task's waker as event-listener gets it: it never runs user code inside event-listener.
struct ListenerWaker(Mutex<Option<Waker>>);

impl ListenerWaker {
    /// Hands the task's waker back to this thread's list, to wake it (`wake`) or only drop
    /// it. A waker woken once is woken: a second wake-up finds nothing.
    fn hand_back(&self, wake: bool) {
        let waker = lock(&self.0).take();
        if let Some(waker) = waker {
            HANDED_BACK.with(|list| list.borrow_mut().push((waker, wake)));
        }
    }
}

impl std::task::Wake for ListenerWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.hand_back(true);
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.hand_back(true);
    }
}

impl Drop for ListenerWaker {
    fn drop(&mut self) {
        self.hand_back(false);
    }
}

/// Runs the tasks' wakers event-listener handed back on this thread: wakes those it woke,
/// drops the others, each under `catch_unwind`; the first panic is passed on (unless the
/// thread already unwinds).
pub(crate) fn run_listener_wakes() {
    let mut first_panic = None;
    loop {
        let handed = HANDED_BACK.with(|list| core::mem::take(&mut *list.borrow_mut()));
        if handed.is_empty() {
            break;
        }
        for (waker, wake) in handed {
            if wake {
                guarded(&mut first_panic, || waker.wake());
            } else {
                guarded(&mut first_panic, || drop(waker));
            }
        }
    }
    pass_on(first_panic);
}

/// Polls `listener` for the task of `cx`, with a waker of ours in its place (see above). An
/// allocation per call: listeners are polled only on the rare waits (a place in a full
/// queue, room in a floor, a drain, a `reclaim_ahead`).
pub(crate) fn poll_listener(listener: Pin<&mut EventListener>, cx: &mut Context<'_>) -> Poll<()> {
    let ours = std::sync::Arc::new(ListenerWaker(Mutex::new(Some(cx.waker().clone()))));
    let poll = listener.poll(&mut Context::from_waker(&Waker::from(ours)));
    // A listener polled again with a new waker lets the old one go in there.
    run_listener_wakes();
    poll
}

/// Drops a listener held for a task (its drop may pass a notification on to another
/// listener's waker), then runs what that handed back.
pub(crate) fn drop_listener_now(listener: EventListener) {
    drop(listener);
    run_listener_wakes();
}

/// Wake-ups a give-back owes to the requests it served, held back for the caller to run
/// once its own lock is released: from
/// [`Reservation::shrink_to_deferring_wakeups`](crate::Reservation::shrink_to_deferring_wakeups).
///
/// The bytes were given back, and granted to the waiters they serve, before it was
/// returned; only the waiters' wakers (user code: they may panic, block or call back into
/// your own code) wait for it. Dropping it (or [`run`](PendingWakeUps::run)) runs them,
/// each under `catch_unwind`; the first panic is passed on after the others ran.
///
/// # Examples
///
/// ```
/// use std::sync::Mutex;
/// use membudget::{BufPool, BufPoolCfg, BufferSize};
///
/// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
/// let books = Mutex::new(pool.try_reserve(640)?);
/// let mut held = books.lock().unwrap();
/// let wake_ups = held.shrink_to_deferring_wakeups(64);
/// drop(held); // your lock first: a woken waiter may call back into your code
/// wake_ups.run();
/// assert_eq!(pool.stats().in_use_bytes, 64);
/// # Ok::<(), membudget::AllocError>(())
/// ```
#[must_use = "dropping it wakes the waiters served at once: hold it until your lock is released"]
pub struct PendingWakeUps {
    deferred: Deferred,
}

impl PendingWakeUps {
    pub(crate) fn new() -> Self {
        PendingWakeUps {
            deferred: Deferred::default(),
        }
    }

    /// Where a give-back collects what it owes.
    pub(crate) fn deferred(&mut self) -> &mut Deferred {
        &mut self.deferred
    }

    /// Runs the wake-ups (as dropping it does).
    ///
    /// # Panics
    ///
    /// If a waker panics: after every other one ran (unless the thread is already
    /// unwinding).
    ///
    /// # Examples
    ///
    /// ```
    /// use membudget::{BufPool, BufPoolCfg, BufferSize};
    ///
    /// let pool = BufPool::new(BufPoolCfg { buffer_size: BufferSize::S64, max_memory: 640 });
    /// let mut held = pool.try_reserve(128)?;
    /// held.shrink_to_deferring_wakeups(0).run(); // nobody waited: nothing to wake
    /// assert_eq!(pool.stats().in_use_bytes, 0);
    /// # Ok::<(), membudget::AllocError>(())
    /// ```
    pub fn run(mut self) {
        self.deferred.run();
    }
}

impl core::fmt::Debug for PendingWakeUps {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PendingWakeUps").finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::task::Wake;

    struct Record(usize, std::sync::Arc<Mutex<Vec<usize>>>);
    impl Wake for Record {
        fn wake(self: std::sync::Arc<Self>) {
            self.1.lock().unwrap().push(self.0);
            assert_ne!(self.0, 2, "waker 2 panics");
        }
    }
    struct PanicsOnDrop;
    impl Wake for PanicsOnDrop {
        fn wake(self: std::sync::Arc<Self>) {}
    }
    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("a waker that panics when dropped");
        }
    }

    #[test]
    fn wakes_in_order_and_past_a_panicking_waker() {
        let woken = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut deferred = Deferred::default();
        for i in 0..12 {
            deferred.wake(Waker::from(std::sync::Arc::new(Record(i, woken.clone()))));
        }
        deferred.drop_later(Waker::from(std::sync::Arc::new(PanicsOnDrop)));
        deferred.drop_later(Waker::from(std::sync::Arc::new(PanicsOnDrop)));
        let event = Arc::new(Event::new());
        let listener = event.listen();
        deferred.notify(Arc::clone(&event));
        assert_eq!(deferred.wake_ups(), 12);
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(deferred)));
        assert!(panic.is_err(), "the panic is passed on");
        assert_eq!(*woken.lock().unwrap(), (0..12).collect::<Vec<_>>());
        // The drain listener was notified although wakers panicked.
        futures::executor::block_on(listener);
    }

    #[test]
    fn settle_runs_user_code_after_the_books() {
        let woken = std::sync::Arc::new(Mutex::new(Vec::new()));
        let books = std::sync::Arc::new(Mutex::new(Vec::new()));
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            settle(|deferred| {
                for i in 0..3 {
                    deferred.wake(Waker::from(std::sync::Arc::new(Record(i, woken.clone()))));
                    // A book entry after each owed wake-up: none has run yet.
                    books.lock().unwrap().push(woken.lock().unwrap().len());
                }
            })
        }));
        assert!(panic.is_err());
        assert_eq!(*books.lock().unwrap(), [0, 0, 0]);
        assert_eq!(*woken.lock().unwrap(), [0, 1, 2]);
    }
}
