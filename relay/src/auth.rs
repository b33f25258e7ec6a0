//! Agent and supervisor tokens: verifying the account backend's JWTs, and minting HS256
//! tokens for local use (`relay token`).
//!
//! A token is accepted with HS256 (a shared secret) or EdDSA (an Ed25519 public key);
//! both may be configured, and each token is checked with the key of the algorithm its
//! header names. Claims (see `docs/protocol.md`, "Authentication"): `sub`, `name`
//! (1–64 characters), `portals` (non-empty), optional `grants` (`"monitor"` makes a
//! supervisor), `exp` required, `iss`/`aud` checked only when configured.
//!
//! Where the HS256 secret comes from is decided in one place,
//! [`resolve_hs256_secret`], so that `relay serve` and `relay token` on the same machine
//! agree: an inline secret, else a secret file, else (when no key at all is configured) a
//! secret generated once into `data_dir/auth/hs256.secret`.
//!
//! Tokens and secrets never reach logs or error messages.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde_json::{Map, Value};

use crate::config::{AuthConfig, Config, create_private_file};
use crate::identity::AgentIdentity;

/// The grant that makes a token's bearer a supervisor.
pub const MONITOR_GRANT: &str = "monitor";
/// The longest accepted display name, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// Why a token was refused, or why verification could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("no token")]
    Missing,
    /// Bad signature, format, algorithm or claims; the message says which, never the token.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
    /// The keys could not be set up (unreadable or malformed key file, ...).
    #[error("auth configuration: {0}")]
    Config(String),
}

/// Checks agent tokens against the configured keys.
pub struct Verifier {
    hs256: Option<DecodingKey>,
    ed25519: Option<DecodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.hs256.is_some())
            .field("ed25519", &self.ed25519.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

impl Verifier {
    /// Builds the verifier from `[auth]`, generating the HS256 secret in `data_dir` if
    /// no key is configured at all.
    pub fn from_config(cfg: &Config) -> Result<Verifier, AuthError> {
        let auth = &cfg.auth;
        let hs256 = resolve_hs256_secret(auth, &cfg.data_dir, true)?
            .map(|secret| DecodingKey::from_secret(&secret));
        let ed25519 = match &auth.ed25519_public_key_file {
            Some(path) => {
                let pem = fs::read(path).map_err(|e| {
                    AuthError::Config(format!(
                        "cannot read auth.ed25519_public_key_file {}: {e}",
                        path.display()
                    ))
                })?;
                Some(DecodingKey::from_ed_pem(&pem).map_err(|e| {
                    AuthError::Config(format!(
                        "auth.ed25519_public_key_file {} is not a PEM Ed25519 public key \
                         (\"BEGIN PUBLIC KEY\"): {e}",
                        path.display()
                    ))
                })?)
            }
            None => None,
        };
        if hs256.is_none() && ed25519.is_none() {
            return Err(AuthError::Config("no token key configured".to_owned()));
        }
        Ok(Verifier {
            hs256,
            ed25519,
            issuer: auth.issuer.clone(),
            audience: auth.audience.clone(),
            leeway: auth.leeway,
        })
    }

    /// Verifies a token's signature, expiry and claims and returns who it names.
    pub fn verify(&self, token: &str) -> Result<AgentIdentity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(map_jwt_error)?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::EdDSA => self.ed25519.as_ref(),
            _ => None,
        }
        .ok_or_else(|| {
            AuthError::Invalid(format!(
                "algorithm {:?} is not accepted (accepted: {})",
                header.alg,
                self.accepted_algorithms()
            ))
        })?;

        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);

        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
            .map_err(map_jwt_error)?;
        identity_from_claims(&data.claims)
    }

    fn accepted_algorithms(&self) -> &'static str {
        match (self.hs256.is_some(), self.ed25519.is_some()) {
            (true, true) => "HS256, EdDSA",
            (true, false) => "HS256",
            (false, true) => "EdDSA",
            (false, false) => "none",
        }
    }
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    let why = match e.kind() {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::InvalidSignature => "bad signature".to_owned(),
        ErrorKind::InvalidAlgorithm => "algorithm does not match the key".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim `{c}`"),
        ErrorKind::InvalidClaimFormat(c) => format!("claim `{c}` has the wrong type"),
        ErrorKind::InvalidIssuer => "claim `iss` does not match auth.issuer".to_owned(),
        ErrorKind::InvalidAudience => "claim `aud` does not match auth.audience".to_owned(),
        ErrorKind::ImmatureSignature => "claim `nbf` is in the future".to_owned(),
        ErrorKind::Json(_) => "claims are not a JSON object".to_owned(),
        _ => "not a well-formed JWT".to_owned(),
    };
    AuthError::Invalid(why)
}

fn identity_from_claims(claims: &Map<String, Value>) -> Result<AgentIdentity, AuthError> {
    let string = |claim: &str| match claims.get(claim) {
        None | Some(Value::Null) => Err(AuthError::Invalid(format!("missing claim `{claim}`"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(AuthError::Invalid(format!(
            "claim `{claim}` must be a string"
        ))),
    };
    let strings = |claim: &str| -> Result<Option<Vec<String>>, AuthError> {
        match claims.get(claim) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(AuthError::Invalid(format!(
                        "claim `{claim}` must be an array of strings"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(AuthError::Invalid(format!(
                "claim `{claim}` must be an array of strings"
            ))),
        }
    };

    let who = AgentIdentity {
        agent_id: string("sub")?,
        name: string("name")?,
        portals: strings("portals")?
            .ok_or_else(|| AuthError::Invalid("missing claim `portals`".to_owned()))?,
        monitor: strings("grants")?
            .unwrap_or_default()
            .iter()
            .any(|g| g == MONITOR_GRANT),
    };
    check_identity(&who)?;
    Ok(who)
}

/// The claim rules both for verified and for minted tokens.
fn check_identity(who: &AgentIdentity) -> Result<(), AuthError> {
    let bad = |m: &str| Err(AuthError::Invalid(m.to_owned()));
    if who.agent_id.is_empty() {
        return bad("claim `sub` must not be empty");
    }
    let name_chars = who.name.chars().count();
    if !(1..=MAX_NAME_CHARS).contains(&name_chars) {
        return Err(AuthError::Invalid(format!(
            "claim `name` must be 1 to {MAX_NAME_CHARS} characters (got {name_chars})"
        )));
    }
    if who.name.chars().any(char::is_control) {
        return bad("claim `name` must not contain control characters");
    }
    if who.portals.is_empty() {
        return bad("claim `portals` must name at least one portal");
    }
    if who.portals.iter().any(String::is_empty) {
        return bad("claim `portals` must not contain an empty portal");
    }
    Ok(())
}

/// The HS256 secret to use, if any: `auth.hs256_secret`, else the contents of
/// `auth.hs256_secret_file`, else `None` if an Ed25519 key is configured, else the
/// secret in `data_dir/auth/hs256.secret` (64 hex characters from 32 random bytes,
/// used as text), which is generated (mode 0600) when missing and `create` is set.
pub fn resolve_hs256_secret(
    auth: &AuthConfig,
    data_dir: &Path,
    create: bool,
) -> Result<Option<Vec<u8>>, AuthError> {
    if let Some(secret) = &auth.hs256_secret {
        if secret.is_empty() {
            return Err(AuthError::Config("auth.hs256_secret is empty".to_owned()));
        }
        return Ok(Some(secret.as_bytes().to_vec()));
    }
    if let Some(path) = &auth.hs256_secret_file {
        return read_secret_file(path, "auth.hs256_secret_file").map(Some);
    }
    if auth.ed25519_public_key_file.is_some() {
        return Ok(None);
    }

    let path = generated_secret_path(data_dir);
    if path.exists() {
        return read_secret_file(&path, "the generated secret").map(Some);
    }
    if !create {
        return Ok(None);
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    let written = create_private_file(&path).and_then(|mut file| {
        file.write_all(secret.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()
    });
    match written {
        Ok(()) => Ok(Some(secret.into_bytes())),
        // Another process (a `relay token` next to `relay serve`) got there first: use its secret.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read_secret_file(&path, "the generated secret").map(Some)
        }
        Err(e) => Err(AuthError::Config(format!(
            "cannot write the generated HS256 secret {}: {e}",
            path.display()
        ))),
    }
}

/// Where a generated HS256 secret lives.
pub fn generated_secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("auth").join("hs256.secret")
}

fn read_secret_file(path: &Path, what: &str) -> Result<Vec<u8>, AuthError> {
    let mut bytes = fs::read(path)
        .map_err(|e| AuthError::Config(format!("cannot read {what} {}: {e}", path.display())))?;
    while bytes.last().is_some_and(u8::is_ascii_whitespace) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(AuthError::Config(format!(
            "{what} {} is empty",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Signs an HS256 token for `who`, valid for `ttl`, with `iss`/`aud` when given.
pub fn mint_hs256(
    secret: &[u8],
    who: &AgentIdentity,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, AuthError> {
    if secret.is_empty() {
        return Err(AuthError::Config("the HS256 secret is empty".to_owned()));
    }
    if ttl.is_zero() {
        return Err(AuthError::Invalid(
            "the token lifetime must be more than 0".to_owned(),
        ));
    }
    check_identity(who)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| AuthError::Config("the system clock is before 1970".to_owned()))?
        .as_secs();
    let mut claims = Map::new();
    claims.insert("sub".into(), who.agent_id.clone().into());
    claims.insert("name".into(), who.name.clone().into());
    claims.insert("portals".into(), who.portals.clone().into());
    if who.monitor {
        claims.insert("grants".into(), vec![MONITOR_GRANT].into());
    }
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), now.saturating_add(ttl.as_secs()).into());
    if let Some(iss) = issuer {
        claims.insert("iss".into(), iss.into());
    }
    if let Some(aud) = audience {
        claims.insert("aud".into(), aud.into());
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| AuthError::Config(format!("cannot sign the token: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "test-secret-that-is-long-enough-for-hs256";

    fn alice() -> AgentIdentity {
        AgentIdentity {
            agent_id: "alice".into(),
            name: "Alice".into(),
            portals: vec!["support".into()],
            monitor: false,
        }
    }

    fn cfg(edit: impl FnOnce(&mut Config)) -> Config {
        let mut cfg = Config::default();
        cfg.auth.hs256_secret = Some(SECRET.into());
        edit(&mut cfg);
        cfg
    }

    fn verifier(edit: impl FnOnce(&mut Config)) -> Verifier {
        Verifier::from_config(&cfg(edit)).expect("verifier")
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn sign(claims: Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign")
    }

    fn invalid(result: Result<AgentIdentity, AuthError>) -> String {
        match result {
            Err(AuthError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn round_trip() {
        let v = verifier(|_| {});
        let token = mint_hs256(
            SECRET.as_bytes(),
            &alice(),
            Duration::from_secs(60),
            None,
            None,
        )
        .expect("mint");
        assert_eq!(v.verify(&token).expect("valid"), alice());

        let sue = AgentIdentity {
            agent_id: "sue".into(),
            name: "Sue Ä".into(),
            portals: vec!["support".into(), "billing".into()],
            monitor: true,
        };
        let token =
            mint_hs256(SECRET.as_bytes(), &sue, Duration::from_secs(60), None, None).expect("mint");
        assert_eq!(v.verify(&token).expect("valid"), sue);
    }

    #[test]
    fn missing_token() {
        assert!(matches!(
            verifier(|_| {}).verify(" "),
            Err(AuthError::Missing)
        ));
        let m = invalid(verifier(|_| {}).verify("not.a.jwt"));
        assert!(!m.contains("not.a.jwt"), "never echo the token: {m}");
    }

    #[test]
    fn expired() {
        let token =
            sign(json!({"sub":"alice","name":"Alice","portals":["support"],"exp": now() - 120}));
        assert!(matches!(
            verifier(|_| {}).verify(&token),
            Err(AuthError::Expired)
        ));
        // Within the leeway (30 s by default) it still passes.
        let token =
            sign(json!({"sub":"alice","name":"Alice","portals":["support"],"exp": now() - 5}));
        verifier(|_| {}).verify(&token).expect("within leeway");
    }

    #[test]
    fn wrong_secret() {
        let token = mint_hs256(
            b"another-secret",
            &alice(),
            Duration::from_secs(60),
            None,
            None,
        )
        .expect("mint");
        assert_eq!(invalid(verifier(|_| {}).verify(&token)), "bad signature");
    }

    #[test]
    fn missing_claims() {
        let full = json!({"sub":"alice","name":"Alice","portals":["support"],"exp": now() + 60});
        for claim in ["sub", "name", "portals", "exp"] {
            let mut claims = full.clone();
            claims.as_object_mut().expect("object").remove(claim);
            let m = invalid(verifier(|_| {}).verify(&sign(claims)));
            assert!(m.contains(&format!("`{claim}`")), "{claim}: {m}");
        }
        let m = invalid(verifier(|_| {}).verify(&sign(
            json!({"sub":"alice","name":"Alice","portals":"support","exp": now() + 60}),
        )));
        assert!(m.contains("`portals`"), "{m}");
    }

    #[test]
    fn name_length() {
        let long = "x".repeat(65);
        let token =
            sign(json!({"sub":"alice","name": long,"portals":["support"],"exp": now() + 60}));
        let m = invalid(verifier(|_| {}).verify(&token));
        assert!(m.contains("`name`"), "{m}");
        let token = sign(json!({"sub":"alice","name":"","portals":["support"],"exp": now() + 60}));
        assert!(invalid(verifier(|_| {}).verify(&token)).contains("`name`"));
        let ok = "ü".repeat(64);
        let token = sign(json!({"sub":"alice","name": ok,"portals":["support"],"exp": now() + 60}));
        verifier(|_| {})
            .verify(&token)
            .expect("64 characters is fine");
        // Minting refuses what verifying would refuse.
        let mut who = alice();
        who.name = "x".repeat(65);
        assert!(matches!(
            mint_hs256(SECRET.as_bytes(), &who, Duration::from_secs(60), None, None),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn empty_portals() {
        let token = sign(json!({"sub":"alice","name":"Alice","portals":[],"exp": now() + 60}));
        assert!(invalid(verifier(|_| {}).verify(&token)).contains("`portals`"));
    }

    #[test]
    fn grants_other_than_monitor_are_ignored() {
        let token = sign(
            json!({"sub":"alice","name":"Alice","portals":["support"],"grants":["audit"],"exp": now() + 60}),
        );
        assert!(!verifier(|_| {}).verify(&token).expect("valid").monitor);
    }

    #[test]
    fn issuer_and_audience() {
        let v = verifier(|c| {
            c.auth.issuer = Some("accounts".into());
            c.auth.audience = Some("relay".into());
        });
        let mint = |iss: Option<&str>, aud: Option<&str>| {
            mint_hs256(
                SECRET.as_bytes(),
                &alice(),
                Duration::from_secs(60),
                iss,
                aud,
            )
            .expect("mint")
        };
        v.verify(&mint(Some("accounts"), Some("relay")))
            .expect("matching");
        assert!(invalid(v.verify(&mint(Some("other"), Some("relay")))).contains("`iss`"));
        assert!(invalid(v.verify(&mint(Some("accounts"), Some("other")))).contains("`aud`"));
        assert!(invalid(v.verify(&mint(None, Some("relay")))).contains("`iss`"));
        assert!(invalid(v.verify(&mint(Some("accounts"), None))).contains("`aud`"));
        // Not configured: not checked, even when present.
        verifier(|_| {})
            .verify(&mint(Some("whoever"), Some("whatever")))
            .expect("unchecked");
    }

    #[test]
    fn ed25519() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let public = dir.path().join("ed25519.pub.pem");
        fs::write(&public, key.public_key_pem()).expect("write");
        let signing = EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).expect("pkcs8");
        let claims = json!({"sub":"bob","name":"Bob","portals":["support"],"grants":["monitor"],"exp": now() + 60});
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &signing).expect("sign");

        // Ed25519 only: no HS256 secret is generated, EdDSA tokens pass, HS256 ones do not.
        let only_ed = Config {
            data_dir: dir.path().join("data"),
            auth: AuthConfig {
                ed25519_public_key_file: Some(public.clone()),
                ..AuthConfig::default()
            },
            ..Config::default()
        };
        let v = Verifier::from_config(&only_ed).expect("verifier");
        let who = v.verify(&token).expect("valid");
        assert_eq!(who.agent_id, "bob");
        assert!(who.monitor);
        assert!(!generated_secret_path(&only_ed.data_dir).exists());
        let hs = mint_hs256(
            SECRET.as_bytes(),
            &alice(),
            Duration::from_secs(60),
            None,
            None,
        )
        .expect("mint");
        assert!(invalid(v.verify(&hs)).contains("HS256"));

        // Both configured: either algorithm passes with its own key.
        let both = verifier(|c| c.auth.ed25519_public_key_file = Some(public.clone()));
        both.verify(&token).expect("eddsa");
        both.verify(&hs).expect("hs256");

        // A token signed by another Ed25519 key fails.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let other_signing =
            EncodingKey::from_ed_pem(other.serialize_pem().as_bytes()).expect("pkcs8");
        let forged = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &other_signing)
            .expect("sign");
        assert_eq!(invalid(both.verify(&forged)), "bad signature");
    }

    #[test]
    fn unreadable_ed25519_key_names_the_file() {
        let mut c = Config::default();
        c.auth.ed25519_public_key_file = Some("/nonexistent/key.pem".into());
        match Verifier::from_config(&c) {
            Err(AuthError::Config(m)) => assert!(m.contains("/nonexistent/key.pem"), "{m}"),
            other => panic!("expected Config, got {other:?}"),
        }
    }

    #[test]
    fn generated_secret_is_created_once_and_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = AuthConfig::default();
        assert_eq!(
            resolve_hs256_secret(&auth, dir.path(), false).expect("resolve"),
            None
        );
        let first = resolve_hs256_secret(&auth, dir.path(), true)
            .expect("resolve")
            .expect("generated");
        assert_eq!(first.len(), 64);
        let again = resolve_hs256_secret(&auth, dir.path(), false)
            .expect("resolve")
            .expect("read back");
        assert_eq!(first, again);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(generated_secret_path(dir.path()))
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // A token minted with it verifies with a verifier built from the same data_dir.
        let c = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let token =
            mint_hs256(&first, &alice(), Duration::from_secs(60), None, None).expect("mint");
        assert_eq!(
            Verifier::from_config(&c)
                .expect("verifier")
                .verify(&token)
                .expect("valid"),
            alice()
        );
    }

    #[test]
    fn secret_precedence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret.txt");
        fs::write(&file, "from-file\n").expect("write");
        let mut auth = AuthConfig {
            hs256_secret_file: Some(file),
            ..AuthConfig::default()
        };
        assert_eq!(
            resolve_hs256_secret(&auth, dir.path(), true).expect("resolve"),
            Some(b"from-file".to_vec())
        );
        auth.hs256_secret_file = None;
        auth.hs256_secret = Some("inline".into());
        assert_eq!(
            resolve_hs256_secret(&auth, dir.path(), true).expect("resolve"),
            Some(b"inline".to_vec())
        );
        assert!(!generated_secret_path(dir.path()).exists());
    }
}
