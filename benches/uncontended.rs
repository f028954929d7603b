//! Uncontended allocate + drop, one thread, a budget wide enough that nothing ever waits.
//!
//! One cycle = take `n` buffers of 64 bytes (`BufferSize::S64`) and give them back, for
//! n = 1, 16 and 1024, one criterion group per `n` so the medians line up:
//!
//! * `ours/*`: membudget's `try_allocate`, `allocate_blocking`, and `allocate().await` in a
//!   loop driven by `futures::executor::block_on` and by a tokio current-thread runtime.
//! * `frozen-core`: `frozen_core::bufpool::BufPool::allocate` 0.0.32 (the design we replace).
//! * `tokio/*`: a `tokio::sync::Semaphore` of `n`-buffer permits plus `std::alloc` of the same
//!   bytes (align 1, as frozen-core uses), `try_acquire_many` and `acquire_many().await`.
//! * `async-lock/try_acquire` (n = 1 only: it takes one permit at a time).
//! * `floor/*`: bare `std::alloc::alloc` + `dealloc` of the same bytes, align 1 (what the
//!   peers use) and align 16 (what membudget uses: `min(buffer_size, 16)`), and the align-16
//!   floor plus one atomic `fetch_add` and one `fetch_sub` on a shared counter: the least any
//!   design that keeps the budget in one shared word can cost.
//!
//! The rows above use each result where it lies ([`consume`]): they measure the pool's own
//! work. Real callers do not write that. They move the allocation out of its `Result` (with
//! `unwrap` or `?`) and hand it by reference to code the compiler does not inline, and moving
//! the three-word `BufPoolAllocation` out of the `Result` it was returned in costs a
//! store-forwarding stall that `consume` hides (issue 11 measured 29-30 ns against 17-22 ns
//! in place at n = 1). So each group also has rows **as users write it**, ours and tokio's
//! side by side, every one handing the allocation by reference to an `#[inline(never)]`
//! `use_it` that only `black_box`es its pointer:
//!
//! * `ours/try_allocate_unwrap`, `ours/allocate_blocking_unwrap`:
//!   `let a = pool.try_allocate(n).unwrap(); use_it(&a);` (and the same with
//!   `allocate_blocking`).
//! * `ours/try_allocate_question_mark`: an `#[inline(never)] fn step(..) -> Result<(),
//!   AllocError>` doing `let a = pool.try_allocate(n)?; use_it(&a); Ok(())`, called as
//!   `step(..).unwrap()`.
//! * `ours/allocate_await_in_async_fn_{block_on,tokio_ct}`: the same through
//!   `async fn step(..) { let a = pool.allocate(n).await?; use_it(&a); Ok(()) }`, awaited in a
//!   loop driven by `futures::executor::block_on` and by the tokio current-thread runtime.
//! * `tokio/try_acquire_many_unwrap`, `tokio/question_mark`,
//!   `tokio/acquire_many_await_in_async_fn_{block_on,tokio_ct}`: the same shapes on the
//!   semaphore, which is how a tokio user would write the pool: the permit (`unwrap` or `?`)
//!   plus `std::alloc` of the bytes in a small owning `TokioAlloc { permit, ptr, layout }`
//!   that deallocates on drop, handed to a non-inlined `use_it_tokio`.
//!
//! Run: `cargo bench --bench uncontended`.

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use membudget::{AllocError, BufPool, BufPoolAllocation};
use tokio::sync::{AcquireError, Semaphore, SemaphorePermit, TryAcquireError};

const BUF: usize = 64;
/// Wide enough for 16 allocations of the largest `n`: nothing ever waits.
const BUDGET: usize = BUF * 1024 * 16;
const SIZES: [usize; 3] = [1, 16, 1024];

/// Checks that `result` is `Ok`, uses the value where it lies, then drops it.
///
/// Neither `black_box(value)` nor `.unwrap()` here: both move the freshly built three-word
/// allocation into a new slot, and LLVM copies it with one 16-byte load from two 8-byte
/// stores, which stalls on store forwarding (measured: 10-12 ns, a third of the row). That
/// is the benchmark's cost, not the pool's: a caller works with its allocation in place.
#[inline(always)]
fn consume<T, E: std::fmt::Debug>(result: Result<T, E>) {
    match &result {
        Ok(value) => {
            black_box(value);
        }
        Err(error) => panic!("allocation failed: {error:?}"),
    }
    drop(result);
}

/// `std::alloc` + `dealloc` of `bytes` with `align`, as every peer row does it.
#[inline(always)]
fn alloc_dealloc(bytes: usize, align: usize) {
    let layout = Layout::from_size_align(bytes, align).expect("valid layout");
    // SAFETY: `bytes` is never zero here.
    let ptr = unsafe { alloc(layout) };
    if ptr.is_null() {
        handle_alloc_error(layout);
    }
    black_box(ptr);
    // SAFETY: allocated just above with the same layout.
    unsafe { dealloc(ptr, layout) };
}

/// What a caller does with its allocation, kept minimal and out of line: the allocation
/// arrives by reference, as it would in real code.
#[inline(never)]
fn use_it(allocation: &BufPoolAllocation) {
    black_box(allocation.first());
}

/// `?` through a function of the caller's own that the compiler does not inline.
#[inline(never)]
fn step(pool: &BufPool, n: usize) -> Result<(), AllocError> {
    let allocation = pool.try_allocate(n)?;
    use_it(&allocation);
    Ok(())
}

/// `allocate().await?` in an async fn of the caller's own.
async fn step_async(pool: &BufPool, n: usize) -> Result<(), AllocError> {
    let allocation = pool.allocate(n).await?;
    use_it(&allocation);
    Ok(())
}

/// A semaphore permit plus `std::alloc` bytes, freed on drop: how a tokio user would build
/// the pool's allocation.
struct TokioAlloc<'a> {
    /// Released after the bytes are freed (fields drop after `Drop::drop`), as ours does.
    #[allow(dead_code)]
    permit: SemaphorePermit<'a>,
    ptr: NonNull<u8>,
    layout: Layout,
}

impl<'a> TokioAlloc<'a> {
    #[inline]
    fn new(permit: SemaphorePermit<'a>, bytes: usize) -> Self {
        let layout = Layout::from_size_align(bytes, 1).expect("valid layout");
        // SAFETY: `bytes` is never zero here.
        let ptr = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            handle_alloc_error(layout)
        };
        TokioAlloc {
            permit,
            ptr,
            layout,
        }
    }
}

impl Drop for TokioAlloc<'_> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// [`use_it`] for the tokio rows.
#[inline(never)]
fn use_it_tokio(allocation: &TokioAlloc<'_>) {
    black_box(allocation.ptr);
}

/// [`step`] for the tokio rows.
#[inline(never)]
fn step_tokio(sem: &Semaphore, permits: u32, bytes: usize) -> Result<(), TryAcquireError> {
    let allocation = TokioAlloc::new(sem.try_acquire_many(permits)?, bytes);
    use_it_tokio(&allocation);
    Ok(())
}

/// [`step_async`] for the tokio rows.
async fn step_tokio_async(sem: &Semaphore, permits: u32, bytes: usize) -> Result<(), AcquireError> {
    let allocation = TokioAlloc::new(sem.acquire_many(permits).await?, bytes);
    use_it_tokio(&allocation);
    Ok(())
}

fn uncontended(c: &mut Criterion) {
    let ours = BufPool::new(membudget::BufPoolCfg {
        buffer_size: membudget::BufferSize::S64,
        max_memory: BUDGET,
    });
    let frozen = frozen_core::bufpool::BufPool::new(frozen_core::bufpool::BufPoolCfg {
        buffer_size: frozen_core::utils::BufferSize::S64,
        max_memory: BUDGET,
    });
    let tokio_sem = Semaphore::new(BUDGET / BUF);
    let async_lock_sem = async_lock::Semaphore::new(BUDGET / BUF);
    // What any design that counts the budget in one shared word pays at least: one atomic
    // read-modify-write to reserve and one to release.
    let shared_counter = AtomicUsize::new(0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");

    for n in SIZES {
        let mut group = c.benchmark_group(format!("uncontended/n={n}"));
        let permits = u32::try_from(n).expect("small n");

        group.bench_function(BenchmarkId::new("ours", "try_allocate"), |b| {
            b.iter(|| consume(ours.try_allocate(black_box(n))));
        });
        group.bench_function(BenchmarkId::new("ours", "allocate_blocking"), |b| {
            b.iter(|| consume(ours.allocate_blocking(black_box(n))));
        });
        group.bench_function(BenchmarkId::new("ours", "try_allocate_unwrap"), |b| {
            b.iter(|| {
                let allocation = ours.try_allocate(black_box(n)).unwrap();
                use_it(&allocation);
            });
        });
        group.bench_function(BenchmarkId::new("ours", "allocate_blocking_unwrap"), |b| {
            b.iter(|| {
                let allocation = ours.allocate_blocking(black_box(n)).unwrap();
                use_it(&allocation);
            });
        });
        group.bench_function(
            BenchmarkId::new("ours", "try_allocate_question_mark"),
            |b| {
                b.iter(|| step(&ours, black_box(n)).unwrap());
            },
        );
        group.bench_function(BenchmarkId::new("ours", "async_block_on"), |b| {
            b.iter_custom(|iters| {
                futures::executor::block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        consume(ours.allocate(black_box(n)).await);
                    }
                    start.elapsed()
                })
            });
        });
        group.bench_function(BenchmarkId::new("ours", "async_tokio_ct"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        consume(ours.allocate(black_box(n)).await);
                    }
                    start.elapsed()
                })
            });
        });
        group.bench_function(
            BenchmarkId::new("ours", "allocate_await_in_async_fn_block_on"),
            |b| {
                b.iter_custom(|iters| {
                    futures::executor::block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            step_async(&ours, black_box(n)).await.unwrap();
                        }
                        start.elapsed()
                    })
                });
            },
        );
        group.bench_function(
            BenchmarkId::new("ours", "allocate_await_in_async_fn_tokio_ct"),
            |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            step_async(&ours, black_box(n)).await.unwrap();
                        }
                        start.elapsed()
                    })
                });
            },
        );

        group.bench_function(BenchmarkId::new("frozen-core", "allocate"), |b| {
            b.iter(|| consume(Ok::<_, ()>(frozen.allocate(black_box(n)))));
        });

        group.bench_function(BenchmarkId::new("tokio", "try_acquire_many+alloc"), |b| {
            b.iter(|| {
                let permit = tokio_sem.try_acquire_many(black_box(permits)).unwrap();
                alloc_dealloc(black_box(n) * BUF, 1);
                drop(permit);
            });
        });
        group.bench_function(BenchmarkId::new("tokio", "acquire_many_block_on"), |b| {
            b.iter_custom(|iters| {
                futures::executor::block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let permit = tokio_sem.acquire_many(black_box(permits)).await.unwrap();
                        alloc_dealloc(black_box(n) * BUF, 1);
                        drop(permit);
                    }
                    start.elapsed()
                })
            });
        });
        group.bench_function(BenchmarkId::new("tokio", "acquire_many_tokio_ct"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let permit = tokio_sem.acquire_many(black_box(permits)).await.unwrap();
                        alloc_dealloc(black_box(n) * BUF, 1);
                        drop(permit);
                    }
                    start.elapsed()
                })
            });
        });
        group.bench_function(BenchmarkId::new("tokio", "try_acquire_many_unwrap"), |b| {
            b.iter(|| {
                let permit = tokio_sem.try_acquire_many(black_box(permits)).unwrap();
                let allocation = TokioAlloc::new(permit, black_box(n) * BUF);
                use_it_tokio(&allocation);
            });
        });
        group.bench_function(BenchmarkId::new("tokio", "question_mark"), |b| {
            b.iter(|| step_tokio(&tokio_sem, black_box(permits), black_box(n) * BUF).unwrap());
        });
        group.bench_function(
            BenchmarkId::new("tokio", "acquire_many_await_in_async_fn_block_on"),
            |b| {
                b.iter_custom(|iters| {
                    futures::executor::block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            step_tokio_async(&tokio_sem, black_box(permits), black_box(n) * BUF)
                                .await
                                .unwrap();
                        }
                        start.elapsed()
                    })
                });
            },
        );
        group.bench_function(
            BenchmarkId::new("tokio", "acquire_many_await_in_async_fn_tokio_ct"),
            |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            step_tokio_async(&tokio_sem, black_box(permits), black_box(n) * BUF)
                                .await
                                .unwrap();
                        }
                        start.elapsed()
                    })
                });
            },
        );

        if n == 1 {
            group.bench_function(BenchmarkId::new("async-lock", "try_acquire+alloc"), |b| {
                b.iter(|| {
                    let guard = async_lock_sem.try_acquire().unwrap();
                    alloc_dealloc(black_box(n) * BUF, 1);
                    drop(guard);
                });
            });
        }

        group.bench_function(BenchmarkId::new("floor", "alloc+dealloc_align1"), |b| {
            b.iter(|| alloc_dealloc(black_box(n) * BUF, 1));
        });
        group.bench_function(BenchmarkId::new("floor", "alloc+dealloc_align16"), |b| {
            b.iter(|| alloc_dealloc(black_box(n) * BUF, 16));
        });
        group.bench_function(BenchmarkId::new("floor", "alloc+dealloc+2_atomics"), |b| {
            b.iter(|| {
                let bytes = black_box(n) * BUF;
                shared_counter.fetch_add(bytes, Ordering::Acquire);
                alloc_dealloc(bytes, 16);
                shared_counter.fetch_sub(bytes, Ordering::Release);
            });
        });
        group.finish();
    }

    eprintln!(
        "size_of: membudget::BufPoolAllocation = {} bytes, frozen_core::bufpool::BufPoolAllocation = {} bytes",
        size_of::<BufPoolAllocation>(),
        size_of::<frozen_core::bufpool::BufPoolAllocation>(),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = uncontended
}
criterion_main!(benches);
