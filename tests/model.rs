//! Issue 7, item 2: model-based tests. Random operation sequences on one thread (try,
//! zero-timeout, `allocate` futures polled once with a no-op waker and kept pending, polled
//! again or dropped later, drops of chosen live allocations, close, resize, stats) are checked
//! step by step against a small reference model of the budget and the FIFO queue.
//!
//! Under Miri the proptest part is left out (too slow); a few hand-written sequences run
//! through the same model instead (they also run natively).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use membudget::{
    AllocError, Allocate, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, ConfigError,
};

/// One step of a test sequence. Indices pick among the live items modulo their count.
#[derive(Clone, Debug)]
enum Op {
    /// `try_allocate(n)` or `try_allocate_zeroed(n)`.
    Try {
        n: usize,
        zeroed: bool,
    },
    /// `allocate_timeout(n, Duration::ZERO)`.
    TimeoutZero {
        n: usize,
    },
    /// Create an `allocate(n)` (or zeroed) future and poll it once.
    Start {
        n: usize,
        zeroed: bool,
    },
    /// Poll a pending future again.
    Poll {
        pick: usize,
    },
    /// Drop a pending future.
    DropFuture {
        pick: usize,
    },
    /// Drop a live allocation.
    DropAllocation {
        pick: usize,
    },
    Close,
    /// `set_max_memory(buffers * buffer_size + extra)`.
    SetMax {
        buffers: usize,
        extra: usize,
    },
    Stats,
}

/// What the model says about one pending future.
#[derive(Clone, Copy, Debug, PartialEq)]
enum FutureState {
    Waiting(usize),
    Granted(usize),
    Failed(AllocError),
}

/// The reference model: the budget and a FIFO queue of future ids.
#[derive(Debug)]
struct Model {
    buffer_size: usize,
    max_memory: usize,
    in_use: usize,
    closed: bool,
    queue: VecDeque<u64>,
}

impl Model {
    fn request(&self, n: usize) -> Result<usize, AllocError> {
        if n == 0 {
            return Err(AllocError::ZeroBuffers);
        }
        match n.checked_mul(self.buffer_size) {
            Some(bytes) if bytes <= self.max_memory => Ok(bytes),
            bytes => Err(AllocError::ExceedsBudget {
                requested_bytes: bytes.unwrap_or(usize::MAX),
                max_memory: self.max_memory,
            }),
        }
    }

    fn fits_now(&self, bytes: usize) -> bool {
        self.queue.is_empty() && bytes <= self.max_memory.saturating_sub(self.in_use)
    }

    /// Grants the queue head for as long as it fits.
    fn serve(&mut self, futures: &mut [(u64, FutureState)]) {
        while let Some(&id) = self.queue.front() {
            let state = &mut futures.iter_mut().find(|(fid, _)| *fid == id).unwrap().1;
            let FutureState::Waiting(bytes) = *state else {
                unreachable!("only waiting futures are queued")
            };
            if bytes > self.max_memory.saturating_sub(self.in_use) {
                break;
            }
            self.in_use += bytes;
            *state = FutureState::Granted(bytes);
            self.queue.pop_front();
        }
    }
}

/// The pool under test, the model, and the items alive on both sides, in matching order.
struct Harness<'p> {
    pool: &'p BufPool,
    model: Model,
    futures: Vec<(u64, Pin<Box<Allocate<'p>>>)>,
    model_futures: Vec<(u64, FutureState)>,
    allocations: Vec<BufPoolAllocation>,
    model_allocations: Vec<usize>,
    next_id: u64,
}

fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
}

impl<'p> Harness<'p> {
    fn new(pool: &'p BufPool, buffer_size: usize, max_memory: usize) -> Self {
        Harness {
            pool,
            model: Model {
                buffer_size,
                max_memory,
                in_use: 0,
                closed: false,
                queue: VecDeque::new(),
            },
            futures: Vec::new(),
            model_futures: Vec::new(),
            allocations: Vec::new(),
            model_allocations: Vec::new(),
            next_id: 0,
        }
    }

    /// Checks a completed allocation call against the model's expectation and keeps the
    /// allocation.
    fn took(
        &mut self,
        step: usize,
        op: &Op,
        got: Result<BufPoolAllocation, AllocError>,
        want: Result<usize, AllocError>,
        zeroed: bool,
    ) {
        match (got, want) {
            (Ok(allocation), Ok(bytes)) => {
                assert_eq!(allocation.allocated_bytes(), bytes, "step {step}: {op:?}");
                assert_eq!(
                    allocation.length(),
                    bytes / self.model.buffer_size,
                    "step {step}: {op:?}"
                );
                if zeroed {
                    // SAFETY: a zeroed allocation's bytes are initialised.
                    let block = unsafe { std::slice::from_raw_parts(allocation.first(), bytes) };
                    assert!(block.iter().all(|&b| b == 0), "step {step}: not zeroed");
                }
                // SAFETY: the block is `bytes` writable bytes owned by `allocation`.
                unsafe { allocation.first().write_bytes(0xA5, bytes) };
                self.allocations.push(allocation);
                self.model_allocations.push(bytes);
            }
            (Err(error), Err(expected)) => assert_eq!(error, expected, "step {step}: {op:?}"),
            (got, want) => {
                panic!("step {step}: {op:?}: pool gave {got:?}, model expected {want:?}")
            }
        }
    }

    fn step(&mut self, step: usize, op: &Op) {
        match *op {
            Op::Try { n, zeroed } => {
                let want = self.model.request(n).and_then(|bytes| {
                    if self.model.closed {
                        Err(AllocError::Closed)
                    } else if self.model.fits_now(bytes) {
                        Ok(bytes)
                    } else {
                        Err(AllocError::WouldBlock)
                    }
                });
                if let Ok(bytes) = want {
                    self.model.in_use += bytes;
                }
                let got = if zeroed {
                    self.pool.try_allocate_zeroed(n)
                } else {
                    self.pool.try_allocate(n)
                };
                self.took(step, op, got, want, zeroed);
            }
            Op::TimeoutZero { n } => {
                let want = self.model.request(n).and_then(|bytes| {
                    if self.model.closed {
                        Err(AllocError::Closed)
                    } else if self.model.fits_now(bytes) {
                        Ok(bytes)
                    } else {
                        Err(AllocError::TimedOut)
                    }
                });
                if let Ok(bytes) = want {
                    self.model.in_use += bytes;
                }
                let got = self.pool.allocate_timeout(n, Duration::ZERO);
                self.took(step, op, got, want, false);
            }
            Op::Start { n, zeroed } => {
                let mut future = Box::pin(if zeroed {
                    self.pool.allocate_zeroed(n)
                } else {
                    self.pool.allocate(n)
                });
                let want = self.model.request(n).and_then(|bytes| {
                    if self.model.closed {
                        Err(AllocError::Closed)
                    } else {
                        Ok(bytes)
                    }
                });
                match (poll_once(&mut future), want) {
                    (Poll::Pending, Ok(bytes)) if !self.model.fits_now(bytes) => {
                        let id = self.next_id;
                        self.next_id += 1;
                        self.model.queue.push_back(id);
                        self.futures.push((id, future));
                        self.model_futures.push((id, FutureState::Waiting(bytes)));
                    }
                    (Poll::Ready(got), want) => {
                        if let Ok(bytes) = want {
                            assert!(
                                self.model.fits_now(bytes),
                                "step {step}: {op:?} was ready, model says it waits"
                            );
                            self.model.in_use += bytes;
                        }
                        self.took(step, op, got, want, zeroed);
                    }
                    (Poll::Pending, want) => {
                        panic!("step {step}: {op:?} is pending, model expected {want:?} now")
                    }
                }
            }
            Op::Poll { pick } => {
                if self.futures.is_empty() {
                    return;
                }
                let i = pick % self.futures.len();
                let state = self.model_futures[i].1;
                match (poll_once(&mut self.futures[i].1), state) {
                    (Poll::Pending, FutureState::Waiting(_)) => {}
                    (Poll::Ready(got), FutureState::Granted(bytes)) => {
                        drop(self.futures.remove(i));
                        self.model_futures.remove(i);
                        // The bytes were counted when granted.
                        self.took(step, op, got, Ok(bytes), false);
                    }
                    (Poll::Ready(got), FutureState::Failed(error)) => {
                        drop(self.futures.remove(i));
                        self.model_futures.remove(i);
                        self.took(step, op, got, Err(error), false);
                    }
                    (poll, state) => panic!(
                        "step {step}: {op:?}: pool {:?}, model {state:?}",
                        poll.map(|r| r.map(|a| a.allocated_bytes()))
                    ),
                }
            }
            Op::DropFuture { pick } => {
                if self.futures.is_empty() {
                    return;
                }
                let i = pick % self.futures.len();
                let (id, future) = self.futures.remove(i);
                drop(future);
                let (_, state) = self.model_futures.remove(i);
                match state {
                    FutureState::Waiting(_) => self.model.queue.retain(|&q| q != id),
                    FutureState::Granted(bytes) => self.model.in_use -= bytes,
                    FutureState::Failed(_) => {}
                }
                self.model.serve(&mut self.model_futures);
            }
            Op::DropAllocation { pick } => {
                if self.allocations.is_empty() {
                    return;
                }
                let i = pick % self.allocations.len();
                let allocation = self.allocations.remove(i);
                let bytes = self.model_allocations.remove(i);
                // SAFETY: written with 0xA5 when it was taken.
                let block = unsafe { std::slice::from_raw_parts(allocation.first(), bytes) };
                assert!(
                    block.iter().all(|&b| b == 0xA5),
                    "step {step}: bytes overwritten"
                );
                drop(allocation);
                self.model.in_use -= bytes;
                self.model.serve(&mut self.model_futures);
            }
            Op::Close => {
                self.pool.close();
                self.model.closed = true;
                for id in self.model.queue.drain(..) {
                    let state = &mut self
                        .model_futures
                        .iter_mut()
                        .find(|(fid, _)| *fid == id)
                        .unwrap()
                        .1;
                    *state = FutureState::Failed(AllocError::Closed);
                }
            }
            Op::SetMax { buffers, extra } => {
                let size = self.model.buffer_size;
                let max_memory = buffers * size + extra % size;
                let got = self.pool.set_max_memory(max_memory);
                if max_memory < size {
                    assert_eq!(
                        got,
                        Err(ConfigError::MaxMemoryBelowBufferSize {
                            max_memory,
                            buffer_size: size
                        }),
                        "step {step}: {op:?}"
                    );
                    return;
                }
                assert_eq!(got, Ok(()), "step {step}: {op:?}");
                self.model.max_memory = max_memory;
                let futures = &mut self.model_futures;
                self.model.queue.retain(|&id| {
                    let state = &mut futures.iter_mut().find(|(fid, _)| *fid == id).unwrap().1;
                    match *state {
                        FutureState::Waiting(bytes) if bytes > max_memory => {
                            *state = FutureState::Failed(AllocError::ExceedsBudget {
                                requested_bytes: bytes,
                                max_memory,
                            });
                            false
                        }
                        _ => true,
                    }
                });
                self.model.serve(&mut self.model_futures);
            }
            Op::Stats => {}
        }
        self.check(step, op);
    }

    /// The pool's stats against the model, after every step.
    fn check(&self, step: usize, op: &Op) {
        let stats = self.pool.stats();
        let model = &self.model;
        assert_eq!(
            (
                stats.in_use_bytes,
                stats.waiting,
                stats.outstanding,
                stats.closed,
                stats.max_memory
            ),
            (
                model.in_use,
                model.queue.len(),
                self.allocations.len(),
                model.closed,
                model.max_memory
            ),
            "step {step} after {op:?}: stats (in_use, waiting, outstanding, closed, max) \
             differ from the model {model:?}"
        );
        assert_eq!(self.pool.is_closed(), model.closed);
    }

    /// Drops everything (futures first, then allocations) and checks the pool is idle.
    fn finish(mut self) {
        self.futures.clear();
        self.allocations.clear();
        let stats = self.pool.stats();
        assert_eq!(
            (stats.in_use_bytes, stats.waiting, stats.outstanding),
            (0, 0, 0),
            "not idle at the end: {stats}"
        );
    }
}

fn run(buffer_size: BufferSize, buffers: usize, extra: usize, ops: &[Op]) {
    let size = buffer_size.bytes();
    let max_memory = buffers * size + extra % size;
    let pool = BufPool::new(BufPoolCfg {
        buffer_size,
        max_memory,
    });
    let mut harness = Harness::new(&pool, size, max_memory);
    for (step, op) in ops.iter().enumerate() {
        harness.step(step, op);
    }
    harness.finish();
}

/// Hand-written sequences: run natively and under Miri.
#[test]
fn model_fixed_sequences() {
    use Op::*;
    // FIFO: a large head blocks smaller requests; try and zero-timeout refuse while anyone
    // waits; cancelling the head serves the next; one release serves several.
    run(
        BufferSize::S16,
        4,
        0,
        &[
            Try {
                n: 3,
                zeroed: false,
            },
            Start {
                n: 4,
                zeroed: false,
            },
            Start { n: 1, zeroed: true },
            Try {
                n: 1,
                zeroed: false,
            },
            TimeoutZero { n: 1 },
            DropAllocation { pick: 0 },
            Poll { pick: 1 },
            Poll { pick: 0 },
            DropAllocation { pick: 0 },
            Start {
                n: 2,
                zeroed: false,
            },
            Start {
                n: 2,
                zeroed: false,
            },
            DropFuture { pick: 1 },
            Poll { pick: 0 },
            DropAllocation { pick: 0 },
            Poll { pick: 0 },
            Poll { pick: 0 },
            Stats,
        ],
    );
    // Granted futures dropped before they pick up their bytes; bad input; close.
    run(
        BufferSize::S64,
        2,
        5,
        &[
            Try { n: 2, zeroed: true },
            Start {
                n: 2,
                zeroed: false,
            },
            Start {
                n: 1,
                zeroed: false,
            },
            DropAllocation { pick: 0 },
            DropFuture { pick: 0 },
            Poll { pick: 0 },
            Try {
                n: 0,
                zeroed: false,
            },
            Try {
                n: 3,
                zeroed: false,
            },
            Start {
                n: usize::MAX,
                zeroed: false,
            },
            TimeoutZero {
                n: usize::MAX / 8 + 1,
            },
            Start {
                n: 2,
                zeroed: false,
            },
            Close,
            Poll { pick: 0 },
            Try {
                n: 1,
                zeroed: false,
            },
            Start {
                n: 1,
                zeroed: false,
            },
            DropAllocation { pick: 0 },
        ],
    );
    // Resizing: grow serves in order, shrink fails what can never fit, below one buffer is
    // refused.
    run(
        BufferSize::S8,
        4,
        0,
        &[
            Try {
                n: 4,
                zeroed: false,
            },
            Start {
                n: 4,
                zeroed: false,
            },
            Start {
                n: 1,
                zeroed: false,
            },
            SetMax {
                buffers: 0,
                extra: 3,
            },
            SetMax {
                buffers: 2,
                extra: 0,
            },
            Poll { pick: 0 },
            SetMax {
                buffers: 9,
                extra: 7,
            },
            Poll { pick: 0 },
            DropAllocation { pick: 0 },
            Stats,
        ],
    );
}

#[cfg(not(miri))]
mod property {
    use super::*;
    use proptest::prelude::*;

    fn n() -> impl Strategy<Value = usize> {
        prop_oneof![
            12 => 0usize..=9,
            1 => Just(usize::MAX),
            1 => Just(usize::MAX / 8 + 1),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (n(), any::<bool>()).prop_map(|(n, zeroed)| Op::Try { n, zeroed }),
            2 => n().prop_map(|n| Op::TimeoutZero { n }),
            6 => (n(), any::<bool>()).prop_map(|(n, zeroed)| Op::Start { n, zeroed }),
            3 => any::<usize>().prop_map(|pick| Op::Poll { pick }),
            3 => any::<usize>().prop_map(|pick| Op::DropFuture { pick }),
            6 => any::<usize>().prop_map(|pick| Op::DropAllocation { pick }),
            1 => Just(Op::Close),
            1 => (0usize..=10, any::<usize>())
                .prop_map(|(buffers, extra)| Op::SetMax { buffers, extra }),
            1 => Just(Op::Stats),
        ]
    }

    fn buffer_size() -> impl Strategy<Value = BufferSize> {
        prop_oneof![
            Just(BufferSize::S8),
            Just(BufferSize::S16),
            Just(BufferSize::S64),
            Just(BufferSize::S4096),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn pool_matches_the_model(
            size in buffer_size(),
            buffers in 1usize..=8,
            extra in any::<usize>(),
            ops in prop::collection::vec(op(), 1..80),
        ) {
            run(size, buffers, extra, &ops);
        }
    }
}
