//! Hand-off under backpressure: the time from a release to the waiter running again.
//!
//! Two parties ping-pong a budget with room for exactly one allocation (one 64-byte buffer).
//! The holder waits until the other party is waiting for the budget, reads the clock, drops
//! its allocation and asks for the budget again; the waiter reads the clock as soon as its
//! request returns. Each hand-off's latency (waiter's clock minus releaser's clock) is
//! measured directly, and criterion reports the mean per hand-off.
//!
//! * `blocking/*`: two OS threads; ours `allocate_blocking(1)`, tokio `Semaphore::new(1)` with
//!   `futures::executor::block_on(acquire())`. The holder waits until the waiter is queued
//!   (ours: `stats().waiting`; tokio: its `acquire` future returned `Pending`), then spins
//!   50 µs more so the waiter is asleep in the kernel when the release comes (the wake-up
//!   dominates, as in real backpressure; ours spins up to about 8 µs before it parks).
//! * `tokio_tasks/*`: two tasks on a 2-worker tokio multi-thread runtime; ours
//!   `allocate(1).await`, tokio `Semaphore::acquire().await`. The waiter's flag is raised when
//!   its future returns `Pending`, i.e. once it is queued; the holder yields until then.
//!   `tokio+buffer` also allocates the 64-byte buffer after the permit (and frees it before
//!   the permit goes back): the pool's allocation built from a semaphore, which is what ours
//!   does in every hand-off.
//!
//! Run: `cargo bench --bench handoff`.

use std::future::{Future, poll_fn};
use std::hint::{black_box, spin_loop};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

/// How long a blocking holder waits after the waiter said it is about to block.
const SETTLE: Duration = Duration::from_micros(50);

fn single_slot_pool() -> membudget::BufPool {
    membudget::BufPool::new(membudget::BufPoolCfg {
        buffer_size: membudget::BufferSize::S64,
        max_memory: 64,
    })
}

/// What the two parties share: who waits, and when the last release happened.
struct Baton {
    base: Instant,
    waiting: [AtomicBool; 2],
    released_at: AtomicU64,
}

impl Baton {
    fn new() -> Self {
        Baton {
            base: Instant::now(),
            waiting: [AtomicBool::new(false), AtomicBool::new(false)],
            released_at: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).expect("short benchmark")
    }

    /// Marks the release: call right before dropping the budget.
    fn stamp_release(&self) {
        self.released_at.store(self.now(), Ordering::SeqCst);
    }

    /// The latency of the hand-off that just ended: call right after the request returned.
    fn latency(&self) -> u64 {
        self.now() - self.released_at.load(Ordering::SeqCst)
    }

    async fn wait_for_waiter_async(&self, other: usize) {
        while !self.waiting[other].swap(false, Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
    }
}

/// Blocking ping-pong of `rounds` hand-offs each way; returns the summed hand-off latency.
///
/// `acquire(me)` blocks until party `me` holds the budget; `queued(other)` tells whether party
/// `other` is in the budget's wait queue. The holder releases only once the other party is
/// queued, so the release always hands the budget over (a release before that would let the
/// releaser take the budget straight back and stall the ping-pong).
fn blocking_pingpong<H>(
    rounds: u64,
    acquire: impl Fn(usize) -> H + Sync,
    queued: impl Fn(usize) -> bool + Sync,
) -> Duration {
    let baton = Baton::new();
    let barrier = Barrier::new(2);
    let total: u64 = thread::scope(|s| {
        let party = |me: usize| {
            let (baton, barrier, acquire, queued) = (&baton, &barrier, &acquire, &queued);
            s.spawn(move || {
                let other = 1 - me;
                let release = |held: H| {
                    while !queued(other) {
                        spin_loop();
                    }
                    // Let the waiter get to sleep.
                    let settle = Instant::now();
                    while settle.elapsed() < SETTLE {
                        spin_loop();
                    }
                    baton.stamp_release();
                    drop(held);
                };
                let mut held = (me == 0).then(|| acquire(me));
                barrier.wait();
                let mut sum = 0;
                for _ in 0..rounds {
                    if let Some(allocation) = held.take() {
                        release(allocation);
                    }
                    held = Some(black_box(acquire(me)));
                    sum += baton.latency();
                }
                if let (1, Some(allocation)) = (me, held.take()) {
                    // Party 0 still waits for its last round.
                    release(allocation);
                }
                drop(held);
                sum
            })
        };
        let parties = [party(0), party(1)];
        parties
            .map(|p| p.join().expect("ping-pong thread panicked"))
            .iter()
            .sum()
    });
    Duration::from_nanos(total)
}

/// Polls `request` to completion, raising `flag` whenever it returns `Pending` (it is queued).
async fn flagged<F: Future>(request: F, flag: &AtomicBool) -> F::Output {
    let mut request = pin!(request);
    poll_fn(|cx| {
        let poll = request.as_mut().poll(cx);
        if poll.is_pending() {
            flag.store(true, Ordering::SeqCst);
        }
        poll
    })
    .await
}

/// Task ping-pong of `rounds` hand-offs each way on `$rt`; `$acquire` is a future that takes
/// the budget from `$shared` (an `Arc`, cloned into each task as `$s`). Evaluates to the
/// summed hand-off latency.
macro_rules! task_pingpong {
    ($rt:expr, $rounds:expr, $shared:expr, |$s:ident| $acquire:expr) => {{
        let baton = Arc::new(Baton::new());
        let started = Arc::new(AtomicBool::new(false));
        let rounds: u64 = $rounds;
        let total: u64 = $rt.block_on(async {
            let tasks: Vec<_> = (0..2usize)
                .map(|me| {
                    let (baton, started, $s) = (baton.clone(), started.clone(), $shared.clone());
                    tokio::spawn(async move {
                        let other = 1 - me;
                        let mut held = None;
                        if me == 0 {
                            held = Some($acquire.await);
                            started.store(true, Ordering::SeqCst);
                        } else {
                            while !started.load(Ordering::SeqCst) {
                                tokio::task::yield_now().await;
                            }
                        }
                        let mut sum = 0;
                        for _ in 0..rounds {
                            if let Some(allocation) = held.take() {
                                baton.wait_for_waiter_async(other).await;
                                baton.stamp_release();
                                drop(allocation);
                            }
                            let allocation = flagged($acquire, &baton.waiting[me]).await;
                            sum += baton.latency();
                            held = Some(black_box(allocation));
                        }
                        if let (1, Some(allocation)) = (me, held.take()) {
                            // Party 0 still waits for its last round.
                            baton.wait_for_waiter_async(other).await;
                            baton.stamp_release();
                            drop(allocation);
                        }
                        drop(held);
                        sum
                    })
                })
                .collect();
            let mut sum = 0;
            for task in tasks {
                sum += task.await.expect("ping-pong task panicked");
            }
            sum
        });
        Duration::from_nanos(total)
    }};
}

/// `iters` hand-offs as `iters / 2` rounds (rounded up) each way, scaled back to `iters`.
fn per_iters(iters: u64, run: impl FnOnce(u64) -> Duration) -> Duration {
    let rounds = iters.div_ceil(2);
    run(rounds).mul_f64(iters as f64 / (2 * rounds) as f64)
}

fn handoff(c: &mut Criterion) {
    let mut group = c.benchmark_group("handoff/blocking");
    group.bench_function(BenchmarkId::new("ours", "allocate_blocking"), |b| {
        let pool = single_slot_pool();
        b.iter_custom(|iters| {
            per_iters(iters, |rounds| {
                blocking_pingpong(
                    rounds,
                    |_| pool.allocate_blocking(1).unwrap(),
                    |_| pool.stats().waiting > 0,
                )
            })
        });
    });
    group.bench_function(BenchmarkId::new("tokio", "block_on_acquire"), |b| {
        let sem = tokio::sync::Semaphore::new(1);
        let waiting = [AtomicBool::new(false), AtomicBool::new(false)];
        b.iter_custom(|iters| {
            per_iters(iters, |rounds| {
                blocking_pingpong(
                    rounds,
                    |me| futures::executor::block_on(flagged(sem.acquire(), &waiting[me])).unwrap(),
                    |other| waiting[other].swap(false, Ordering::SeqCst),
                )
            })
        });
    });
    group.finish();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("handoff/tokio_tasks");
    group.bench_function(BenchmarkId::new("ours", "allocate_await"), |b| {
        let pool = Arc::new(single_slot_pool());
        b.iter_custom(|iters| {
            per_iters(iters, |rounds| {
                task_pingpong!(rt, rounds, pool, |pool| async {
                    pool.allocate(1).await.unwrap()
                })
            })
        });
    });
    group.bench_function(BenchmarkId::new("tokio", "acquire_await"), |b| {
        let sem = Arc::new(tokio::sync::Semaphore::new(1));
        b.iter_custom(|iters| {
            per_iters(iters, |rounds| {
                task_pingpong!(rt, rounds, sem, |sem| async {
                    sem.acquire().await.unwrap()
                })
            })
        });
    });
    // What a tokio user builds the pool's allocation from: the permit, then the buffer
    // (freed before the permit goes back, as ours frees before it releases).
    group.bench_function(
        BenchmarkId::new("tokio+buffer", "acquire_await_then_alloc"),
        |b| {
            let sem = Arc::new(tokio::sync::Semaphore::new(1));
            b.iter_custom(|iters| {
                per_iters(iters, |rounds| {
                    task_pingpong!(rt, rounds, sem, |sem| async {
                        let permit = sem.acquire().await.unwrap();
                        PermitWithBuffer {
                            buffer: black_box(Vec::<u8>::with_capacity(64)),
                            _permit: permit,
                        }
                    })
                })
            });
        },
    );
    group.finish();
}

/// A permit and its buffer; the buffer is dropped first (fields drop in order).
struct PermitWithBuffer<'a> {
    /// Held for its allocation and drop only.
    #[allow(dead_code)]
    buffer: Vec<u8>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = handoff
}
criterion_main!(benches);
