//! Identifiers and secrets of the session core.
//!
//! Ids are random and opaque (`s_…`, `p_…`, `i_…`), so nothing about one session can be
//! learnt from another's. Secrets (participant tokens, support-link tokens) are kept only
//! as SHA-256 digests, so a lookup compares digests and never times the secret itself,
//! and their `Debug` output is redacted so they cannot reach a log by accident.

use std::fmt;

use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};

/// A random source the core draws ids, keys and tokens from. The shell passes a CSPRNG
/// seeded by the operating system; tests pass a seeded one for determinism.
pub type Random = Box<dyn RngCore + Send>;

fn random_hex(rng: &mut dyn RngCore, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rng.fill_bytes(&mut buf);
    hex::encode(buf)
}

macro_rules! opaque_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $bytes:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Draws a fresh random id.
            pub fn random(rng: &mut dyn RngCore) -> Self {
                Self(format!(concat!($prefix, "{}"), random_hex(rng, $bytes)))
            }

            /// Wraps an id received from a client; it is only ever compared, never trusted.
            pub fn from_wire(s: &str) -> Self {
                Self(s.to_owned())
            }

            /// The id as sent on the wire.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

opaque_id!(
    /// A session on this node (`s_` + 128 random bits).
    SessionId, "s_", 16
);
opaque_id!(
    /// A participant inside one session (`p_` + 64 random bits).
    ParticipantId, "p_", 8
);
opaque_id!(
    /// An invitation (`i_` + 64 random bits).
    InvitationId, "i_", 8
);

/// A WebSocket connection, numbered by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// The nine-digit support key a customer types. Redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SupportKey(String);

impl SupportKey {
    /// Draws a key uniformly from the 10^9 nine-digit strings.
    pub fn random(rng: &mut dyn RngCore) -> Self {
        Self(format!("{:09}", rng.random_range(0..1_000_000_000u32)))
    }

    /// Wraps an already normalised key (see [`relay_codec::wire::normalize_support_key`]).
    pub fn from_normalized(digits: String) -> Self {
        Self(digits)
    }

    /// The digits, for the agent who opened the session and nobody else.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SupportKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SupportKey(***)")
    }
}

/// A bearer secret (participant token, support-link token): 128 random bits, hex.
/// Redacted in `Debug`; the core stores only its [`SecretDigest`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Draws a fresh 128-bit secret.
    pub fn random(rng: &mut dyn RngCore) -> Self {
        Self(random_hex(rng, 16))
    }

    /// The secret itself, to hand to its owner once.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    /// Its digest, which is what the core keeps.
    pub fn digest(&self) -> SecretDigest {
        SecretDigest::of(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// SHA-256 of a secret as presented by a client.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretDigest([u8; 32]);

impl SecretDigest {
    /// Digest of a presented secret.
    pub fn of(presented: &str) -> Self {
        Self(Sha256::digest(presented.as_bytes()).into())
    }

    /// The digest in lowercase hex (the cluster directory's keys are named by it).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretDigest({}…)", hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ids_have_prefix_and_entropy() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let s = SessionId::random(&mut rng);
        assert!(s.as_str().starts_with("s_") && s.as_str().len() == 2 + 32);
        let p = ParticipantId::random(&mut rng);
        assert!(p.as_str().starts_with("p_") && p.as_str().len() == 2 + 16);
        assert_ne!(SessionId::random(&mut rng), s);
    }

    #[test]
    fn support_keys_are_nine_digits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for _ in 0..1000 {
            let k = SupportKey::random(&mut rng);
            assert_eq!(k.reveal().len(), 9);
            assert!(k.reveal().bytes().all(|b| b.is_ascii_digit()));
        }
    }

    #[test]
    fn secrets_are_redacted_and_digested() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let s = Secret::random(&mut rng);
        assert_eq!(s.reveal().len(), 32);
        assert!(!format!("{s:?}").contains(s.reveal()));
        assert_eq!(s.digest(), SecretDigest::of(s.reveal()));
        assert_ne!(s.digest(), SecretDigest::of("other"));
    }
}
