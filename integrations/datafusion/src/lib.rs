//! DataFusion's `MemoryPool` over a [membudget](membudget) `BufPool`: a query's operators and
//! the program's I/O buffers under one budget tree.
//!
//! [`MembudgetPool`] implements DataFusion 55's
//! [`MemoryPool`](datafusion::execution::memory_pool::MemoryPool). Give it a `BufPool`
//! (typically a child of the program's root pool, with a floor so that I/O cannot starve the
//! query: [`MembudgetPool::child_of`]) and hand it to DataFusion's `RuntimeEnvBuilder`:
//!
//! ```
//! use std::sync::Arc;
//! use datafusion::execution::runtime_env::RuntimeEnvBuilder;
//! use datafusion::prelude::{SessionConfig, SessionContext};
//! use membudget::{BufPool, BufPoolCfg, BufferSize};
//! use membudget_datafusion::MembudgetPool;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let root = BufPool::builder(BufPoolCfg { buffer_size: BufferSize::S16384, max_memory: 256 << 20 })
//!     .name("process")
//!     .build()?;
//! let io = root.child("io", BufPoolCfg { buffer_size: BufferSize::S16384, max_memory: 256 << 20 })?;
//! // 64 MiB for queries, all of it set aside: the I/O side gets the other 192 MiB.
//! let query = Arc::new(MembudgetPool::child_of(&root, "query", 64 << 20, 64 << 20)?);
//! let runtime = RuntimeEnvBuilder::new().with_memory_pool(query.clone()).build_arc()?;
//! let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
//! let batches = ctx.sql("SELECT 1 + 1 AS two").await?.collect().await?;
//! assert_eq!(batches[0].num_rows(), 1);
//! println!("{}", root.tree_report());
//! # drop(io);
//! # Ok(())
//! # }
//! ```
//!
//! See the README for the policy, how reservations map to the core, the measured failure
//! rates and the differences from DataFusion's own pools.

#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

mod pool;
mod refusal;

pub use pool::{ConsumerUsage, MembudgetPool, MembudgetPoolBuilder, MembudgetStats, Policy};
pub use refusal::{Holder, HolderKind, Refusal, RefusalReason};
