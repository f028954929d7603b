//! The one place that picks the synchronisation primitives: `loom`'s modelled ones under
//! `cfg(loom)`, the standard library's otherwise. Everything else imports through here so a
//! loom model sees every atomic, lock and park the pool uses.

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(loom)]
pub(crate) use loom_atomic::{AtomicBool, AtomicU64, AtomicUsize};
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

/// loom's atomics, each access made a conflict for loom's search.
///
/// loom (0.7) looks for the orders worth exploring by remembering, per atomic, only its *last*
/// access: a store or read-modify-write by thread B is checked against that one access, and
/// so misses a load by thread A whenever B itself loaded the same atomic in between, which
/// every compare-exchange loop does (load, then compare-exchange). The order "B's write
/// before A's load" is then never explored (tokio-rs/loom#166, #392). Measured here: a
/// thread that drops the allocation filling the pool, racing the main thread's
/// `try_allocate`, was explored in 1 execution (the try always refused); the try's success
/// never ran. So every access here first bumps a shadow counter of the same atomic with a
/// `Relaxed` read-modify-write: read-modify-writes conflict with every earlier access of
/// another thread, so loom now tries each cross-thread pair of accesses both ways (load
/// pairs too, which costs executions but loses none). `Relaxed` on the shadow creates no
/// happens-before, and the real access keeps its own ordering, so loom still models stale
/// loads. (The same case: 1 execution before, both outcomes after.)
#[cfg(loom)]
mod loom_atomic {
    use core::sync::atomic::Ordering::{self, Relaxed};

    macro_rules! shadowed {
        ($name:ident, $value:ty, { $($int:tt)* }) => {
            #[derive(Debug)]
            pub(crate) struct $name {
                value: loom::sync::atomic::$name,
                shadow: loom::sync::atomic::AtomicUsize,
            }

            impl Default for $name {
                fn default() -> Self {
                    Self::new(<$value>::default())
                }
            }

            #[allow(dead_code)]
            impl $name {
                pub(crate) fn new(value: $value) -> Self {
                    $name {
                        value: loom::sync::atomic::$name::new(value),
                        shadow: loom::sync::atomic::AtomicUsize::new(0),
                    }
                }

                fn conflict(&self) {
                    self.shadow.fetch_add(1, Relaxed);
                }

                pub(crate) fn load(&self, order: Ordering) -> $value {
                    self.conflict();
                    self.value.load(order)
                }

                pub(crate) fn store(&self, value: $value, order: Ordering) {
                    self.conflict();
                    self.value.store(value, order)
                }

                pub(crate) fn swap(&self, value: $value, order: Ordering) -> $value {
                    self.conflict();
                    self.value.swap(value, order)
                }

                pub(crate) fn compare_exchange(
                    &self,
                    current: $value,
                    new: $value,
                    success: Ordering,
                    failure: Ordering,
                ) -> Result<$value, $value> {
                    self.conflict();
                    self.value.compare_exchange(current, new, success, failure)
                }

                pub(crate) fn compare_exchange_weak(
                    &self,
                    current: $value,
                    new: $value,
                    success: Ordering,
                    failure: Ordering,
                ) -> Result<$value, $value> {
                    self.conflict();
                    self.value.compare_exchange_weak(current, new, success, failure)
                }

                pub(crate) fn fetch_update<F>(
                    &self,
                    set: Ordering,
                    fetch: Ordering,
                    f: F,
                ) -> Result<$value, $value>
                where
                    F: FnMut($value) -> Option<$value>,
                {
                    self.conflict();
                    self.value.fetch_update(set, fetch, f)
                }

                pub(crate) fn fetch_or(&self, value: $value, order: Ordering) -> $value {
                    self.conflict();
                    self.value.fetch_or(value, order)
                }

                $($int)*
            }
        };
    }

    macro_rules! integer_ops {
        ($value:ty) => {
            pub(crate) fn fetch_add(&self, value: $value, order: Ordering) -> $value {
                self.conflict();
                self.value.fetch_add(value, order)
            }

            pub(crate) fn fetch_sub(&self, value: $value, order: Ordering) -> $value {
                self.conflict();
                self.value.fetch_sub(value, order)
            }

            pub(crate) fn fetch_min(&self, value: $value, order: Ordering) -> $value {
                self.conflict();
                self.value.fetch_min(value, order)
            }

            pub(crate) fn fetch_max(&self, value: $value, order: Ordering) -> $value {
                self.conflict();
                self.value.fetch_max(value, order)
            }
        };
    }

    shadowed!(AtomicBool, bool, {});
    shadowed!(AtomicUsize, usize, {
        integer_ops!(usize);
    });
    shadowed!(AtomicU64, u64, {
        integer_ops!(u64);
    });
}

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
