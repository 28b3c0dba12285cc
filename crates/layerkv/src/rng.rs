//! [`SplitMix64`]: the small seeded random stream of layerkv's seeded searches (calibration's
//! random order), generators (the retrieval tasks) and randomised tests, so the core needs no
//! `rand` dependency and every seeded run repeats exactly. O(1) per draw, no allocation.

/// Steele, Lea and Flood's splitmix64: one 64-bit state, a Weyl increment and a mixer.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `[0, 1)` from the top 53 bits (every `f64` step of the interval).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A number in `0..n` (0 when `n` is 0), by modulo.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    /// The first outputs of splitmix64 from seed 0, as the reference C code gives them.
    #[test]
    fn matches_the_reference_stream() {
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        // The first draw's top 53 bits over 2^53.
        let u = SplitMix64::new(0).next_f64();
        assert_eq!(
            u,
            (0xe220_a839_7b1d_cdafu64 >> 11) as f64 / 9_007_199_254_740_992.0
        );
        assert!((0.0..1.0).contains(&u));
    }
}
