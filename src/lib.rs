//! An async-first, memory-budgeted buffer pool.
//!
//! A storage engine, a proxy or an ingest service has to cap how much memory its in-flight
//! I/O buffers take. [`BufPool`] hands out one contiguous allocation of `n` fixed-size
//! buffers per call; every allocation reserves its bytes from a budget, and when the budget is
//! spent the caller waits (backpressure) until other allocations are dropped. Tokio tasks
//! (`pool.allocate(n).await`) and plain threads (`pool.allocate_blocking(n)`) share one pool
//! and one FIFO queue. No runtime is required: the futures work under tokio, smol or
//! `futures::executor::block_on` alike.
//!
//! ```
//! use membudget::{BufPool, BufPoolCfg, BufferSize};
//!
//! # futures::executor::block_on(async {
//! const BUF: BufferSize = BufferSize::S4096;
//! let pool = BufPool::new(BufPoolCfg { buffer_size: BUF, max_memory: BUF as usize * 64 });
//!
//! let allocation = pool.allocate(16).await?; // 16 contiguous 4 KiB buffers
//! for (i, buffer) in allocation.iter().enumerate() {
//!     // SAFETY: each buffer is 4096 writable bytes that only this allocation owns.
//!     unsafe { buffer.write_bytes(i as u8, BUF as usize) };
//! }
//! assert_eq!(pool.stats().in_use_bytes, 16 * 4096);
//! drop(allocation); // the bytes go back to the budget, waking waiters
//! # Ok::<(), membudget::AllocError>(())
//! # }).unwrap();
//! ```
//!
//! # Cargo features
//!
//! - `bytes` (**on** by default): [`FilledAllocation`] implements `bytes::BufMut` (so tokio's
//!   `AsyncReadExt::read_buf` reads into pooled memory), and `FilledAllocation::freeze` turns
//!   it into a `bytes::Bytes` without a copy, for hyper, tonic or object_store; the pool's
//!   bytes stay reserved until the last clone or slice of it is dropped. Adds the `bytes` crate (1.10.1 or later) as a dependency. Without it,
//!   [`FilledAllocation::read_from`] still reads from any `std::io::Read`.
//! - `metrics` (off by default): `BufPool::record_metrics` pushes each pool's gauges and
//!   totals through the `metrics` 0.24 facade, labelled `pool = <name>`, and waiters record
//!   the wait histogram as they go; the names are in [`metric_names`]. Adds the `metrics`
//!   crate as a dependency. Nothing of it runs on the fast path.
//! - `loom` (off): for the project's own loom models only, together with
//!   `RUSTFLAGS="--cfg loom"`.
//!
//! See the README for the guarantees, the migration from `frozen_core::bufpool` and the
//! measurements.

#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod allocation;
mod blocking;
mod builder;
mod chain;
mod clock;
mod config;
mod deferred;
mod error;
mod filled;
mod heap;
mod owned;
mod pool;
mod reclaim;
mod recycle;
mod registry;
mod report;
mod reservation;
mod size;
mod state;
mod stats;
mod sync;
mod telemetry;
mod wait;
mod waiters;
mod word;

pub use allocation::{BufPoolAllocation, BufPoolAllocationIter, BufferPointer};
pub use builder::BufPoolBuilder;
pub use config::{BufPoolCfg, ConfigError};
pub use deferred::PendingWakeUps;
pub use error::AllocError;
pub use filled::FilledAllocation;
pub use owned::{AllocateOwned, PollAllocate};
pub use pool::BufPool;
pub use reclaim::{ReclaimAhead, ReclaimerHandle};
pub use registry::Reclaimer;
pub use report::{PoolReport, ReclaimerReport};
pub use reservation::{Grow, Reservation, Reserve, ReserveOwned};
pub use size::{BufferSize, InvalidBufferSize};
pub use stats::PoolStats;
pub use telemetry::metric_names;
pub use wait::{Allocate, Drained};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Compile-time checks of the thread-safety and size promises.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<BufPool>();
    send_sync::<BufPoolAllocation>();
    send_sync::<FilledAllocation>();
    send_sync::<Allocate<'static>>();
    send::<Drained<'static>>();
    const fn unpin<T: Unpin>() {}
    send_sync::<AllocateOwned>();
    send_sync::<PollAllocate>();
    unpin::<PollAllocate>();
    send_sync::<Reservation>();
    send_sync::<PoolReport>();
    send_sync::<ReclaimerReport>();
    send_sync::<Reserve<'static>>();
    send_sync::<Grow<'static>>();
    send_sync::<ReserveOwned>();
    send_sync::<ReclaimerHandle>();
    send_sync::<ReclaimAhead>();
    send_sync::<AllocError>();
    send::<PendingWakeUps>();
    send_sync::<ConfigError>();
    assert!(core::mem::size_of::<BufPoolAllocation>() <= 3 * core::mem::size_of::<usize>());
};
