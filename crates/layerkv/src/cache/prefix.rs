//! Prefix caching: full pages registered under a chained hash of their tokens (with the owner
//! layer and the policy's fingerprint in the hash), looked up when a sequence with the same
//! prompt prefix arrives. Active only for policies that never evict, since a page's KV then
//! depends on its prefix alone.

use crate::error::{Error, Result};
use crate::ids::SeqId;
use crate::pool::{chain_hash, group_block_hash, BlockPool};

use super::sequence::{Sequence, State};
use super::Core;

impl Core {
    /// Registers the full blocks `tokens` completes in every group's table of `s`.
    pub(crate) fn register_full_blocks(
        &self,
        pool: &mut BlockPool,
        s: &mut Sequence,
        tokens: &[u32],
    ) -> Result<()> {
        let bs = self.config.block_size;
        let map = &self.map;
        let fp = self.policy.fingerprint();
        for &t in tokens {
            s.partial.push(t);
            if s.partial.len() == bs {
                let chain = chain_hash(s.chain.last().copied().unwrap_or(0), &s.partial);
                let block = s.chain.len();
                for (g, &owner) in map.owners().iter().enumerate() {
                    let page = s.table(g).pages[block];
                    pool.register(page, group_block_hash(chain, owner, fp))?;
                }
                s.chain.push(chain);
                s.partial.clear();
            }
        }
        Ok(())
    }

    /// See [`crate::KvCache::add_sequence_with_prefix`].
    pub(crate) fn add_sequence_with_prefix(
        &self,
        st: &mut State,
        seq: SeqId,
        prompt: &[u32],
    ) -> Result<usize> {
        if st.seqs.contains_key(&seq) {
            return Err(Error::SequenceExists(seq));
        }
        let mut s = self.empty_sequence();
        if self.caching {
            let bs = self.config.block_size;
            let map = &self.map;
            let fp = self.policy.fingerprint();
            let mut parent = 0;
            for block in prompt[..prompt.len().saturating_sub(1)].chunks_exact(bs) {
                let chain = chain_hash(parent, block);
                let all_cached = map
                    .owners()
                    .iter()
                    .all(|&owner| st.pool.contains_hash(group_block_hash(chain, owner, fp)));
                if !all_cached {
                    break;
                }
                for (g, &owner) in map.owners().iter().enumerate() {
                    let page = st
                        .pool
                        .lookup(group_block_hash(chain, owner, fp))
                        .expect("hash checked above under the same lock");
                    let t = s.table_mut(g);
                    t.push_page(page);
                    t.push_slots(bs, t.num_slots);
                }
                s.chain.push(chain);
                parent = chain;
            }
        }
        let reused = s.chain.len() * self.config.block_size;
        s.num_tokens = reused;
        st.seqs.insert(seq, s);
        Ok(reused)
    }
}
