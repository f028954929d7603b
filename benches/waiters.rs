//! Waiter scaling: the cost of a release that serves the head of a queue of 1, 100 or 10,000
//! waiters.
//!
//! The budget holds one 64-byte buffer. One allocation holds it and N `allocate(1)` futures,
//! each polled once with a no-op waker, wait behind it. One iteration is the steady-state
//! step: drop the held allocation (the release grants the head), poll the head to take its
//! allocation (now the one held), and queue a fresh future at the tail (polled once), so the
//! queue stays N long. Issue 4 wants the 10,000-waiter cost at most 2x the 1-waiter cost.
//!
//! `tokio/*` does the same with `Semaphore::new(1)` and `acquire()` futures.
//! `tokio+buffer/*` adds what tokio leaves out and ours does in every iteration: a 64-byte
//! heap buffer per permit (allocated when taken, freed before the release), i.e. the pool's
//! allocation built from a semaphore.
//! `ours_untimed/*` is ours built with `time_waits(false)`: no clock reads for the wait
//! statistics (two per wait otherwise, from the TSC where it is invariant).
//! `ours_recycling/*` keeps freed 64-byte blocks for reuse (`recycle(4).recycle_min_bytes(64)`):
//! compare it with `tokio/*`, the bare permit, since neither touches the allocator for the
//! buffer (ours hands the released block to the head, see README "Performance").
//!
//! Since issue 22 the release hands its block to the head waiter (same size), so `ours/*`
//! calls the allocator only for the boxed future, as `tokio/*` does; `tokio+buffer/*` still
//! pays a malloc and a free for its buffer.
//!
//! Both rows box their futures (`Box::pin`, polled through `Pin<Box<dyn Future>>`): tokio's
//! `Acquire` and our `Allocate` are `!Unpin` (the waiter node lives inside the future). Each iteration therefore pays one box allocation,
//! one free and a dynamic `poll` call on both sides, and the head's box is freed before the
//! new tail's is made in both.
//!
//! Run: `cargo bench --bench waiters`.

use std::collections::VecDeque;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures::task::noop_waker_ref;

const QUEUE_LENGTHS: [usize; 3] = [1, 100, 10_000];

type BoxedAllocate<'a> =
    Pin<Box<dyn Future<Output = Result<membudget::BufPoolAllocation, membudget::AllocError>> + 'a>>;

fn enqueue_ours<'a>(
    pool: &'a membudget::BufPool,
    queue: &mut VecDeque<BoxedAllocate<'a>>,
    cx: &mut Context<'_>,
) {
    let mut waiter: BoxedAllocate<'a> = Box::pin(pool.allocate(1));
    assert!(waiter.as_mut().poll(cx).is_pending());
    queue.push_back(waiter);
}

/// `time_waits`: the builder option that times each wait for the statistics (two clock
/// reads per wait; on by default). `recycling`: freed 64-byte blocks are kept for reuse
/// (`recycle(4).recycle_min_bytes(64)`).
fn ours(queued: usize, iters: u64, time_waits: bool, recycling: bool) -> Duration {
    let mut builder = membudget::BufPool::builder(membudget::BufPoolCfg {
        buffer_size: membudget::BufferSize::S64,
        max_memory: 64,
    })
    .time_waits(time_waits);
    if recycling {
        builder = builder.recycle(4).recycle_min_bytes(64);
    }
    let pool = builder.build().unwrap();
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut held = pool.try_allocate(1).unwrap();
    let mut queue: VecDeque<BoxedAllocate<'_>> = VecDeque::with_capacity(queued + 1);
    for _ in 0..queued {
        enqueue_ours(&pool, &mut queue, &mut cx);
    }

    let start = Instant::now();
    for _ in 0..iters {
        drop(held);
        let mut head = queue.pop_front().unwrap();
        held = match head.as_mut().poll(&mut cx) {
            Poll::Ready(allocation) => allocation.unwrap(),
            Poll::Pending => panic!("the release did not serve the head"),
        };
        drop(head);
        enqueue_ours(&pool, &mut queue, &mut cx);
    }
    let elapsed = start.elapsed();
    black_box(&held);
    drop(held);
    drop(queue);
    elapsed
}

type Acquire<'a> = Pin<
    Box<
        dyn Future<Output = Result<tokio::sync::SemaphorePermit<'a>, tokio::sync::AcquireError>>
            + 'a,
    >,
>;

fn enqueue_tokio<'a>(
    sem: &'a tokio::sync::Semaphore,
    queue: &mut VecDeque<Acquire<'a>>,
    cx: &mut Context<'_>,
) {
    let mut waiter: Acquire<'a> = Box::pin(sem.acquire());
    assert!(waiter.as_mut().poll(cx).is_pending());
    queue.push_back(waiter);
}

/// `with_buffer`: each permit also carries a 64-byte heap buffer, allocated when the permit
/// is taken and freed when it is released: the pool's allocation built from a semaphore, as
/// a tokio user would build it (ours allocates its buffer in every iteration too).
fn tokio(queued: usize, iters: u64, with_buffer: bool) -> Duration {
    let sem = tokio::sync::Semaphore::new(1);
    let mut cx = Context::from_waker(noop_waker_ref());
    let buffer = || with_buffer.then(|| black_box(Vec::<u8>::with_capacity(64)));
    let mut held = (sem.try_acquire().unwrap(), buffer());
    let mut queue: VecDeque<Acquire<'_>> = VecDeque::with_capacity(queued + 1);
    for _ in 0..queued {
        enqueue_tokio(&sem, &mut queue, &mut cx);
    }

    let start = Instant::now();
    for _ in 0..iters {
        // The buffer is freed before the permit goes back, as ours frees before it releases.
        drop(held.1);
        drop(held.0);
        let mut head = queue.pop_front().unwrap();
        held = match head.as_mut().poll(&mut cx) {
            Poll::Ready(permit) => (permit.unwrap(), buffer()),
            Poll::Pending => panic!("the release did not serve the head"),
        };
        drop(head);
        enqueue_tokio(&sem, &mut queue, &mut cx);
    }
    let elapsed = start.elapsed();
    black_box(&held);
    drop(held);
    drop(queue);
    elapsed
}

fn waiters(c: &mut Criterion) {
    let mut group = c.benchmark_group("waiters");
    for queued in QUEUE_LENGTHS {
        group.bench_function(BenchmarkId::new("ours/release_to_head", queued), |b| {
            b.iter_custom(|iters| ours(queued, iters, true, false));
        });
        group.bench_function(
            BenchmarkId::new("ours_recycling/release_to_head", queued),
            |b| {
                b.iter_custom(|iters| ours(queued, iters, true, true));
            },
        );
        group.bench_function(
            BenchmarkId::new("ours_untimed/release_to_head", queued),
            |b| {
                b.iter_custom(|iters| ours(queued, iters, false, false));
            },
        );
        group.bench_function(BenchmarkId::new("tokio/release_to_head", queued), |b| {
            b.iter_custom(|iters| tokio(queued, iters, false));
        });
        group.bench_function(
            BenchmarkId::new("tokio+buffer/release_to_head", queued),
            |b| {
                b.iter_custom(|iters| tokio(queued, iters, true));
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = waiters
}
criterion_main!(benches);
