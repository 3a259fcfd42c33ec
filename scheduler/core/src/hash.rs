//! Deterministic hashing and pseudo-random numbers, written out here so that
//! results never depend on a hasher's random keys or on a library's version.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, DefaultHasher, Hasher};

/// A hash map whose hasher has fixed keys. Nothing iterates these maps (only
/// lookups), so their order never reaches a plan; the fixed keys keep even
/// their timing free of randomness.
pub(crate) type FixedMap<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;

/// A hash map keyed by indices the crate numbers itself (hosts, zones,
/// domains) or by sizes, which placement reads for every candidate it
/// scores: its hasher is a multiply, not SipHash. Keys named by users (ids,
/// labels) stay in [`FixedMap`]. Nothing iterates these maps in an order
/// that reaches a decision.
pub(crate) type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// The hasher of [`IntMap`]: each word is added, then multiplied by an odd
/// constant; the result is rotated so that the well-mixed high bits land
/// where the table takes its bucket (as `rustc-hash` does).
#[derive(Default)]
pub(crate) struct IntHasher(u64);

impl IntHasher {
    fn add(&mut self, word: u64) {
        self.0 = self.0.wrapping_add(word).wrapping_mul(0xF135_7AEA_2E62_A9C5);
    }
}

impl Hasher for IntHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

/// SplitMix64's finaliser: spreads every input bit over every output bit.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 64-bit hash of `text` (FNV-1a, then mixed), the same on every platform and release.
pub(crate) fn hash_text(text: &str) -> u64 {
    let fnv = text.bytes().fold(0xCBF2_9CE4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    });
    mix(fnv)
}

/// [`hash_text`] of `value`'s text, without writing the text out.
pub(crate) fn hash_display(value: &impl fmt::Display) -> u64 {
    struct Fnv(u64);
    impl fmt::Write for Fnv {
        fn write_str(&mut self, text: &str) -> fmt::Result {
            self.0 = text.bytes().fold(self.0, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3));
            Ok(())
        }
    }
    let mut fnv = Fnv(0xCBF2_9CE4_8422_2325);
    _ = fmt::Write::write_fmt(&mut fnv, format_args!("{value}"));
    mix(fnv.0)
}

/// A seeded pseudo-random sequence (SplitMix64), for synthetic clusters.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A number in `0..n`; `n` must not be 0. The modulo bias is far below
    /// anything a synthetic cluster could show.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// One of `choices`, which must not be empty.
    pub(crate) fn pick<'a, T>(&mut self, choices: &'a [T]) -> &'a T {
        &choices[self.below(choices.len() as u64) as usize]
    }
}

/// Visits `0..n` once each, in an order fixed by `key`: a start and a stride
/// coprime with `n`. Different keys give different orders without building
/// a permutation, so a walk costs nothing until it is followed.
pub(crate) fn walk(n: usize, key: u64) -> impl Iterator<Item = usize> {
    let n64 = n.max(1) as u64;
    let start = key % n64;
    let mut stride = if n64 <= 2 {
        1
    } else {
        1 + (key >> 32) % (n64 - 1)
    };
    while gcd(stride, n64) != 1 {
        stride = stride % (n64 - 1) + 1;
    }
    (0..n).scan(start, move |position, _| {
        let current = *position;
        // Both are below n: a subtraction, not a division, wraps it.
        *position += stride;
        if *position >= n64 {
            *position -= n64;
        }
        Some(current as usize)
    })
}

/// The greatest common divisor, by Stein's binary algorithm: shifts and
/// subtractions, no division (a walk's setup runs it for every replica
/// placed, a few times each, and a 64-bit division costs tens of cycles).
fn gcd(mut a: u64, mut b: u64) -> u64 {
    if a == 0 || b == 0 {
        return a | b;
    }
    let shift = (a | b).trailing_zeros();
    a >>= a.trailing_zeros();
    loop {
        b >>= b.trailing_zeros();
        if a > b {
            (a, b) = (b, a);
        }
        b -= a;
        if b == 0 {
            return a << shift;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_visit_everything_once() {
        for n in [0, 1, 2, 3, 4, 10, 12, 97, 100, 1024] {
            for key in [0, 1, 7, u64::MAX, hash_text("svc"), mix(42)] {
                let mut seen: Vec<usize> = walk(n, key).collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n={n} key={key}");
            }
        }
    }

    #[test]
    fn a_display_hashes_as_its_text() {
        let id = wharf_proto::ServiceId::new("default", "hello").expect("a valid id");
        assert_eq!(hash_display(&id), hash_text("default/hello"));
        assert_eq!(hash_display(&""), hash_text(""));
    }

    #[test]
    fn int_maps_find_what_they_hold() {
        let mut map: IntMap<(usize, u64, u64), u32> = IntMap::default();
        for i in 0..1000u32 {
            map.insert((i as usize, u64::from(i) << 20, 1), i);
        }
        assert!((0..1000u32).all(|i| map.get(&(i as usize, u64::from(i) << 20, 1)) == Some(&i)));
        assert_eq!(map.get(&(0, 0, 2)), None);
    }

    #[test]
    fn gcd_is_euclid_s() {
        fn euclid(mut a: u64, mut b: u64) -> u64 {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        }
        let mut rng = SplitMix64::new(3);
        let mut pairs: Vec<(u64, u64)> = vec![(0, 0), (0, 7), (7, 0), (1, 1), (12, 18), (1 << 40, 1 << 20), (u64::MAX, 3)];
        pairs.extend((0..1000).map(|_| (rng.below(1 << 20), rng.below(1 << 20))));
        for (a, b) in pairs {
            assert_eq!(gcd(a, b), euclid(a, b), "gcd({a}, {b})");
        }
    }

    #[test]
    fn hashes_are_fixed() {
        assert_eq!(hash_text("default/hello"), hash_text("default/hello"));
        assert_ne!(hash_text("default/hello"), hash_text("default/hellp"));
        let mut a = SplitMix64::new(1);
        let mut b = SplitMix64::new(1);
        assert_eq!(a.next_u64(), b.next_u64());
        assert!(a.below(3) < 3);
    }
}
