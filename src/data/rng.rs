//! The counter-based generator behind every random choice of an episode.
//!
//! An episode must be a pure function of (seed, episode index) so that its content does not depend on
//! how many loader threads run or where a resumed run starts: each episode gets its own SplitMix64
//! stream, keyed by a hash of the seed, a stream tag and the index, instead of sharing one sequential
//! generator.

/// SplitMix64's output function: a bijective 64-bit mixer with full avalanche.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A SplitMix64 stream for one (seed, stream, index) key.
#[derive(Debug, Clone)]
pub struct EpisodeRng {
    state: u64,
}

impl EpisodeRng {
    /// The stream for `index` under `seed`; `stream` separates independent uses of the same index
    /// (an episode's replacement attempts, the per-pass query permutations).
    pub fn new(seed: u64, stream: u64, index: u64) -> EpisodeRng {
        let key = mix(mix(seed ^ GOLDEN_GAMMA).wrapping_add(stream)).wrapping_add(index);
        EpisodeRng { state: mix(key) }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix(self.state)
    }

    /// Uniform in [0, 1) with 53 bits, like Python's `random.random()`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift; the bias, below n / 2^64, is negligible.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0) has no value to return");
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in `lo..=hi`, like Python's `random.randint`.
    pub fn inclusive(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_stream_and_keys_differ() {
        let draw = |mut rng: EpisodeRng| -> Vec<u64> { (0..4).map(|_| rng.next_u64()).collect() };
        let a = draw(EpisodeRng::new(321, 0, 7));
        assert_eq!(a, draw(EpisodeRng::new(321, 0, 7)));
        for other in [
            EpisodeRng::new(322, 0, 7),
            EpisodeRng::new(321, 1, 7),
            EpisodeRng::new(321, 0, 8),
        ] {
            assert_ne!(other.clone().next_u64(), a[0]);
        }
    }

    #[test]
    fn below_is_uniform_enough_and_in_range() {
        let mut rng = EpisodeRng::new(1, 2, 3);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[rng.below(5)] += 1;
        }
        // Each bucket expects 10_000 with std ~ 89; 5 std is a generous bound.
        for c in counts {
            assert!((c as i64 - 10_000).abs() < 450, "{counts:?}");
        }
        let mut rng = EpisodeRng::new(9, 9, 9);
        for _ in 0..1000 {
            let f = rng.next_f64();
            assert!((0.0..1.0).contains(&f));
            let k = rng.inclusive(3, 5);
            assert!((3..=5).contains(&k));
        }
    }
}
