//! [`Reservation`]: the reserved step as a guard. It derefs to the [`Step`] (plans, slots,
//! attention-mass buffers); [`Reservation::retain`] commits it, and dropping it uncommitted
//! (an early `?`, a panic unwinding through the engine) rolls every table, refcount, score and
//! sink shift back to before the reserve. This is TGI's RAII allocation and llama.cpp's
//! plan/apply split in one value: nothing an engine forgets can leave the cache reserved.
//! [`Reservation::retain_with`] extends the transaction over the engine's compaction moves.

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
    ///
    /// The pages compaction empties go back to the pool at once, so execute [`Step::moves`]
    /// before any other reserve on this cache (another thread's included), or use
    /// [`Reservation::retain_with`], which keeps them until the moves ran.
    pub fn retain(self) -> Result<RetainOutcome> {
        self.cache
            .core
            .retain(&mut self.cache.state.write(), self.step, false)
        // On error the step is still reserved: `drop` rolls it back.
    }

    /// [`Reservation::retain`] as one transaction with the engine's execution of the
    /// compaction moves: retains, runs `execute` on the retained step (move the K/V rows of
    /// [`Step::moves`]), then commits. If `execute` fails (or panics), every table, score and
    /// page is put back as before the reserve and the error is returned, so the store's rows
    /// for live slots are still right as long as `execute` wrote nothing it did not finish
    /// (gather every source first, as `KvStore::move_slots` does). The pages compaction
    /// empties stay held until the commit, so no other step can reuse one before its rows
    /// moved out; the cache's lock is not held while `execute` runs.
    ///
    /// Costs a copy of each retained (sequence, group)'s table and scores, O(live slots).
    pub fn retain_with<E: From<crate::Error>>(
        self,
        execute: impl FnOnce(&Step) -> std::result::Result<(), E>,
    ) -> std::result::Result<RetainOutcome, E> {
        let outcome = self
            .cache
            .core
            .retain(&mut self.cache.state.write(), self.step, true)?;
        // On an error below the step is `Retaining`: `drop` aborts the retain and rolls back.
        execute(self.step)?;
        self.cache
            .core
            .commit(&mut self.cache.state.write(), self.step)?;
        Ok(outcome)
    }

    /// Ends a probe step ([`KvCache::reserve_probe`]): for every sequence and every group
    /// whose retention needs probes, each slot that existed before the step keeps the larger of
    /// its probe score and the mass the step's rows put on it ([`Step::mass_mut`]), then the
    /// step is rolled back: its tokens, pages and copies are gone, only the scores stay.
    /// Errors (and rolls back) on a step not reserved as a probe.
    ///
    /// [`KvCache::reserve_probe`]: crate::KvCache::reserve_probe
    pub fn finish_probe(mut self) -> Result<()> {
        if !self.step.probe {
            return Err(crate::Error::InvalidConfig(
                "finish_probe: the step was not reserved as a probe (KvCache::reserve_probe)"
                    .into(),
            ));
        }
        self.cache
            .core
            .fold_probe(&mut self.cache.state.write(), self.step)?;
        self.undo()
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
        match self.step.state {
            StepState::Reserved => {
                let r = self.undo();
                debug_assert!(r.is_ok(), "rollback of a reserved step failed: {r:?}");
            }
            StepState::Retaining => {
                let r = self
                    .cache
                    .core
                    .abort(&mut self.cache.state.write(), self.step);
                if r.is_err() {
                    self.step.state = StepState::Idle;
                }
                debug_assert!(r.is_ok(), "abort of a retained step failed: {r:?}");
            }
            StepState::Idle | StepState::Retained => {}
        }
    }
}
