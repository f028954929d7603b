//! s30b: a new user's exact model of a 4-level tree of pools (issues 13 and 19): floors,
//! reservations mixed with allocations, counted overcommit (`force_grow`), growth and exact
//! resizes at every level, a close in the middle of the tree; every quiescent point checked
//! against the model: in use, available, reserved, outstanding, overcommit, peak, and the
//! report (`tree_report`, `own_bytes`, `top`, children order).
//!
//! The model, from README "Budgets beyond one pool", guarantee 15 and `PoolReport`:
//! a pool's bytes in use are its own holdings plus, for each child, `max(floor, child's in
//! use)` while the child is open (its floor is set aside in the parent; a request uses the
//! floor first and climbs with the rest), and the child's in use once it is closed (the
//! floor's free part went back). A try-form request is granted iff every level whose count it
//! raises stays within its budget; `ExceedsBudget` iff it is above the smallest cap of its
//! chain (rounded reservation sizes for reservations).

mod common;

use common::{rounds, watchdog};
use membudget::{
    AllocError, BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, PoolReport, Reservation,
};

/// (parent, max_memory, floor, buffer size); pool 0 is the root.
const TREE: [(usize, usize, usize, BufferSize); 6] = [
    (usize::MAX, 8192, 0, BufferSize::S64),
    (0, 4096, 1024, BufferSize::S128),
    (1, 2048, 512, BufferSize::S64),
    (2, 1024, 0, BufferSize::S32),
    (0, 6000, 768, BufferSize::S256),
    (1, 1500, 0, BufferSize::S8),
];
const N: usize = TREE.len();

fn round8(n: usize) -> usize {
    n.next_multiple_of(8)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn build() -> Vec<BufPool> {
    let mut pools: Vec<BufPool> = Vec::new();
    for (i, &(parent, max_memory, floor, buffer_size)) in TREE.iter().enumerate() {
        let mut builder = BufPool::builder(BufPoolCfg {
            buffer_size,
            max_memory,
        })
        .name(format!("p{i}"));
        if parent != usize::MAX {
            builder = builder.parent(&pools[parent]).min_memory(floor);
        }
        pools.push(builder.build().expect("the tree builds"));
    }
    pools
}

/// What the model knows.
struct Model {
    own: [usize; N],
    reserved: [usize; N],
    outstanding: [usize; N],
    closed: [bool; N],
    peak: [usize; N],
    max: [usize; N],
}

impl Model {
    fn chain(p: usize) -> Vec<usize> {
        let mut chain = vec![p];
        let mut at = p;
        while TREE[at].0 != usize::MAX {
            at = TREE[at].0;
            chain.push(at);
        }
        chain
    }

    fn in_use_with(&self, own: &[usize; N]) -> [usize; N] {
        let mut u = *own;
        // Children have larger indices than their parents: go bottom up.
        for c in (1..N).rev() {
            let contribution = if self.closed[c] {
                u[c]
            } else {
                u[c].max(TREE[c].2)
            };
            u[TREE[c].0] += contribution;
        }
        u
    }

    fn in_use(&self) -> [usize; N] {
        self.in_use_with(&self.own)
    }

    fn smallest_cap(&self, p: usize) -> usize {
        Self::chain(p).iter().map(|&l| self.max[l]).min().unwrap()
    }

    /// Whether `bytes` more held in `p` fit every level they would raise.
    fn fits(&self, p: usize, bytes: usize) -> bool {
        let now = self.in_use();
        let mut own = self.own;
        own[p] += bytes;
        let then = self.in_use_with(&own);
        Self::chain(p)
            .iter()
            .all(|&l| then[l] == now[l] || then[l] <= self.max[l])
    }

    fn hold(&mut self, p: usize, bytes: usize) {
        self.own[p] += bytes;
        let u = self.in_use();
        for (peak, u) in self.peak.iter_mut().zip(u) {
            *peak = (*peak).max(u);
        }
    }

    fn closed_chain(&self, p: usize) -> bool {
        Self::chain(p).iter().any(|&l| self.closed[l])
    }
}

fn find<'a>(report: &'a PoolReport, pool: &BufPool) -> Option<&'a PoolReport> {
    if report.describes(pool) {
        return Some(report);
    }
    report.children.iter().find_map(|c| find(c, pool))
}

fn check(pools: &[BufPool], model: &Model, what: &str) {
    let u = model.in_use();
    let report = pools[3].tree_report();
    assert!(
        report.describes(&pools[0]),
        "{what}: tree_report starts at the root"
    );
    for (i, pool) in pools.iter().enumerate() {
        let s = pool.stats();
        let max = model.max[i];
        let got = (
            s.in_use_bytes,
            s.reserved_bytes,
            s.outstanding,
            s.overcommit_bytes,
            s.available_bytes(),
            s.waiting,
        );
        let want = (
            u[i],
            model.reserved[i],
            model.outstanding[i],
            u[i].saturating_sub(max),
            max.saturating_sub(u[i]),
            0,
        );
        assert_eq!(
            got, want,
            "{what}: pool {i} (in use, reserved, outstanding, overcommit, available, waiting)"
        );
        assert_eq!(s.peak_in_use_bytes, model.peak[i], "{what}: pool {i} peak");
        assert_eq!(s.closed, model.closed[i], "{what}: pool {i} closed");
        let r = find(&report, pool)
            .unwrap_or_else(|| panic!("{what}: pool {i} is not in the tree report"));
        assert_eq!(
            (
                r.in_use_bytes,
                r.reserved_bytes,
                r.outstanding,
                r.overcommit_bytes,
                r.max_memory,
                r.waiting
            ),
            (
                s.in_use_bytes,
                s.reserved_bytes,
                s.outstanding,
                s.overcommit_bytes,
                s.max_memory,
                0
            ),
            "{what}: pool {i}: report against stats"
        );
        assert_eq!(
            r.min_memory,
            if model.closed[i] { 0 } else { TREE[i].2 },
            "{what}: pool {i} floor in the report"
        );
        assert_eq!(r.own_bytes(), model.own[i], "{what}: pool {i} own bytes");
        let sorted = r
            .children
            .windows(2)
            .all(|w| w[0].in_use_bytes >= w[1].in_use_bytes);
        assert!(sorted, "{what}: pool {i}'s children sorted by bytes in use");
    }
    let top = report.top(N);
    assert_eq!(top.len(), N, "{what}: top(N) lists every pool");
    assert!(
        top.windows(2).all(|w| w[0].own_bytes() >= w[1].own_bytes()),
        "{what}: top sorted by own bytes"
    );
    let mut owns: Vec<usize> = model.own.to_vec();
    owns.sort_unstable_by(|a, b| b.cmp(a));
    let got: Vec<usize> = top.iter().map(|r| r.own_bytes()).collect();
    assert_eq!(got, owns, "{what}: top's own bytes");
}

fn ok_or_refused(
    result: Result<(), AllocError>,
    model: &Model,
    p: usize,
    more: usize,
    total_after: usize,
    what: &str,
) -> bool {
    let cap = model.smallest_cap(p);
    match result {
        // Zero bytes: at once, closed or not (README: `try_reserve(0)`, `try_grow(0)`: `Ok`).
        Ok(()) if more == 0 => true,
        Ok(()) => {
            assert!(!model.closed_chain(p), "{what}: granted in a closed pool");
            assert!(total_after <= cap, "{what}: granted above the cap");
            assert!(
                model.fits(p, more),
                "{what}: granted though it does not fit"
            );
            true
        }
        Err(AllocError::ExceedsBudget { .. }) => {
            assert!(
                total_after > cap,
                "{what}: ExceedsBudget within the cap {cap}"
            );
            false
        }
        Err(AllocError::Closed) => {
            assert!(model.closed_chain(p), "{what}: Closed on an open chain");
            false
        }
        Err(AllocError::WouldBlock) => {
            assert!(
                !model.closed_chain(p),
                "{what}: WouldBlock on a closed chain"
            );
            assert!(
                more > 0 && !model.fits(p, more),
                "{what}: WouldBlock though {more} bytes fit"
            );
            false
        }
        Err(e) => panic!("{what}: unexpected {e:?}"),
    }
}

fn run(seed: u64, steps: usize, resizes: bool) {
    let pools = build();
    let mut model = Model {
        own: [0; N],
        reserved: [0; N],
        outstanding: [0; N],
        closed: [false; N],
        peak: [0; N],
        max: TREE.map(|t| t.1),
    };
    // Floors are set aside at build: they count as in use (and in the peak) at once.
    let u = model.in_use();
    model.peak = u;
    check(&pools, &model, &format!("seed {seed}: built"));
    let mut res: Vec<(usize, Reservation, usize)> = Vec::new();
    let mut allocs: Vec<(usize, BufPoolAllocation)> = Vec::new();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let close_at = if seed % 2 == 0 { steps / 2 } else { usize::MAX };
    for step in 0..steps {
        if step == close_at {
            // Close the middle of the tree: pools 2 and 3 (2's floor goes back as far as
            // it is free).
            pools[2].close();
            model.closed[2] = true;
            model.closed[3] = true;
            check(
                &pools,
                &model,
                &format!("seed {seed} step {step}: closed 2"),
            );
        }
        let p = rng.below(N);
        let op = rng.below(if resizes { 15 } else { 12 });
        let what = format!("seed {seed} step {step} op {op} pool {p}");
        match op {
            0 => {
                let bytes = rng.below(700);
                let r = pools[p].try_reserve(bytes);
                let held = round8(bytes);
                let result = r.map(|r| {
                    assert_eq!(r.size(), held, "{what}: size");
                    res.push((p, r, held));
                });
                if ok_or_refused(result, &model, p, held, held, &what) {
                    model.hold(p, held);
                    model.reserved[p] += held;
                }
            }
            1 => {
                let n = 1 + rng.below(6);
                let bytes = n * TREE[p].3 as usize;
                let before: Vec<_> = pools.iter().map(|p| p.stats().in_use_bytes).collect();
                let result = pools[p].try_allocate(n).map(|a| {
                    assert_eq!(a.allocated_bytes(), bytes);
                    allocs.push((p, a));
                });
                if std::env::var("S30B_DEBUG").is_ok() {
                    eprintln!(
                        "{what}: try_allocate({n}) = {bytes} bytes: {result:?}; before {before:?} model {:?}",
                        model.in_use()
                    );
                }
                if ok_or_refused(result, &model, p, bytes, bytes, &what) {
                    model.hold(p, bytes);
                    model.outstanding[p] += 1;
                }
            }
            2 if !res.is_empty() => {
                let k = rng.below(res.len());
                let (p, r, size) = &mut res[k];
                let p = *p;
                let more = rng.below(400);
                let held = round8(*size);
                let result = r.try_grow(more);
                let grown = result.is_ok();
                if ok_or_refused(result, &model, p, round8(more), held + round8(more), &what) {
                    model.hold(p, round8(more));
                    model.reserved[p] += round8(more);
                    *size += round8(more);
                }
                assert_eq!(r.size(), *size, "{what}: size after try_grow ({grown})");
            }
            3 if !res.is_empty() => {
                let k = rng.below(res.len());
                let (p, r, size) = &mut res[k];
                let p = *p;
                let to = rng.below(*size + 300);
                let held = round8(*size);
                let result = r.resize_to(to);
                if to <= *size {
                    assert_eq!(result, Ok(()), "{what}: shrinking resize");
                    let less = held - round8(to);
                    model.own[p] -= less;
                    model.reserved[p] -= less;
                    *size = to;
                } else {
                    let more = round8(to) - held;
                    if ok_or_refused(result, &model, p, more, round8(to), &what) {
                        model.hold(p, more);
                        model.reserved[p] += more;
                        *size = to;
                    }
                }
                assert_eq!(r.size(), *size, "{what}: size after resize_to({to})");
            }
            4 if !res.is_empty() => {
                let k = rng.below(res.len());
                let (p, r, size) = &mut res[k];
                let p = *p;
                let more = rng.below(300);
                r.force_grow(more).expect("force_grow always succeeds");
                let extra = round8(*size + more) - round8(*size);
                *size += more;
                model.hold(p, extra);
                model.reserved[p] += extra;
                assert_eq!(r.size(), *size, "{what}: size after force_grow");
            }
            5 if !res.is_empty() => {
                let k = rng.below(res.len());
                let (p, r, size) = &mut res[k];
                let p = *p;
                let less = rng.below(*size + 20);
                let before = round8(*size);
                if rng.below(2) == 0 {
                    r.shrink(less);
                    *size -= round8(less).min(*size);
                } else {
                    match r.try_shrink(less) {
                        Ok(()) => *size -= less,
                        Err(e) => {
                            assert!(less > *size, "{what}: try_shrink refused: {e:?}");
                        }
                    }
                }
                let back = before - round8(*size);
                model.own[p] -= back;
                model.reserved[p] -= back;
                assert_eq!(r.size(), *size, "{what}: size after a shrink");
            }
            6 if !res.is_empty() && res.len() < 16 => {
                let k = rng.below(res.len());
                let (p, r, size) = &mut res[k];
                let p = *p;
                let want = rng.below(*size + 40);
                let part = r.split(want);
                let got = round8(want).min(*size);
                assert_eq!(part.size(), got, "{what}: split");
                let before = round8(*size);
                *size -= got;
                // The two parts hold what the whole held.
                assert_eq!(round8(*size) + round8(got), before, "{what}: split held");
                assert_eq!(r.size(), *size);
                res.push((p, part, got));
            }
            7 if res.len() >= 2 => {
                let a = rng.below(res.len());
                let b = rng.below(res.len());
                if a != b {
                    let (pb, rb, sb) = res.swap_remove(a.max(b));
                    let (pa, ra, sa) = &mut res[a.min(b)];
                    match ra.merge(rb) {
                        Ok(()) => {
                            assert_eq!(*pa, pb, "{what}: merged across pools");
                            let before = round8(*sa) + round8(sb);
                            *sa += sb;
                            let back = before - round8(*sa);
                            model.own[pb] -= back;
                            model.reserved[pb] -= back;
                            assert_eq!(ra.size(), *sa);
                        }
                        Err(rb) => {
                            assert_ne!(*pa, pb, "{what}: merge refused in one pool");
                            res.push((pb, rb, sb));
                        }
                    }
                }
            }
            8 if !res.is_empty() => {
                let k = rng.below(res.len());
                let (p, r, size) = &mut res[k];
                let p = *p;
                let n = 1 + rng.below(3);
                let bytes = n * TREE[p].3 as usize;
                match r.allocate(n) {
                    Ok(a) => {
                        assert!(bytes <= *size, "{what}: allocated beyond the size");
                        assert_eq!(a.allocated_bytes(), bytes);
                        *size -= bytes;
                        model.reserved[p] -= bytes;
                        model.outstanding[p] += 1;
                        allocs.push((p, a));
                    }
                    Err(AllocError::ExceedsBudget { max_memory, .. }) => {
                        assert!(bytes > *size, "{what}: refused within the size");
                        assert_eq!(max_memory, *size);
                    }
                    Err(e) => panic!("{what}: {e:?}"),
                }
                assert_eq!(r.size(), *size);
            }
            9 | 10 if !allocs.is_empty() => {
                let k = rng.below(allocs.len());
                let (p, a) = allocs.swap_remove(k);
                model.own[p] -= a.allocated_bytes();
                model.outstanding[p] -= 1;
                drop(a);
            }
            11 if !res.is_empty() => {
                let k = rng.below(res.len());
                let (p, r, size) = res.swap_remove(k);
                if rng.below(2) == 0 {
                    drop(r);
                } else {
                    let mut r = r;
                    assert_eq!(r.free(), size, "{what}: free returns the size");
                    assert_eq!(r.size(), 0);
                }
                model.own[p] -= round8(size);
                model.reserved[p] -= round8(size);
            }
            12 => {
                let bs = TREE[p].3 as usize;
                let to = bs + rng.below(2 * TREE[p].1);
                pools[p].set_max_memory(to).expect("at least one buffer");
                model.max[p] = to;
            }
            13 => {
                let more = rng.below(600);
                assert_eq!(pools[p].add_max_memory(more), model.max[p] + more, "{what}");
                model.max[p] += more;
            }
            14 => {
                let less = rng.below(900);
                let bs = TREE[p].3 as usize;
                let u = model.in_use()[p];
                let want = less
                    .min(model.max[p].saturating_sub(u))
                    .min(model.max[p] - bs);
                assert_eq!(pools[p].forget_max_memory(less), want, "{what}: forgotten");
                model.max[p] -= want;
            }
            _ => continue,
        }
        check(&pools, &model, &what);
    }
    drop(res);
    drop(allocs);
    model.own = [0; N];
    model.reserved = [0; N];
    model.outstanding = [0; N];
    check(&pools, &model, &format!("seed {seed}: all given back"));
    // Closing the root retires every floor.
    pools[0].close();
    model.closed = [true; N];
    check(&pools, &model, &format!("seed {seed}: root closed"));
    assert!(pools[0].stats().is_drained());
}

#[test]
fn four_level_tree_books_match_a_model_at_every_quiescent_point() {
    watchdog(60, || {
        for seed in 0..rounds(24, 2) as u64 {
            run(seed, rounds(600, 40), false);
        }
    });
}

/// The same, with budgets changed at every level as the tree runs (`set_max_memory`,
/// `add_max_memory`, `forget_max_memory`): a shrink below what is held is counted as
/// overcommit (`PoolStats::overcommit_bytes`) and binds every later grant.
#[test]
fn four_level_tree_books_match_a_model_while_budgets_change() {
    watchdog(60, || {
        for seed in 0..rounds(24, 2) as u64 {
            run(seed, rounds(600, 40), true);
        }
    });
}

/// BUG (found by the model above, seed 9): a `try_` request of a grandchild refused at the
/// root (no room there) raised the middle pool's `peak_in_use_bytes`, though those bytes were
/// never in use there (`PoolStats::peak_in_use_bytes`: "the most bytes ever in use at
/// once"). The fast path of a chain held each ancestor's level in turn, noting its peak,
/// before it knew the request would be refused higher up.
#[test]
fn a_refused_try_leaves_no_phantom_peak_in_the_middle_of_the_chain() {
    let cfg = |max_memory| BufPoolCfg {
        buffer_size: BufferSize::S64,
        max_memory,
    };
    let root = BufPool::new(cfg(1024));
    let mid = root.child("mid", cfg(1024)).unwrap();
    let leaf = mid.child("leaf", cfg(1024)).unwrap();
    let held = root.try_reserve(1000).unwrap();
    for refused in [
        leaf.try_allocate(2).map(drop),
        leaf.try_reserve(128).map(drop),
        mid.try_allocate(2).map(drop),
    ] {
        assert_eq!(refused, Err(AllocError::WouldBlock));
    }
    let mut r = leaf.try_reserve(0).unwrap();
    assert_eq!(r.try_grow(128), Err(AllocError::WouldBlock));
    assert_eq!(r.resize_to(128), Err(AllocError::WouldBlock));
    for pool in [&mid, &leaf] {
        let s = pool.stats();
        assert_eq!(
            (s.in_use_bytes, s.peak_in_use_bytes),
            (0, 0),
            "{s}: nothing was ever in use here"
        );
    }
    assert_eq!(root.stats().peak_in_use_bytes, 1000);
    drop((held, r));
}
