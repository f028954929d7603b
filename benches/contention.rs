//! Contention: 2 and 4 threads, each doing 100,000 `allocate(8)` + drop of 64-byte buffers,
//! with a wide budget (nothing waits) and a tight one (exactly one allocation of 8 fits).
//!
//! Every criterion iteration is one whole run (spawn the threads, release them together, join
//! them), so criterion's times are per run; divide by `threads * 100,000` for per-operation
//! times, which the summary lines (`contention-summary`) on stderr print directly, together
//! with the spread across the 15 measured runs (median, min, max and max/median) that issue
//! 4 asks for: the tight budget must not collapse into the bimodal times tokio shows.
//!
//! Rows: `ours/blocking` (`allocate_blocking`), `ours/async_block_on` (`allocate().await`,
//! one `futures::executor::block_on` per thread), `frozen-core` (0.0.32 `allocate`),
//! `tokio` (`Semaphore::acquire_many(8).await` via `block_on` per thread, plus `std::alloc`),
//! and, wide budget only, `floor+atomic` (`std::alloc` plus one shared `fetch_add`/`fetch_sub`).
//!
//! frozen-core loses wake-ups (a `notify_one` without the Condvar's mutex): under the tight
//! budget a run can hang for good. A watchdog thread rescues such a run by taking and dropping
//! one buffer (its drop notifies again) once nothing has progressed for 200 ms, and the summary
//! counts the rescues.
//!
//! Run: `cargo bench --bench contention`.

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};

const BUF: usize = 64;
const N: usize = 8;
const OPS_PER_THREAD: usize = 100_000;
/// Runs per configuration after the one warm-up run; criterion's samples are these runs.
const RUNS: usize = 15;

#[derive(Clone, Copy, PartialEq)]
enum Budget {
    Wide,
    Tight,
}

impl Budget {
    fn allocations(self) -> usize {
        match self {
            Budget::Wide => 1024,
            Budget::Tight => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Budget::Wide => "wide",
            Budget::Tight => "tight",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    OursBlocking,
    OursAsync,
    Frozen,
    Tokio,
    FloorAtomic,
}

impl Variant {
    fn id(self) -> (&'static str, &'static str) {
        match self {
            Variant::OursBlocking => ("ours", "blocking"),
            Variant::OursAsync => ("ours", "async_block_on"),
            Variant::Frozen => ("frozen-core", "allocate"),
            Variant::Tokio => ("tokio", "acquire_many_block_on"),
            Variant::FloorAtomic => ("floor+atomic", "alloc"),
        }
    }
}

#[inline(always)]
fn alloc_dealloc(bytes: usize) {
    let layout = Layout::from_size_align(bytes, 1).expect("valid layout");
    // SAFETY: non-zero size.
    let ptr = unsafe { alloc(layout) };
    if ptr.is_null() {
        handle_alloc_error(layout);
    }
    black_box(ptr);
    // SAFETY: allocated just above with the same layout.
    unsafe { dealloc(ptr, layout) };
}

/// Spawns `threads` threads that each run `work` once after a common barrier. The run time is
/// from the first thread starting its work to the last one finishing it, as each thread reads
/// the clock itself (the spawning thread may not be scheduled when the workers start).
fn timed_run(threads: usize, work: impl Fn() + Sync) -> Duration {
    let barrier = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    work();
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("worker panicked"))
            .collect()
    });
    let first_start = spans.iter().map(|span| span.0).min().expect("threads > 0");
    let last_end = spans.iter().map(|span| span.1).max().expect("threads > 0");
    last_end - first_start
}

/// One run of `variant`: `threads` x `OPS_PER_THREAD` allocate(8) + drop. Returns the wall
/// time and how many times the frozen-core watchdog had to step in.
fn run_once(variant: Variant, budget: Budget, threads: usize) -> (Duration, usize) {
    let max_memory = BUF * N * budget.allocations();
    match variant {
        Variant::OursBlocking | Variant::OursAsync => {
            let pool = membudget::BufPool::new(membudget::BufPoolCfg {
                buffer_size: membudget::BufferSize::S64,
                max_memory,
            });
            let time = timed_run(threads, || {
                if variant == Variant::OursBlocking {
                    for _ in 0..OPS_PER_THREAD {
                        drop(black_box(pool.allocate_blocking(N).unwrap()));
                    }
                } else {
                    futures::executor::block_on(async {
                        for _ in 0..OPS_PER_THREAD {
                            drop(black_box(pool.allocate(N).await.unwrap()));
                        }
                    });
                }
            });
            (time, 0)
        }
        Variant::Frozen => {
            let pool = frozen_core::bufpool::BufPool::new(frozen_core::bufpool::BufPoolCfg {
                buffer_size: frozen_core::utils::BufferSize::S64,
                max_memory,
            });
            let progress = AtomicUsize::new(0);
            let done = AtomicBool::new(false);
            let rescues = AtomicUsize::new(0);
            let time = thread::scope(|s| {
                let watchdog = s.spawn(|| {
                    // The watchdog: a lost wake-up leaves a waiter asleep with the budget
                    // free; one more allocate + drop notifies it again.
                    let mut seen = progress.load(Ordering::Relaxed);
                    let mut idle = Duration::ZERO;
                    while !done.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(20));
                        let now = progress.load(Ordering::Relaxed);
                        if now == seen {
                            idle += Duration::from_millis(20);
                        } else {
                            (seen, idle) = (now, Duration::ZERO);
                        }
                        if idle >= Duration::from_millis(200) && !done.load(Ordering::Relaxed) {
                            drop(pool.allocate(1));
                            rescues.fetch_add(1, Ordering::Relaxed);
                            idle = Duration::ZERO;
                        }
                    }
                });
                let time = timed_run(threads, || {
                    for _ in 0..OPS_PER_THREAD / 1000 {
                        for _ in 0..1000 {
                            drop(black_box(pool.allocate(N)));
                        }
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                });
                done.store(true, Ordering::Relaxed);
                // The watchdog itself may sleep through a lost wake-up in `allocate(1)`.
                while !watchdog.is_finished() {
                    thread::sleep(Duration::from_millis(20));
                    if !watchdog.is_finished() {
                        drop(pool.allocate(1));
                    }
                }
                time
            });
            (time, rescues.into_inner())
        }
        Variant::Tokio => {
            let sem = tokio::sync::Semaphore::new(budget.allocations() * N);
            let time = timed_run(threads, || {
                futures::executor::block_on(async {
                    for _ in 0..OPS_PER_THREAD {
                        let permit = sem.acquire_many(N as u32).await.unwrap();
                        alloc_dealloc(BUF * N);
                        drop(permit);
                    }
                });
            });
            (time, 0)
        }
        Variant::FloorAtomic => {
            let in_use = AtomicUsize::new(0);
            let time = timed_run(threads, || {
                for _ in 0..OPS_PER_THREAD {
                    in_use.fetch_add(BUF * N, Ordering::AcqRel);
                    alloc_dealloc(BUF * N);
                    in_use.fetch_sub(BUF * N, Ordering::Release);
                }
            });
            (time, 0)
        }
    }
}

fn per_op_ns(run: Duration, threads: usize) -> f64 {
    run.as_secs_f64() * 1e9 / (threads * OPS_PER_THREAD) as f64
}

/// Prints median, min, max and max/median of the recorded runs, per operation.
fn print_spread(label: &str, threads: usize, runs: &[Duration], rescues: usize) {
    let mut ns: Vec<f64> = runs.iter().map(|&run| per_op_ns(run, threads)).collect();
    ns.sort_by(f64::total_cmp);
    let median = if ns.len() % 2 == 1 {
        ns[ns.len() / 2]
    } else {
        (ns[ns.len() / 2 - 1] + ns[ns.len() / 2]) / 2.0
    };
    let (min, max) = (ns[0], ns[ns.len() - 1]);
    eprintln!(
        "contention-summary {label}: runs={} per-op ns: median={median:.1} min={min:.1} \
         max={max:.1} max/median={:.2} (median run {:.2} ms){}",
        ns.len(),
        max / median,
        median * (threads * OPS_PER_THREAD) as f64 / 1e6,
        if rescues > 0 {
            format!(" frozen-core watchdog rescues={rescues}")
        } else {
            String::new()
        },
    );
}

fn contention(c: &mut Criterion) {
    for budget in [Budget::Wide, Budget::Tight] {
        for threads in [2, 4] {
            let mut group = c.benchmark_group(format!("contention/{}/{threads}t", budget.name()));
            group
                .sampling_mode(SamplingMode::Flat)
                .throughput(Throughput::Elements((threads * OPS_PER_THREAD) as u64));
            let mut variants = vec![
                Variant::OursBlocking,
                Variant::OursAsync,
                Variant::Frozen,
                Variant::Tokio,
            ];
            if budget == Budget::Wide {
                variants.push(Variant::FloorAtomic);
            }
            for variant in variants {
                let runs = Mutex::new(Vec::new());
                let rescues = AtomicUsize::new(0);
                let (who, what) = variant.id();
                group.bench_function(BenchmarkId::new(who, what), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let (run, rescued) = run_once(variant, budget, threads);
                            runs.lock().unwrap().push(run);
                            rescues.fetch_add(rescued, Ordering::Relaxed);
                            total += run;
                        }
                        total
                    });
                });
                let runs = runs.into_inner().unwrap();
                // Only when criterion really measured (not in `--test` mode, nor filtered
                // out); the first run is criterion's warm-up.
                if runs.len() > 2 {
                    let label = format!("{}/{threads}t/{who}/{what}", budget.name());
                    print_spread(&label, threads, &runs[1..], rescues.into_inner());
                }
            }
            group.finish();
        }
    }
}

// The tiny warm-up and measurement times are on purpose: criterion then does exactly one
// warm-up run and `RUNS` samples of one run each (and warns that it could not fit them in
// the time), so a tight-budget configuration that collapses costs 16 runs, not hundreds.
criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1))
        .sample_size(RUNS);
    targets = contention
}
criterion_main!(benches);
