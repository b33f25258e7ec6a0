//! The proof-of-work puzzle of a support-key attempt while the node's key budget is
//! spent (see `docs/operations.md`, "Support-key guessing").
//!
//! The relay hands out a `challenge` (an opaque ASCII string) and a difficulty `bits`;
//! a client proves work by finding a `nonce` (decimal digits) such that
//! `SHA-256(challenge ":" nonce)` starts with at least `bits` zero bits, and repeats its
//! join with `proof: {challenge, nonce}`. Each try costs one SHA-256 of a short message,
//! so a solution takes `2^bits` tries on average: a fraction of a second for one
//! customer, but a cost on every single guess of someone sweeping the key space.
//!
//! This module is the puzzle alone: checking and solving. Issuing challenges (their
//! expiry, single use, the relay's secret) is the relay's.

use sha2::{Digest, Sha256};

/// The most leading zero bits a challenge may ask for (a bound on the work a client
/// agrees to do).
pub const MAX_BITS: u8 = 32;

/// How many zero bits `SHA-256(challenge ":" nonce)` starts with.
pub fn zero_bits(challenge: &str, nonce: &str) -> u32 {
    let digest = Sha256::new()
        .chain_update(challenge.as_bytes())
        .chain_update(b":")
        .chain_update(nonce.as_bytes())
        .finalize();
    leading_zero_bits(&digest)
}

fn leading_zero_bits(digest: &[u8]) -> u32 {
    digest
        .iter()
        .position(|b| *b != 0)
        .map_or(digest.len() as u32 * 8, |i| {
            i as u32 * 8 + digest[i].leading_zeros()
        })
}

/// Whether `nonce` solves `challenge` at difficulty `bits`. A nonce is 1 to 20 ASCII
/// digits (a `u64` in decimal); anything else never solves.
pub fn solves(challenge: &str, nonce: &str, bits: u8) -> bool {
    !nonce.is_empty()
        && nonce.len() <= 20
        && nonce.bytes().all(|b| b.is_ascii_digit())
        && zero_bits(challenge, nonce) >= u32::from(bits)
}

/// Finds a nonce that solves `challenge` at difficulty `bits` (at most [`MAX_BITS`]):
/// the first in 0, 1, 2, … . Takes `2^bits` hashes on average.
pub fn solve(challenge: &str, bits: u8) -> String {
    let bits = bits.min(MAX_BITS);
    let mut prefix = Sha256::new();
    prefix.update(challenge.as_bytes());
    prefix.update(b":");
    let mut digits = [0u8; 20];
    for n in 0u64.. {
        let nonce = decimal(n, &mut digits);
        let digest = prefix.clone().chain_update(nonce).finalize();
        if leading_zero_bits(&digest) >= u32::from(bits) {
            return String::from_utf8_lossy(nonce).into_owned();
        }
    }
    unreachable!("2^64 nonces hold a solution for any difficulty up to MAX_BITS")
}

/// `n` in decimal, written into the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_solution_has_the_bits_asked_for_and_a_wrong_nonce_rarely_does() {
        for bits in [0u8, 1, 8, 12] {
            let nonce = solve("c1.abcdef", bits);
            assert!(solves("c1.abcdef", &nonce, bits), "{bits}: {nonce}");
        }
        // The nonce is bound to its challenge: the same nonce on another challenge is
        // almost never a solution at 12 bits (probability 1/4096 each).
        let nonce = solve("c1.abcdef", 16);
        assert!(zero_bits("c1.abcdef", &nonce) >= 16);
        assert!(!solves("c1.abcdeg", &nonce, 16));
    }

    #[test]
    fn only_decimal_nonces_count() {
        let nonce = solve("x", 4);
        assert!(solves("x", &nonce, 4));
        for bad in ["", "-1", "1a", " 1", "123456789012345678901"] {
            assert!(!solves("x", bad, 0), "{bad:?}");
        }
    }

    /// A vector the customer portal's solver (relay/web/js/work.js) must agree with: the
    /// first solution of this challenge at 18 bits.
    #[test]
    fn the_first_solution_of_a_known_challenge() {
        let c = "v1.18.120000.00112233445566778899aabbccddeeff.0123456789abcdef0123456789abcdef";
        assert_eq!(solve(c, 18), "568552");
    }

    #[test]
    fn zero_bits_matches_a_known_digest() {
        // SHA-256("abc:0") = 6c8d...; no leading zero bits (0x6c = 0110_1100: one).
        let d = Sha256::digest(b"abc:0");
        assert_eq!(zero_bits("abc", "0"), d[0].leading_zeros());
        assert_eq!(decimal(0, &mut [0; 20]), b"0");
        assert_eq!(decimal(u64::MAX, &mut [0; 20]), b"18446744073709551615");
    }
}
