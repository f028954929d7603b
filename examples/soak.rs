//! A soak harness: chaotic mixed load on fresh pools, checked continuously.
//!
//! ```text
//! cargo run --release --example soak -- --secs 30
//! ```
//!
//! Each epoch builds a fresh pool with a random buffer size and budget, then lets tokio tasks
//! and blocking threads hammer it with random sizes through every call form (async, blocking,
//! timeout, try, zeroed), random cancellations (`tokio::time::timeout`, `select!`, dropping a
//! future after one poll) and random resizes, and ends with `close()` and `drained()`.
//! Throughout it checks that the bytes of live allocations never exceed the budget and that
//! no wait outlasts a watchdog bound; at the end of every epoch, that nothing is in use or
//! waiting. It prints the operation counts, the waits and the longest one.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::Poll;
use std::time::{Duration, Instant};

use membudget::{AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize};

/// No single wait may take longer than this; a longer one is reported as a hang.
const WAIT_BOUND: Duration = Duration::from_secs(10);
const EPOCH: Duration = Duration::from_secs(2);
const TASKS: usize = 24;
const THREADS: usize = 4;

#[derive(Default)]
struct Counters {
    allocations: AtomicU64,
    waits: AtomicU64,
    would_block: AtomicU64,
    timed_out: AtomicU64,
    cancelled: AtomicU64,
    closed: AtomicU64,
    exceeded: AtomicU64,
    resizes: AtomicU64,
    epochs: AtomicU64,
    max_wait_micros: AtomicU64,
}

/// What one epoch's workers share: the pool, the live bytes they hold, and the largest budget
/// set during the epoch (a shrink applies to live memory only as it comes back).
struct Epoch {
    pool: BufPool,
    live_bytes: AtomicUsize,
    ceiling: AtomicUsize,
    buffer_size: usize,
    max_buffers: usize,
}

/// An allocation whose bytes are counted in `Epoch::live_bytes` while it lives.
struct Held<'a> {
    allocation: Option<BufPoolAllocation>,
    epoch: &'a Epoch,
}

impl<'a> Held<'a> {
    fn new(epoch: &'a Epoch, allocation: BufPoolAllocation) -> Self {
        let bytes = allocation.allocated_bytes();
        let live = epoch.live_bytes.fetch_add(bytes, Relaxed) + bytes;
        let ceiling = epoch.ceiling.load(Relaxed);
        if live > ceiling {
            fail(&format!(
                "budget exceeded: {live} live bytes, budget at most {ceiling}"
            ));
        }
        // Touch the memory: first and last byte of every buffer.
        let mut allocation = allocation;
        for buffer in allocation.buffers_uninit_mut() {
            let last = buffer.len() - 1;
            buffer[0].write(0xA5);
            buffer[last].write(0x5A);
        }
        Held {
            allocation: Some(allocation),
            epoch,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(allocation) = self.allocation.take() {
            self.epoch
                .live_bytes
                .fetch_sub(allocation.allocated_bytes(), Relaxed);
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("soak: FAILED: {message}");
    std::process::exit(1);
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn record(counters: &Counters, result: &Result<BufPoolAllocation, AllocError>, waited: Duration) {
    if waited > WAIT_BOUND {
        fail(&format!(
            "a wait took {waited:?}, above the bound {WAIT_BOUND:?}"
        ));
    }
    counters
        .max_wait_micros
        .fetch_max(waited.as_micros() as u64, Relaxed);
    let counter = match result {
        Ok(_) => &counters.allocations,
        Err(AllocError::WouldBlock) => &counters.would_block,
        Err(AllocError::TimedOut) => &counters.timed_out,
        Err(AllocError::Closed) => &counters.closed,
        Err(AllocError::ExceedsBudget { .. }) => &counters.exceeded,
        Err(error) => fail(&format!("unexpected error {error:?}")),
    };
    counter.fetch_add(1, Relaxed);
}

async fn task_worker(epoch: Arc<Epoch>, counters: Arc<Counters>, seed: u64) {
    let mut rng = Rng(seed | 1);
    loop {
        let n = 1 + rng.below(epoch.max_buffers);
        let since = Instant::now();
        let result = match rng.below(6) {
            0 => match tokio::time::timeout(
                Duration::from_micros(rng.below(500) as u64),
                epoch.pool.allocate(n),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => {
                    counters.cancelled.fetch_add(1, Relaxed);
                    continue;
                }
            },
            1 => {
                tokio::select! {
                    result = epoch.pool.allocate_zeroed(n) => result,
                    _ = tokio::time::sleep(Duration::from_micros(rng.below(300) as u64)) => {
                        counters.cancelled.fetch_add(1, Relaxed);
                        continue;
                    }
                }
            }
            2 => {
                // Polled once, then dropped: queued and cancelled, or served at once.
                let mut allocate = pin!(epoch.pool.allocate(n));
                match futures::poll!(allocate.as_mut()) {
                    Poll::Ready(result) => result,
                    Poll::Pending => {
                        counters.cancelled.fetch_add(1, Relaxed);
                        continue;
                    }
                }
            }
            3 => epoch.pool.try_allocate(n),
            _ => epoch.pool.allocate(n).await,
        };
        let waited = since.elapsed();
        if waited > Duration::from_micros(50) {
            counters.waits.fetch_add(1, Relaxed);
        }
        record(&counters, &result, waited);
        match result {
            Ok(allocation) => {
                let held = Held::new(&epoch, allocation);
                for _ in 0..rng.below(3) {
                    tokio::task::yield_now().await;
                }
                drop(held);
            }
            Err(AllocError::Closed) => return,
            Err(_) => tokio::task::yield_now().await,
        }
    }
}

fn thread_worker(epoch: &Epoch, counters: &Counters, seed: u64) {
    let mut rng = Rng(seed | 1);
    loop {
        let n = 1 + rng.below(epoch.max_buffers);
        let since = Instant::now();
        let result = match rng.below(4) {
            0 => epoch
                .pool
                .allocate_timeout(n, Duration::from_micros(rng.below(1000) as u64)),
            1 => epoch.pool.try_allocate(n),
            2 => epoch.pool.allocate_zeroed_blocking(n),
            _ => epoch.pool.allocate_blocking(n),
        };
        let waited = since.elapsed();
        if waited > Duration::from_micros(50) {
            counters.waits.fetch_add(1, Relaxed);
        }
        record(counters, &result, waited);
        match result {
            Ok(allocation) => {
                let held = Held::new(epoch, allocation);
                for _ in 0..rng.below(3) {
                    std::thread::yield_now();
                }
                drop(held);
            }
            Err(AllocError::Closed) => return,
            Err(_) => std::thread::yield_now(),
        }
    }
}

fn parse_secs() -> u64 {
    let mut args = std::env::args().skip(1);
    let mut secs = 30;
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next().map(|value| value.parse())) {
            ("--secs", Some(Ok(value))) => secs = value,
            _ => {
                eprintln!("usage: soak [--secs N]");
                std::process::exit(2);
            }
        }
    }
    secs
}

fn main() {
    let secs = parse_secs();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let counters = Arc::new(Counters::default());
    let progress = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));

    // The watchdog: progress must move, or the process fails instead of hanging CI.
    let watchdog = {
        let counters = counters.clone();
        let progress = progress.clone();
        let finished = finished.clone();
        std::thread::spawn(move || {
            let mut last = (u64::MAX, u64::MAX);
            let mut still_since = Instant::now();
            while !finished.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = (
                    counters.allocations.load(Relaxed) + counters.closed.load(Relaxed),
                    progress.load(Relaxed),
                );
                if now != last {
                    last = now;
                    still_since = Instant::now();
                } else if still_since.elapsed() > WAIT_BOUND {
                    fail(&format!("no progress for {WAIT_BOUND:?}: hang"));
                }
            }
        })
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let started = Instant::now();
    while Instant::now() < deadline {
        run_epoch(&runtime, &mut rng, &counters);
        progress.fetch_add(1, Relaxed);
        let epochs = counters.epochs.fetch_add(1, Relaxed) + 1;
        if epochs % 5 == 0 {
            println!(
                "{:6.1} s  {} epochs  {} allocations  {} cancelled  max wait {} us",
                started.elapsed().as_secs_f64(),
                epochs,
                counters.allocations.load(Relaxed),
                counters.cancelled.load(Relaxed),
                counters.max_wait_micros.load(Relaxed),
            );
        }
    }
    finished.store(true, Relaxed);
    watchdog.join().expect("watchdog");
    let c = &counters;
    println!("---");
    println!(
        "soak: passed in {:.1} s: {} epochs, {} allocations, {} waited, {} cancelled, \
         {} would block, {} timed out, {} exceeded the budget after a resize, {} closed, \
         {} resizes, max wait {} us; 0 bytes in use at the end of every epoch",
        started.elapsed().as_secs_f64(),
        c.epochs.load(Relaxed),
        c.allocations.load(Relaxed),
        c.waits.load(Relaxed),
        c.cancelled.load(Relaxed),
        c.would_block.load(Relaxed),
        c.timed_out.load(Relaxed),
        c.exceeded.load(Relaxed),
        c.closed.load(Relaxed),
        c.resizes.load(Relaxed),
        c.max_wait_micros.load(Relaxed),
    );
}

fn run_epoch(runtime: &tokio::runtime::Runtime, rng: &mut Rng, counters: &Arc<Counters>) {
    let buffer_size = BufferSize::ALL[rng.below(8)];
    let budget_buffers = 4 + rng.below(60);
    let max_memory = buffer_size.bytes() * budget_buffers;
    let resizing = rng.below(2) == 0;
    let epoch = Arc::new(Epoch {
        pool: BufPool::new(BufPoolCfg {
            buffer_size,
            max_memory,
        }),
        live_bytes: AtomicUsize::new(0),
        ceiling: AtomicUsize::new(max_memory),
        buffer_size: buffer_size.bytes(),
        max_buffers: budget_buffers,
    });

    let threads: Vec<_> = (0..THREADS)
        .map(|i| {
            let epoch = epoch.clone();
            let counters = counters.clone();
            let seed = rng.next() ^ i as u64;
            std::thread::spawn(move || thread_worker(&epoch, &counters, seed))
        })
        .collect();
    let seeds: Vec<u64> = (0..TASKS).map(|_| rng.next()).collect();
    let resize_seed = rng.next();
    runtime.block_on(async {
        let tasks: Vec<_> = seeds
            .into_iter()
            .map(|seed| tokio::spawn(task_worker(epoch.clone(), counters.clone(), seed)))
            .collect();
        let mut rng = Rng(resize_seed | 1);
        let until = Instant::now() + EPOCH;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if resizing {
                // Within [1, 2 x budget] buffers; the ceiling only ever rises in an epoch.
                let buffers = 1 + rng.below(2 * budget_buffers);
                let bytes = buffers * epoch.buffer_size;
                epoch.ceiling.fetch_max(bytes, Relaxed);
                epoch.pool.set_max_memory(bytes).expect("a valid budget");
                counters.resizes.fetch_add(1, Relaxed);
            }
        }
        epoch.pool.close();
        let drained = tokio::time::timeout(WAIT_BOUND, epoch.pool.drained()).await;
        if drained.is_err() {
            fail(&format!("drained() hung: {}", epoch.pool.stats()));
        }
        for task in tasks {
            tokio::time::timeout(WAIT_BOUND, task)
                .await
                .unwrap_or_else(|_| fail("a task did not stop after close()"))
                .expect("a task panicked");
        }
    });
    for thread in threads {
        thread.join().expect("a worker thread panicked");
    }
    let stats = epoch.pool.stats();
    if stats.in_use_bytes != 0 || stats.outstanding != 0 || stats.waiting != 0 {
        fail(&format!("epoch ended with {stats}"));
    }
    if epoch.live_bytes.load(Relaxed) != 0 {
        fail("live byte count not back to zero");
    }
}
