//! A concurrent soak of one shared [`KvCache`]: 8 threads run seeded random operations (add a
//! sequence, with or without a declared prompt length; add one through a prefix lookup; protocol
//! steps over up to 3 sequences, retained, rolled back, or aborted after retain (their moves
//! fail: `Reservation::retain_with`); forks of any thread's idle sequence;
//! frees) on one cache whose pool is small enough that exhaustion is routine. The run is split
//! into rounds, each on a fresh cache with its own random policy: sharing maps (identity, CLA,
//! MLKV, LCKV) with full retention and prefix caching, StreamingLLM, H2O, SnapKV with chunked
//! prefill, a union, a model-wide sliding window, and a custom TOVA-like rule through
//! [`RetentionRule`] (the only user of the "last step's mass" scores).
//!
//! After every batch of [`BATCH`] operations of a thread, that thread stops the world and checks
//! - `KvCache::check_invariants` (pool lists, refcount == tables holding each page, tables,
//!   scores, compaction bound);
//! - pool conservation recounted from every table through the public API against the pool's
//!   own counters, no page in two groups or twice in one table (`common::recount`);
//! - the contents: every valid slot of every idle sequence holds that sequence's own token at the
//!   slot's text position in a shadow K/V store that executes what the protocol tells an engine
//!   to execute (copies, writes, compaction moves) (`common::Shadow`);
//! - the retention bound of every idle sequence.
//!
//! A shared registry says which thread owns which sequence and which are mid-step: a thread
//! steps and frees only its own sequences and forks only idle ones. Any error other than
//! [`Error::PoolExhausted`] is a violation. Threads' seeds derive from `LAYERKV_SOAK_SEED`
//! (default fixed) and are printed on failure; they fix each thread's choices, not the
//! interleaving, which is the scheduler's.
//!
//! Known races, worked around by default: see [`Gate`]; `LAYERKV_SOAK_RACES=1` drops the
//! workaround and the soak finds them.
//!
//! `cargo test -p layerkv --test soak` runs `LAYERKV_SOAK_OPS` operations (default 200 000);
//! `cargo test -p layerkv --test soak --release -- --ignored --nocapture` runs 10^6 and prints
//! operations per second and the count of every outcome.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use common::{recount, Shadow};
use layerkv::{
    bits, Budget, CacheConfig, CustomRetention, Error, KvCache, LayerKvPolicy, LayerMap,
    PolicyBuilder, RetainInput, RetainOutcome, Retention, RetentionRule, ScoreNeed, SeqId, Step,
};

const THREADS: usize = 8;
/// Operations of a thread between two stop-the-world checks.
const BATCH: usize = 50;
/// Sequences a thread holds at most (it frees one before adding or forking past this).
const MAX_OWN: usize = 4;
/// Tokens after which a thread frees a sequence (keeps histories and positions small).
const MAX_TOKENS: usize = 600;
/// Rounds (one policy and one cache each) a run is split into.
const ROUNDS: usize = 8;

/// The core's seeded stream, with the one draw the soak adds.
type Rng = layerkv::SplitMix64;

/// True `percent` times in 100.
fn chance(rng: &mut Rng, percent: usize) -> bool {
    rng.below(100) < percent
}

/// TOVA-like custom retention: keeps the `keep - 1` valid slots that the latest step's queries
/// attended to most, plus the newest valid slot.
#[derive(Debug)]
struct Tova {
    keep: usize,
}

impl RetentionRule for Tova {
    fn name(&self) -> String {
        format!("tova({})", self.keep)
    }

    fn score_need(&self) -> ScoreNeed {
        ScoreNeed {
            last: true,
            ..ScoreNeed::NONE
        }
    }

    fn select(
        &self,
        input: &RetainInput<'_>,
        keep: &mut [u64],
        scratch: &mut Vec<u32>,
    ) -> layerkv::Result<()> {
        let last = input.scores.last.ok_or_else(|| Error::InvalidRetention {
            retention: self.name(),
            reason: "no last-step scores".into(),
        })?;
        scratch.clear();
        scratch.extend((0..input.num_slots as u32).filter(|&s| bits::get(input.valid, s as usize)));
        let Some(&newest) = scratch.last() else {
            return Ok(());
        };
        bits::set(keep, newest as usize);
        // Highest mass first; ties to the newer slot. `total_cmp`: no NaN is ever equal.
        scratch.sort_unstable_by(|&a, &b| {
            last[b as usize]
                .total_cmp(&last[a as usize])
                .then(b.cmp(&a))
        });
        for &s in scratch.iter().filter(|&&s| s != newest).take(self.keep - 1) {
            bits::set(keep, s as usize);
        }
        Ok(())
    }

    fn max_tokens(&self, num_tokens: usize) -> usize {
        self.keep.min(num_tokens)
    }
}

/// One round's cache setup, drawn from the round's seed.
struct Setup {
    name: String,
    cache: KvCache,
    prompts: Vec<Vec<u32>>,
    /// Whether sequences declare prompt lengths (chunked prefill: SnapKV compresses at the end).
    declare_prompts: bool,
}

fn setup(round: usize, rng: &mut Rng) -> Setup {
    let bs = [2, 4, 8][rng.below(3)];
    let (map, retention, caching, model_window) = match round % ROUNDS {
        0 => (LayerMap::identity(4), Retention::Full, true, None),
        1 => {
            let sinks = rng.below(4);
            let window = sinks.max(1) + 4 + rng.below(36);
            let r = Retention::SinkWindow { sinks, window };
            (LayerMap::cla(6, 2), r, false, None)
        }
        2 => {
            let r = Retention::HeavyHitter {
                heavy: Budget::Tokens(rng.below(12)),
                recent: Budget::Tokens(1 + rng.below(8)),
            };
            (LayerMap::mlkv(8, 2 + rng.below(3)), r, false, None)
        }
        3 => {
            let observe = 2 + rng.below(3);
            let r = Retention::SnapKv {
                observe,
                budget: Budget::Tokens(observe + 2 + rng.below(16)),
                pool: 3,
            };
            (LayerMap::identity(3), r, false, None)
        }
        4 => {
            let r = Retention::Union {
                parts: vec![
                    Retention::SinkWindow {
                        sinks: 1 + rng.below(3),
                        window: 4 + rng.below(12),
                    },
                    Retention::HeavyHitter {
                        heavy: Budget::Ratio(0.1 + 0.2 * rng.below(3) as f64),
                        recent: Budget::Tokens(1 + rng.below(4)),
                    },
                ],
            };
            (LayerMap::cla(4, 2), r, false, None)
        }
        5 => (LayerMap::cla(4, 2), Retention::Full, true, None),
        6 => {
            let w = Some(8 + rng.below(40));
            (LayerMap::lckv(6, 1, 1), Retention::Full, false, w)
        }
        _ => {
            let r = Retention::Custom(CustomRetention(Arc::new(Tova {
                keep: 4 + rng.below(20),
            })));
            (LayerMap::identity(2), r, false, None)
        }
    };
    let map = map.unwrap();
    let groups = map.num_groups();
    let policy = PolicyBuilder::new(map)
        .retention(retention)
        .build()
        .unwrap();
    let name = format!(
        "{} groups, {}, block {bs}, prefix caching {caching}, model window {model_window:?}",
        groups,
        policy.retention(0)
    );
    // About two pages a group per sequence the threads may hold: exhaustion is routine.
    let num_pages = groups * (THREADS * MAX_OWN) / 2 + rng.below(8);
    let config = CacheConfig {
        block_size: bs,
        num_pages,
        bytes_per_token: 16,
        prefix_caching: caching,
        model_window,
        ..CacheConfig::default()
    };
    let cache = KvCache::new(Arc::new(policy), config).unwrap();
    // Nested prompts over one stem, each with its own tail: later prompts find earlier ones'
    // blocks.
    let stem: Vec<u32> = (0..48).map(|_| rng.next_u64() as u32 >> 1).collect();
    let prompts = (0..6)
        .map(|i| {
            let mut p = stem[..(i + 1) * 8].to_vec();
            p.extend((0..1 + i).map(|_| rng.next_u64() as u32 >> 1));
            p
        })
        .collect();
    Setup {
        name,
        cache,
        prompts,
        declare_prompts: round % ROUNDS == 3,
    }
}

/// The counts of every outcome.
#[derive(Debug, Default, Clone)]
struct Counts {
    ops: u64,
    adds: u64,
    prompts_declared: u64,
    prefix_lookups: u64,
    prefix_hits: u64,
    prefix_tokens_reused: u64,
    steps_retained: u64,
    steps_rolled_back: u64,
    steps_aborted: u64,
    aborts_with_moves: u64,
    steps_exhausted: u64,
    multi_sequence_steps: u64,
    tokens_written: u64,
    page_copies: u64,
    evicted_slots: u64,
    freed_pages: u64,
    moved_slots: u64,
    forks: u64,
    forks_of_other_threads: u64,
    frees: u64,
    preemptions: u64,
    checks: u64,
    sequences_checked: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        macro_rules! sum {
            ($($f:ident),*) => { $(self.$f += o.$f;)* };
        }
        sum!(
            ops,
            adds,
            prompts_declared,
            prefix_lookups,
            prefix_hits,
            prefix_tokens_reused,
            steps_retained,
            steps_rolled_back,
            steps_aborted,
            aborts_with_moves,
            steps_exhausted,
            multi_sequence_steps,
            tokens_written,
            page_copies,
            evicted_slots,
            freed_pages,
            moved_slots,
            forks,
            forks_of_other_threads,
            frees,
            preemptions,
            checks,
            sequences_checked
        );
    }
}

struct Entry {
    owner: usize,
    busy: bool,
    history: Vec<u32>,
}

/// Who may touch the cache when. Every operation holds the gate shared; a check holds it
/// exclusively, so it sees no half-done operation and the registry lists exactly the cache's
/// sequences.
///
/// One race of the protocol between threads sharing one cache is worked around unless
/// `LAYERKV_SOAK_RACES=1`: a rollback re-takes the page a reserve copied away from; if another
/// thread released that page in between (free, eviction), the rollback fails or takes a
/// stranger's page (pinned by `invariants.rs::rollback_after_the_copied_page_changed_hands`):
/// steps that roll back (or abort) hold the gate exclusively from reserve to the end.
///
/// A second race is gone by design: plain `retain` releases the pages compaction empties before
/// the engine has executed the moves that read them, so another thread's reserve could take
/// such a page and write it first. Steps here retain with `retain_with`, which holds those pages
/// until the moves ran, under the shared hold. With `LAYERKV_SOAK_RACES=1` they use `retain`
/// and then move, and the soak finds that race too.
struct Gate {
    lock: RwLock<()>,
    races: bool,
}

enum Held<'a> {
    Shared(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
}

impl Gate {
    fn shared(&self) -> Held<'_> {
        Held::Shared(self.lock.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn exclusive(&self) -> Held<'_> {
        Held::Exclusive(self.lock.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// The hold a step starts with.
    fn for_step(&self, rollback: bool) -> Held<'_> {
        if rollback && !self.races {
            self.exclusive()
        } else {
            self.shared()
        }
    }
}

/// How a step ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Retain,
    Rollback,
    /// `retain_with` whose moves fail: the step must be put back as a rollback would.
    Abort,
}

/// The message of the error the soak's failing moves return.
const INJECTED: &str = "soak: injected failure while moving";

/// The step protocol as an engine drives it, in one place: reserve; page copies and K/V writes
/// (into the shadow); attention mass; then retain and the compaction moves, or rollback. The
/// gate decides who else may run meanwhile (see [`Gate`]). Returns what retain did (`None`
/// after a rollback or an abort) and the number of page copies; an abort reports whether the
/// step had moves in `aborted_moves`.
fn drive_step(
    round: &Round,
    step: &mut Step,
    batch: &[(SeqId, &[u32])],
    ending: Ending,
    rng: &mut Rng,
    gathered: &mut Vec<u64>,
    aborted_moves: &mut bool,
) -> Result<(Option<RetainOutcome>, usize), Error> {
    let (cache, shadow, gate) = (&round.setup.cache, &round.shadow, &round.gate);
    let groups = cache.policy().layer_map().num_groups();
    let held = gate.for_step(ending != Ending::Retain);
    let mut reserved = cache.reserve(batch, step)?;
    let copies = reserved.copies().len();
    shadow.write_step(&reserved, batch, groups);
    let fill = |buf: Option<&mut [f32]>, salt: u64| {
        for (i, m) in buf.into_iter().flatten().enumerate() {
            *m = ((salt >> (i % 48)) & 0xffff) as f32 / 4096.0;
        }
    };
    for g in 0..groups {
        fill(reserved.mass_mut(g), rng.next_u64());
        fill(reserved.observed_mass_mut(g), rng.next_u64());
    }
    match ending {
        Ending::Rollback => {
            reserved.rollback()?;
            drop(held);
            Ok((None, copies))
        }
        Ending::Retain if gate.races => {
            let outcome = reserved.retain()?;
            shadow.apply_moves(step, gathered);
            drop(held);
            Ok((Some(outcome), copies))
        }
        Ending::Retain => {
            let outcome = reserved.retain_with(|step| {
                shadow.apply_moves(step, gathered);
                Ok::<(), Error>(())
            })?;
            drop(held);
            Ok((Some(outcome), copies))
        }
        Ending::Abort => {
            let r = reserved.retain_with(|step| {
                *aborted_moves = !step.moves().is_empty();
                Err(Error::InvalidConfig(INJECTED.into()))
            });
            drop(held);
            match r {
                Err(Error::InvalidConfig(m)) if m == INJECTED => Ok((None, copies)),
                Err(e) => Err(e),
                Ok(_) => Err(Error::InvalidConfig(
                    "soak: an aborted step retained".into(),
                )),
            }
        }
    }
}

/// What every thread of a round shares.
struct Round {
    setup: Setup,
    shadow: Shadow,
    gate: Gate,
    registry: Mutex<HashMap<SeqId, Entry>>,
    next_id: AtomicU64,
    stop: AtomicBool,
}

impl Round {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SeqId, Entry>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every check of the module docs; the caller holds the gate exclusively. Returns the number
    /// of sequences checked.
    fn check(&self) -> Result<usize, String> {
        let cache = &self.setup.cache;
        let reg = self.lock();
        let live: Vec<SeqId> = reg.keys().copied().collect();
        cache.check_invariants()?;
        if cache.num_sequences() != live.len() {
            return Err(format!(
                "cache has {} sequences, registry {}",
                cache.num_sequences(),
                live.len()
            ));
        }
        recount(cache, &live)?;
        let groups = cache.policy().layer_map().num_groups();
        let r = cache.read();
        for (&seq, e) in reg.iter().filter(|(_, e)| !e.busy) {
            self.shadow.check(&r, seq, &e.history, groups)?;
            for g in 0..groups {
                let bound = cache.policy().retention(g).max_tokens(e.history.len());
                let kept = r.table(seq, g).map_err(|e| e.to_string())?.num_valid();
                if kept > bound {
                    return Err(format!("seq {seq} group {g} keeps {kept} > {bound} tokens"));
                }
            }
        }
        Ok(live.len())
    }
}

/// One thread's run of `ops` operations.
fn worker(round: &Round, me: usize, seed: u64, ops: usize) -> Result<Counts, String> {
    let mut rng = Rng::new(seed);
    let mut c = Counts::default();
    let cache = &round.setup.cache;
    let mut step = Step::new();
    let mut gathered = Vec::new();
    let mut own: Vec<SeqId> = Vec::new();
    let fail = |i: usize, what: String| format!("thread {me} (seed {seed:#x}) op {i}: {what}");
    for i in 0..ops {
        if round.stop.load(Ordering::Relaxed) {
            break;
        }
        if i % BATCH == BATCH - 1 {
            let _world = round.gate.exclusive();
            c.sequences_checked += round.check().map_err(|e| fail(i, e))? as u64;
            c.checks += 1;
        }
        c.ops += 1;
        let roll = rng.below(100);
        // Free one past the limit (or after an exhaustion) before anything that adds one.
        if own.len() >= MAX_OWN && roll < 30 || (roll >= 85 && !own.is_empty()) {
            let _op = round.gate.shared();
            let id = own.swap_remove(rng.below(own.len()));
            round.lock().remove(&id);
            cache
                .free(id)
                .map_err(|e| fail(i, format!("free {id}: {e}")))?;
            c.frees += 1;
        } else if roll < 8 {
            // Add, with a declared prompt length half the time in the chunked-prefill round.
            let _op = round.gate.shared();
            let id = round.next_id.fetch_add(1, Ordering::Relaxed);
            cache.add_sequence(id).map_err(|e| fail(i, e.to_string()))?;
            if round.setup.declare_prompts && chance(&mut rng, 50) {
                let len = 2 + rng.below(60);
                cache
                    .set_prompt_len(id, len)
                    .map_err(|e| fail(i, e.to_string()))?;
                c.prompts_declared += 1;
            }
            round.lock().insert(
                id,
                Entry {
                    owner: me,
                    busy: false,
                    history: Vec::new(),
                },
            );
            own.push(id);
            c.adds += 1;
        } else if roll < 18 {
            // Add through a prefix lookup, then step the rest of the prompt.
            let prompt = &round.setup.prompts[rng.below(round.setup.prompts.len())];
            let id = round.next_id.fetch_add(1, Ordering::Relaxed);
            let reused = {
                let _op = round.gate.shared();
                let reused = cache
                    .add_sequence_with_prefix(id, prompt)
                    .map_err(|e| fail(i, e.to_string()))?;
                let bs = cache.config().block_size;
                if reused % bs != 0
                    || reused >= prompt.len()
                    || !cache.prefix_caching() && reused > 0
                {
                    return Err(fail(i, format!("prefix lookup reused {reused} tokens")));
                }
                round.lock().insert(
                    id,
                    Entry {
                        owner: me,
                        busy: true,
                        history: prompt[..reused].to_vec(),
                    },
                );
                reused
            };
            own.push(id);
            c.prefix_lookups += 1;
            c.prefix_hits += u64::from(reused > 0);
            c.prefix_tokens_reused += reused as u64;
            let rest = &prompt[reused..];
            let batch = [(id, rest)];
            run_step(
                round,
                &mut c,
                &mut step,
                &mut gathered,
                &batch,
                Ending::Retain,
                &mut rng,
            )
            .map_err(|e| fail(i, e))?;
        } else if roll < 30 {
            // Fork an idle sequence of any thread (its owner cannot start a step on it or free
            // it while the registry is locked).
            if own.len() >= MAX_OWN {
                continue;
            }
            let _op = round.gate.shared();
            let mut reg = round.lock();
            let idle: Vec<(SeqId, usize)> = reg
                .iter()
                .filter(|(_, e)| !e.busy)
                .map(|(&s, e)| (s, e.owner))
                .collect();
            if idle.is_empty() {
                continue;
            }
            let (parent, owner) = idle[rng.below(idle.len())];
            let child = round.next_id.fetch_add(1, Ordering::Relaxed);
            cache
                .fork(parent, child)
                .map_err(|e| fail(i, format!("fork {parent}: {e}")))?;
            let history = reg[&parent].history.clone();
            reg.insert(
                child,
                Entry {
                    owner: me,
                    busy: false,
                    history,
                },
            );
            own.push(child);
            c.forks += 1;
            c.forks_of_other_threads += u64::from(owner != me);
        } else if !own.is_empty() {
            // A step over 1 to 3 of this thread's sequences: decode tokens, sometimes a chunk.
            let n = 1 + rng.below(own.len().min(3));
            let mut ids: Vec<SeqId> = (0..n).map(|_| own[rng.below(own.len())]).collect();
            ids.sort_unstable();
            ids.dedup();
            let tokens: Vec<Vec<u32>> = ids
                .iter()
                .map(|_| {
                    let len = if chance(&mut rng, 20) {
                        2 + rng.below(24)
                    } else {
                        1
                    };
                    (0..len).map(|_| rng.next_u64() as u32 >> 1).collect()
                })
                .collect();
            let batch: Vec<(SeqId, &[u32])> = ids
                .iter()
                .copied()
                .zip(tokens.iter().map(Vec::as_slice))
                .collect();
            let ending = if chance(&mut rng, 20) {
                Ending::Rollback
            } else if chance(&mut rng, 10) {
                Ending::Abort
            } else {
                Ending::Retain
            };
            {
                let mut reg = round.lock();
                for id in &ids {
                    reg.get_mut(id).expect("own sequence").busy = true;
                }
            }
            c.multi_sequence_steps += u64::from(ids.len() > 1);
            let exhausted = run_step(
                round,
                &mut c,
                &mut step,
                &mut gathered,
                &batch,
                ending,
                &mut rng,
            )
            .map_err(|e| fail(i, e))?;
            // Preempt like a scheduler: after an exhaustion, free the longest of the batch
            // sometimes; free what has grown past the limit always.
            let _op = round.gate.shared();
            let mut reg = round.lock();
            let longest = ids.iter().copied().max_by_key(|id| reg[id].history.len());
            let victim = match longest {
                Some(id) if exhausted && chance(&mut rng, 50) => Some(id),
                Some(id) if reg[&id].history.len() > MAX_TOKENS => Some(id),
                _ => None,
            };
            if let Some(id) = victim {
                reg.remove(&id);
                own.retain(|&s| s != id);
                cache.free(id).map_err(|e| fail(i, e.to_string()))?;
                c.frees += 1;
                c.preemptions += u64::from(exhausted);
            }
        }
    }
    let _op = round.gate.shared();
    let mut reg = round.lock();
    for id in own {
        reg.remove(&id);
        cache.free(id).map_err(|e| fail(ops, e.to_string()))?;
        c.frees += 1;
    }
    Ok(c)
}

/// Runs one step of `batch` (whose sequences are marked busy) and records the outcome; marks
/// them idle again with their histories extended when retained. Returns whether the pool was
/// exhausted.
fn run_step(
    round: &Round,
    c: &mut Counts,
    step: &mut Step,
    gathered: &mut Vec<u64>,
    batch: &[(SeqId, &[u32])],
    ending: Ending,
    rng: &mut Rng,
) -> Result<bool, String> {
    let mut aborted_moves = false;
    let result = drive_step(
        round,
        step,
        batch,
        ending,
        rng,
        gathered,
        &mut aborted_moves,
    );
    let exhausted = match result {
        Ok((outcome, copies)) => {
            c.page_copies += copies as u64;
            match outcome {
                Some(o) => {
                    c.steps_retained += 1;
                    c.evicted_slots += o.evicted_slots as u64;
                    c.freed_pages += o.freed_pages as u64;
                    c.moved_slots += o.moved_slots as u64;
                    c.tokens_written += batch.iter().map(|b| b.1.len() as u64).sum::<u64>();
                }
                None if ending == Ending::Abort => {
                    c.steps_aborted += 1;
                    c.aborts_with_moves += u64::from(aborted_moves);
                }
                None => c.steps_rolled_back += 1,
            }
            false
        }
        Err(Error::PoolExhausted { .. }) => {
            c.steps_exhausted += 1;
            true
        }
        Err(e) => return Err(format!("step {batch:?} ({ending:?}): {e}")),
    };
    // Histories change under the shared gate: a check never sees a table and a history that
    // disagree.
    let _op = round.gate.shared();
    let mut reg = round.lock();
    for &(id, tokens) in batch {
        let e = reg.get_mut(&id).expect("own sequence");
        if !exhausted && ending == Ending::Retain {
            e.history.extend_from_slice(tokens);
        }
        e.busy = false;
    }
    Ok(exhausted)
}

/// Runs `total_ops` operations over [`ROUNDS`] rounds of [`THREADS`] threads; panics with every
/// thread's seed on a violation. Returns the summed counts and the wall time.
fn soak(total_ops: usize, base_seed: u64, races: bool) -> (Counts, f64) {
    let mut total = Counts::default();
    let mut secs = 0.0;
    for r in 0..ROUNDS {
        let mut rng = Rng::new(base_seed ^ (r as u64).wrapping_mul(0xa076_1d64_78bd_642f));
        let setup = setup(r, &mut rng);
        let (num_pages, bs) = (
            setup.cache.config().num_pages,
            setup.cache.config().block_size,
        );
        let seeds: Vec<u64> = (0..THREADS).map(|_| rng.next_u64()).collect();
        let round = Round {
            shadow: Shadow::new(num_pages, bs),
            setup,
            gate: Gate {
                lock: RwLock::new(()),
                races,
            },
            registry: Mutex::default(),
            next_id: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        };
        let per_thread = total_ops / ROUNDS / THREADS;
        let start = Instant::now();
        let results: Vec<Result<Counts, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = seeds
                .iter()
                .enumerate()
                .map(|(me, &seed)| {
                    let round = &round;
                    s.spawn(move || {
                        let out = worker(round, me, seed, per_thread);
                        if out.is_err() {
                            round.stop.store(true, Ordering::Relaxed);
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|p| {
                        round.stop.store(true, Ordering::Relaxed);
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                        Err(format!("a thread panicked: {}", msg.unwrap_or_default()))
                    })
                })
                .collect()
        });
        secs += start.elapsed().as_secs_f64();
        let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            errors.is_empty(),
            "round {r} ({}), base seed {base_seed:#x}, thread seeds {seeds:#x?}:\n{errors:#?}",
            round.setup.name
        );
        // Everything was freed: every page is back, and the last check passes.
        let end = round.check().expect("final check");
        let stats = round.setup.cache.pool_stats();
        assert_eq!((end, stats.num_used), (0, 0), "round {r}: pages leaked");
        for c in results.into_iter().flatten() {
            total.add(&c);
        }
        total.checks += 1;
    }
    (total, secs)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const DEFAULT_SEED: u64 = 0x50a4_c0de;

/// What every run must have seen: the soak exercised what it claims to.
fn assert_coverage(c: &Counts) {
    assert!(c.steps_exhausted > 0, "the pool never ran out: {c:#?}");
    assert!(c.steps_retained > c.steps_exhausted / 4, "{c:#?}");
    assert!(c.steps_rolled_back > 0, "{c:#?}");
    assert!(
        c.aborts_with_moves > 0,
        "no abort undid compaction moves: {c:#?}"
    );
    assert!(c.multi_sequence_steps > 0, "{c:#?}");
    assert!(c.forks_of_other_threads > 0, "{c:#?}");
    assert!(c.prefix_hits > 0, "no prefix lookup hit: {c:#?}");
    assert!(c.page_copies > 0, "no copy-on-write: {c:#?}");
    assert!(c.moved_slots > 0, "no compaction moves: {c:#?}");
    assert!(c.prompts_declared > 0, "{c:#?}");
    assert!(c.checks > 0 && c.sequences_checked > 0, "{c:#?}");
}

/// The CI soak: `LAYERKV_SOAK_OPS` operations (default 200 000), `LAYERKV_SOAK_SEED`.
///
/// Shown to fail: with `LAYERKV_SOAK_RACES=1` (the races of [`Gate`] surface as a rollback
/// error, an untracked shared tail or a shadow mismatch; since steps retain with
/// `retain_with` and races mode uses plain `retain`, seeds 1, 2 and 3 at 10^6 operations all
/// fail with a shadow mismatch: a slot overwritten before its row moved out), with `Shadow::apply_moves` skipped (a shadow mismatch at
/// the first check), and with `BlockPool::release` not moving `num_used` (the pool's own check;
/// the recount when that is off too), each in turn.
#[test]
fn eight_threads_share_one_cache() {
    let ops = env_or("LAYERKV_SOAK_OPS", 200_000);
    let seed = env_or("LAYERKV_SOAK_SEED", DEFAULT_SEED);
    let races = env_or("LAYERKV_SOAK_RACES", 0) == 1;
    let (c, _) = soak(ops, seed, races);
    assert_coverage(&c);
}

/// 10^6 operations; prints operations per second and the counts.
#[test]
#[ignore = "long: run with --release -- --ignored --nocapture"]
fn eight_threads_share_one_cache_million() {
    let ops = env_or("LAYERKV_SOAK_OPS", 1_000_000);
    let seed = env_or("LAYERKV_SOAK_SEED", DEFAULT_SEED);
    let races = env_or("LAYERKV_SOAK_RACES", 0) == 1;
    let (c, secs) = soak(ops, seed, races);
    assert_coverage(&c);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "soak: {} operations, {THREADS} threads, {ROUNDS} rounds, seed {seed:#x}, {secs:.2} s, \
         {:.0} operations/s, {} cores ({cpu}), 0 violations",
        c.ops,
        c.ops as f64 / secs,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!("{c:#?}");
}
