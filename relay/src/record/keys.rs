//! Review keys: who can read a portal's recordings.
//!
//! Each portal has an age X25519 key pair. The relay holds only the public half (the
//! recipient, `age1…`, in `[recording.review_keys]`) and encrypts recordings to it as it
//! writes them. The private half exists only inside an **identity file** that is itself
//! age-encrypted with a passphrase (scrypt), as `age-keygen | age -p` would make it:
//! whoever holds the file and its passphrase can read the portal's recordings; nobody
//! else can, the relay included. There is no reset: lose the passphrase or the file and
//! the recordings are unreadable for good.

use std::io::{Read, Write};
use std::iter;

use age::secrecy::{ExposeSecret, SecretString};
use age::x25519;

/// Shortest accepted passphrase, in characters.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// Largest identity file read (a real one is about 400 bytes).
const MAX_IDENTITY_FILE_BYTES: u64 = 64 * 1024;

/// Why a review key could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum ReviewKeyError {
    /// The passphrase is too short to resist guessing.
    #[error("the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters")]
    WeakPassphrase,
    /// The passphrase does not open the identity file.
    #[error("wrong passphrase for this identity file")]
    WrongPassphrase,
    /// The file is not a passphrase-protected age file.
    #[error("not a review identity file (expected a passphrase-protected age file): {0}")]
    NotAnIdentityFile(String),
    /// The file opened but holds no X25519 identity.
    #[error("the identity file holds no age X25519 identity")]
    NoIdentity,
    /// Encryption failed (out of memory, or an I/O error on the in-memory buffer).
    #[error("encrypting the identity: {0}")]
    Encrypt(String),
    /// A recipient string (public key) does not parse.
    #[error("{0:?} is not an age X25519 public key (age1…): {1}")]
    BadRecipient(String, String),
}

/// A new key pair: the passphrase-protected identity file and its public key.
pub struct NewReviewKey {
    /// The identity file's bytes (ASCII-armored age, safe to store anywhere: useless
    /// without the passphrase).
    pub identity_file: Vec<u8>,
    /// The public key for `[recording.review_keys]`.
    pub recipient: x25519::Recipient,
}

/// Largest scrypt work factor (`N = 2^n`) an identity file may ask for when opened:
/// about 4 s and 2 GiB on a laptop; more would let a forged file stall the tool.
pub const MAX_SCRYPT_LOG_N: u8 = 21;

/// Makes a key pair for `portal` and protects its private half with `passphrase`,
/// with scrypt work factor `N = 2^scrypt_log_n` (`None`: age's choice, about one second
/// on this machine; tests pass a small one).
pub fn new_review_key(
    portal: &str,
    passphrase: SecretString,
    scrypt_log_n: Option<u8>,
) -> Result<NewReviewKey, ReviewKeyError> {
    if passphrase.expose_secret().chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(ReviewKeyError::WeakPassphrase);
    }
    let identity = x25519::Identity::generate();
    let recipient = identity.to_public();
    let contents = format!(
        "# relay session-review identity for portal {portal}\n# public key: {recipient}\n{}\n",
        identity.to_string().expose_secret()
    );
    let mut scrypt = age::scrypt::Recipient::new(passphrase);
    if let Some(n) = scrypt_log_n {
        scrypt.set_work_factor(n.clamp(1, MAX_SCRYPT_LOG_N));
    }
    let encryptor = age::Encryptor::with_recipients(iter::once(&scrypt as &dyn age::Recipient))
        .map_err(|e| ReviewKeyError::Encrypt(e.to_string()))?;
    let mut out = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
        .map_err(|e| ReviewKeyError::Encrypt(e.to_string()))?;
    let mut writer = encryptor
        .wrap_output(armor)
        .map_err(|e| ReviewKeyError::Encrypt(e.to_string()))?;
    writer
        .write_all(contents.as_bytes())
        .map_err(|e| ReviewKeyError::Encrypt(e.to_string()))?;
    writer
        .finish()
        .and_then(|armor| armor.finish())
        .map_err(|e| ReviewKeyError::Encrypt(e.to_string()))?;
    Ok(NewReviewKey {
        identity_file: out,
        recipient,
    })
}

/// Opens an identity file with its passphrase.
pub fn open_identity(
    file: &[u8],
    passphrase: SecretString,
) -> Result<x25519::Identity, ReviewKeyError> {
    let not_identity = |e: &dyn std::fmt::Display| ReviewKeyError::NotAnIdentityFile(e.to_string());
    let reader = age::armor::ArmoredReader::new(file);
    let decryptor = age::Decryptor::new(reader).map_err(|e| not_identity(&e))?;
    if !decryptor.is_scrypt() {
        return Err(ReviewKeyError::NotAnIdentityFile(
            "it is encrypted to a key, not a passphrase".into(),
        ));
    }
    let mut scrypt = age::scrypt::Identity::new(passphrase);
    scrypt.set_max_work_factor(MAX_SCRYPT_LOG_N);
    let mut reader = match decryptor.decrypt(iter::once(&scrypt as &dyn age::Identity)) {
        Ok(r) => r,
        Err(age::DecryptError::DecryptionFailed | age::DecryptError::NoMatchingKeys) => {
            return Err(ReviewKeyError::WrongPassphrase);
        }
        Err(e) => return Err(not_identity(&e)),
    };
    let mut contents = String::new();
    (&mut reader)
        .take(MAX_IDENTITY_FILE_BYTES)
        .read_to_string(&mut contents)
        .map_err(|e| not_identity(&e))?;
    let identity = contents
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .ok_or(ReviewKeyError::NoIdentity)?
        .parse::<x25519::Identity>()
        .map_err(|_| ReviewKeyError::NoIdentity);
    // The plaintext held the secret key; do not leave it in freed memory.
    zeroize_string(contents);
    identity
}

/// Parses a public key from the configuration.
pub fn parse_recipient(s: &str) -> Result<x25519::Recipient, ReviewKeyError> {
    s.trim()
        .parse::<x25519::Recipient>()
        .map_err(|e| ReviewKeyError::BadRecipient(s.to_owned(), e.to_string()))
}

fn zeroize_string(s: String) {
    let mut bytes = s.into_bytes();
    bytes.iter_mut().for_each(|b| *b = 0);
    std::hint::black_box(&bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    #[test]
    fn a_new_key_opens_with_its_passphrase_only() {
        let key =
            new_review_key("support", secret("correct horse battery staple"), Some(10)).unwrap();
        let text = String::from_utf8(key.identity_file.clone()).unwrap();
        assert!(
            text.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"),
            "{text}"
        );
        assert!(
            !text.contains("AGE-SECRET-KEY"),
            "the secret is not in clear"
        );

        let identity =
            open_identity(&key.identity_file, secret("correct horse battery staple")).unwrap();
        assert_eq!(identity.to_public().to_string(), key.recipient.to_string());
        assert!(matches!(
            open_identity(&key.identity_file, secret("wrong horse battery staple")),
            Err(ReviewKeyError::WrongPassphrase)
        ));
    }

    #[test]
    fn short_passphrases_and_foreign_files_are_refused() {
        assert!(matches!(
            new_review_key("p", secret("short"), Some(10)),
            Err(ReviewKeyError::WeakPassphrase)
        ));
        assert!(matches!(
            open_identity(b"AGE-SECRET-KEY-1XYZ", secret("whatever passphrase")),
            Err(ReviewKeyError::NotAnIdentityFile(_))
        ));
        assert!(matches!(
            open_identity(b"", secret("whatever passphrase")),
            Err(ReviewKeyError::NotAnIdentityFile(_))
        ));
    }

    #[test]
    fn recipients_parse_or_say_why() {
        let id = x25519::Identity::generate();
        let public = id.to_public().to_string();
        assert_eq!(parse_recipient(&public).unwrap().to_string(), public);
        assert!(matches!(
            parse_recipient("age1nope"),
            Err(ReviewKeyError::BadRecipient(..))
        ));
    }
}
