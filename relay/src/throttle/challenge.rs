//! Issuing and redeeming the proof-of-work challenges of a spent key budget (the puzzle
//! itself is [`relay_codec::challenge`]). Sans-IO: every call takes `now`.
//!
//! A challenge is stateless until it is redeemed: `v1.<bits>.<expiry>.<random>.<mac>`,
//! where `expiry` counts milliseconds from this node's start, `random` makes it unique
//! and `mac` is HMAC-SHA-256 (truncated to 128 bits) under a secret drawn at start, so
//! that the relay remembers nothing for challenges it hands out (an attacker asking for
//! millions costs nothing but the answers). A redeemed challenge is remembered until it
//! expires, so each one admits one attempt; that memory is bounded by the work each
//! entry took to earn and by [`MAX_REDEEMED`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use relay_codec::wire::{KeyChallenge, KeyProof};
use sha2::Sha256;

/// How long a challenge stays redeemable after it is handed out.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(120);

/// Most redeemed challenges remembered at once; past it, redemptions are refused until
/// old ones expire (each entry cost its sender `2^bits` hashes, so reaching this takes
/// about 2^38 hashes within [`CHALLENGE_TTL`] at the default difficulty).
pub const MAX_REDEEMED: usize = 1_000_000;

/// Why a proof was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// Not a challenge of this node (malformed, or forged: the MAC does not verify).
    #[error("the challenge is not one this node handed out")]
    Unknown,
    /// Handed out too long ago.
    #[error("the challenge has expired")]
    Expired,
    /// Redeemed before.
    #[error("the challenge was used already")]
    Used,
    /// The nonce does not solve it, or it is easier than the node asks for now.
    #[error("the nonce does not solve the challenge")]
    Unsolved,
    /// Too many redeemed challenges are remembered right now.
    #[error("too many proofs at once")]
    Busy,
}

/// The node's challenges: its secret, its epoch, and what was redeemed.
pub struct Challenges {
    secret: [u8; 32],
    epoch: Instant,
    /// Random parts of redeemed challenges, with when they expire.
    redeemed: HashMap<[u8; 16], Instant>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("redeemed", &self.redeemed.len())
            .finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

impl Challenges {
    /// Challenges under a fresh `secret`, with times counted from `epoch`.
    pub fn new(secret: [u8; 32], epoch: Instant) -> Self {
        Challenges {
            secret,
            epoch,
            redeemed: HashMap::new(),
        }
    }

    /// A new challenge of difficulty `bits`, valid for [`CHALLENGE_TTL`] from `now`.
    pub fn issue(&self, now: Instant, bits: u8, rng: &mut dyn RngCore) -> KeyChallenge {
        let mut random = [0u8; 16];
        rng.fill_bytes(&mut random);
        let expiry = (now + CHALLENGE_TTL).saturating_duration_since(self.epoch);
        let body = format!("v1.{bits}.{}.{}", expiry.as_millis(), hex::encode(random));
        let mac = hex::encode(self.mac(&body));
        KeyChallenge {
            challenge: format!("{body}.{mac}"),
            bits,
        }
    }

    /// Accepts `proof` once if it solves a live challenge of this node of at least
    /// `min_bits`.
    pub fn redeem(
        &mut self,
        now: Instant,
        proof: &KeyProof,
        min_bits: u8,
    ) -> Result<(), ProofError> {
        let (bits, expires, random) = self.parse(&proof.challenge)?;
        if expires <= now {
            return Err(ProofError::Expired);
        }
        if self.redeemed.contains_key(&random) {
            return Err(ProofError::Used);
        }
        if bits < min_bits || !relay_codec::challenge::solves(&proof.challenge, &proof.nonce, bits)
        {
            return Err(ProofError::Unsolved);
        }
        if self.redeemed.len() >= MAX_REDEEMED {
            self.prune(now);
            if self.redeemed.len() >= MAX_REDEEMED {
                return Err(ProofError::Busy);
            }
        }
        self.redeemed.insert(random, expires);
        Ok(())
    }

    /// Forgets redeemed challenges that have expired (they cannot be redeemed again
    /// anyway). Call now and then.
    pub fn prune(&mut self, now: Instant) {
        self.redeemed.retain(|_, expires| *expires > now);
    }

    /// Redeemed challenges remembered now.
    pub fn remembered(&self) -> usize {
        self.redeemed.len()
    }

    fn mac(&self, body: &str) -> [u8; 16] {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(body.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// Bits, expiry and random part of a challenge string, if its MAC verifies.
    fn parse(&self, challenge: &str) -> Result<(u8, Instant, [u8; 16]), ProofError> {
        if challenge.len() > 128 {
            return Err(ProofError::Unknown);
        }
        let (body, mac) = challenge.rsplit_once('.').ok_or(ProofError::Unknown)?;
        let mac = hex::decode(mac).map_err(|_| ProofError::Unknown)?;
        let mut check =
            HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        check.update(body.as_bytes());
        check
            .verify_truncated_left(&mac)
            .ok()
            .filter(|()| mac.len() == 16)
            .ok_or(ProofError::Unknown)?;
        let mut parts = body.split('.');
        let (Some("v1"), Some(bits), Some(expiry), Some(random), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(ProofError::Unknown);
        };
        let bits: u8 = bits.parse().map_err(|_| ProofError::Unknown)?;
        let expiry: u64 = expiry.parse().map_err(|_| ProofError::Unknown)?;
        let random: [u8; 16] = hex::decode(random)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or(ProofError::Unknown)?;
        Ok((bits, self.epoch + Duration::from_millis(expiry), random))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn setup() -> (Challenges, Instant, rand::rngs::StdRng) {
        let epoch = Instant::now();
        (
            Challenges::new([7; 32], epoch),
            epoch,
            rand::rngs::StdRng::seed_from_u64(1),
        )
    }

    #[test]
    fn a_solved_challenge_admits_one_attempt() {
        let (mut cs, now, mut rng) = setup();
        let c = cs.issue(now, 8, &mut rng);
        let proof = c.solve();
        assert_eq!(cs.redeem(now, &proof, 8), Ok(()));
        assert_eq!(cs.redeem(now, &proof, 8), Err(ProofError::Used));
        assert_eq!(cs.remembered(), 1);
        cs.prune(now + CHALLENGE_TTL);
        assert_eq!(cs.remembered(), 0);
    }

    #[test]
    fn expired_forged_unsolved_and_too_easy_proofs_are_refused() {
        let (mut cs, now, mut rng) = setup();
        let c = cs.issue(now, 8, &mut rng);
        let proof = c.solve();
        assert_eq!(
            cs.redeem(now + CHALLENGE_TTL, &proof, 8),
            Err(ProofError::Expired)
        );
        // Another node (another secret) did not hand it out.
        let mut other = Challenges::new([8; 32], now);
        assert_eq!(other.redeem(now, &proof, 8), Err(ProofError::Unknown));
        // Lowering the bits in the string breaks the MAC.
        let forged = KeyProof {
            challenge: proof.challenge.replacen("v1.8.", "v1.0.", 1),
            nonce: "0".into(),
        };
        assert_eq!(cs.redeem(now, &forged, 0), Err(ProofError::Unknown));
        // A nonce that does not solve it.
        let wrong = (0u64..)
            .map(|n| n.to_string())
            .find(|n| !relay_codec::challenge::solves(&c.challenge, n, 8))
            .expect("some nonce fails");
        let unsolved = KeyProof {
            challenge: c.challenge.clone(),
            nonce: wrong,
        };
        assert_eq!(cs.redeem(now, &unsolved, 8), Err(ProofError::Unsolved));
        // The node asks for more now than the challenge did.
        assert_eq!(cs.redeem(now, &proof, 9), Err(ProofError::Unsolved));
        for garbage in ["", "v1", "v1.8.1.zz.00", &"a".repeat(500)] {
            let p = KeyProof {
                challenge: garbage.into(),
                nonce: "1".into(),
            };
            assert_eq!(
                cs.redeem(now, &p, 0),
                Err(ProofError::Unknown),
                "{garbage:?}"
            );
        }
        // The honest proof still works once.
        assert_eq!(cs.redeem(now, &proof, 8), Ok(()));
    }
}
