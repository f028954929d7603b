//! Issue 2, guarantee 2 (bad input is an error, at once) and issue 7, item 4 (the bad-input
//! table): every public entry point tried with 0, 1, the exact budget, budget + 1, values that
//! overflow `n * buffer_size`, and `usize::MAX`, each checked against its documented result.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use common::*;
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, ConfigError, InvalidBufferSize,
};

/// Every allocation entry point.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Entry {
    Allocate,
    AllocateZeroed,
    Blocking,
    ZeroedBlocking,
    Timeout,
    ZeroedTimeout,
    TimeoutZero,
    TimeoutMax,
    Try,
    TryZeroed,
}

const ENTRIES: [Entry; 10] = [
    Entry::Allocate,
    Entry::AllocateZeroed,
    Entry::Blocking,
    Entry::ZeroedBlocking,
    Entry::Timeout,
    Entry::ZeroedTimeout,
    Entry::TimeoutZero,
    Entry::TimeoutMax,
    Entry::Try,
    Entry::TryZeroed,
];

impl Entry {
    /// Whether the call waits when the budget is spent (and so cannot be tried with a valid
    /// request on a full pool).
    fn waits(self) -> bool {
        matches!(
            self,
            Entry::Allocate
                | Entry::AllocateZeroed
                | Entry::Blocking
                | Entry::ZeroedBlocking
                | Entry::Timeout
                | Entry::ZeroedTimeout
                | Entry::TimeoutMax
        )
    }

    /// Calls the entry point; the async ones must be ready at their first poll.
    fn call(self, pool: &BufPool, n: usize) -> Result<BufPoolAllocation, AllocError> {
        match self {
            Entry::Allocate => ready(&mut Box::pin(pool.allocate(n))),
            Entry::AllocateZeroed => ready(&mut Box::pin(pool.allocate_zeroed(n))),
            Entry::Blocking => pool.allocate_blocking(n),
            Entry::ZeroedBlocking => pool.allocate_zeroed_blocking(n),
            Entry::Timeout => pool.allocate_timeout(n, Duration::from_secs(60)),
            Entry::ZeroedTimeout => pool.allocate_zeroed_timeout(n, Duration::from_secs(60)),
            Entry::TimeoutZero => pool.allocate_timeout(n, Duration::ZERO),
            Entry::TimeoutMax => pool.allocate_timeout(n, Duration::MAX),
            Entry::Try => pool.try_allocate(n),
            Entry::TryZeroed => pool.try_allocate_zeroed(n),
        }
    }
}

fn sizes() -> Vec<BufferSize> {
    if cfg!(miri) {
        vec![BufferSize::S8, BufferSize::S4096, BufferSize::S16384]
    } else {
        BufferSize::ALL.to_vec()
    }
}

/// The bad-input rows for a pool with this buffer size and budget: `(n, expected)`.
fn bad_rows(size: BufferSize, max_memory: usize) -> Vec<(usize, AllocError)> {
    let bytes = size.bytes();
    let exact = max_memory / bytes;
    let overflow = |requested_bytes| AllocError::ExceedsBudget {
        requested_bytes,
        max_memory,
    };
    vec![
        (0, AllocError::ZeroBuffers),
        (exact + 1, overflow((exact + 1) * bytes)),
        (exact * 2, overflow(exact * 2 * bytes)),
        // The largest n whose size still fits a usize.
        (usize::MAX / bytes, overflow(usize::MAX / bytes * bytes)),
        // The smallest n whose size overflows, and others that do.
        (usize::MAX / bytes + 1, overflow(usize::MAX)),
        (usize::MAX / 8 + 1, overflow(usize::MAX)),
        (1 << (usize::BITS - 1), overflow(usize::MAX)),
        (usize::MAX, overflow(usize::MAX)),
    ]
}

#[test]
fn table_every_entry_point_with_every_kind_of_n() {
    watchdog(30, || {
        for size in sizes() {
            let bytes = size.bytes();
            // A budget that is a multiple of the buffer size, and one that is not.
            for max_memory in [bytes * 10, bytes * 10 + bytes / 2] {
                let pool = BufPool::new(BufPoolCfg {
                    buffer_size: size,
                    max_memory,
                });
                for entry in ENTRIES {
                    for (n, expected) in bad_rows(size, max_memory) {
                        assert_eq!(
                            err(entry.call(&pool, n)),
                            expected,
                            "{entry:?}({n}) with {size} and max_memory {max_memory}"
                        );
                    }
                    // 1 and the exact budget succeed.
                    for n in [1, max_memory / bytes] {
                        let allocation = entry
                            .call(&pool, n)
                            .unwrap_or_else(|error| panic!("{entry:?}({n}) with {size}: {error}"));
                        assert_eq!(allocation.length(), n);
                        assert_eq!(allocation.allocated_bytes(), n * bytes);
                        assert_eq!(pool.stats().in_use_bytes, n * bytes);
                    }
                    assert_idle(&pool);
                }
            }
        }
    });
}

/// Bad input is reported at once even when the budget is spent and others wait: never a
/// wait, never a deadlock. Valid requests on the spent pool give the documented error for
/// the calls that never wait.
#[test]
fn table_on_a_spent_pool_with_waiters_still_errors_at_once() {
    watchdog(30, || {
        for size in sizes() {
            let bytes = size.bytes();
            let max_memory = bytes * 4;
            let pool = BufPool::new(BufPoolCfg {
                buffer_size: size,
                max_memory,
            });
            let held = pool.try_allocate(4).unwrap();
            let mut queued = Box::pin(pool.allocate(2));
            assert_pending(&mut queued);
            for entry in ENTRIES {
                for (n, expected) in bad_rows(size, max_memory) {
                    assert_eq!(err(entry.call(&pool, n)), expected, "{entry:?}({n})");
                }
                if !entry.waits() {
                    for n in [1, 4] {
                        let expected = match entry {
                            Entry::TimeoutZero => AllocError::TimedOut,
                            _ => AllocError::WouldBlock,
                        };
                        assert_eq!(err(entry.call(&pool, n)), expected, "{entry:?}({n})");
                    }
                }
            }
            assert_eq!(pool.stats().waiting, 1);
            drop(held);
            assert_eq!(ready(&mut queued).unwrap().length(), 2);
            drop(queued);
            assert_idle(&pool);
        }
    });
}

/// On a closed pool: `n = 0` is still `ZeroBuffers` and impossible sizes still
/// `ExceedsBudget`; every valid request is `Closed`.
#[test]
fn table_on_a_closed_pool() {
    watchdog(30, || {
        for size in sizes() {
            let bytes = size.bytes();
            let max_memory = bytes * 6;
            let pool = BufPool::new(BufPoolCfg {
                buffer_size: size,
                max_memory,
            });
            let live = pool.try_allocate(2).unwrap();
            pool.close();
            for entry in ENTRIES {
                for (n, expected) in bad_rows(size, max_memory) {
                    assert_eq!(err(entry.call(&pool, n)), expected, "{entry:?}({n})");
                }
                for n in [1, 4, 6] {
                    assert_eq!(
                        err(entry.call(&pool, n)),
                        AllocError::Closed,
                        "{entry:?}({n}) on a closed pool"
                    );
                }
            }
            drop(live);
            assert_idle(&pool);
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_bad_input_errors_at_once_on_a_runtime() {
    let pool = shared_pool(4);
    let held = pool.try_allocate(4).unwrap();
    let result = within(10, async {
        (
            pool.allocate(0).await,
            pool.allocate_zeroed(5).await,
            pool.allocate(usize::MAX).await,
        )
    })
    .await;
    assert_eq!(err(result.0), AllocError::ZeroBuffers);
    assert_eq!(
        err(result.1),
        AllocError::ExceedsBudget {
            requested_bytes: 320,
            max_memory: 256
        }
    );
    assert_eq!(
        err(result.2),
        AllocError::ExceedsBudget {
            requested_bytes: usize::MAX,
            max_memory: 256
        }
    );
    // The same from blocking callers on the runtime's blocking pool.
    let p = pool.clone();
    let blocking = within(
        10,
        tokio::task::spawn_blocking(move || {
            (
                p.allocate_blocking(0),
                p.allocate_blocking(usize::MAX / 64 + 1),
            )
        }),
    )
    .await
    .unwrap();
    assert_eq!(err(blocking.0), AllocError::ZeroBuffers);
    assert_eq!(
        err(blocking.1),
        AllocError::ExceedsBudget {
            requested_bytes: usize::MAX,
            max_memory: 256
        }
    );
    drop(held);
    assert_idle(&pool);
}

/// The ExceedsBudget error reports the budget in force when the request was refused.
#[test]
fn exceeds_budget_reports_the_current_budget() {
    let pool = pool(BufferSize::S64, 8);
    pool.set_max_memory(64 * 3).unwrap();
    assert_eq!(
        pool.try_allocate(4).unwrap_err(),
        AllocError::ExceedsBudget {
            requested_bytes: 256,
            max_memory: 192
        }
    );
    pool.set_max_memory(64 * 4).unwrap();
    assert_eq!(pool.try_allocate(4).unwrap().length(), 4);
}

/// The most bytes a pool counts (documented on `BufPoolCfg::max_memory`): 2 PiB, or all of
/// `usize` on smaller targets. A larger `max_memory` is accepted and enforces this.
fn counted_limit() -> usize {
    usize::try_from(1u64 << 51).unwrap_or(usize::MAX)
}

/// `(max_memory, Ok or the expected error)` for `try_new`, `validate` and `set_max_memory`.
fn config_rows(size: BufferSize) -> Vec<(usize, Result<(), ConfigError>)> {
    let bytes = size.bytes();
    let limit = counted_limit();
    let below = |max_memory| {
        Err(ConfigError::MaxMemoryBelowBufferSize {
            max_memory,
            buffer_size: bytes,
        })
    };
    vec![
        (0, below(0)),
        (1, below(1)),
        (bytes - 1, below(bytes - 1)),
        (bytes, Ok(())),
        (bytes + 1, Ok(())),
        (bytes * 64, Ok(())),
        (limit, Ok(())),
        (limit.saturating_add(1), Ok(())),
        (usize::MAX / 2, Ok(())),
        (usize::MAX, Ok(())),
    ]
}

#[test]
fn table_try_new_validate_and_new() {
    for size in sizes() {
        for (max_memory, expected) in config_rows(size) {
            let cfg = BufPoolCfg {
                buffer_size: size,
                max_memory,
            };
            assert_eq!(cfg.validate(), expected, "validate {cfg:?}");
            match (BufPool::try_new(cfg), expected) {
                (Ok(pool), Ok(())) => {
                    assert_eq!(pool.stats().max_memory, max_memory);
                    assert_eq!(pool.buffer_size(), size);
                }
                (Err(error), Err(want)) => assert_eq!(error, want),
                (got, want) => panic!("try_new({cfg:?}) = {got:?}, expected {want:?}"),
            }
            // The builder validates the same way, whatever its options.
            for builder in [
                BufPool::builder(cfg),
                BufPool::builder(cfg).direct_io_alignment().recycle(2),
            ] {
                match (builder.build(), expected) {
                    (Ok(pool), Ok(())) => assert_eq!(pool.stats().max_memory, max_memory),
                    (Err(error), Err(want)) => assert_eq!(error, want),
                    (got, want) => panic!("build({cfg:?}) = {got:?}, expected {want:?}"),
                }
            }
            // `new` panics with the ConfigError's message.
            let built = catch_unwind(AssertUnwindSafe(|| drop(BufPool::new(cfg))));
            match (built, expected) {
                (Ok(()), Ok(())) => {}
                (Err(panic), Err(want)) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .expect("a string panic message");
                    assert!(
                        message.contains(&want.to_string()),
                        "panic message {message:?} lacks {want}"
                    );
                }
                (got, want) => panic!("new({cfg:?}) = {:?}, expected {want:?}", got.is_ok()),
            }
        }
    }
}

#[test]
fn new_panics_with_the_config_error_message() {
    let panic = catch_unwind(|| {
        BufPool::new(BufPoolCfg {
            buffer_size: BufferSize::S16,
            max_memory: 0,
        })
    })
    .unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.ends_with("max_memory (0 bytes) is below one buffer (16 bytes)"),
        "{message}"
    );
}

#[test]
fn table_set_max_memory() {
    for size in sizes() {
        let original = size.bytes() * 8;
        for (max_memory, expected) in config_rows(size) {
            let pool = BufPool::new(BufPoolCfg {
                buffer_size: size,
                max_memory: original,
            });
            assert_eq!(
                pool.set_max_memory(max_memory),
                expected,
                "set_max_memory({max_memory}) with {size}"
            );
            let now = pool.stats().max_memory;
            match expected {
                Ok(()) => assert_eq!(now, max_memory),
                Err(_) => assert_eq!(now, original, "a refused budget must change nothing"),
            }
            // Requests are judged against whichever budget is in force; nothing overflows.
            assert_eq!(
                pool.try_allocate(usize::MAX).unwrap_err(),
                AllocError::ExceedsBudget {
                    requested_bytes: usize::MAX,
                    max_memory: now.min(counted_limit())
                }
            );
            assert_eq!(pool.try_allocate(0).unwrap_err(), AllocError::ZeroBuffers);
            drop(pool.try_allocate(1).unwrap());
        }
    }
}

/// `usize::MAX` as the budget means "no limit": accepted, reported as configured, and
/// enforced as the most the pool counts, so huge requests still fail at once, without
/// overflow, and never wait.
#[test]
fn unlimited_budget_pool_judges_huge_requests_without_overflow() {
    let size = BufferSize::S16384;
    let limit = counted_limit();
    for max_memory in [usize::MAX, usize::MAX / 2, limit] {
        let pool = BufPool::new(BufPoolCfg {
            buffer_size: size,
            max_memory,
        });
        assert_eq!(pool.stats().max_memory, max_memory);
        let too_many = limit / size.bytes() + 1;
        assert_eq!(
            pool.try_allocate(too_many).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: too_many * size.bytes(),
                max_memory: limit
            }
        );
        assert_eq!(
            pool.allocate_blocking(usize::MAX / size.bytes() + 1)
                .unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: usize::MAX,
                max_memory: limit
            }
        );
        assert_eq!(
            pool.allocate_blocking(usize::MAX).unwrap_err(),
            AllocError::ExceedsBudget {
                requested_bytes: usize::MAX,
                max_memory: limit
            }
        );
        let two = pool.try_allocate(2).unwrap();
        assert_eq!(two.length(), 2);
        assert_eq!(pool.stats().in_use_bytes, 2 * size.bytes());
        drop(two);
        assert_eq!(pool.stats().in_use_bytes, 0);
    }
}

#[test]
fn error_types_display_lowercase_and_implement_error() {
    let errors = [
        AllocError::ZeroBuffers,
        AllocError::ExceedsBudget {
            requested_bytes: 320,
            max_memory: 256,
        },
        AllocError::ExceedsBudget {
            requested_bytes: usize::MAX,
            max_memory: 256,
        },
        AllocError::Closed,
        AllocError::WouldBlock,
        AllocError::TimedOut,
    ];
    for error in errors {
        let text = error.to_string();
        assert!(!text.is_empty());
        assert!(
            text.chars().next().unwrap().is_lowercase(),
            "{text:?} is not lowercase"
        );
        assert!(!text.ends_with('.'));
        let as_error: &dyn std::error::Error = &error;
        assert!(as_error.source().is_none());
    }
    assert!(
        AllocError::ExceedsBudget {
            requested_bytes: 320,
            max_memory: 256
        }
        .to_string()
        .contains("320")
    );
    let config = ConfigError::MaxMemoryBelowBufferSize {
        max_memory: 0,
        buffer_size: 16,
    };
    assert_eq!(
        config.to_string(),
        "max_memory (0 bytes) is below one buffer (16 bytes)"
    );
    let _: &dyn std::error::Error = &config;
}

#[test]
fn buffer_size_conversions() {
    for (value, expected) in [
        (0, None),
        (1, None),
        (7, None),
        (8, Some(BufferSize::S8)),
        (9, None),
        (16, Some(BufferSize::S16)),
        (100, None),
        (4096, Some(BufferSize::S4096)),
        (16384, Some(BufferSize::S16384)),
        (32768, None),
        (usize::MAX, None),
    ] {
        match expected {
            Some(size) => {
                assert_eq!(BufferSize::try_from(value), Ok(size));
                assert_eq!(size.bytes(), value);
                assert_eq!(size as usize, value);
                assert_eq!(usize::from(size), value);
            }
            None => assert_eq!(BufferSize::try_from(value), Err(InvalidBufferSize(value))),
        }
    }
    for size in BufferSize::ALL {
        assert!(size.bytes().is_power_of_two());
        assert_eq!(BufferSize::try_from(size.bytes()), Ok(size));
    }
}
