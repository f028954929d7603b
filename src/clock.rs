//! The clock of the wait statistics: cheap timestamps ([`Stamp`]) taken where a wait starts
//! and where it is granted, and their conversion to [`Duration`] when `stats()` reads them.
//!
//! Two reads per wait are on the waiting path's critical path (the second one under the
//! queue lock's shadow, just before it), so the clock must be cheap. `Instant::now` costs
//! 25-40 ns on the KVM guests we measure on; the CPU's time-stamp counter (`rdtsc`) about
//! 10 ns. So on x86_64 with an *invariant* TSC (constant rate, synchronised across cores:
//! every x86_64 CPU of the last decade), or one the Linux kernel offers as a clocksource (a
//! guest whose hypervisor hides the invariant flag), stamps are TSC ticks; elsewhere, under
//! Miri, or without either, they are nanoseconds of the OS clock.
//!
//! Ticks become time only when the statistics are read: the TSC's rate is measured then
//! against the OS clock, over the whole time since the process first needed the clock (so the
//! estimate gets better the longer the process runs, and costs nothing per wait).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A point in time, in the clock's ticks.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Ord, PartialOrd)]
pub(crate) struct Stamp(u64);

impl Stamp {
    /// Now.
    #[inline]
    pub(crate) fn now() -> Stamp {
        let epoch = epoch();
        if epoch.tsc_invariant {
            Stamp(read_tsc())
        } else {
            Stamp(nanos_since(epoch.instant))
        }
    }

    /// The ticks from `earlier` to `self`; zero if `earlier` is later.
    #[inline]
    pub(crate) fn ticks_since(self, earlier: Stamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Converts a number of ticks (a wait, or waits added up) to time.
#[cfg(test)]
pub(crate) fn ticks_to_duration(ticks: u64) -> Duration {
    let [duration] = ticks_to_durations([ticks]);
    duration
}

/// Tick counts as durations, for several tick counts at once, with one measurement of the rate,
/// so that durations read together compare as their ticks do (a mean of waits is never above
/// their maximum just because the rate was measured twice).
pub(crate) fn ticks_to_durations<const N: usize>(ticks: [u64; N]) -> [Duration; N] {
    let epoch = epoch();
    if !epoch.tsc_invariant {
        return ticks.map(Duration::from_nanos);
    }
    // Read the TSC and the OS clock back to back, and take the rate over everything since
    // the epoch.
    let elapsed_ticks = read_tsc().saturating_sub(epoch.tsc);
    let elapsed_nanos = nanos_since(epoch.instant);
    if elapsed_ticks == 0 {
        return [Duration::ZERO; N];
    }
    let nanos_per_tick = elapsed_nanos as f64 / elapsed_ticks as f64;
    ticks.map(|ticks| Duration::from_nanos((ticks as f64 * nanos_per_tick) as u64))
}

/// [`ticks_to_durations`] for one wait at a time (the `metrics` wait histogram): the TSC's
/// rate is measured at most once per 2^28 ticks (about a tenth of a second), not on every
/// call, since two clock reads per wait would cost more than the rest of recording it.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) fn ticks_to_duration_cached(ticks: u64, now: Stamp) -> Duration {
    // A cache of a measurement, not part of any protocol (so not through `sync.rs`): a race
    // between the two stores only pairs a rate with a slightly different tick. Loom and
    // Miri never take this path (no TSC there).
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static NANOS_PER_TICK: AtomicU64 = AtomicU64::new(0);
    static MEASURED_AT: AtomicU64 = AtomicU64::new(0);
    const REMEASURE_AFTER: u64 = 1 << 28;

    let epoch = epoch();
    if !epoch.tsc_invariant {
        return Duration::from_nanos(ticks);
    }
    let measured_at = MEASURED_AT.load(Relaxed);
    let nanos_per_tick = if measured_at != 0 && now.0.wrapping_sub(measured_at) < REMEASURE_AFTER {
        f64::from_bits(NANOS_PER_TICK.load(Relaxed))
    } else {
        let elapsed_ticks = read_tsc().saturating_sub(epoch.tsc);
        if elapsed_ticks == 0 {
            return Duration::ZERO;
        }
        let rate = nanos_since(epoch.instant) as f64 / elapsed_ticks as f64;
        NANOS_PER_TICK.store(rate.to_bits(), Relaxed);
        MEASURED_AT.store(now.0.max(1), Relaxed);
        rate
    };
    Duration::from_nanos((ticks as f64 * nanos_per_tick) as u64)
}

/// The reference point of both clocks, and which one stamps.
#[derive(Debug)]
struct Epoch {
    instant: Instant,
    tsc: u64,
    tsc_invariant: bool,
}

/// Taken once per process, when the first pool is built (`BufPoolBuilder::build` calls
/// [`start`]) or the clock is first read.
fn epoch() -> &'static Epoch {
    static EPOCH: OnceLock<Epoch> = OnceLock::new();
    EPOCH.get_or_init(|| Epoch {
        instant: Instant::now(),
        tsc: read_tsc(),
        tsc_invariant: tsc_invariant(),
    })
}

/// Sets the epoch up now (it costs a `cpuid`, slow in a VM), not on the first wait.
pub(crate) fn start() {
    epoch();
}

fn nanos_since(instant: Instant) -> u64 {
    u64::try_from(instant.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Whether the TSC can stamp waits: the CPU says it is invariant, or (Linux) the kernel found
/// it stable enough to offer it as a clocksource. Many hypervisors hide the invariant flag
/// (it would stop live migration) while the TSC runs at a constant rate and the guest's
/// kernel, which checks it against other clocks at boot, lists it; without this second check
/// such a guest stamps every wait with `Instant::now` (two per wait: measured +55-70 ns on the
/// release-to-waiter path, `docs/performance-log.md`, issue 22 on the AMD EPYC).
#[cfg(all(target_arch = "x86_64", not(miri), not(loom)))]
fn tsc_invariant() -> bool {
    cpu_says_invariant() || kernel_offers_tsc()
}

/// Whether Linux lists `tsc` among its available clocksources. A TSC the kernel's watchdog
/// found unstable loses its high-resolution flag, and on a kernel with high-resolution timers
/// or a tickless idle (every common configuration) the list then leaves it out.
#[cfg(all(target_arch = "x86_64", not(miri), not(loom)))]
fn kernel_offers_tsc() -> bool {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/available_clocksource")
        .is_ok_and(|sources| sources.split_whitespace().any(|source| source == "tsc"))
}

#[cfg(all(target_arch = "x86_64", not(miri), not(loom)))]
fn cpu_says_invariant() -> bool {
    use core::arch::x86_64::__cpuid;
    // CPUID leaf 0x8000_0007 ("advanced power management"), EDX bit 8: the TSC runs at a
    // constant rate in every P-, C- and T-state.
    const INVARIANT_TSC: u32 = 1 << 8;
    // `__cpuid` is an unsafe fn before Rust 1.94 (our MSRV is lower) and safe from 1.94 on.
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 0x8000_0000 is always valid and reports
    // the highest extended leaf, checked before 0x8000_0007 is read.
    #[allow(unused_unsafe)]
    unsafe {
        let max_extended_leaf = __cpuid(0x8000_0000).eax;
        max_extended_leaf >= 0x8000_0007 && __cpuid(0x8000_0007).edx & INVARIANT_TSC != 0
    }
}

#[cfg(not(all(target_arch = "x86_64", not(miri), not(loom))))]
fn tsc_invariant() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", not(miri), not(loom)))]
#[inline(always)]
fn read_tsc() -> u64 {
    // SAFETY: `rdtsc` exists on every x86_64 CPU, reads a counter and touches no memory; the
    // function is `unsafe` only as an intrinsic. (Not serialising: a stamp may be taken a few
    // instructions early or late, which the statistics do not notice.)
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(all(target_arch = "x86_64", not(miri), not(loom))))]
fn read_tsc() -> u64 {
    0
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn stamps_measure_a_sleep() {
        let start = Stamp::now();
        std::thread::sleep(Duration::from_millis(20));
        let waited = ticks_to_duration(Stamp::now().ticks_since(start));
        assert!(waited >= Duration::from_millis(15), "{waited:?}");
        // Generous: only a wildly wrong rate would fail this.
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[test]
    fn the_cached_conversion_agrees_with_the_measured_one() {
        let start = Stamp::now();
        std::thread::sleep(Duration::from_millis(20));
        let now = Stamp::now();
        let ticks = now.ticks_since(start);
        let measured = ticks_to_duration(ticks).as_secs_f64();
        for _ in 0..3 {
            let cached = ticks_to_duration_cached(ticks, now).as_secs_f64();
            assert!(
                (cached - measured).abs() <= measured * 0.05,
                "{cached} vs {measured}"
            );
        }
    }

    #[test]
    fn an_earlier_stamp_gives_zero() {
        let earlier = Stamp::now();
        let later = Stamp(earlier.0 + 10);
        assert_eq!(earlier.ticks_since(later), 0);
    }
}
