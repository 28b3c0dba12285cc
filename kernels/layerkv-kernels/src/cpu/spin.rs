//! [`SpinPool`]: a fork-join pool whose workers spin briefly between jobs, for the decode-time
//! quantized products.
//!
//! Batch-1 decode runs about 200 small matrix-vector products per token, each a few tens of
//! microseconds. On rayon's pool every one of them wakes workers that fell asleep in the gap
//! before it (a futex wake and a reschedule each: about 17% of a token on a 2-core VM). llama.cpp
//! keeps its threads spinning on an atomic between the ops of a graph; this pool does the same
//! for a bounded time ([`SpinPool::spin`], default [`DEFAULT_SPIN`]) after each job, then parks
//! them, so a process that stops decoding stops burning cores within that time.
//!
//! A job is `tasks` indices handed out one at a time; the caller runs tasks too and returns when
//! every task has finished. The job's generation, its task count and the next index share one
//! atomic word, so a claim is one compare-and-swap that also proves the job is still live: a
//! worker that wakes late can never run a task of a job that already ended (whose closure is
//! gone) or count it towards the next one.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long idle workers spin for the next job before they park (overridden by the
/// `LAYERKV_SPIN_US` environment variable): long enough to bridge the gaps between one layer's
/// products, short enough to leave the cores to others soon after decoding stops.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

/// A job's closure, type-erased; only dereferenced while the job runs.
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize) + Sync));
// SAFETY: the pointee is `Sync` and outlives every use (see `SpinPool::run`).
unsafe impl Send for JobPtr {}
unsafe impl Sync for JobPtr {}

struct Shared {
    /// The job word: generation (high 32 bits), tasks (16 bits), next index to claim (16 bits).
    claim: AtomicU64,
    /// Tasks of the current job that have finished.
    done: AtomicUsize,
    /// The current job's closure. Written by the caller only while no task runs (before it
    /// publishes a generation, after every task finished); read after a successful claim,
    /// which the caller's release store of the generation orders after the write.
    job: UnsafeCell<Option<JobPtr>>,
    /// Raised by a task that panicked; the caller re-raises.
    panicked: AtomicBool,
    /// Parked workers wait here; the mutex guards nothing but the wake-up.
    park: Mutex<()>,
    wake: Condvar,
    sleepers: AtomicUsize,
    spin: Duration,
}

// SAFETY: `job` is accessed as documented on the field; everything else is atomics and locks.
unsafe impl Sync for Shared {}

/// A fork-join pool of spinning workers (see the module docs).
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: usize,
    /// One job at a time: concurrent callers take turns.
    running: Mutex<()>,
}

impl std::fmt::Debug for SpinPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpinPool")
            .field("workers", &self.workers)
            .field("spin", &self.shared.spin)
            .finish()
    }
}

/// Most claims one job word holds; [`SpinPool::run`] groups indices past it.
pub const MAX_TASKS: usize = 0xffff;
const GEN_SHIFT: u32 = 32;
const TASKS_SHIFT: u32 = 16;

/// `(generation, tasks, next index)` of a job word.
fn unpack(word: u64) -> (u64, u64, u64) {
    (
        word >> GEN_SHIFT,
        (word >> TASKS_SHIFT) & 0xffff,
        word & 0xffff,
    )
}

impl SpinPool {
    /// A pool of `workers` threads besides the caller's, spinning `spin` after each job.
    pub fn new(workers: usize, spin: Duration) -> Self {
        let shared = Arc::new(Shared {
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            park: Mutex::new(()),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            spin,
        });
        for i in 0..workers {
            let s = shared.clone();
            thread::Builder::new()
                .name(format!("layerkv-spin-{i}"))
                .spawn(move || worker(&s))
                .expect("spawning a layerkv-spin worker");
        }
        Self {
            shared,
            workers,
            running: Mutex::new(()),
        }
    }

    /// The process-wide pool: as many threads in all as rayon's pool (`RAYON_NUM_THREADS`),
    /// spinning `LAYERKV_SPIN_US` microseconds (default [`DEFAULT_SPIN`]).
    pub fn global() -> &'static SpinPool {
        static POOL: OnceLock<SpinPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let spin = std::env::var("LAYERKV_SPIN_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_micros)
                .unwrap_or(DEFAULT_SPIN);
            SpinPool::new(rayon::current_num_threads().saturating_sub(1), spin)
        })
    }

    /// Threads that run tasks, the caller's included.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// How long idle workers spin before they park.
    pub fn spin(&self) -> Duration {
        self.shared.spin
    }

    /// Runs `f(0) .. f(tasks - 1)` on the pool and the calling thread; returns when all have
    /// finished. A panic in a task is re-raised here after the others finished. Past
    /// [`MAX_TASKS`] one claim runs a run of consecutive indices. A task must not call `run`.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.workers == 0 || tasks == 1 {
            (0..tasks).for_each(f);
            return;
        }
        if tasks > MAX_TASKS {
            let per = tasks.div_ceil(MAX_TASKS);
            let group = |g: usize| (g * per..((g + 1) * per).min(tasks)).for_each(f);
            return self.run(tasks.div_ceil(per), &group);
        }
        let _turn = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY (lifetime erasure): the pointer is dereferenced only by a task of this job,
        // and this call returns only once every task has finished, so the borrow outlives
        // every use.
        let ptr: *const (dyn Fn(usize) + Sync + '_) = f;
        let ptr: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(ptr) };
        // SAFETY: no task runs between jobs (see `Shared::job`).
        unsafe { *s.job.get() = Some(JobPtr(ptr)) };
        s.done.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        let generation =
            (s.claim.load(Ordering::Relaxed) >> GEN_SHIFT).wrapping_add(1) & 0xffff_ffff;
        // Publishes the job: a claim of this word sees the closure written above.
        s.claim.store(
            generation << GEN_SHIFT | (tasks as u64) << TASKS_SHIFT,
            Ordering::SeqCst,
        );
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work(s, generation);
        while s.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
        // SAFETY: every task finished; no claim of this generation can succeed any more.
        unsafe { *s.job.get() = None };
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a SpinPool task panicked");
        }
    }
}

/// Claims and runs tasks of job `generation` until none is left.
fn work(s: &Shared, generation: u64) {
    let mut cur = s.claim.load(Ordering::Acquire);
    loop {
        let (g, tasks, next) = unpack(cur);
        if g != generation || next >= tasks {
            return;
        }
        match s
            .claim
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // SAFETY: the claim proves the job is live (see `Shared::job`).
                let f = unsafe { (*s.job.get()).map(|JobPtr(p)| p) };
                if let Some(f) = f {
                    // SAFETY: the caller of `run` waits for this task before the closure ends.
                    let task = AssertUnwindSafe(|| unsafe { (*f)(next as usize) });
                    if catch_unwind(task).is_err() {
                        s.panicked.store(true, Ordering::Relaxed);
                    }
                }
                s.done.fetch_add(1, Ordering::Release);
                cur = s.claim.load(Ordering::Acquire);
            }
            Err(now) => cur = now,
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let idle_since = Instant::now();
        let mut spins = 0u32;
        let generation = loop {
            let g = s.claim.load(Ordering::Acquire) >> GEN_SHIFT;
            if g != seen {
                break g;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && idle_since.elapsed() >= s.spin {
                let guard = s.park.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                // Re-checked under the lock the caller notifies under: no lost wake-up.
                let g = s.claim.load(Ordering::SeqCst) >> GEN_SHIFT;
                if g == seen {
                    drop(s.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
                } else {
                    drop(guard);
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        };
        seen = generation;
        work(s, generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        let pool = SpinPool::new(3, Duration::from_micros(50));
        for job in 0..2000usize {
            let tasks = 1 + job % 37;
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            pool.run(tasks, &|i| {
                hits[i].fetch_add(job + 1, Ordering::Relaxed);
            });
            for (i, h) in hits.iter().enumerate() {
                assert_eq!(h.load(Ordering::Relaxed), job + 1, "job {job} task {i}");
            }
            if job % 500 == 0 {
                // Let the workers park, so the next job must wake them.
                thread::sleep(Duration::from_millis(2));
            }
        }
    }

    #[test]
    fn more_tasks_than_a_job_word_holds_run_once_each() {
        let pool = SpinPool::new(1, Duration::from_micros(50));
        let tasks = 3 * MAX_TASKS + 7;
        let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
        pool.run(tasks, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_panicking_task_is_raised_to_the_caller_and_the_pool_goes_on() {
        let pool = SpinPool::new(1, Duration::from_micros(50));
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|i| assert_ne!(i, 5, "task five"));
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(8, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }
}
