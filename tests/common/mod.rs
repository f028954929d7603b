//! Helpers shared by the integration tests: watchdogs, waiting for a pool state with a
//! deadline, a budget checker and thread/task plumbing.
//!
//! Every test that waits goes through one of the watchdogs here, so a hang fails in seconds
//! instead of wedging the test run.

#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize};

/// Under Miri everything runs some thousand times slower: watchdog deadlines stretch by this.
pub const SLOWDOWN: u32 = if cfg!(miri) { 100 } else { 1 };

/// `native` rounds natively, `miri` under Miri.
pub const fn rounds(native: usize, miri: usize) -> usize {
    if cfg!(miri) { miri } else { native }
}

/// A deadline `secs` seconds (stretched under Miri) from now.
pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs) * SLOWDOWN
}

/// Runs `f` on its own thread and fails the test if it does not finish within `secs` seconds
/// (a hang); a panic in `f` is passed on as it is.
#[track_caller]
pub fn watchdog<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let worker = thread::Builder::new()
        .name("watched".into())
        .spawn(move || {
            let out = f();
            let _ = done_tx.send(());
            out
        })
        .expect("spawn the watched thread");
    match done_rx.recv_timeout(Duration::from_secs(secs) * SLOWDOWN) {
        // Disconnected: `f` panicked, and `join` passes the panic on.
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: the test did not finish within {secs} s: a hang")
        }
    }
}

/// Awaits `f`, failing the test if it takes longer than `secs` seconds (async watchdog).
pub async fn within<F: Future>(secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs) * SLOWDOWN, f).await {
        Ok(out) => out,
        Err(_) => panic!("watchdog: the future did not finish within {secs} s: a hang"),
    }
}

/// Spins (yielding) until `cond` holds; panics after `secs` seconds.
#[track_caller]
pub fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = deadline(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        thread::yield_now();
    }
}

/// Async form of [`wait_until`]: yields to the runtime between checks.
pub async fn wait_until_async(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = deadline(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::task::yield_now().await;
    }
}

/// Waits (blocking) until exactly `n` requests are queued in `pool`.
#[track_caller]
pub fn wait_waiting(pool: &BufPool, n: usize) {
    let end = deadline(10);
    loop {
        let waiting = pool.stats().waiting;
        if waiting == n {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {n} queued requests (stats: {})",
            pool.stats()
        );
        thread::yield_now();
    }
}

/// Waits (async) until exactly `n` requests are queued in `pool`.
pub async fn wait_waiting_async(pool: &BufPool, n: usize) {
    let end = deadline(10);
    loop {
        let waiting = pool.stats().waiting;
        if waiting == n {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {n} queued requests (stats: {})",
            pool.stats()
        );
        tokio::task::yield_now().await;
    }
}

/// A pool of `buffers` buffers of `size`.
pub fn pool(size: BufferSize, buffers: usize) -> BufPool {
    BufPool::new(BufPoolCfg {
        buffer_size: size,
        max_memory: size.bytes() * buffers,
    })
}

/// A pool of `buffers` 64-byte buffers behind an `Arc`.
pub fn shared_pool(buffers: usize) -> Arc<BufPool> {
    Arc::new(pool(BufferSize::S64, buffers))
}

/// Asserts the pool is quiescent with nothing in use, nothing outstanding and nobody waiting.
#[track_caller]
pub fn assert_idle(pool: &BufPool) {
    let stats = pool.stats();
    assert_eq!(
        (stats.in_use_bytes, stats.outstanding, stats.waiting),
        (0, 0, 0),
        "pool not idle: {stats}"
    );
}

/// Asserts the whole budget can be taken at once (and gives it back).
#[track_caller]
pub fn assert_full_budget_back(pool: &BufPool) {
    let stats = pool.stats();
    let all = stats.max_memory / stats.buffer_size;
    let allocation = pool
        .try_allocate(all)
        .unwrap_or_else(|error| panic!("the full budget is not back ({error}): {stats}"));
    assert_eq!(allocation.length(), all);
    drop(allocation);
    assert_idle(pool);
}

/// Counts the bytes the test itself believes live, checking them against the budget at
/// every step; also fills each allocation with an owner tag and checks nobody overwrote it.
#[derive(Debug)]
pub struct BudgetChecker {
    pub max_memory: usize,
    live: AtomicUsize,
    peak: AtomicUsize,
    pub grants: AtomicUsize,
}

impl BudgetChecker {
    pub fn new(max_memory: usize) -> Arc<Self> {
        Arc::new(BudgetChecker {
            max_memory,
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            grants: AtomicUsize::new(0),
        })
    }

    /// Call right after getting `allocation`: counts it and checks the budget and the pool.
    #[track_caller]
    pub fn acquired(&self, pool: &BufPool, allocation: &BufPoolAllocation, tag: u8) {
        let bytes = allocation.allocated_bytes();
        let live = self.live.fetch_add(bytes, SeqCst) + bytes;
        self.peak.fetch_max(live, SeqCst);
        self.grants.fetch_add(1, SeqCst);
        assert!(
            live <= self.max_memory,
            "budget exceeded: {live} live bytes > {}",
            self.max_memory
        );
        let in_use = pool.stats().in_use_bytes;
        assert!(
            in_use <= pool.stats().max_memory,
            "stats over budget: {in_use}"
        );
        // SAFETY: the allocation owns `bytes` writable bytes.
        unsafe { allocation.first().write_bytes(tag, bytes) };
    }

    /// Call right before dropping `allocation`: checks its tag survived, uncounts it.
    #[track_caller]
    pub fn releasing(&self, allocation: &BufPoolAllocation, tag: u8) {
        let bytes = allocation.allocated_bytes();
        // SAFETY: `bytes` bytes initialised by `acquired`, owned by `allocation`.
        let data = unsafe { std::slice::from_raw_parts(allocation.first(), bytes) };
        assert!(
            data.iter().all(|&b| b == tag),
            "another allocation wrote into this one's bytes"
        );
        self.live.fetch_sub(bytes, SeqCst);
    }

    pub fn peak(&self) -> usize {
        self.peak.load(SeqCst)
    }

    pub fn live(&self) -> usize {
        self.live.load(SeqCst)
    }
}

/// Runs `f` on a new std thread; the returned future resolves to its result (a panic in the
/// thread becomes a panic here). Unlike `spawn_blocking`, a hung thread never holds up the
/// runtime's shutdown, so an async watchdog can still fail the test.
pub fn thread_future<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Pin<Box<dyn Future<Output = T> + Send>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    Box::pin(async move { rx.await.expect("the blocking thread panicked") })
}

/// Polls `future` once with a no-op waker.
pub fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
}

/// Polls an allocation future once and asserts it is queued (pending).
#[track_caller]
pub fn assert_pending<F: Future + Unpin>(future: &mut F) {
    assert!(
        poll_once(future).is_pending(),
        "expected the request to wait"
    );
}

/// Polls an allocation future once and returns its result, asserting it was ready.
#[track_caller]
pub fn ready<F, T>(future: &mut F) -> T
where
    F: Future<Output = T> + Unpin,
{
    match poll_once(future) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("expected the future to be ready"),
    }
}

/// `Err(error)` of an allocation result, or a panic naming what came instead.
#[track_caller]
pub fn err(result: Result<BufPoolAllocation, AllocError>) -> AllocError {
    match result {
        Ok(allocation) => panic!("expected an error, got {allocation:?}"),
        Err(error) => error,
    }
}

/// A tiny deterministic PRNG (xorshift) so stress tests need no extra crate.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}
