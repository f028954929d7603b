//! Reclaim cost: a waiter served by reclaim from a cache vs. the same waiter served by a plain
//! release (issue 21, "Cost").
//!
//! The budget holds one 64-byte buffer, and one allocation holds it. That allocation sits in
//! a `Slot` (a `Mutex<Option<BufPoolAllocation>>`) in both rows. One iteration:
//!
//! * `from_cache`: the slot is registered with the pool as a reclaimer (priority 0; its
//!   `estimate` is the slot's bytes, its `reclaim` takes the allocation out of the slot, drops
//!   it and returns a ready future). A boxed `allocate(1)` future is polled with a no-op waker
//!   until it is ready: its first poll finds the pool full, queues, starts a reclaim round
//!   (snapshot of the registrations, estimates, one `reclaim` call, the release), and looks
//!   at its request again when the round ends (so it is normally ready on that first poll).
//!   The allocation it gets is put back into the slot: the cache is refilled for the next
//!   iteration.
//! * `from_release`: no reclaimer is registered. A boxed `allocate(1)` future is polled once
//!   (pending: it queues), the bench takes the allocation out of the slot and drops it (the
//!   release grants the head), and the future is polled until ready. The allocation it gets
//!   is put back into the slot for the next iteration.
//!
//! Both rows pay the same box allocation, two slot lock/unlocks (take and put back), the
//! queueing and the grant; `from_cache` adds the round (and its two clock reads for
//! `reclaim_time`), `from_release` a second poll.
//!
//! Run: `cargo bench --bench reclaim`.

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use futures::task::noop_waker_ref;
use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, Reclaimer};

type BoxedAllocate<'a> = Pin<Box<dyn Future<Output = Result<BufPoolAllocation, AllocError>> + 'a>>;

/// Where the one allocation lives between iterations: the cache in `from_cache`.
#[derive(Default)]
struct Slot(Mutex<Option<BufPoolAllocation>>);

impl Slot {
    fn take(&self) -> Option<BufPoolAllocation> {
        self.0.lock().unwrap().take()
    }

    fn put(&self, allocation: BufPoolAllocation) {
        *self.0.lock().unwrap() = Some(allocation);
    }
}

impl Reclaimer for Slot {
    fn estimate(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, BufPoolAllocation::allocated_bytes)
    }

    fn reclaim(&self, _target: usize) -> Pin<Box<dyn Future<Output = usize> + Send>> {
        let freed = self.take().map_or(0, |a| a.allocated_bytes());
        Box::pin(std::future::ready(freed))
    }
}

fn pool() -> BufPool {
    BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 64,
    })
}

fn poll_until_ready(waiter: &mut BoxedAllocate<'_>, cx: &mut Context<'_>) -> BufPoolAllocation {
    loop {
        if let Poll::Ready(allocation) = waiter.as_mut().poll(cx) {
            return allocation.unwrap();
        }
    }
}

fn from_cache(iters: u64) -> Duration {
    let pool = pool();
    let slot = Arc::new(Slot::default());
    slot.put(pool.try_allocate(1).unwrap());
    let _handle = pool.register_reclaimer("cache", 0, slot.clone());
    let mut cx = Context::from_waker(noop_waker_ref());

    let start = Instant::now();
    for _ in 0..iters {
        let mut waiter: BoxedAllocate<'_> = Box::pin(pool.allocate(1));
        let allocation = poll_until_ready(&mut waiter, &mut cx);
        drop(waiter);
        slot.put(allocation);
    }
    let elapsed = start.elapsed();
    assert_eq!(pool.stats().reclaim_rounds as u64, iters);
    black_box(&slot);
    elapsed
}

fn from_release(iters: u64) -> Duration {
    let pool = pool();
    let slot = Slot::default();
    slot.put(pool.try_allocate(1).unwrap());
    let mut cx = Context::from_waker(noop_waker_ref());

    let start = Instant::now();
    for _ in 0..iters {
        let mut waiter: BoxedAllocate<'_> = Box::pin(pool.allocate(1));
        assert!(waiter.as_mut().poll(&mut cx).is_pending());
        drop(slot.take());
        let allocation = poll_until_ready(&mut waiter, &mut cx);
        drop(waiter);
        slot.put(allocation);
    }
    let elapsed = start.elapsed();
    black_box(&slot);
    elapsed
}

fn reclaim(c: &mut Criterion) {
    let mut group = c.benchmark_group("reclaim");
    group.bench_function("waiter/from_cache", |b| b.iter_custom(from_cache));
    group.bench_function("waiter/from_release", |b| b.iter_custom(from_release));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = reclaim
}
criterion_main!(benches);
