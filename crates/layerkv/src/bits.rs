//! Word-packed slot bitsets: bit `s % 64` of word `s / 64` stands for logical slot `s`.
//!
//! The block tables keep slot validity in this form and the kernels read it as `&[u64]`.
//! Every helper is O(words) and allocation-free; callers own the buffers.

/// Number of `u64` words that hold `bits` bits.
pub fn words_for(bits: usize) -> usize {
    bits.div_ceil(64)
}

/// Reads bit `i`.
#[inline]
pub fn get(words: &[u64], i: usize) -> bool {
    words[i / 64] >> (i % 64) & 1 == 1
}

/// Sets bit `i`.
#[inline]
pub fn set(words: &mut [u64], i: usize) {
    words[i / 64] |= 1 << (i % 64);
}

/// Clears bit `i`.
#[inline]
pub fn clear(words: &mut [u64], i: usize) {
    words[i / 64] &= !(1 << (i % 64));
}

/// Sets bits `lo..hi` (word at a time).
pub fn set_range(words: &mut [u64], lo: usize, hi: usize) {
    let mut i = lo;
    while i < hi {
        let bit = i % 64;
        let n = (64 - bit).min(hi - i);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        words[i / 64] |= mask;
        i += n;
    }
}

/// Number of set bits in `lo..hi`.
pub fn count_range(words: &[u64], lo: usize, hi: usize) -> usize {
    (lo..hi).filter(|&i| get(words, i)).count()
}

/// Number of set bits.
pub fn count(words: &[u64]) -> usize {
    words.iter().map(|w| w.count_ones() as usize).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_bit_by_bit() {
        for lo in 0..130 {
            for hi in lo..200 {
                let mut a = vec![0u64; 4];
                set_range(&mut a, lo, hi);
                assert_eq!(count(&a), hi - lo);
                assert_eq!(count_range(&a, lo, hi), hi - lo);
                assert!(lo == 0 || !get(&a, lo - 1));
                assert!(hi >= 256 || !get(&a, hi));
            }
        }
    }
}
