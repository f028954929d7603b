//! The one place that picks the synchronisation primitives: `loom`'s modelled ones under
//! `cfg(loom)`, the standard library's otherwise. Everything else imports through here so a
//! loom model sees every atomic, lock and park the pool uses.

#[cfg(loom)]
pub(crate) use loom::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU64, AtomicUsize},
};
#[cfg(loom)]
pub(crate) use loom_park::{Thread, current as current_thread, park};

#[cfg(not(loom))]
pub(crate) use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU64, AtomicUsize},
};
#[cfg(not(loom))]
pub(crate) use std::thread::{Thread, current as current_thread, park};
#[cfg(not(loom))]
pub(crate) use std::thread_local;

#[cfg(loom)]
pub(crate) use loom::thread_local;

/// Thread parking under loom, with std's semantics.
///
/// `loom::thread::Thread::unpark` also resumes a thread that is blocked on a lock or in a
/// `join` (tokio-rs/loom#249), which std's `unpark` never does: a late wake-up of a blocking
/// waiter's waker would then abort the model with "expected to be able to acquire lock". Here
/// each loom thread parks on its own `loom::sync::Notify` instead, which has the token
/// semantics of std's park/unpark (an unpark before the park is kept; spurious wake-ups are
/// modelled too).
#[cfg(loom)]
mod loom_park {
    use loom::sync::Notify;
    // A std `Arc`: sharing the parker is not part of the model, and a loom `Arc` would add
    // a scheduling point per clone and touch loom's state when a failed model is torn down.
    use std::sync::Arc;

    loom::thread_local! {
        static PARKER: Arc<Notify> = Arc::new(Notify::new());
    }

    /// A handle to unpark one thread.
    #[derive(Clone, Debug)]
    pub(crate) struct Thread(Arc<Notify>);

    impl Thread {
        pub(crate) fn unpark(&self) {
            self.0.notify();
        }
    }

    pub(crate) fn current() -> Thread {
        Thread(PARKER.with(Arc::clone))
    }

    pub(crate) fn park() {
        PARKER.with(Arc::clone).wait();
    }
}

/// A cell whose accesses loom checks for data races: `with` and `with_mut` hand out raw
/// pointers, and the caller's `// SAFETY:` says why no other access overlaps.
#[derive(Debug, Default)]
pub(crate) struct UnsafeCell<T>(
    #[cfg(loom)] loom::cell::UnsafeCell<T>,
    #[cfg(not(loom))] core::cell::UnsafeCell<T>,
);

impl<T> UnsafeCell<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(loom)]
        {
            UnsafeCell(loom::cell::UnsafeCell::new(value))
        }
        #[cfg(not(loom))]
        {
            UnsafeCell(core::cell::UnsafeCell::new(value))
        }
    }

    /// Reads through a raw pointer.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        #[cfg(loom)]
        {
            self.0.with(f)
        }
        #[cfg(not(loom))]
        {
            f(self.0.get())
        }
    }

    /// Writes through a raw pointer.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        #[cfg(loom)]
        {
            self.0.with_mut(f)
        }
        #[cfg(not(loom))]
        {
            f(self.0.get())
        }
    }
}

/// Whether `deadline` has passed. loom has no clock: a deadline there has always passed,
/// which models the timeout racing with everything else.
pub(crate) fn deadline_passed(deadline: std::time::Instant) -> bool {
    #[cfg(loom)]
    {
        let _ = deadline;
        true
    }
    #[cfg(not(loom))]
    {
        std::time::Instant::now() >= deadline
    }
}

/// How many `spin_loop`s a blocking waiter may spin before it parks; none under loom, where
/// spinning gains nothing and every spin would be a step to model.
pub(crate) const SPINS_BEFORE_PARK: u32 = if cfg!(loom) { 0 } else { 512 };

/// Whether blocking waiters spin before they park at all (not under loom).
pub(crate) const SPINS: bool = SPINS_BEFORE_PARK != 0;

/// Parks the current thread until it is unparked or `deadline` passes.
///
/// loom has no clock, so under a model a deadline only yields: timeouts are tested with real
/// threads, the wake-up logic around them with loom.
pub(crate) fn park_until(deadline: std::time::Instant) {
    #[cfg(not(loom))]
    {
        let now = std::time::Instant::now();
        if let Some(remaining) = deadline.checked_duration_since(now) {
            std::thread::park_timeout(remaining);
        }
    }
    #[cfg(loom)]
    {
        let _ = deadline;
        loom::thread::yield_now();
    }
}

/// Locks `mutex`, ignoring poison: no user code (a waker's `wake`, `clone` or `drop`) runs
/// while a lock of this crate is held, and every critical section keeps its state consistent
/// at each step, so a poisoned lock could only come from a bug of our own.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(loom)]
    {
        mutex.lock().unwrap()
    }
    #[cfg(not(loom))]
    {
        mutex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
