//! [`BlockPool`]: the cross-layer paged block allocator. One pool of equal-sized pages serves
//! every KV group of every sequence; a page holds `block_size` token slots of K and V of one
//! group.
//!
//! Layout: reference counts in a dense `Vec<u32>` (4 bytes a page, so a large pool's counts stay
//! in cache; the top bit marks a page that has a prefix hash, so a release reads one word), the
//! LRU links and hashes in a second flat `Vec` touched only by prefix caching. Plain free pages sit on a LIFO stack (a flat `Vec`
//! of ids reserved to the pool size: pop and push touch one cache line, and recently released
//! pages, still warm, are reused first). Cached pages are on a doubly linked LRU list threaded
//! through the metadata by `u32` index between two sentinel entries, so a prefix hit can take a
//! page out of the middle in O(1). Allocate, release and retain are O(1) and allocate nothing.
//!
//! Page states: *used* (refcount > 0), *free* (refcount 0, no hash) and *cached* (refcount 0,
//! with a prefix hash: its contents can be reused by a later sequence with the same prefix).
//! Allocation takes a free page first and evicts the least recently released cached page (LRU)
//! only when none is left. Invariant: `free + cached + used == total`, where `used` is its own
//! counter (moved when a refcount leaves or reaches 0), not the remainder of the other two, so
//! [`BlockPool::check_invariants`] can compare it against a recount.
//!
//! The pool also keeps a high-water mark, [`PoolStats::peak_used`]: the most pages in use at
//! any moment since creation or the last [`BlockPool::reset_peak`], updated in O(1) wherever a
//! page goes into use (allocate, a prefix hit reviving a cached page).
//!
//! Refcounts never saturate: releasing a page with refcount 0 is [`Error::RefCountUnderflow`].
//! The prefix map is a `HashMap` reserved to twice the pool size at construction, so inserts
//! (and tombstone clean-up as hashes turn over) do not allocate either.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// A page id: index into the pool (and into the kernels' page tensors).
pub type PageId = u32;

/// Marks a logical page of a block table whose page was returned to the pool by eviction.
pub const NULL_PAGE: PageId = u32::MAX;

const NO_LINK: u32 = u32::MAX;

/// Bit of a count word set while the page has a prefix hash.
const HASHED: u32 = 1 << 31;
/// The reference count inside a count word.
const COUNT: u32 = HASHED - 1;

#[derive(Debug, Clone, Copy)]
struct Meta {
    prev: u32,
    next: u32,
    /// Prefix hash of the page's contents; 0 = none.
    hash: u64,
}

/// Counters of a pool, for reports and invariant checks.
///
/// Equality compares every field except [`PoolStats::peak_used`]: the peak is the history of a
/// measurement, which a rolled-back step raises (its pages were in use) but does not lower, so
/// "the state after a rollback equals the state before the step" stays a plain `==`. Compare
/// `peak_used` explicitly where it matters.
#[derive(Debug, Clone, Copy, Eq, Default)]
pub struct PoolStats {
    /// Pages in the pool.
    pub num_pages: usize,
    /// Pages held by at least one table (counted on its own, not derived from the others).
    pub num_used: usize,
    /// The most pages in use at any moment since the pool was created or
    /// [`BlockPool::reset_peak`] was last called: the high-water mark, which a footprint read
    /// between steps can miss (a prompt held whole until retention compresses it).
    pub peak_used: usize,
    /// Unheld pages without a prefix hash.
    pub num_free: usize,
    /// Unheld pages that keep a prefix hash (reusable, evicted LRU on demand).
    pub num_cached: usize,
    /// Prefix lookups that found a page.
    pub prefix_hits: u64,
    /// Prefix lookups that found nothing.
    pub prefix_misses: u64,
    /// Cached pages whose contents were dropped to serve an allocation.
    pub cache_evictions: u64,
}

impl PartialEq for PoolStats {
    fn eq(&self, other: &Self) -> bool {
        // Destructured so that a new field must be placed here (or left out on purpose).
        let Self {
            num_pages,
            num_used,
            peak_used: _,
            num_free,
            num_cached,
            prefix_hits,
            prefix_misses,
            cache_evictions,
        } = *self;
        (
            num_pages,
            num_used,
            num_free,
            num_cached,
            prefix_hits,
            prefix_misses,
            cache_evictions,
        ) == (
            other.num_pages,
            other.num_used,
            other.num_free,
            other.num_cached,
            other.prefix_hits,
            other.prefix_misses,
            other.cache_evictions,
        )
    }
}

/// The page allocator. Not thread-safe by itself; [`crate::KvCache`] wraps it in a lock.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// Per page: reference count | [`HASHED`].
    counts: Vec<u32>,
    meta: Vec<Meta>,
    free: Vec<PageId>,
    num_pages: u32,
    num_cached: usize,
    /// Pages with refcount > 0, moved on every 0 <-> 1 transition.
    num_used: usize,
    /// High-water mark of `num_used` since creation or [`BlockPool::reset_peak`].
    peak_used: usize,
    prefix: HashMap<u64, PageId>,
    stats: PoolStats,
}

impl BlockPool {
    /// A pool of `num_pages` free pages (at most `u32::MAX - 2`).
    pub fn new(num_pages: usize) -> Result<Self> {
        if num_pages == 0 || num_pages >= (u32::MAX - 2) as usize {
            return Err(Error::InvalidConfig(format!(
                "a pool needs 1..{} pages, got {num_pages}",
                u32::MAX - 2
            )));
        }
        let n = num_pages as u32;
        let mut meta = vec![
            Meta {
                prev: NO_LINK,
                next: NO_LINK,
                hash: 0
            };
            num_pages
        ];
        // Sentinels of the (empty) cached list: head.next = tail, tail.prev = head.
        meta.push(Meta {
            prev: NO_LINK,
            next: n + 1,
            hash: 0,
        });
        meta.push(Meta {
            prev: n,
            next: NO_LINK,
            hash: 0,
        });
        Ok(Self {
            counts: vec![0; num_pages],
            meta,
            free: (0..n).rev().collect(),
            num_pages: n,
            num_cached: 0,
            num_used: 0,
            peak_used: 0,
            // Twice the pages: with at most `num_pages` live keys, hashbrown then clears
            // tombstones by rehashing in place instead of growing (an allocation).
            prefix: HashMap::with_capacity(2 * num_pages),
            stats: PoolStats::default(),
        })
    }

    fn head(&self) -> u32 {
        self.num_pages
    }

    fn tail(&self) -> u32 {
        self.num_pages + 1
    }

    fn check(&self, page: PageId) -> Result<usize> {
        if page < self.num_pages {
            Ok(page as usize)
        } else {
            Err(Error::PageOutOfRange {
                page,
                num_pages: self.num_pages as usize,
            })
        }
    }

    #[inline]
    fn unlink(&mut self, page: u32) {
        let Meta { prev, next, .. } = self.meta[page as usize];
        self.meta[prev as usize].next = next;
        self.meta[next as usize].prev = prev;
        let m = &mut self.meta[page as usize];
        m.prev = NO_LINK;
        m.next = NO_LINK;
    }

    #[inline]
    fn link_after(&mut self, at: u32, page: u32) {
        let next = self.meta[at as usize].next;
        self.meta[page as usize].prev = at;
        self.meta[page as usize].next = next;
        self.meta[at as usize].next = page;
        self.meta[next as usize].prev = page;
    }

    /// Number of pages in the pool.
    pub fn num_pages(&self) -> usize {
        self.num_pages as usize
    }

    /// Pages an allocation can take right now (free + cached).
    pub fn num_available(&self) -> usize {
        self.free.len() + self.num_cached
    }

    /// Counters (O(1)).
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            num_pages: self.num_pages as usize,
            num_used: self.num_used,
            peak_used: self.peak_used,
            num_free: self.free.len(),
            num_cached: self.num_cached,
            ..self.stats
        }
    }

    /// Starts a new measurement of [`PoolStats::peak_used`]: the peak becomes the pages in use
    /// now. O(1).
    pub fn reset_peak(&mut self) {
        self.peak_used = self.num_used;
    }

    /// A page went from refcount 0 to 1.
    #[inline]
    fn mark_used(&mut self) {
        self.num_used += 1;
        self.peak_used = self.peak_used.max(self.num_used);
    }

    /// Takes one page (refcount 1). O(1), no allocation. Evicts the LRU cached page only when
    /// no plain free page is left.
    #[inline]
    pub fn allocate(&mut self) -> Result<PageId> {
        if let Some(page) = self.free.pop() {
            self.counts[page as usize] = 1;
            self.mark_used();
            return Ok(page);
        }
        let page = self.meta[self.head() as usize].next;
        if page == self.tail() {
            return Err(Error::PoolExhausted {
                requested: 1,
                available: 0,
            });
        }
        // No free page left: evict the least recently released cached page.
        self.unlink(page);
        self.counts[page as usize] = 1;
        self.mark_used();
        let hash = std::mem::take(&mut self.meta[page as usize].hash);
        self.num_cached -= 1;
        self.stats.cache_evictions += 1;
        if self.prefix.get(&hash) == Some(&page) {
            self.prefix.remove(&hash);
        }
        Ok(page)
    }

    /// Fills `out` with fresh pages, all or nothing.
    pub fn allocate_into(&mut self, out: &mut [PageId]) -> Result<()> {
        if out.len() > self.num_available() {
            return Err(Error::PoolExhausted {
                requested: out.len(),
                available: self.num_available(),
            });
        }
        for slot in out.iter_mut() {
            *slot = self.allocate()?;
        }
        Ok(())
    }

    /// Adds a holder to a used page (sequence fork). O(1).
    #[inline]
    pub fn retain(&mut self, page: PageId) -> Result<()> {
        let i = self.check(page)?;
        let c = &mut self.counts[i];
        if *c & COUNT == 0 {
            return Err(Error::PageNotInUse { page });
        }
        // 2^31 - 1 holders would need more tables than memory can hold.
        debug_assert!(*c & COUNT < COUNT);
        *c += 1;
        Ok(())
    }

    /// Drops a holder; at refcount 0 the page becomes free (or cached if it has a prefix hash).
    /// O(1), no allocation. A release with refcount 0 is a double free and an error.
    #[inline]
    pub fn release(&mut self, page: PageId) -> Result<()> {
        let i = self.check(page)?;
        let c = self.counts[i];
        if c & COUNT == 0 {
            return Err(Error::RefCountUnderflow { page });
        }
        self.counts[i] = c - 1;
        if (c - 1) & COUNT == 0 {
            self.num_used -= 1;
            if c & HASHED != 0 {
                self.num_cached += 1;
                let before_tail = self.meta[self.tail() as usize].prev;
                self.link_after(before_tail, page);
            } else {
                self.free.push(page);
            }
        }
        Ok(())
    }

    /// Holders of `page`.
    pub fn refcount(&self, page: PageId) -> Result<u32> {
        Ok(self.counts[self.check(page)?] & COUNT)
    }

    /// Finds a page whose contents have prefix hash `hash` and takes a reference to it
    /// (reviving it from the cached list if unheld). O(1).
    pub fn lookup(&mut self, hash: u64) -> Option<PageId> {
        let Some(&page) = self.prefix.get(&hash) else {
            self.stats.prefix_misses += 1;
            return None;
        };
        self.stats.prefix_hits += 1;
        if self.counts[page as usize] & COUNT == 0 {
            self.unlink(page);
            self.num_cached -= 1;
            self.mark_used();
        }
        self.counts[page as usize] += 1;
        Some(page)
    }

    /// Whether a page with prefix hash `hash` is known (no reference taken, no counters moved).
    pub fn contains_hash(&self, hash: u64) -> bool {
        self.prefix.contains_key(&hash)
    }

    /// Records that used page `page` holds the block with prefix hash `hash` (non-zero). Returns
    /// false (and changes nothing) if another page already holds that hash or `page` has one.
    pub fn register(&mut self, page: PageId, hash: u64) -> Result<bool> {
        let i = self.check(page)?;
        if self.counts[i] & COUNT == 0 {
            return Err(Error::PageNotInUse { page });
        }
        if hash == 0 || self.meta[i].hash != 0 || self.prefix.contains_key(&hash) {
            return Ok(false);
        }
        self.meta[i].hash = hash;
        self.counts[i] |= HASHED;
        self.prefix.insert(hash, page);
        Ok(true)
    }

    /// Drops every cached page's hash (cached pages become plain free pages). O(pages).
    pub fn clear_prefix_cache(&mut self) {
        while self.num_cached > 0 {
            let page = self.meta[self.head() as usize].next;
            self.unlink(page);
            self.free.push(page);
            self.num_cached -= 1;
        }
        for m in &mut self.meta[..self.num_pages as usize] {
            m.hash = 0;
        }
        for c in &mut self.counts {
            *c &= COUNT;
        }
        self.prefix.clear();
    }

    /// Checks the free-list structure against the counters (O(pages)); for tests and debugging.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let (mut cached, mut cur, mut steps) = (0, self.meta[self.head() as usize].next, 0);
        while cur != self.tail() {
            let m = &self.meta[cur as usize];
            if self.counts[cur as usize] & COUNT != 0 || m.hash == 0 {
                return Err(format!(
                    "page {cur} is on the cached list with refcount {} hash {}",
                    self.counts[cur as usize] & COUNT,
                    m.hash
                ));
            }
            cached += 1;
            steps += 1;
            if steps > self.num_pages {
                return Err("cached list has a cycle".into());
            }
            cur = m.next;
        }
        if cached != self.num_cached {
            return Err(format!(
                "cached list holds {cached}, counter says {}",
                self.num_cached
            ));
        }
        let mut seen = vec![false; self.num_pages as usize];
        for &p in &self.free {
            let m = &self.meta[p as usize];
            let rc = self.counts[p as usize] & COUNT;
            if rc != 0 || m.hash != 0 || std::mem::replace(&mut seen[p as usize], true) {
                return Err(format!(
                    "free page {p}: refcount {rc} hash {} (or listed twice)",
                    m.hash
                ));
            }
        }
        for (p, (c, m)) in self.counts.iter().zip(&self.meta).enumerate() {
            if (c & HASHED != 0) != (m.hash != 0) {
                return Err(format!("page {p}: hashed bit {c:#x} but hash {}", m.hash));
            }
        }
        let used = self.counts.iter().filter(|&&c| c & COUNT > 0).count();
        if used != self.num_used {
            return Err(format!(
                "{used} pages have a refcount, counter says {}",
                self.num_used
            ));
        }
        if self.peak_used < self.num_used || self.peak_used > self.num_pages as usize {
            return Err(format!(
                "peak {} outside [{} used, {} pages]",
                self.peak_used, self.num_used, self.num_pages
            ));
        }
        if used + self.free.len() + cached != self.num_pages as usize {
            return Err(format!(
                "{used} used + {} free + {cached} cached != {}",
                self.free.len(),
                self.num_pages
            ));
        }
        Ok(())
    }
}

/// Chained prefix hash of one full block: mixes the previous block's hash with the block's
/// token ids. Group and policy are mixed in by [`group_block_hash`], so one token chain serves
/// every group. Never returns 0 (0 means "no hash").
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = splitmix(parent ^ 0x9e37_79b9_7f4a_7c15);
    for &t in tokens {
        h = splitmix(h ^ u64::from(t));
    }
    h.max(1)
}

/// The prefix hash of a group's block: the token chain hash keyed by the group's owner layer
/// and the policy fingerprint (a block's KV depends on both). Never 0.
pub fn group_block_hash(chain: u64, owner_layer: usize, policy: u64) -> u64 {
    splitmix(chain ^ splitmix(policy ^ (owner_layer as u64).wrapping_mul(0xff51_afd7_ed55_8ccd)))
        .max(1)
}

#[inline]
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_conserves_pages() {
        let mut pool = BlockPool::new(4).unwrap();
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert_ne!(a, b);
        assert_eq!(pool.stats().num_used, 2);
        pool.retain(a).unwrap();
        pool.release(a).unwrap();
        assert_eq!(pool.refcount(a).unwrap(), 1);
        pool.release(a).unwrap();
        pool.release(b).unwrap();
        assert_eq!(
            pool.release(b).unwrap_err(),
            Error::RefCountUnderflow { page: b }
        );
        assert_eq!(pool.retain(b).unwrap_err(), Error::PageNotInUse { page: b });
        assert!(matches!(
            pool.release(9).unwrap_err(),
            Error::PageOutOfRange { page: 9, .. }
        ));
        pool.check_invariants().unwrap();
        assert_eq!(pool.stats().num_free, 4);
    }

    #[test]
    fn exhaustion_is_all_or_nothing() {
        let mut pool = BlockPool::new(3).unwrap();
        let mut out = [0; 4];
        assert_eq!(
            pool.allocate_into(&mut out).unwrap_err(),
            Error::PoolExhausted {
                requested: 4,
                available: 3
            }
        );
        assert_eq!(pool.stats().num_free, 3);
        let mut out = [0; 3];
        pool.allocate_into(&mut out).unwrap();
        assert!(matches!(
            pool.allocate().unwrap_err(),
            Error::PoolExhausted { .. }
        ));
    }

    #[test]
    fn cached_pages_are_reused_by_hash_and_evicted_lru() {
        let mut pool = BlockPool::new(3).unwrap();
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert!(pool.register(a, 11).unwrap());
        assert!(pool.register(b, 22).unwrap());
        assert!(!pool.register(b, 11).unwrap());
        pool.release(a).unwrap();
        pool.release(b).unwrap();
        assert_eq!(pool.stats().num_cached, 2);
        assert_eq!(pool.lookup(22), Some(b));
        assert_eq!(pool.lookup(33), None);
        // The plain free page goes first, then the least recently released cached page (a).
        let c = pool.allocate().unwrap();
        assert!(c != a && c != b);
        assert_eq!(pool.allocate().unwrap(), a);
        assert_eq!(pool.lookup(11), None);
        let s = pool.stats();
        assert_eq!(
            (s.prefix_hits, s.prefix_misses, s.cache_evictions),
            (1, 2, 1)
        );
        pool.check_invariants().unwrap();
    }

    #[test]
    fn used_is_counted_on_its_own_and_checked() {
        let mut pool = BlockPool::new(4).unwrap();
        let a = pool.allocate().unwrap();
        pool.allocate().unwrap();
        pool.retain(a).unwrap();
        // Two pages in use however many holders: a retain is not a new page.
        assert_eq!(pool.stats().num_used, 2);
        pool.check_invariants().unwrap();
        // A counter that drifts from the refcounts is caught (the recount is independent of
        // the free list and the cached list).
        pool.num_used += 1;
        let e = pool.check_invariants().unwrap_err();
        assert!(e.contains("3"), "{e}");
        pool.num_used -= 1;
        pool.check_invariants().unwrap();
    }

    #[test]
    fn peak_is_the_high_water_mark_until_reset() {
        let mut pool = BlockPool::new(4).unwrap();
        let pages: Vec<_> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        pool.retain(pages[0]).unwrap();
        for &p in &pages {
            pool.release(p).unwrap();
        }
        // Page 0 is still held by its second holder; the other two went back.
        let s = pool.stats();
        assert_eq!((s.num_used, s.peak_used), (1, 3));
        pool.reset_peak();
        assert_eq!(pool.stats().peak_used, 1);
        let b = pool.allocate().unwrap();
        assert_eq!(pool.stats().peak_used, 2);
        pool.release(b).unwrap();
        assert_eq!(pool.stats().peak_used, 2, "a release never lowers the peak");
        pool.check_invariants().unwrap();

        // A prefix hit that revives a cached page puts it back in use, and so does an
        // allocation that evicts one.
        let mut pool = BlockPool::new(2).unwrap();
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert!(pool.register(a, 7).unwrap());
        assert!(pool.register(b, 8).unwrap());
        pool.release(a).unwrap();
        pool.release(b).unwrap();
        pool.reset_peak();
        assert_eq!(pool.stats().peak_used, 0);
        assert_eq!(pool.lookup(7), Some(a));
        assert_eq!(pool.stats().peak_used, 1);
        assert_eq!(pool.allocate().unwrap(), b);
        let s = pool.stats();
        assert_eq!((s.num_used, s.peak_used, s.cache_evictions), (2, 2, 1));
        pool.check_invariants().unwrap();
    }

    #[test]
    fn stats_equality_leaves_the_peak_out() {
        let mut pool = BlockPool::new(3).unwrap();
        let before = pool.stats();
        let a = pool.allocate().unwrap();
        pool.release(a).unwrap();
        let after = pool.stats();
        assert_eq!((before.peak_used, after.peak_used), (0, 1));
        assert_eq!(before, after);
        // Every other field still counts.
        pool.allocate().unwrap();
        assert_ne!(pool.stats(), after);
        assert_ne!(
            PoolStats {
                prefix_misses: 1,
                ..after
            },
            after
        );
    }

    #[test]
    fn hashes_depend_on_parent_tokens_group_and_policy() {
        let h = chain_hash(0, &[1, 2, 3]);
        assert_ne!(h, chain_hash(0, &[1, 2, 4]));
        assert_ne!(h, chain_hash(5, &[1, 2, 3]));
        assert_ne!(group_block_hash(h, 0, 1), group_block_hash(h, 1, 1));
        assert_ne!(group_block_hash(h, 0, 1), group_block_hash(h, 0, 2));
    }
}
