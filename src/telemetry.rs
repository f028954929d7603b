//! The pool's metrics: their names (always available, so dashboards and tests can refer to
//! them), and, with the `metrics` feature, their reporting through the `metrics` facade.
//!
//! Nothing here runs on the fast path. [`BufPool::record_metrics`](crate::BufPool::record_metrics)
//! pushes the gauges and totals of a [`PoolStats`] snapshot when the application asks (on a
//! timer, say); the only thing recorded as it happens is each wait, into the wait histogram,
//! by the waiter itself once it has its allocation, outside every lock.

/// The names of the metrics a pool reports with the `metrics` feature, and their label.
///
/// Every metric carries the label [`POOL_LABEL`](metric_names::POOL_LABEL) `=` the pool's
/// name ([`BufPoolBuilder::name`](crate::BufPoolBuilder::name)), or
/// [`UNNAMED`](metric_names::UNNAMED) for a pool without one.
///
/// # Examples
///
/// ```
/// use membudget::metric_names;
///
/// assert_eq!(metric_names::IN_USE_BYTES, "membudget_in_use_bytes");
/// assert_eq!(metric_names::POOL_LABEL, "pool");
/// ```
pub mod metric_names {
    /// Gauge: bytes in use (`PoolStats::in_use_bytes`).
    pub const IN_USE_BYTES: &str = "membudget_in_use_bytes";
    /// Gauge: the budget (`PoolStats::max_memory`).
    pub const MAX_MEMORY_BYTES: &str = "membudget_max_memory_bytes";
    /// Gauge: requests queued now (`PoolStats::waiting`).
    pub const WAITING: &str = "membudget_waiting";
    /// Gauge: freed blocks kept for reuse (`PoolStats::cached_bytes`).
    pub const CACHED_BYTES: &str = "membudget_cached_bytes";
    /// Counter: allocations ever made (`PoolStats::total_allocations`).
    pub const ALLOCATIONS_TOTAL: &str = "membudget_allocations_total";
    /// Counter: requests granted after waiting in the pool's queue: allocations, and also
    /// reservations, growths and child pools' requests that waited there
    /// (`PoolStats::waited_allocations`).
    pub const WAITED_TOTAL: &str = "membudget_waited_total";
    /// Counter: calls that failed with `WouldBlock`: `try_allocate` (and its zeroed form),
    /// `try_reserve`, `Reservation::try_grow` and `Reservation::resize_to`
    /// (`PoolStats::would_block`).
    pub const WOULD_BLOCK_TOTAL: &str = "membudget_would_block_total";
    /// Counter: timed calls that gave up (`PoolStats::timed_out`).
    pub const TIMED_OUT_TOTAL: &str = "membudget_timed_out_total";
    /// Counter: requests refused because the queue was full (`PoolStats::queue_full`).
    pub const QUEUE_FULL_TOTAL: &str = "membudget_queue_full_total";
    /// Counter: reclaim rounds run for the pool's budget (`PoolStats::reclaim_rounds`).
    pub const RECLAIM_ROUNDS_TOTAL: &str = "membudget_reclaim_rounds_total";
    /// Counter: bytes reclaim rounds asked for (`PoolStats::reclaim_asked_bytes`).
    pub const RECLAIM_ASKED_BYTES_TOTAL: &str = "membudget_reclaim_asked_bytes_total";
    /// Counter: bytes reclaimers reported freed (`PoolStats::reclaimed_bytes`).
    pub const RECLAIMED_BYTES_TOTAL: &str = "membudget_reclaimed_bytes_total";
    /// Gauge holding a running total: seconds spent in reclaim rounds
    /// (`PoolStats::reclaim_time`).
    pub const RECLAIM_SECONDS_TOTAL: &str = "membudget_reclaim_seconds_total";
    /// Histogram: each wait, in seconds, from queueing to the waiter taking its allocation
    /// or reservation (only for pools that time their waits, the default), recorded by the
    /// pool whose queue it waited in: a child's request that waited in an ancestor's queue
    /// is that ancestor's. A grant given back untaken (its request dropped after the grant)
    /// counts in `membudget_waited_total` but records no sample.
    pub const WAIT_SECONDS: &str = "membudget_wait_seconds";
    /// The label naming the pool.
    pub const POOL_LABEL: &str = "pool";
    /// The label value of a pool without a name.
    pub const UNNAMED: &str = "unnamed";
}

#[cfg(feature = "metrics")]
pub(crate) use reporting::{WaitHistogram, record};

#[cfg(feature = "metrics")]
mod reporting {
    use std::sync::Arc;
    use std::time::Duration;

    use metrics::{Histogram, SharedString, counter, gauge, histogram};

    use super::metric_names::*;
    use crate::PoolStats;

    fn label(name: Option<&Arc<str>>) -> SharedString {
        match name {
            Some(name) => SharedString::from(Arc::clone(name)),
            None => SharedString::const_str(UNNAMED),
        }
    }

    /// Pushes the gauges and totals of `stats` to the recorder installed now.
    pub(crate) fn record(stats: &PoolStats) {
        let pool = label(stats.name.as_ref());
        let gauges = [
            (IN_USE_BYTES, stats.in_use_bytes),
            (MAX_MEMORY_BYTES, stats.max_memory),
            (WAITING, stats.waiting),
            (CACHED_BYTES, stats.cached_bytes),
        ];
        for (name, value) in gauges {
            gauge!(name, POOL_LABEL => pool.clone()).set(value as f64);
        }
        let totals = [
            (ALLOCATIONS_TOTAL, stats.total_allocations),
            (WAITED_TOTAL, stats.waited_allocations),
            (WOULD_BLOCK_TOTAL, stats.would_block),
            (TIMED_OUT_TOTAL, stats.timed_out),
            (QUEUE_FULL_TOTAL, stats.queue_full),
            (RECLAIM_ROUNDS_TOTAL, stats.reclaim_rounds),
            (RECLAIM_ASKED_BYTES_TOTAL, stats.reclaim_asked_bytes),
            (RECLAIMED_BYTES_TOTAL, stats.reclaimed_bytes),
        ];
        for (name, value) in totals {
            counter!(name, POOL_LABEL => pool.clone()).absolute(value as u64);
        }
        // A counter of seconds, as Prometheus spells time totals (a float: the facade's
        // counters count integers, so it goes as a gauge set to the running total).
        gauge!(RECLAIM_SECONDS_TOTAL, POOL_LABEL => pool.clone())
            .set(stats.reclaim_time.as_secs_f64());
    }

    /// The wait histogram of one pool: registered once, when the pool is built, with the
    /// recorder installed then (the `metrics` facade's handles are bound at registration), so
    /// recording a wait costs no lookup and no allocation.
    #[derive(Debug)]
    pub(crate) struct WaitHistogram(Histogram);

    impl WaitHistogram {
        pub(crate) fn register(name: Option<&Arc<str>>) -> Self {
            WaitHistogram(histogram!(WAIT_SECONDS, POOL_LABEL => label(name)))
        }

        pub(crate) fn record(&self, waited: Duration) {
            self.0.record(waited.as_secs_f64());
        }
    }
}
