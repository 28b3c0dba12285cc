//! The sampler's hot path allocates nothing (STYLE.md house rule 2): after the first token,
//! [`Sampler::sample`] with every filter and penalty on reuses its buffers. Counted through a
//! `#[global_allocator]` wrapping `System`, per thread (const-initialised thread-locals, which
//! never allocate), so tests running in parallel do not disturb the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use layerkv_model::generate::{Sampler, Sampling};

struct Counting;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn bump() {
    if ACTIVE.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every call forwards to `System` unchanged; the bookkeeping touches only
// const-initialised thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations `f` makes on this thread.
fn count(f: impl FnOnce()) -> usize {
    ALLOCS.with(|c| c.set(0));
    ACTIVE.with(|a| a.set(true));
    f();
    ACTIVE.with(|a| a.set(false));
    ALLOCS.with(Cell::get)
}

#[test]
fn sampling_allocates_nothing_after_the_first_token() {
    const VOCAB: usize = 49_152;
    assert!(
        count(|| drop(std::hint::black_box(vec![0u8; 8]))) > 0,
        "the counter sees allocations"
    );
    // Seeded pseudo-random logits, a new row per step.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rows: Vec<Vec<f32>> = (0..64)
        .map(|_| {
            (0..VOCAB)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 * 8.0
                })
                .collect()
        })
        .collect();
    for filters in [
        Sampling {
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            ..Sampling::greedy()
        },
        Sampling {
            top_p: 0.9,
            ..Sampling::greedy()
        },
        Sampling {
            min_p: 0.1,
            ..Sampling::greedy()
        },
    ] {
        let cfg = Sampling {
            temperature: 0.8,
            repetition_penalty: 1.1,
            presence_penalty: 0.2,
            frequency_penalty: 0.1,
            penalty_last_n: 16,
            seed: 3,
            ..filters
        };
        let mut s = Sampler::new(cfg);
        // The first token sizes the buffers; the prompt fills the penalty window past its
        // length, so tokens also leave it during the measurement.
        s.observe(&(0..40).collect::<Vec<u32>>());
        s.sample(&rows[0]);
        let n = count(|| {
            for row in &rows[1..] {
                std::hint::black_box(s.sample(row));
            }
        });
        assert_eq!(n, 0, "{cfg:?}");
    }
    // Greedy too.
    let mut s = Sampler::new(Sampling::greedy());
    s.sample(&rows[0]);
    assert_eq!(
        count(|| rows.iter().for_each(|r| {
            s.sample(r);
        })),
        0
    );
    rows.clear();
}
