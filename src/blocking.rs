//! The blocking shim: drives the pool's futures on the calling thread, spinning briefly and
//! then parking it between polls. The waiting logic itself lives only in the futures.

use core::cell::Cell;
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use core::task::{Context, Poll, Waker};
use std::time::Instant;

use crate::sync::{
    AtomicBool, SPINS, SPINS_BEFORE_PARK, Thread, current_thread, deadline_passed, park,
    park_until, thread_local,
};

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
        // `Release`: pairs with the `Acquire` of the waiting thread's check, so what the
        // waker's caller did before (a grant) is visible when the thread wakes.
        if !self.woken.swap(true, Release) {
            self.thread.unpark();
        }
    }
}

thread_local! {
    // Not `const { .. }`: loom's `thread_local!` does not take that form.
    #[allow(clippy::missing_const_for_thread_local)]
    /// This thread's waker, made once: a blocking wait allocates nothing. `None` while a
    /// wait on this thread uses it (a nested wait, from a waker's own code, makes its own).
    static THREAD_WAKER: Cell<Option<std::sync::Arc<ThreadWaker>>> = Cell::new(None);

    #[allow(clippy::missing_const_for_thread_local)]
    /// How many `spin_loop`s this thread's next wait may spin before it parks (see
    /// [`spin_until_woken`]): it adapts to how long this thread's recent waits were.
    static SPIN_BUDGET: Cell<u32> = Cell::new(SPINS_BEFORE_PARK);
}

/// The fewest spins a thread keeps trying however long its waits were: about a quarter of a
/// microsecond, so that it notices when wake-ups come quickly again.
const MIN_SPINS: u32 = 16;

/// Polls `future` to completion on this thread, or until `deadline` passes. At the deadline
/// it polls once more, so a result that arrived just in time is not thrown away; `None` means
/// the deadline won and the caller drops (cancels) the future.
pub(crate) fn block_on<F: Future>(
    mut future: Pin<&mut F>,
    deadline: Option<Instant>,
) -> Option<F::Output> {
    let thread_waker = THREAD_WAKER.with(Cell::take).unwrap_or_else(|| {
        std::sync::Arc::new(ThreadWaker {
            thread: current_thread(),
            woken: AtomicBool::new(false),
        })
    });
    // A wake left over from an earlier wait on this thread only costs one more poll.
    thread_waker.woken.store(false, Relaxed);
    let waker = Waker::from(std::sync::Arc::clone(&thread_waker));
    let output = drive(future.as_mut(), &waker, &thread_waker.woken, deadline);
    drop(waker);
    THREAD_WAKER.with(|cell| cell.set(Some(thread_waker)));
    output
}

fn drive<F: Future>(
    mut future: Pin<&mut F>,
    waker: &Waker,
    woken: &AtomicBool,
    deadline: Option<Instant>,
) -> Option<F::Output> {
    let mut cx = Context::from_waker(waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return Some(output);
        }
        let time_left = deadline.is_none_or(|deadline| !deadline_passed(deadline));
        if time_left && spin_until_woken(woken) {
            woken.store(false, Relaxed);
            continue;
        }
        let parked_at = SPINS.then(Instant::now);
        while !woken.swap(false, Acquire) {
            match deadline {
                None => park(),
                Some(deadline) if !deadline_passed(deadline) => park_until(deadline),
                Some(_) => {
                    return match future.as_mut().poll(&mut cx) {
                        Poll::Ready(output) => Some(output),
                        Poll::Pending => None,
                    };
                }
            }
        }
        if parked_at.is_some_and(|parked_at| parked_at.elapsed() < SHORT_PARK) {
            // Woken soon after it parked: a longer spin would have saved the futex round
            // trip, so the next wait spins in full again.
            SPIN_BUDGET.with(|cell| cell.set(SPINS_BEFORE_PARK));
        }
    }
}

/// A park shorter than this (about two futex round trips here) means the wake-up came soon
/// enough that spinning in full would have caught it.
const SHORT_PARK: std::time::Duration = std::time::Duration::from_micros(20);

/// Spins some microseconds for `woken` before the caller parks, if a core is free for it;
/// `true` if the wake came (its `Acquire` load pairs with the waker's `Release`).
///
/// Parking costs a futex wait here and a futex wake plus a context switch in the releaser's
/// thread (6-7 µs on a 2-core VM): when budget changes hands quickly, as it does under a
/// tight budget, a waiter that is still spinning takes it without either syscall. At most
/// one spinner fewer than the cores spins at a time, so spinning never starves the thread
/// that is about to release, and a long wait costs at most one spin before it parks.
///
/// The spin adapts, per thread: a spin that missed the wake-up halves the next one (down to
/// [`MIN_SPINS`]), one that caught it allows twice the spins it took (up to
/// `SPINS_BEFORE_PARK`). Under a load whose waits are all long (tens of microseconds, many
/// tasks behind a small budget) a fixed spin only burned a core the releasers needed: the
/// blocking threads of `benches/latency.rs` spent about 16 µs of CPU per request against 8 µs
/// parking at once, and the tasks beside them waited longer for it (issue 22).
fn spin_until_woken(woken: &AtomicBool) -> bool {
    use std::sync::atomic::AtomicUsize;

    static SPINNERS: AtomicUsize = AtomicUsize::new(0);
    static MAX_SPINNERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

    if SPINS_BEFORE_PARK == 0 {
        return false;
    }
    let max = *MAX_SPINNERS
        .get_or_init(|| std::thread::available_parallelism().map_or(0, |cores| cores.get() - 1));
    if SPINNERS.fetch_add(1, Relaxed) >= max {
        SPINNERS.fetch_sub(1, Relaxed);
        return false;
    }
    let budget = SPIN_BUDGET.with(Cell::get);
    let mut spins = 0;
    let wake_came = loop {
        if woken.load(Acquire) {
            break true;
        }
        if spins >= budget {
            break false;
        }
        core::hint::spin_loop();
        spins += 1;
    };
    SPINNERS.fetch_sub(1, Relaxed);
    let next = if wake_came {
        spins.saturating_mul(2).clamp(budget, SPINS_BEFORE_PARK)
    } else {
        (budget / 2).max(MIN_SPINS)
    };
    SPIN_BUDGET.with(|cell| cell.set(next));
    wake_came
}
