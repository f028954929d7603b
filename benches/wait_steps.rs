//! The map of one release → waiter cycle (issue 22, "Find where the nanoseconds go"): the
//! `waiters` bench's loop with each of its five steps in a function of its own, timed step by
//! step with the time-stamp counter, for ours and for tokio's `Semaphore` (bare, and with the
//! 64-byte buffer a tokio user allocates per permit), side by side in one process.
//!
//! The steps of one cycle, one waiter behind one 64-byte allocation on a budget of one buffer:
//!
//! 1. `make`: create the `allocate(1)` future (tokio: `acquire()`) and box it;
//! 2. `queue`: its first poll, which finds the budget taken and queues it;
//! 3. `release`: drop the held allocation (tokio: the buffer, then the permit), which grants
//!    the head and wakes it (a no-op waker);
//! 4. `take`: the waiter's second poll, which takes its grant (and its memory);
//! 5. `drop`: drop the finished future and its box.
//!
//! Each step is an `#[inline(never)]` function bracketed by `rdtscp`; an empty function timed
//! the same way (the probe, printed) is subtracted. Ticks become nanoseconds with the TSC's
//! rate measured against `Instant` over 200 ms. `ours` keeps the default wait timing (two
//! clock reads per wait), `ours_untimed` is `time_waits(false)`. Three rounds of 2 million
//! cycles each; x86_64 only (elsewhere it says so and exits).
//!
//! Instruction counts per step (the README's map) come from running this binary under
//! `valgrind --tool=callgrind` with `WAIT_STEPS_CYCLES` set, and reading the inclusive cost
//! of the `step_*` functions.
//!
//! Run: `cargo bench --bench wait_steps` (`WAIT_STEPS_CYCLES`, `WAIT_STEPS_ROUNDS`).

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use membudget::{Allocate, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize};

type Ours<'a> = Pin<Box<Allocate<'a>>>;
type Acquire<'a> = Pin<
    Box<
        dyn Future<Output = Result<tokio::sync::SemaphorePermit<'a>, tokio::sync::AcquireError>>
            + 'a,
    >,
>;
type Held<'a> = (tokio::sync::SemaphorePermit<'a>, Option<Vec<u8>>);

#[inline(never)]
fn step_make(pool: &BufPool) -> Ours<'_> {
    Box::pin(pool.allocate(1))
}

#[inline(never)]
fn step_queue(waiter: &mut Ours<'_>, cx: &mut Context<'_>) {
    assert!(
        waiter.as_mut().poll(cx).is_pending(),
        "the waiter did not queue"
    );
}

#[inline(never)]
fn step_release(held: BufPoolAllocation) {
    black_box(held.length());
    drop(held);
}

#[inline(never)]
fn step_take(waiter: &mut Ours<'_>, cx: &mut Context<'_>) -> BufPoolAllocation {
    match waiter.as_mut().poll(cx) {
        Poll::Ready(allocation) => allocation.unwrap(),
        Poll::Pending => panic!("the release did not serve the head"),
    }
}

#[inline(never)]
fn step_drop(waiter: Ours<'_>) {
    drop(waiter);
}

#[inline(never)]
fn tokio_make(sem: &tokio::sync::Semaphore) -> Acquire<'_> {
    Box::pin(sem.acquire())
}

#[inline(never)]
fn tokio_queue(waiter: &mut Acquire<'_>, cx: &mut Context<'_>) {
    assert!(
        waiter.as_mut().poll(cx).is_pending(),
        "the waiter did not queue"
    );
}

#[inline(never)]
fn tokio_release(held: Held<'_>) {
    // The buffer is freed before the permit goes back, as ours frees before it releases.
    drop(held.1);
    drop(held.0);
}

#[inline(never)]
fn tokio_take<'a>(waiter: &mut Acquire<'a>, cx: &mut Context<'_>, buffer: bool) -> Held<'a> {
    match waiter.as_mut().poll(cx) {
        Poll::Ready(permit) => (
            permit.unwrap(),
            buffer.then(|| black_box(Vec::<u8>::with_capacity(64))),
        ),
        Poll::Pending => panic!("the release did not serve the head"),
    }
}

#[inline(never)]
fn tokio_drop(waiter: Acquire<'_>) {
    drop(waiter);
}

#[inline(never)]
fn probe(x: u64) -> u64 {
    black_box(x)
}

/// Ticks per step, summed over the cycles: `[make, queue, release, take, drop, probe]`.
type Ticks = [u64; 6];

/// The time-stamp counter once every earlier instruction has executed (`rdtscp`; later ones
/// may start early, as in real code, so steps overlap as they do there: a fence on both sides,
/// `lfence; rdtsc`, serialises each step and adds 5-20 ns to each here).
/// Adds the ticks between consecutive stamps of one cycle to the sums of its steps.
#[inline(always)]
fn add_spans(sum: &mut Ticks, stamps: [u64; 7]) {
    for (slot, span) in sum.iter_mut().zip(stamps.windows(2)) {
        *slot += span[1] - span[0];
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn ticks() -> u64 {
    let mut aux = 0u32;
    // SAFETY: `rdtscp` exists on every x86_64 CPU of the last fifteen years (the bench is not
    // for older ones); it reads a counter and writes only `aux`, which is ours.
    unsafe { core::arch::x86_64::__rdtscp(&mut aux) }
}

#[cfg(not(target_arch = "x86_64"))]
fn ticks() -> u64 {
    0
}

fn ours(cycles: u64, time_waits: bool) -> Ticks {
    let pool = BufPool::builder(BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory: 64,
    })
    .time_waits(time_waits)
    .build()
    .unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let mut held = pool.try_allocate(1).unwrap();
    let mut sum = [0; 6];
    for _ in 0..cycles {
        let t0 = ticks();
        let mut waiter = step_make(&pool);
        let t1 = ticks();
        step_queue(&mut waiter, &mut cx);
        let t2 = ticks();
        step_release(held);
        let t3 = ticks();
        held = step_take(&mut waiter, &mut cx);
        let t4 = ticks();
        step_drop(waiter);
        let t5 = ticks();
        black_box(probe(t5));
        let t6 = ticks();
        add_spans(&mut sum, [t0, t1, t2, t3, t4, t5, t6]);
    }
    sum
}

fn tokio(cycles: u64, buffer: bool) -> Ticks {
    let sem = tokio::sync::Semaphore::new(1);
    let mut cx = Context::from_waker(Waker::noop());
    let mut held = (
        sem.try_acquire().unwrap(),
        buffer.then(|| black_box(Vec::<u8>::with_capacity(64))),
    );
    let mut sum = [0; 6];
    for _ in 0..cycles {
        let t0 = ticks();
        let mut waiter = tokio_make(&sem);
        let t1 = ticks();
        tokio_queue(&mut waiter, &mut cx);
        let t2 = ticks();
        tokio_release(held);
        let t3 = ticks();
        held = tokio_take(&mut waiter, &mut cx, buffer);
        let t4 = ticks();
        tokio_drop(waiter);
        let t5 = ticks();
        black_box(probe(t5));
        let t6 = ticks();
        add_spans(&mut sum, [t0, t1, t2, t3, t4, t5, t6]);
    }
    sum
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench` (and criterion-style filters): nothing to parse here.
    if !cfg!(target_arch = "x86_64") {
        println!("wait_steps: needs x86_64 (the time-stamp counter); skipped");
        return;
    }
    let cycles = env_or("WAIT_STEPS_CYCLES", 2_000_000).max(1);
    let rounds = env_or("WAIT_STEPS_ROUNDS", 3);
    let started = Instant::now();
    let first = ticks();
    std::thread::sleep(Duration::from_millis(200));
    let ns_per_tick = started.elapsed().as_nanos() as f64 / (ticks() - first).max(1) as f64;
    println!("wait_steps: ns per step, {cycles} cycles a run, the probe subtracted");
    println!(
        "{:<6} {:<13} {:>7} {:>7} {:>8} {:>7} {:>7} {:>7}",
        "round", "who", "make", "queue", "release", "take", "drop", "probe"
    );
    for round in 0..rounds {
        let rows: [(&str, Ticks); 4] = [
            ("ours", ours(cycles, true)),
            ("ours_untimed", ours(cycles, false)),
            ("tokio", tokio(cycles, false)),
            ("tokio+buffer", tokio(cycles, true)),
        ];
        for (who, sum) in rows {
            let per = sum.map(|ticks| ticks as f64 / cycles as f64 * ns_per_tick);
            let probe = per[5];
            let step = |i: usize| per[i] - probe;
            println!(
                "{round:<6} {who:<13} {:>7.1} {:>7.1} {:>8.1} {:>7.1} {:>7.1} {:>7.1}",
                step(0),
                step(1),
                step(2),
                step(3),
                step(4),
                probe
            );
        }
    }
}
