//! Tail latency (issue 22): the time from asking for budget to holding it, request by request,
//! under a mixed load, as percentiles beside tokio's.
//!
//! Throughput benches (`many_tasks`) report a mean; a service with a budget cares about the
//! slow requests too: the p99 and p99.9 of "I asked for a buffer, when could I use it". This
//! bench records every request's latency, from an `Instant::now()` taken just before the
//! request to `elapsed()` just after it returned (so the clock read, the queueing, the wake-up
//! and the scheduling delay until the waiter runs again are all in it), into a `Vec`
//! pre-allocated per task or thread (no locks or allocation in the timed part), and reports
//! p50, p90, p99, p99.9 and the maximum of each run.
//!
//! Scenarios, each on one tokio multi-thread runtime with 2 workers:
//!
//! * `tasks64_room8`: 64 tasks share a budget with room for 8 allocations of one 64-byte
//!   buffer. Each loops: ask (`allocate(1).await`), record, hold across one
//!   `tokio::task::yield_now().await`, drop. Most requests queue: the backpressure path.
//! * `mixed`: the same 64 tasks, plus 2 plain OS threads that loop on the blocking form
//!   (ask, record, hold across a ~1 µs spin, drop). Everyone starts together, and the threads
//!   stop when the first task is done, so every thread sample is taken under the full load
//!   (without that window the threads, free of the queue once the tasks end, add thousands
//!   of 70 ns samples while the runtime winds down). Reported for the tasks, the threads and
//!   both together (`all`). With 2 workers and 2 blocking threads on a 2-core machine the
//!   cores are oversubscribed, as in a real program that mixes them. For the threads it also
//!   prints their time on a CPU and their time runnable but waiting for one
//!   (`/proc/thread-self/schedstat`), which shows what a blocking wait costs in CPU.
//!
//! Both are closed loops: 64 requesters and room for 8, so a request mostly waits behind
//! the 56 others, and its latency is about 56 hand-offs (release, grant, wake, the waiter
//! running) plus the holders' work. The percentiles therefore scale with the cost of a
//! hand-off and with how fairly the queue serves (both sides are FIFO), and everything the
//! OS does to the threads (a preempted worker, a 4 ms scheduler tick) lands in the tail.
//!
//! Each runs for ours (`BufPool` with 64-byte buffers and `max_memory` = 8 × 64: `allocate(1)`,
//! `allocate_blocking(1)`) and for tokio (`tokio::sync::Semaphore::new(8)`: `acquire().await`,
//! plus a 64-byte `std::alloc` buffer per permit, `Box::<[u8; 64]>::new_uninit()`, because
//! ours allocates and frees its buffer in every request; the buffer is dropped before the
//! permit). A tokio user's blocking thread has no blocking `acquire`, so it drives the future
//! with `futures::executor::block_on(sem.acquire())`, as the `handoff` and `contention`
//! benches do (tokio's own `Handle::block_on` parks the thread too). Ours and tokio run in the
//! same process, alternating, and the order flips every round (ours first in even rounds,
//! tokio first in odd) so a drift in the machine's load does not favour one side. A short
//! warm-up of each runs first and is not recorded.
//!
//! Output: per run, the percentiles in ns, with the CPU time other processes used during the
//! run and the VM's steal time (`/proc/stat`; on a shared machine, a run where these are
//! large was disturbed); then per scenario and series, the median over the runs of each
//! percentile with its spread (min-max), and ours ÷ tokio for p99 per round. The
//! raw per-run figures go to `$CARGO_TARGET_DIR/latency/results.json` (`target/latency/...`
//! when unset, relative to the package root, where cargo runs benches);
//! `python3 scripts/latency_plot.py` draws `docs/latency.svg` from it.
//!
//! Knobs (environment):
//!
//! * `LATENCY_ROUNDS`: rounds (each runs every scenario once for ours and once for tokio);
//!   default 3.
//! * `LATENCY_REQUESTS`: the tasks' requests per run, split evenly over the 64 tasks; default
//!   640,000 (10,000 per task: 640 samples above the p99.9). The blocking threads add theirs.
//! * `LATENCY_WATCHDOG_SECS`: the whole bench aborts with a message after this long; default
//!   120. It never hangs.
//! * `LATENCY_SCHED=1`: each blocking request also reads its thread's run-queue time
//!   (`/proc/thread-self/schedstat`, about a microsecond per read, for ours and tokio
//!   alike), and the `threads` line says how much of the time of the requests at or above the
//!   p99.9 was spent runnable but waiting for a CPU (docs/latency.md, stop 34: nearly all of
//!   it, for ours).
//! * `LATENCY_DIAG=1`: diagnostic runs after ours and tokio in every round (see
//!   docs/latency.md for what they showed): `ours_untimed`, ours with `time_waits(false)` (no
//!   clock reads for the wait statistics), in both scenarios; and in `mixed`, `ours_fbo`, ours
//!   with the blocking threads on `futures::executor::block_on(pool.allocate(1))` instead of
//!   `allocate_blocking(1)` (the same queue without our blocking shim's spin-then-park).
//!
//! `-- --quick` runs one round of a tenth of the requests (a smoke test).
//!
//! Run: `cargo bench --bench latency` (about 6 s on 2 quiet cores, 8 s with `LATENCY_DIAG=1`).

use std::future::Future;
use std::hint::{black_box, spin_loop};
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use membudget::{BufPool, BufPoolAllocation, BufPoolCfg, BufferSize};
use tokio::sync::{Semaphore, SemaphorePermit};

const TASKS: usize = 64;
const ROOM: usize = 8;
const BUF: usize = 64;
const WORKERS: usize = 2;
const THREADS: usize = 2;
/// How long a blocking thread holds what it got: a little work.
const THREAD_HOLD: Duration = Duration::from_micros(1);

const PERCENTILES: [(&str, f64); 4] =
    [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999)];

/// One side of the comparison: a budget with room for `ROOM` one-buffer requests.
trait Budget: Send + Sync + 'static {
    const PEER: &'static str;
    type Held<'a>: Send
    where
        Self: 'a;
    fn new() -> Self;
    fn acquire(&self) -> impl Future<Output = Self::Held<'_>> + Send;
    fn acquire_blocking(&self) -> Self::Held<'_>;
}

struct Ours(BufPool);

impl Budget for Ours {
    const PEER: &'static str = "ours";
    type Held<'a> = BufPoolAllocation;

    fn new() -> Self {
        Ours(BufPool::new(BufPoolCfg {
            buffer_size: BufferSize::S64,
            max_memory: ROOM * BUF,
        }))
    }

    async fn acquire(&self) -> BufPoolAllocation {
        self.0.allocate(1).await.unwrap()
    }

    fn acquire_blocking(&self) -> BufPoolAllocation {
        self.0.allocate_blocking(1).unwrap()
    }
}

/// Ours again, with the blocking threads driving `allocate(1)` through
/// `futures::executor::block_on` instead of `allocate_blocking(1)`: a diagnostic
/// (`LATENCY_DIAG=1`) that separates our blocking shim (spin, then park) from the queue.
struct OursFuturesBlockOn(Ours);

impl Budget for OursFuturesBlockOn {
    const PEER: &'static str = "ours_fbo";
    type Held<'a> = BufPoolAllocation;

    fn new() -> Self {
        OursFuturesBlockOn(Ours::new())
    }

    fn acquire(&self) -> impl Future<Output = BufPoolAllocation> + Send {
        self.0.acquire()
    }

    fn acquire_blocking(&self) -> BufPoolAllocation {
        futures::executor::block_on(self.0.0.allocate(1)).unwrap()
    }
}

/// Ours with `time_waits(false)`: no clock reads for the wait statistics (a diagnostic,
/// `LATENCY_DIAG=1`).
struct OursUntimed(Ours);

impl Budget for OursUntimed {
    const PEER: &'static str = "ours_untimed";
    type Held<'a> = BufPoolAllocation;

    fn new() -> Self {
        let cfg = BufPoolCfg {
            buffer_size: BufferSize::S64,
            max_memory: ROOM * BUF,
        };
        let pool = BufPool::builder(cfg).time_waits(false).build();
        OursUntimed(Ours(pool.expect("valid configuration")))
    }

    fn acquire(&self) -> impl Future<Output = BufPoolAllocation> + Send {
        self.0.acquire()
    }

    fn acquire_blocking(&self) -> BufPoolAllocation {
        self.0.acquire_blocking()
    }
}

struct Tokio(Semaphore);

/// A permit and the buffer a tokio user allocates with it. Fields drop in order: the buffer
/// is freed before the permit goes back, as ours frees its buffer before returning its bytes.
struct TokioHeld<'a> {
    _buffer: Box<MaybeUninit<[u8; BUF]>>,
    _permit: SemaphorePermit<'a>,
}

impl Budget for Tokio {
    const PEER: &'static str = "tokio";
    type Held<'a> = TokioHeld<'a>;

    fn new() -> Self {
        Tokio(Semaphore::new(ROOM))
    }

    async fn acquire(&self) -> TokioHeld<'_> {
        let permit = self.0.acquire().await.unwrap();
        TokioHeld {
            _buffer: black_box(Box::new_uninit()),
            _permit: permit,
        }
    }

    fn acquire_blocking(&self) -> TokioHeld<'_> {
        let permit = futures::executor::block_on(self.0.acquire()).unwrap();
        TokioHeld {
            _buffer: black_box(Box::new_uninit()),
            _permit: permit,
        }
    }
}

fn nanos(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

/// The measured window: every task and blocking thread waits at the start until all of them
/// are running (so no one starts alone, and a thread the OS is slow to schedule does not miss
/// the run), and the blocking threads stop when the first task is done (so their samples all
/// come from under the full load, not from the idle pool after the tasks are gone).
struct Window {
    ready: AtomicUsize,
    parties: usize,
    over: AtomicBool,
}

impl Window {
    fn all_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) >= self.parties || self.over.load(Ordering::Relaxed)
    }
}

async fn task_loop<B: Budget>(budget: Arc<B>, window: Arc<Window>, requests: usize) -> Vec<u64> {
    let mut latencies = Vec::with_capacity(requests);
    // Sets `over` when the loop ends, and if the task panics.
    let _over = StopOnDrop(&window.over);
    window.ready.fetch_add(1, Ordering::Relaxed);
    while !window.all_ready() {
        tokio::task::yield_now().await;
    }
    for _ in 0..requests {
        let asked = Instant::now();
        let held = budget.acquire().await;
        latencies.push(nanos(asked.elapsed()));
        tokio::task::yield_now().await;
        drop(black_box(held));
    }
    latencies
}

/// This thread's time on a CPU and waiting in the run queue so far, in ns
/// (`/proc/thread-self/schedstat`; `None` where there is none).
fn sched_stat() -> Option<[u64; 2]> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    Some([fields.next()?.ok()?, fields.next()?.ok()?])
}

/// This thread's `/proc/thread-self/schedstat`, kept open and read again per request
/// (`LATENCY_SCHED=1`): a read costs about a microsecond, against 2-4 to open it anew.
struct SchedFile {
    file: std::fs::File,
    text: String,
}

impl SchedFile {
    fn open() -> Option<SchedFile> {
        let file = std::fs::File::open("/proc/thread-self/schedstat").ok()?;
        Some(SchedFile {
            file,
            text: String::new(),
        })
    }

    /// The time this thread spent runnable but waiting for a CPU so far, ns.
    fn run_queue_ns(&mut self) -> u64 {
        use std::io::{Read, Seek};
        self.text.clear();
        let read = self
            .file
            .rewind()
            .and_then(|()| self.file.read_to_string(&mut self.text));
        read.ok()
            .and_then(|_| self.text.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }
}

/// One blocking thread's run: its latencies, its CPU and run-queue time over the whole run,
/// and with `per_request_sched` each request's run-queue time (same order as the latencies).
struct ThreadRun {
    latencies: Vec<u64>,
    sched: Option<[u64; 2]>,
    run_queue: Option<Vec<u64>>,
}

fn thread_loop<B: Budget>(
    budget: &B,
    window: &Window,
    capacity: usize,
    per_request_sched: bool,
) -> ThreadRun {
    let mut latencies = Vec::with_capacity(capacity);
    let mut sched_file = per_request_sched.then(SchedFile::open).flatten();
    let mut run_queue = sched_file.as_ref().map(|_| Vec::with_capacity(capacity));
    window.ready.fetch_add(1, Ordering::Relaxed);
    while !window.all_ready() {
        std::thread::yield_now();
    }
    let sched_before = sched_stat();
    while !window.over.load(Ordering::Relaxed) {
        let queued_before = sched_file.as_mut().map(SchedFile::run_queue_ns);
        let asked = Instant::now();
        let held = budget.acquire_blocking();
        latencies.push(nanos(asked.elapsed()));
        if let (Some(file), Some(before), Some(run_queue)) =
            (sched_file.as_mut(), queued_before, run_queue.as_mut())
        {
            run_queue.push(file.run_queue_ns().saturating_sub(before));
        }
        let until = Instant::now() + THREAD_HOLD;
        while Instant::now() < until {
            spin_loop();
        }
        drop(black_box(held));
    }
    let sched = sched_before
        .zip(sched_stat())
        .map(|(before, after)| [after[0] - before[0], after[1] - before[1]]);
    ThreadRun {
        latencies,
        sched,
        run_queue,
    }
}

/// Sets the flag when dropped (panicking or not).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Tasks,
    Mixed,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Tasks => "tasks64_room8",
            Scenario::Mixed => "mixed",
        }
    }

    fn threads(self) -> usize {
        match self {
            Scenario::Tasks => 0,
            Scenario::Mixed => THREADS,
        }
    }
}

/// The latencies of one run, by who asked.
struct Samples {
    tasks: Vec<u64>,
    threads: Vec<u64>,
    /// The blocking threads' summed time on a CPU and in the run queue while recording, ns.
    thread_sched: Option<[u64; 2]>,
    /// With `LATENCY_SCHED=1`: each thread request's run-queue time, in the order of
    /// `threads`.
    thread_run_queue: Option<Vec<u64>>,
    /// Other processes' CPU time and the steal time during the run, ms.
    others: Option<[u64; 2]>,
    elapsed: Duration,
}

/// The machine's busy CPU time (user, nice, system, irq, softirq), its steal time (a VM's
/// vCPUs waiting for the host), and this process's CPU time, in ms (`/proc/stat` and
/// `/proc/self/stat`, counted in Linux's USER_HZ of 100 per second); `None` where there are
/// none.
fn cpu_times() -> Option<[u64; 3]> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let machine: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mine: Vec<u64> = me
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let busy = machine[0] + machine[1] + machine[2] + machine.get(5)? + machine.get(6)?;
    Some([busy, *machine.get(7)?, mine[0] + mine[1]].map(|ticks| ticks * 10))
}

/// What the rest of the machine did during a run, in ms: the CPU time other processes used
/// (the machine's busy time minus ours), and the steal time.
fn others_during(before: Option<[u64; 3]>, after: Option<[u64; 3]>) -> Option<[u64; 2]> {
    let ([busy0, steal0, mine0], [busy1, steal1, mine1]) = (before?, after?);
    Some([
        (busy1 - busy0).saturating_sub(mine1 - mine0),
        steal1 - steal0,
    ])
}

fn run<B: Budget>(
    rt: &tokio::runtime::Runtime,
    scenario: Scenario,
    per_task: usize,
    per_request_sched: bool,
) -> Samples {
    let cpu_before = cpu_times();
    let budget = Arc::new(B::new());
    let window = Arc::new(Window {
        ready: AtomicUsize::new(0),
        parties: TASKS + scenario.threads(),
        over: AtomicBool::new(false),
    });
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..scenario.threads())
            .map(|_| {
                let (budget, window) = (&*budget, &*window);
                scope
                    .spawn(move || thread_loop(budget, window, per_task * TASKS, per_request_sched))
            })
            .collect();
        // The threads stop even if spawning or joining the tasks panics.
        let stopper = StopOnDrop(&window.over);
        let started = Instant::now();
        let per_task_latencies = rt.block_on(async {
            let handles: Vec<_> = (0..TASKS)
                .map(|_| {
                    let (budget, window) = (Arc::clone(&budget), Arc::clone(&window));
                    tokio::spawn(task_loop(budget, window, per_task))
                })
                .collect();
            let mut out = Vec::with_capacity(TASKS);
            for handle in handles {
                out.push(handle.await.expect("a task panicked"));
            }
            out
        });
        let elapsed = started.elapsed();
        drop(stopper);
        let mut latencies = Vec::new();
        let mut thread_sched = Some([0, 0]);
        let mut thread_run_queue = Some(Vec::new());
        for thread in threads {
            let one = thread.join().expect("a blocking thread panicked");
            latencies.extend(one.latencies);
            thread_sched = thread_sched
                .zip(one.sched)
                .map(|(sum, one)| [sum[0] + one[0], sum[1] + one[1]]);
            thread_run_queue = thread_run_queue.zip(one.run_queue).map(|(mut all, one)| {
                all.extend(one);
                all
            });
        }
        Samples {
            tasks: per_task_latencies.concat(),
            threads: latencies,
            thread_sched: thread_sched.filter(|_| scenario.threads() > 0),
            thread_run_queue: thread_run_queue
                .filter(|_| scenario.threads() > 0 && per_request_sched),
            others: others_during(cpu_before, cpu_times()),
            elapsed,
        }
    })
}

/// Percentiles of one series of one run, in ns.
struct Summary {
    count: usize,
    mean: f64,
    values: [u64; 4],
    max: u64,
}

impl Summary {
    fn of(mut samples: Vec<u64>) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len();
        // Nearest rank: the smallest sample with at least q of all samples at or below it.
        let rank = |q: f64| ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        let values = PERCENTILES.map(|(_, q)| samples[rank(q)]);
        let mean = samples.iter().map(|&ns| ns as f64).sum::<f64>() / n as f64;
        Some(Summary {
            count: n,
            mean,
            values,
            max: samples[n - 1],
        })
    }

    fn get(&self, key: &str) -> u64 {
        match PERCENTILES.iter().position(|(name, _)| *name == key) {
            Some(i) => self.values[i],
            None => self.max,
        }
    }
}

struct Record {
    scenario: &'static str,
    series: &'static str,
    peer: &'static str,
    round: usize,
    elapsed: Duration,
    summary: Summary,
    /// For the `threads` series: the blocking threads' summed time on a CPU and waiting in
    /// the run queue while they recorded, ns.
    sched: Option<[u64; 2]>,
    /// For the `threads` series with `LATENCY_SCHED=1`: how many requests were at or above
    /// the p99.9, and the share of their time spent runnable but waiting for a CPU.
    slowest: Option<(usize, f64)>,
    /// Other processes' CPU time and the steal time during the run, ms.
    others: Option<[u64; 2]>,
}

/// For the blocking threads' requests at or above the run's p99.9 (`LATENCY_SCHED=1`): how
/// many, and the share of their summed latency they spent runnable but waiting for a CPU
/// (after the queue had woken them, or before they could ask).
fn slowest_run_queue_share(latencies: &[u64], run_queue: &[u64]) -> Option<(usize, f64)> {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let p999 = *sorted.get(((0.999 * n as f64).ceil() as usize).clamp(1, n) - 1)?;
    let (count, latency, queued) = latencies
        .iter()
        .zip(run_queue)
        .filter(|&(&latency, _)| latency >= p999)
        .fold((0, 0u64, 0u64), |(count, latency, queued), (&l, &q)| {
            (count + 1, latency + l, queued + q.min(l))
        });
    (latency > 0).then(|| (count, queued as f64 / latency as f64))
}

fn record_run<B: Budget>(
    rt: &tokio::runtime::Runtime,
    scenario: Scenario,
    setup: &Setup,
    round: usize,
    records: &mut Vec<Record>,
) {
    let samples = run::<B>(rt, scenario, setup.per_task, setup.per_request_sched);
    let slowest = samples
        .thread_run_queue
        .as_deref()
        .and_then(|run_queue| slowest_run_queue_share(&samples.threads, run_queue));
    let mut series = vec![("tasks", samples.tasks.clone())];
    if scenario == Scenario::Mixed {
        let all = [samples.tasks.as_slice(), samples.threads.as_slice()].concat();
        series.push(("threads", samples.threads));
        series.push(("all", all));
    }
    for (name, latencies) in series {
        let Some(summary) = Summary::of(latencies) else {
            eprintln!(
                "latency: {} {} round {round}: no {name} samples",
                scenario.name(),
                B::PEER
            );
            continue;
        };
        let sched = samples.thread_sched.filter(|_| name == "threads");
        let others_note = samples
            .others
            .filter(|_| name == "tasks")
            .map_or(String::new(), |[cpu, steal]| {
                format!("  others: {cpu} ms CPU, steal {steal} ms")
            });
        let slowest = slowest.filter(|_| name == "threads");
        let sched_note = sched.map_or(others_note, |[cpu, queued]| {
            format!(
                "  threads: {:.0} ms on a CPU, {:.0} ms runnable but waiting for one{}",
                cpu as f64 / 1e6,
                queued as f64 / 1e6,
                slowest.map_or(String::new(), |(count, share)| format!(
                    "; the {count} at or above p99.9 spent {:.0} % of their time so",
                    share * 100.0
                ))
            )
        });
        println!(
            "{:<14} {:<8} {:<12} {:>5} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11} {:>9.0} {:>8.0}{}",
            scenario.name(),
            name,
            B::PEER,
            round,
            summary.values[0],
            summary.values[1],
            summary.values[2],
            summary.values[3],
            summary.max,
            summary.count,
            summary.mean,
            samples.elapsed.as_secs_f64() * 1e3,
            sched_note,
        );
        records.push(Record {
            scenario: scenario.name(),
            series: name,
            peer: B::PEER,
            round,
            elapsed: samples.elapsed,
            summary,
            sched,
            slowest,
            others: samples.others,
        });
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
        Err(_) => default,
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct Setup {
    rounds: usize,
    per_task: usize,
    /// `LATENCY_SCHED=1`: each blocking request also reads its thread's run-queue time.
    per_request_sched: bool,
}

fn write_json(setup: &Setup, records: &[Record]) -> std::io::Result<PathBuf> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    let dir = target.join("latency");
    std::fs::create_dir_all(&dir)?;
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let mut json = String::from("{\n");
    json += "  \"bench\": \"latency\",\n";
    json += &format!("  \"cpu\": {},\n", json_string(&cpu_model()));
    json += &format!("  \"unix_time\": {unix},\n");
    json += &format!(
        "  \"setup\": {{\"rounds\": {}, \"tasks\": {TASKS}, \"requests_per_task\": {}, \
         \"room\": {ROOM}, \"buffer_bytes\": {BUF}, \"workers\": {WORKERS}, \
         \"blocking_threads\": {THREADS}, \"tokio_blocking\": \"futures::executor::block_on\"}},\n",
        setup.rounds, setup.per_task
    );
    json += "  \"runs\": [\n";
    for (i, record) in records.iter().enumerate() {
        let s = &record.summary;
        json += &format!(
            "    {{\"scenario\": \"{}\", \"series\": \"{}\", \"peer\": \"{}\", \"round\": {}, \
             \"count\": {}, \"elapsed_ms\": {:.1}, \"mean\": {:.0}, \"p50\": {}, \"p90\": {}, \
             \"p99\": {}, \"p999\": {}, \"max\": {}{}{}{}}}{}\n",
            record.scenario,
            record.series,
            record.peer,
            record.round,
            s.count,
            record.elapsed.as_secs_f64() * 1e3,
            s.mean,
            s.values[0],
            s.values[1],
            s.values[2],
            s.values[3],
            s.max,
            record.sched.map_or(String::new(), |[cpu, queued]| format!(
                ", \"thread_cpu_ms\": {:.1}, \"thread_runq_ms\": {:.1}",
                cpu as f64 / 1e6,
                queued as f64 / 1e6
            )),
            record
                .slowest
                .map_or(String::new(), |(count, share)| format!(
                    ", \"slowest_count\": {count}, \"slowest_run_queue_share\": {share:.3}"
                )),
            record.others.map_or(String::new(), |[cpu, steal]| format!(
                ", \"others_cpu_ms\": {cpu}, \"steal_ms\": {steal}"
            )),
            if i + 1 < records.len() { "," } else { "" },
        );
    }
    json += "  ]\n}\n";
    let path = dir.join("results.json");
    let tmp = dir.join("results.json.tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2
    }
}

fn print_summary(records: &[Record]) {
    println!();
    println!("Median over runs [min-max], ns:");
    println!(
        "{:<14} {:<8} {:<12} {:>22} {:>22} {:>22} {:>22} {:>24}",
        "scenario", "series", "peer", "p50", "p90", "p99", "p99.9", "max"
    );
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for record in records {
        if !keys.contains(&(record.scenario, record.series)) {
            keys.push((record.scenario, record.series));
        }
    }
    for &(scenario, series) in &keys {
        for peer in [
            Ours::PEER,
            Tokio::PEER,
            OursUntimed::PEER,
            OursFuturesBlockOn::PEER,
        ] {
            let runs: Vec<&Record> = records
                .iter()
                .filter(|r| r.scenario == scenario && r.series == series && r.peer == peer)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let cells: Vec<String> = ["p50", "p90", "p99", "p999", "max"]
                .iter()
                .map(|key| {
                    let mut values: Vec<u64> = runs.iter().map(|r| r.summary.get(key)).collect();
                    let mid = median(&mut values);
                    format!("{mid} [{}-{}]", values[0], values[values.len() - 1])
                })
                .collect();
            println!(
                "{scenario:<14} {series:<8} {peer:<12} {:>22} {:>22} {:>22} {:>22} {:>24}",
                cells[0], cells[1], cells[2], cells[3], cells[4]
            );
        }
    }
    println!();
    println!(
        "p99 ours / tokio per round (target <= 1.0 in every run), and beside it the run's time \
         ours / tokio (the tasks' throughput, inverted):"
    );
    let rounds = records.iter().map(|r| r.round + 1).max().unwrap_or(0);
    for &(scenario, series) in &keys {
        let find = |peer: &str, round: usize| {
            records.iter().find(|r| {
                r.scenario == scenario && r.series == series && r.peer == peer && r.round == round
            })
        };
        let pairs: Vec<(f64, f64)> = (0..rounds)
            .filter_map(|round| {
                let (ours, tokio) = (find(Ours::PEER, round)?, find(Tokio::PEER, round)?);
                Some((
                    ours.summary.values[2] as f64 / tokio.summary.values[2] as f64,
                    ours.elapsed.as_secs_f64() / tokio.elapsed.as_secs_f64(),
                ))
            })
            .collect();
        let met = pairs.iter().all(|&(p99, _)| p99 <= 1.0);
        let p99s: Vec<String> = pairs.iter().map(|(p99, _)| format!("{p99:.2}")).collect();
        let times: Vec<String> = pairs.iter().map(|(_, time)| format!("{time:.2}")).collect();
        println!(
            "{scenario:<14} {series:<8} p99 {:<20} {:<8} run time {}",
            p99s.join(", "),
            if met { "met" } else { "NOT met" },
            times.join(", ")
        );
    }
}

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let diag = std::env::var_os("LATENCY_DIAG").is_some_and(|value| value != "0");
    let setup = Setup {
        rounds: if quick {
            1
        } else {
            env_usize("LATENCY_ROUNDS", 3).max(1)
        },
        per_task: (env_usize("LATENCY_REQUESTS", 640_000) / if quick { 10 } else { 1 } / TASKS)
            .max(1),
        per_request_sched: std::env::var_os("LATENCY_SCHED").is_some_and(|value| value != "0"),
    };
    let watchdog = Duration::from_secs(env_usize("LATENCY_WATCHDOG_SECS", 120) as u64);
    std::thread::spawn(move || {
        std::thread::sleep(watchdog);
        eprintln!(
            "latency: still running after {} s (LATENCY_WATCHDOG_SECS): a hang; aborting",
            watchdog.as_secs()
        );
        std::process::abort();
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let scenarios = [Scenario::Tasks, Scenario::Mixed];

    println!(
        "latency: {} rounds; per run {TASKS} tasks x {} requests, room for {ROOM} x {BUF} B, \
         {WORKERS} workers; mixed adds {THREADS} blocking threads; {}",
        setup.rounds,
        setup.per_task,
        cpu_model()
    );
    // Warm-up: the runtime's threads, the allocator, the code paths; not recorded.
    for scenario in scenarios {
        run::<Ours>(&rt, scenario, (setup.per_task / 10).max(1), false);
        run::<Tokio>(&rt, scenario, (setup.per_task / 10).max(1), false);
    }

    println!(
        "{:<14} {:<8} {:<12} {:>5} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11} {:>9} {:>8}",
        "scenario",
        "series",
        "peer",
        "round",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "count",
        "mean",
        "run ms"
    );
    let mut records = Vec::new();
    for round in 0..setup.rounds {
        for scenario in scenarios {
            if round % 2 == 0 {
                record_run::<Ours>(&rt, scenario, &setup, round, &mut records);
                record_run::<Tokio>(&rt, scenario, &setup, round, &mut records);
            } else {
                record_run::<Tokio>(&rt, scenario, &setup, round, &mut records);
                record_run::<Ours>(&rt, scenario, &setup, round, &mut records);
            }
            if diag {
                record_run::<OursUntimed>(&rt, scenario, &setup, round, &mut records);
            }
            if diag && scenario == Scenario::Mixed {
                record_run::<OursFuturesBlockOn>(&rt, scenario, &setup, round, &mut records);
            }
        }
    }
    print_summary(&records);
    match write_json(&setup, &records) {
        Ok(path) => println!("\nlatency: raw per-run percentiles in {}", path.display()),
        Err(err) => eprintln!("latency: could not write results.json: {err}"),
    }
}
