//! [`KvCache::check_invariants`]: every cross-structure invariant, recounted from the tables
//! (O(pages + slots)); for tests and debugging.

use std::collections::HashMap;

use crate::bits;
use crate::pool::{PageId, NULL_PAGE};

use super::KvCache;

impl KvCache {
    /// Checks every cross-structure invariant (O(pages + slots)): pool free list and counters,
    /// refcount == number of tables holding the page, table lengths and validity counts, score
    /// lengths, the compaction bound (fewer holes than a page). For tests and debugging.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let st = self.state.read();
        st.pool.check_invariants()?;
        let bs = self.core.config.block_size;
        let mut holders: HashMap<PageId, u32> = HashMap::new();
        for (id, s) in &st.seqs {
            for (g, t) in s.tables().enumerate() {
                if t.pages.len() != t.num_slots.div_ceil(bs) {
                    return Err(format!(
                        "seq {id} group {g}: {} pages for {} slots",
                        t.pages.len(),
                        t.num_slots
                    ));
                }
                let counted = if t.bitset {
                    bits::count(&t.valid)
                } else {
                    t.num_slots
                };
                if counted != t.num_valid {
                    return Err(format!(
                        "seq {id} group {g}: num_valid {} != bitset {counted}",
                        t.num_valid
                    ));
                }
                if t.bitset && t.positions.len() != t.num_slots {
                    return Err(format!(
                        "seq {id} group {g}: {} positions for {} slots",
                        t.positions.len(),
                        t.num_slots
                    ));
                }
                if let Some(sc) = s.scores.get(g) {
                    for (what, v) in [
                        ("accumulated", &sc.accumulated),
                        ("last", &sc.last),
                        ("observed", &sc.observed),
                        ("probed", &sc.probed),
                    ] {
                        if !v.is_empty() && v.len() != t.num_slots {
                            return Err(format!(
                                "seq {id} group {g}: {} {what} scores for {} slots",
                                v.len(),
                                t.num_slots
                            ));
                        }
                    }
                }
                let tail = t.pages.last().copied().unwrap_or(NULL_PAGE);
                if !t.pages.is_empty() && t.tail != tail {
                    return Err(format!(
                        "seq {id} group {g}: tail {} but last page {tail}",
                        t.tail
                    ));
                }
                // A partly filled tail not marked shared must be this table's alone (full
                // tails may be shared, e.g. prefix-cache hits: appends start a new page).
                if !t.tail_shared && tail != NULL_PAGE && t.num_slots % bs != 0 {
                    let rc = st.pool.refcount(tail).map_err(|e| e.to_string())?;
                    if rc != 1 {
                        return Err(format!(
                            "seq {id} group {g}: tail page {tail} has refcount {rc} but is \
                             not marked shared"
                        ));
                    }
                }
                for (i, &p) in t.pages.iter().enumerate() {
                    if p == NULL_PAGE {
                        return Err(format!("seq {id} group {g}: page {i} is null"));
                    }
                    if t.bitset && t.valid_in_page(i, bs) == 0 {
                        return Err(format!(
                            "seq {id} group {g}: page {i} ({p}) holds no valid slot"
                        ));
                    }
                    *holders.entry(p).or_default() += 1;
                }
            }
        }
        // Copy-on-write sources held by reserved steps, and pages a transactional retain holds
        // until its moves ran.
        for &p in &st.pinned {
            *holders.entry(p).or_default() += 1;
        }
        for page in 0..st.pool.num_pages() as PageId {
            let rc = st.pool.refcount(page).map_err(|e| e.to_string())?;
            let held = holders.get(&page).copied().unwrap_or(0);
            if rc != held {
                return Err(format!(
                    "page {page}: refcount {rc} but {held} tables hold it"
                ));
            }
        }
        Ok(())
    }
}
