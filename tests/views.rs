//! Issue 18, item 3: the safe uninitialised views of an allocation (`uninit_mut`,
//! `buffers_uninit_mut`) against what the crate believes is initialised (a zeroed allocation
//! counts as initialised throughout; a `FilledAllocation` tracks an initialised prefix).
//!
//! Safe code may write `MaybeUninit::uninit()` through those views, so after one was handed
//! out the crate must not read those bytes back as initialised: not through `set_filled` and
//! the filled view, not through `freeze`. The tests drive every sequence of the safe operations,
//! up to a length (3 under Miri, over fewer arguments, see `alphabet`; 4 natively), over a
//! zeroed and a plain allocation, against a model of what each byte is known to hold, and check
//! that every read sees only bytes that were written (the zeroed ones as 0). Under Miri a read
//! of an uninitialised byte is reported as undefined behaviour before the model's assertion
//! could fail:
//! `MIRIFLAGS="-Zmiri-strict-provenance" cargo +nightly miri test --test views`.

use std::mem::MaybeUninit;

#[cfg(feature = "bytes")]
use bytes::BufMut;
use membudget::{BufPool, BufPoolAllocation, BufPoolCfg, BufferSize, FilledAllocation};

/// Two buffers of 8 bytes: a view of each buffer and one across both are told apart.
const BUF: usize = 8;
const N: usize = 2;
const CAP: usize = BUF * N;

/// The longest sequence tried: every sequence up to it is.
const MAX_LEN: usize = if cfg!(miri) { 3 } else { 4 };

/// What is written through an uninitialised view.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Val {
    /// `MaybeUninit::uninit()`: safe, and de-initialises the byte.
    Uninit,
    /// A real byte.
    Byte(u8),
}

impl Val {
    fn known(self) -> Option<u8> {
        match self {
            Val::Uninit => None,
            Val::Byte(byte) => Some(byte),
        }
    }

    fn write(self) -> MaybeUninit<u8> {
        match self {
            Val::Uninit => MaybeUninit::uninit(),
            Val::Byte(byte) => MaybeUninit::new(byte),
        }
    }
}

/// One safe operation. Each applies to whichever form the allocation is in, turning it into
/// the form it needs first (`into_allocation` for the views, `into_filled` for the rest).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    /// `allocation.uninit_mut()[pos] = val`.
    Whole(usize, Val),
    /// `allocation.buffers_uninit_mut().nth(buffer)[offset] = val`.
    Buffers(usize, usize, Val),
    /// `filled.set_filled(len)`, then a read of the filled view.
    SetFilled(usize),
    /// `filled.extend_from_slice(&[byte])`.
    Extend(u8),
    /// `filled.read_from(&mut &[byte][..])` (zeroes what was never initialised first).
    ReadFrom(u8),
    /// `BufMut::put_u8` (through `chunk_mut` and `advance_mut`).
    #[cfg(feature = "bytes")]
    PutU8(u8),
    /// Every read of the filled view: `filled`, `Deref`, `AsRef`, `buffers`, `io_slices`,
    /// `filled_mut`.
    Read,
    /// `into_allocation().into_filled()` (or `into_filled()` of a plain allocation).
    Refill,
    /// `freeze()` and a read of the `Bytes`; always last.
    #[cfg(feature = "bytes")]
    Freeze,
}

impl Op {
    /// Whether nothing can follow the operation (it consumes the allocation).
    fn is_last(self) -> bool {
        #[cfg(feature = "bytes")]
        let last = self == Op::Freeze;
        #[cfg(not(feature = "bytes"))]
        let last = {
            let _ = self;
            false
        };
        last
    }
}

/// The operations tried at each step: both views at the start of the first buffer and inside
/// the second, each writing a hole or a byte; `set_filled` of one byte and of all. Under Miri,
/// where one sequence costs some 25 ms, a subset that still has every operation, a hole
/// through each view and a byte through one, and the `set_filled` that exposes everything.
fn alphabet() -> Vec<Op> {
    let mut ops = vec![
        Op::Whole(0, Val::Uninit),
        Op::Whole(9, Val::Byte(0xA9)),
        Op::Buffers(1, 1, Val::Uninit),
        Op::SetFilled(CAP),
        Op::Extend(0xE1),
        Op::ReadFrom(0xD1),
        Op::Read,
        Op::Refill,
    ];
    if !cfg!(miri) {
        ops.extend([
            Op::Whole(9, Val::Uninit),
            Op::Whole(0, Val::Byte(0xA0)),
            Op::Buffers(0, 0, Val::Uninit),
            Op::Buffers(0, 0, Val::Byte(0xB0)),
            Op::Buffers(1, 1, Val::Byte(0xB9)),
            Op::SetFilled(1),
        ]);
    }
    #[cfg(feature = "bytes")]
    ops.extend([Op::PutU8(0xF1), Op::Freeze]);
    ops
}

/// How many sequences `every_sequence` runs: `ops` operations of which `last` end one.
fn sequences(ops: usize, last: usize) -> usize {
    (1..=MAX_LEN)
        .map(|len| (ops - last).pow(len as u32 - 1) * ops)
        .sum()
}

/// The allocation in one of its two forms.
enum Subject {
    Plain(BufPoolAllocation),
    Filled(FilledAllocation),
}

/// What the test knows, and what the crate is documented to know.
struct Model {
    /// What each byte is known to hold; `None`: possibly uninitialised.
    bytes: [Option<u8>; CAP],
    /// The crate counts the block as initialised throughout: zeroed, and no uninitialised
    /// view handed out since.
    whole_init: bool,
    /// In the filled form: the initialised prefix the crate tracks, and the filled length.
    init: usize,
    filled: usize,
}

struct Run<'a> {
    seq: &'a [Op],
    subject: Option<Subject>,
    model: Model,
}

impl Run<'_> {
    fn plain(&mut self) -> &mut BufPoolAllocation {
        if let Some(Subject::Filled(_)) = self.subject {
            let Some(Subject::Filled(filled)) = self.subject.take() else {
                unreachable!()
            };
            self.subject = Some(Subject::Plain(filled.into_allocation()));
        }
        match self.subject.as_mut() {
            Some(Subject::Plain(allocation)) => allocation,
            _ => unreachable!(),
        }
    }

    fn filled(&mut self) -> &mut FilledAllocation {
        if let Some(Subject::Plain(_)) = self.subject {
            let Some(Subject::Plain(allocation)) = self.subject.take() else {
                unreachable!()
            };
            self.subject = Some(Subject::Filled(allocation.into_filled()));
            self.model.init = if self.model.whole_init { CAP } else { 0 };
            self.model.filled = 0;
        }
        match self.subject.as_mut() {
            Some(Subject::Filled(filled)) => filled,
            _ => unreachable!(),
        }
    }

    /// The filled form, with the model beside it (borrowed apart).
    fn parts(&mut self) -> (&mut FilledAllocation, &Model, &[Op]) {
        self.filled();
        let Some(Subject::Filled(filled)) = self.subject.as_mut() else {
            unreachable!()
        };
        (filled, &self.model, self.seq)
    }

    fn check_filled(&mut self, what: &str) {
        let (filled, model, seq) = self.parts();
        check(model, seq, filled.filled(), what);
    }

    /// The model's side of writing `val` at `pos` through an uninitialised view.
    fn viewed(&mut self, pos: usize, val: Val) {
        self.model.bytes[pos] = val.known();
        self.model.whole_init = false;
    }

    /// The model's side of one byte appended at `filled`.
    fn appended(&mut self, byte: u8) {
        let at = self.model.filled;
        self.model.bytes[at] = Some(byte);
        self.model.init = self.model.init.max(at + 1);
        self.model.filled = at + 1;
    }

    fn step(&mut self, op: Op) {
        let seq = self.seq;
        match op {
            Op::Whole(pos, val) => {
                self.plain().uninit_mut()[pos] = val.write();
                self.viewed(pos, val);
            }
            Op::Buffers(buffer, offset, val) => {
                let mut buffers = self.plain().buffers_uninit_mut();
                assert_eq!(buffers.len(), N);
                let view = buffers.nth(buffer).unwrap();
                assert_eq!(view.len(), BUF);
                view[offset] = val.write();
                self.viewed(buffer * BUF + offset, val);
            }
            Op::SetFilled(len) => {
                let accepted = self.filled().set_filled(len);
                if accepted {
                    self.model.filled = len;
                }
                // The read first: under Miri an uninitialised byte is reported right here.
                self.check_filled("filled() after set_filled");
                assert_eq!(
                    accepted,
                    len <= self.model.init,
                    "set_filled({len}) after {seq:?}"
                );
            }
            Op::Extend(byte) => {
                let written = self.filled().extend_from_slice(&[byte]);
                let room = self.model.filled < CAP;
                assert_eq!(
                    written,
                    usize::from(room),
                    "extend_from_slice after {seq:?}"
                );
                if room {
                    self.appended(byte);
                }
                self.check_filled("filled() after extend_from_slice");
            }
            Op::ReadFrom(byte) => {
                let mut source: &[u8] = &[byte];
                let read = self.filled().read_from(&mut source).unwrap();
                let room = self.model.filled < CAP;
                assert_eq!(read, usize::from(room), "read_from after {seq:?}");
                if room {
                    // What was never initialised is zeroed first.
                    for known in &mut self.model.bytes[self.model.init..] {
                        *known = Some(0);
                    }
                    self.model.init = CAP;
                    self.appended(byte);
                }
                self.check_filled("filled() after read_from");
            }
            #[cfg(feature = "bytes")]
            Op::PutU8(byte) => {
                let filled = self.filled();
                if filled.remaining_mut() > 0 {
                    filled.put_u8(byte);
                    self.appended(byte);
                }
                self.check_filled("filled() after put_u8");
            }
            Op::Read => {
                let (filled, model, seq) = self.parts();
                check(model, seq, filled.filled(), "filled()");
                check(model, seq, &filled[..], "deref");
                check(model, seq, AsRef::<[u8]>::as_ref(filled), "as_ref()");
                let buffers: Vec<&[u8]> = filled.buffers().collect();
                check_pieces(model, seq, &buffers, "buffers()");
                let io_slices = filled.io_slices();
                let io_slices: Vec<&[u8]> = io_slices.iter().map(|slice| &slice[..]).collect();
                check_pieces(model, seq, &io_slices, "io_slices()");
                check(model, seq, filled.filled_mut(), "filled_mut()");
            }
            Op::Refill => {
                self.plain();
                self.check_filled("filled() after a fresh into_filled");
            }
            #[cfg(feature = "bytes")]
            Op::Freeze => {
                self.filled();
                let Some(Subject::Filled(filled)) = self.subject.take() else {
                    unreachable!()
                };
                let frozen = filled.freeze();
                check(&self.model, seq, &frozen, "freeze()");
                // Its slices read the same memory.
                if let Some(tail) = frozen.len().checked_sub(1) {
                    check_at(
                        &self.model,
                        seq,
                        1,
                        &frozen.slice(1..),
                        "freeze().slice(1..)",
                    );
                    assert_eq!(frozen.slice(1..).len(), tail);
                }
            }
        }
    }
}

/// Reads every byte of `view`, the filled view, and compares it with the model: a typed read
/// of each `u8`, which Miri reports if the byte is uninitialised.
#[track_caller]
fn check(model: &Model, seq: &[Op], view: &[u8], what: &str) {
    check_at(model, seq, 0, view, what);
    assert_eq!(view.len(), model.filled, "{what}: length after {seq:?}");
}

/// `check` of the filled view cut into pieces (`buffers`, `io_slices`): each a full buffer
/// but perhaps the last.
#[track_caller]
fn check_pieces(model: &Model, seq: &[Op], pieces: &[&[u8]], what: &str) {
    let mut at = 0;
    for (i, piece) in pieces.iter().enumerate() {
        if i + 1 < pieces.len() {
            assert_eq!(piece.len(), BUF, "{what}: piece {i} after {seq:?}");
        }
        check_at(model, seq, at, piece, what);
        at += piece.len();
    }
    assert_eq!(at, model.filled, "{what}: length after {seq:?}");
}

/// Compares `view`, the bytes from `at` on, with the model, reading each byte.
#[track_caller]
fn check_at(model: &Model, seq: &[Op], at: usize, view: &[u8], what: &str) {
    let known = &model.bytes[at..at + view.len()];
    if let Some(expected) = known.iter().copied().collect::<Option<Vec<u8>>>() {
        // One comparison (a `memcmp`, which Miri also checks reads initialised bytes only).
        assert_eq!(view, &expected[..], "{what}: bytes from {at} after {seq:?}");
        return;
    }
    for (i, &byte) in view.iter().enumerate() {
        let byte = std::hint::black_box(byte);
        let i = at + i;
        match model.bytes[i] {
            Some(known) => assert_eq!(byte, known, "{what}: byte {i} after {seq:?}"),
            None => panic!(
                "{what}: byte {i} ({byte:#04x}) is exposed but was never initialised, \
                 after {seq:?}"
            ),
        }
    }
}

/// Runs `seq` on a fresh allocation of `N` buffers from `pool`, zeroed or not.
fn run(pool: &BufPool, zeroed: bool, seq: &[Op]) {
    let allocation = if zeroed {
        pool.try_allocate_zeroed(N)
    } else {
        pool.try_allocate(N)
    }
    .unwrap();
    let mut run = Run {
        seq,
        subject: Some(Subject::Plain(allocation)),
        model: Model {
            bytes: [if zeroed { Some(0) } else { None }; CAP],
            whole_init: zeroed,
            init: 0,
            filled: 0,
        },
    };
    for &op in seq {
        run.step(op);
    }
}

/// Every sequence of the alphabet from length 1 to `MAX_LEN`, the shorter ones first (so a
/// failure shows a shortest sequence), `Freeze` only last; returns how many were run.
fn every_sequence(zeroed: bool) -> usize {
    let pool = pool();
    let alphabet = alphabet();
    let mut count = 0;
    for len in 1..=MAX_LEN {
        // An odometer over the alphabet: `digits` is the sequence's indices.
        let mut digits = vec![0; len];
        'sequences: loop {
            let seq: Vec<Op> = digits.iter().map(|&d| alphabet[d]).collect();
            if !seq[..len - 1].iter().any(|op| op.is_last()) {
                run(&pool, zeroed, &seq);
                count += 1;
            }
            for digit in digits.iter_mut().rev() {
                *digit += 1;
                if *digit < alphabet.len() {
                    continue 'sequences;
                }
                *digit = 0;
            }
            break;
        }
    }
    assert_eq!(pool.stats().in_use_bytes, 0);
    count
}

/// Room for one allocation of `N` buffers at a time.
fn pool() -> BufPool {
    BufPool::new(BufPoolCfg {
        buffer_size: BufferSize::S8,
        max_memory: CAP,
    })
}

#[test]
fn every_sequence_on_a_zeroed_allocation() {
    let count = every_sequence(true);
    assert_eq!(
        count,
        sequences(alphabet().len(), usize::from(cfg!(feature = "bytes")))
    );
}

#[test]
fn every_sequence_on_a_plain_allocation() {
    let count = every_sequence(false);
    assert_eq!(
        count,
        sequences(alphabet().len(), usize::from(cfg!(feature = "bytes")))
    );
}

// ---- the bug's shortest paths, one by one ----

#[test]
fn uninit_mut_forgets_that_a_zeroed_allocation_is_initialised() {
    let pool = pool();
    let mut allocation = pool.try_allocate_zeroed(N).unwrap();
    allocation.uninit_mut()[3] = MaybeUninit::uninit();
    let mut filled = allocation.into_filled();
    assert!(!filled.set_filled(CAP), "byte 3 is uninitialised");
    assert!(!filled.set_filled(1), "nothing is known to be initialised");
    assert!(filled.set_filled(0));
    filled.extend_from_slice(b"ab");
    assert_eq!(filled.filled(), b"ab");
    assert!(!filled.set_filled(3));
}

#[test]
fn buffers_uninit_mut_forgets_that_a_zeroed_allocation_is_initialised() {
    let pool = pool();
    let mut allocation = pool.try_allocate_zeroed(N).unwrap();
    allocation.buffers_uninit_mut().nth(1).unwrap()[0] = MaybeUninit::uninit();
    let mut filled = allocation.into_filled();
    assert!(!filled.set_filled(CAP), "byte 8 is uninitialised");
}

#[test]
fn a_view_forgets_even_through_a_filled_round_trip() {
    let pool = pool();
    let filled = pool.try_allocate_zeroed(N).unwrap().into_filled();
    let mut allocation = filled.into_allocation();
    allocation.uninit_mut()[0] = MaybeUninit::uninit();
    let mut filled = allocation.into_filled();
    assert!(!filled.set_filled(CAP));
    // `read_from` zeroes what is not known to be initialised before the reader sees it.
    let mut source: &[u8] = b"x";
    assert_eq!(filled.read_from(&mut source).unwrap(), 1);
    assert!(filled.set_filled(CAP));
    assert_eq!(filled.filled(), b"x\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
}

#[cfg(feature = "bytes")]
#[test]
fn freeze_after_a_view_exposes_no_uninitialised_byte() {
    let pool = pool();
    let mut allocation = pool.try_allocate_zeroed(N).unwrap();
    allocation.uninit_mut()[CAP - 1] = MaybeUninit::uninit();
    let mut filled = allocation.into_filled();
    assert!(!filled.set_filled(CAP));
    filled.extend_from_slice(b"abc");
    assert_eq!(&filled.freeze()[..], b"abc");
}

#[test]
fn a_zeroed_allocation_without_a_view_still_reads_as_zeros() {
    let pool = pool();
    let mut filled = pool.try_allocate_zeroed(N).unwrap().into_filled();
    filled.extend_from_slice(b"ab");
    // Through a round trip, too: the cursor's own writes keep the block initialised.
    let mut filled = filled.into_allocation().into_filled();
    assert!(filled.set_filled(CAP));
    assert_eq!(&filled[..3], b"ab\0");
    assert!(filled[3..].iter().all(|&byte| byte == 0));
}
