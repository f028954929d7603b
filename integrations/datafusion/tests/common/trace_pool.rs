#![allow(dead_code, unreachable_pub)]
//! A `MemoryPool` that forwards to another and records every call, to see which reservation
//! a pool refuses and what happened before.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use datafusion::common::Result;
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};

#[derive(Debug)]
pub struct Event {
    pub micros: u128,
    pub consumer: String,
    pub op: &'static str,
    pub bytes: usize,
    pub reservation: usize,
    pub ok: bool,
    pub reserved_after: usize,
}

#[derive(Debug)]
pub struct TracePool {
    inner: Arc<dyn MemoryPool>,
    started: Instant,
    pub events: Mutex<Vec<Event>>,
}

impl TracePool {
    pub fn new(inner: Arc<dyn MemoryPool>) -> TracePool {
        TracePool {
            inner,
            started: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    fn log(&self, r: &MemoryConsumer, op: &'static str, bytes: usize, size: usize, ok: bool) {
        let e = Event {
            micros: self.started.elapsed().as_micros(),
            consumer: r.name().to_owned(),
            op,
            bytes,
            reservation: size,
            ok,
            reserved_after: self.inner.reserved(),
        };
        self.events.lock().unwrap().push(e);
    }

    /// The last `n` events, one a line, and per consumer the bytes after each event.
    pub fn dump(&self, n: usize) {
        let events = self.events.lock().unwrap();
        let start = events.len().saturating_sub(n);
        for e in &events[start..] {
            println!(
                "    {:>8}us {:<28} {:<10} {:>9} (res {:>9}) {} total {:>9}",
                e.micros,
                e.consumer,
                e.op,
                e.bytes,
                e.reservation,
                if e.ok { "ok " } else { "REFUSED" },
                e.reserved_after
            );
        }
    }
}

impl std::fmt::Display for TracePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "trace({})", self.inner.name())
    }
}

impl MemoryPool for TracePool {
    fn name(&self) -> &str {
        "trace"
    }
    fn register(&self, consumer: &MemoryConsumer) {
        self.inner.register(consumer);
        self.log(consumer, "register", 0, 0, true);
    }
    fn unregister(&self, consumer: &MemoryConsumer) {
        self.inner.unregister(consumer);
        self.log(consumer, "unregister", 0, 0, true);
    }
    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.inner.grow(reservation, additional);
        self.log(
            reservation.consumer(),
            "grow",
            additional,
            reservation.size(),
            true,
        );
    }
    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.inner.shrink(reservation, shrink);
        self.log(
            reservation.consumer(),
            "shrink",
            shrink,
            reservation.size(),
            true,
        );
    }
    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let r = self.inner.try_grow(reservation, additional);
        self.log(
            reservation.consumer(),
            "try_grow",
            additional,
            reservation.size(),
            r.is_ok(),
        );
        r
    }
    fn reserved(&self) -> usize {
        self.inner.reserved()
    }
    fn memory_limit(&self) -> MemoryLimit {
        self.inner.memory_limit()
    }
}
