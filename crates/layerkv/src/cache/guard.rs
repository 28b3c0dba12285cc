//! [`Reservation`]: the reserved step as a guard. It derefs to the [`Step`] (plans, slots,
//! attention-mass buffers); [`Reservation::retain`] commits it, and dropping it uncommitted
//! (an early `?`, a panic unwinding through the engine) rolls every table, refcount, score and
//! sink shift back to before the reserve. This is TGI's RAII allocation and llama.cpp's
//! plan/apply split in one value: nothing an engine forgets can leave the cache reserved.

use std::ops::{Deref, DerefMut};

use crate::error::Result;
use crate::step::{RetainOutcome, Step, StepState};

use super::KvCache;

/// A reserved step: execute its plans, attend, then [`Reservation::retain`]. See the module
/// docs.
#[must_use = "dropping a reservation rolls the step back; call `retain` to commit it"]
#[derive(Debug)]
pub struct Reservation<'a> {
    cache: &'a KvCache,
    step: &'a mut Step,
}

impl<'a> Reservation<'a> {
    /// The guard of a step `cache` has just reserved (state `Reserved`).
    pub(crate) fn new(cache: &'a KvCache, step: &'a mut Step) -> Self {
        debug_assert_eq!(step.state, StepState::Reserved);
        Self { cache, step }
    }

    /// Step protocol 3/3: takes the step's attention mass, runs every group's retention for
    /// every sequence with its own phase, returns pages left empty to the pool and plans the
    /// compaction moves ([`Step::moves`]) the engine executes before its next reserve.
    ///
    /// On error nothing was retained and the step is rolled back.
    pub fn retain(self) -> Result<RetainOutcome> {
        self.cache
            .core
            .retain(&mut self.cache.state.write(), self.step)
        // On error the step is still reserved: `drop` rolls it back.
    }

    /// Rolls the step back now (what dropping the reservation does), reporting an error if the
    /// cache's state did not match the step.
    pub fn rollback(mut self) -> Result<()> {
        self.undo()
        // `step.state` is no longer `Reserved`: `drop` does nothing.
    }

    /// Rolls the step back under the cache's lock. A failed rollback (a cache whose state does
    /// not match the step) still leaves the step unreserved, so `drop` never tries it twice.
    fn undo(&mut self) -> Result<()> {
        let r = self
            .cache
            .core
            .rollback(&mut self.cache.state.write(), self.step);
        if r.is_err() {
            self.step.state = StepState::Idle;
        }
        r
    }
}

impl Deref for Reservation<'_> {
    type Target = Step;

    fn deref(&self) -> &Step {
        self.step
    }
}

impl DerefMut for Reservation<'_> {
    fn deref_mut(&mut self) -> &mut Step {
        self.step
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.step.state == StepState::Reserved {
            let r = self.undo();
            debug_assert!(r.is_ok(), "rollback of a reserved step failed: {r:?}");
        }
    }
}
