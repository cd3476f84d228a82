//! Small deterministic generators for randomised tests, and how those tests
//! pick their seed and print it so that a failure can be replayed.

/// A seeded source of pseudo-random numbers; the provided methods derive
/// everything from [`Rng::next_u64`], so a seed gives the same sequence of
/// values whatever generator the test uses them through.
pub trait Rng {
    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64;

    /// Uniform in `[0, n)` (0 when `n` is 0): the next value modulo `n`.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// An index in `[0, n)`: [`Rng::below`] for lengths.
    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Uniform in `[lo, hi)`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// `n` random bytes (the little-endian bytes of successive values).
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// splitmix64: any seed (0 included) gives a good sequence.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
}

impl Rng for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// xorshift64 (shifts 13, 7, 17): small, good enough to pick bytes. The
/// seed must not be 0 (the sequence would stay 0).
#[derive(Debug, Clone)]
pub struct XorShift64(pub u64);

impl Rng for XorShift64 {
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The seed in the environment variable `var`: None when it is unset; a
/// value that is not a u64 (white space around it is allowed) panics, so a
/// mistyped seed never silently runs another one.
pub fn env_seed(var: &str) -> Option<u64> {
    let v = std::env::var(var).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={v:?} is not a u64")),
    )
}

/// Prints the seed randomised test `test` runs with, and how to replay it
/// (seen with `--nocapture`, or when the test fails).
pub fn announce_seed(test: &str, var: &str, seed: u64) {
    println!("{test}: seed {seed} (replay with {var}={seed})");
}

/// The seed of randomised test `test`: the environment variable `var` (see
/// [`env_seed`]) or else `default`, announced with [`announce_seed`].
pub fn seed_or(test: &str, var: &str, default: u64) -> u64 {
    let seed = env_seed(var).unwrap_or(default);
    announce_seed(test, var, seed);
    seed
}
