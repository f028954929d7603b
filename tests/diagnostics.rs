//! Issue 6: shutdown diagnostics. `shutdown_timeout` and `shutdown_before` report whether the
//! pool drained and what is still out; a `Drop` that waits too long says so on stderr, once.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{SLOWDOWN, watchdog};
use membudget::{BufPool, BufPoolCfg, BufferSize};

const BUF: BufferSize = BufferSize::S64;

fn pool() -> BufPool {
    BufPool::new(BufPoolCfg {
        buffer_size: BUF,
        max_memory: 64 * 8,
    })
}

#[test]
fn shutdown_timeout_reports_what_is_still_out() {
    watchdog(20, || {
        let pool = pool();
        let a = pool.try_allocate(2).unwrap();
        let b = pool.try_allocate(3).unwrap();
        let report = pool.shutdown_timeout(Duration::from_millis(5));
        assert!(!report.is_drained());
        assert_eq!((report.outstanding, report.in_use_bytes), (2, 5 * 64));
        drop((a, b));
        assert!(pool.shutdown_timeout(Duration::ZERO).is_drained());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_before_returns_at_the_deadline_or_when_drained() {
    let pool = Arc::new(pool());
    let held = pool.try_allocate(4).unwrap();
    let report = pool
        .shutdown_before(tokio::time::sleep(Duration::from_millis(5)))
        .await;
    assert!(!report.is_drained() && report.closed);
    assert_eq!(report.outstanding, 1);
    let releaser = thread::spawn(move || drop(held));
    let report = tokio::time::timeout(
        Duration::from_secs(10) * SLOWDOWN,
        pool.shutdown_before(std::future::pending::<()>()),
    )
    .await
    .expect("drained before the watchdog");
    assert!(report.is_drained());
    releaser.join().unwrap();
}

/// Runs in a child process: holds an allocation on another thread for a while and drops
/// the pool, whose drop must report on stderr what it waits for.
#[test]
fn drop_that_waits_says_so_on_stderr_once() {
    if std::env::var_os("MEMBUDGET_DROP_CHILD").is_some() {
        let pool = BufPool::builder(BufPoolCfg {
            buffer_size: BUF,
            max_memory: 64 * 8,
        })
        .drop_warning_after(Duration::from_millis(50))
        .build()
        .unwrap();
        let held = pool.try_allocate(3).unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let holder = thread::spawn(move || {
            wait.recv().unwrap();
            thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        go.send(()).unwrap();
        drop(pool); // blocks until `held` is dropped, reporting after 50 ms
        holder.join().unwrap();
        return;
    }
    if cfg!(miri) {
        return; // Miri cannot spawn processes.
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "drop_that_waits_says_so_on_stderr_once",
            "--exact",
            "--nocapture",
        ])
        .env("MEMBUDGET_DROP_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed: {stderr}");
    assert_eq!(
        stderr
            .matches("membudget: dropping a BufPool has waited")
            .count(),
        1,
        "exactly one report: {stderr}"
    );
    assert!(
        stderr.contains("for 1 allocations (192 bytes)"),
        "names what it waits for: {stderr}"
    );
}

#[test]
fn stats_display_for_logs() {
    let pool = pool();
    let held = pool.try_allocate(2).unwrap();
    assert_eq!(
        pool.try_allocate(7).unwrap_err(),
        membudget::AllocError::WouldBlock
    );
    let line = pool.stats().to_string();
    assert!(
        line.starts_with("128 of 512 bytes in use by 1 allocations (peak 128 bytes)"),
        "{line}"
    );
    assert!(line.contains("1 would block"), "{line}");
    drop(held);
}
