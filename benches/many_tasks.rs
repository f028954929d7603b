//! Many tasks: 1,000 tokio tasks on a 2-worker multi-thread runtime share a budget of 16
//! allocations of one 64-byte buffer; each task loops `K` = 100 times. Total throughput of the
//! 100,000 operations (criterion reports time per run and elements per second).
//!
//! * `allocate+drop`: each loop is `allocate(1).await` then drop (the program). With
//!   two workers at most two allocations are held at once, so this mostly measures the
//!   uncontended path under task scheduling.
//! * `hold_across_yield`: each loop holds its allocation across `tokio::task::yield_now()`,
//!   so all 16 slots are busy and most requests queue: the backpressure path.
//!
//! Each row runs ours (`BufPool::allocate`) against the same program on
//! `tokio::sync::Semaphore::new(16)` + `std::alloc` of the same bytes.
//!
//! Run: `cargo bench --bench many_tasks`.

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const TASKS: usize = 1_000;
const K: usize = 100;
const SLOTS: usize = 16;
const BUF: usize = 64;

#[derive(Clone, Copy)]
enum Shape {
    AllocateDrop,
    HoldAcrossYield,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::AllocateDrop => "allocate+drop",
            Shape::HoldAcrossYield => "hold_across_yield",
        }
    }
}

/// `std::alloc` bytes, freed on drop: the tokio rows' stand-in for an allocation.
struct RawBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: owns its memory exclusively, like a `Box<[u8]>`.
unsafe impl Send for RawBuf {}

impl RawBuf {
    #[inline]
    fn new(bytes: usize) -> Self {
        let layout = Layout::from_size_align(bytes, 1).expect("valid layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            handle_alloc_error(layout)
        };
        RawBuf { ptr, layout }
    }
}

impl Drop for RawBuf {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

async fn run_ours(pool: Arc<membudget::BufPool>, shape: Shape) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..K {
                    let allocation = pool.allocate(1).await.unwrap();
                    if let Shape::HoldAcrossYield = shape {
                        tokio::task::yield_now().await;
                    }
                    drop(black_box(allocation));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}

async fn run_tokio(sem: Arc<tokio::sync::Semaphore>, shape: Shape) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let sem = sem.clone();
            tokio::spawn(async move {
                for _ in 0..K {
                    let permit = sem.acquire().await.unwrap();
                    let buffer = RawBuf::new(BUF);
                    if let Shape::HoldAcrossYield = shape {
                        tokio::task::yield_now().await;
                    }
                    drop(black_box(buffer));
                    drop(permit);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}

fn many_tasks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("tokio runtime");
    let pool = Arc::new(membudget::BufPool::new(membudget::BufPoolCfg {
        buffer_size: membudget::BufferSize::S64,
        max_memory: BUF * SLOTS,
    }));
    let sem = Arc::new(tokio::sync::Semaphore::new(SLOTS));

    for shape in [Shape::AllocateDrop, Shape::HoldAcrossYield] {
        let mut group = c.benchmark_group(format!("many_tasks/{}", shape.name()));
        group.throughput(Throughput::Elements((TASKS * K) as u64));
        group.bench_function(BenchmarkId::new("ours", "allocate_await"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| rt.block_on(run_ours(pool.clone(), shape)))
                    .sum()
            });
        });
        group.bench_function(BenchmarkId::new("tokio", "semaphore_acquire"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| rt.block_on(run_tokio(sem.clone(), shape)))
                    .sum()
            });
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = many_tasks
}
criterion_main!(benches);
