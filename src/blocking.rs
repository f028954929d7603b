//! The blocking shim: drives the pool's futures on the calling thread, parking it between
//! polls. The waiting logic itself lives only in the futures.

use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::Ordering::{Acquire, Release};
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
