//! The blocking shim: drives the pool's futures on the calling thread, parking it between
//! polls. The waiting logic itself lives only in the futures.

use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use core::task::{Context, Poll, Waker};
use std::time::Instant;

use crate::sync::{AtomicBool, Thread, current_thread, park, park_until};

/// Wakes a parked thread; remembers a wake that comes before the park.
struct ThreadWaker {
    thread: Thread,
    woken: AtomicBool,
}

impl std::task::Wake for ThreadWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        if !self.woken.swap(true, Release) {
            self.thread.unpark();
        }
    }
}

/// Polls `future` to completion on this thread, or until `deadline` passes. At the deadline
/// it polls once more, so a result that arrived just in time is not thrown away; `None` means
/// the deadline won and the caller drops (cancels) the future.
pub(crate) fn block_on<F: Future + Unpin>(
    future: &mut F,
    deadline: Option<Instant>,
) -> Option<F::Output> {
    let thread_waker = std::sync::Arc::new(ThreadWaker {
        thread: current_thread(),
        woken: AtomicBool::new(false),
    });
    let waker = Waker::from(thread_waker.clone());
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = Pin::new(&mut *future).poll(&mut cx) {
            return Some(output);
        }
        let time_left = deadline.is_none_or(|deadline| !deadline_passed(deadline));
        if time_left && spin_until_woken(&thread_waker.woken) {
            thread_waker.woken.store(false, Relaxed);
            continue;
        }
        while !thread_waker.woken.swap(false, Acquire) {
            match deadline {
                None => park(),
                Some(deadline) if !deadline_passed(deadline) => park_until(deadline),
                Some(_) => {
                    return match Pin::new(&mut *future).poll(&mut cx) {
                        Poll::Ready(output) => Some(output),
                        Poll::Pending => None,
                    };
                }
            }
        }
    }
}

/// Spins some microseconds for `woken` before the caller parks, if a core is free for it;
/// `true` if the wake came (its `Acquire` load pairs with the waker's `Release`).
///
/// Parking costs a futex wait here and a futex wake plus a context switch in the releaser's
/// thread (6-7 µs on a 2-core VM): when budget changes hands quickly, as it does under a
/// tight budget, a waiter that is still spinning takes it without either syscall. At most
/// one spinner fewer than the cores spins at a time, so spinning never starves the thread
/// that is about to release, and a long wait costs at most one spin before it parks.
#[cfg(not(loom))]
fn spin_until_woken(woken: &AtomicBool) -> bool {
    use std::sync::atomic::AtomicUsize;

    /// About 8 µs of `spin_loop` on this project's VM: about what parking and being woken
    /// costs, the classic bound that keeps a spin-then-park wait within 2x of the best choice.
    const SPINS: u32 = 512;
    static SPINNERS: AtomicUsize = AtomicUsize::new(0);
    static MAX_SPINNERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

    let max = *MAX_SPINNERS
        .get_or_init(|| std::thread::available_parallelism().map_or(0, |cores| cores.get() - 1));
    if SPINNERS.fetch_add(1, Relaxed) >= max {
        SPINNERS.fetch_sub(1, Relaxed);
        return false;
    }
    let mut spins = 0;
    let wake_came = loop {
        if woken.load(Acquire) {
            break true;
        }
        if spins == SPINS {
            break false;
        }
        core::hint::spin_loop();
        spins += 1;
    };
    SPINNERS.fetch_sub(1, Relaxed);
    wake_came
}

/// Under loom there is nothing to gain from spinning, and every spin would be a step to model.
#[cfg(loom)]
fn spin_until_woken(_woken: &AtomicBool) -> bool {
    false
}

#[cfg(not(loom))]
fn deadline_passed(deadline: Instant) -> bool {
    Instant::now() >= deadline
}

/// loom has no clock: a deadline there has always passed, which models the timeout racing
/// with everything else.
#[cfg(loom)]
fn deadline_passed(_deadline: Instant) -> bool {
    true
}
