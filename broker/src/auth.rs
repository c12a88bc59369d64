//! Token verification and minting: who a connecting client is.
//!
//! Owns: checking a JWT's signature, algorithm and `exp`, and turning its `sub` and
//! `role` claims into a [`Principal`]; minting HS256 tokens (for `herald token` and
//! `herald dev`); mapping every failure to a [`Refusal`] a person can act on.
//! Must not: read files or the network (keys and secrets come in as bytes), decide
//! what a principal may do (that is the store's `authorize`), or panic on any token.
//!
//! # Tokens
//!
//! Claims: `sub` (the user id as a decimal string — a JSON number is accepted too —
//! or the service name), `role` (`"user"` | `"service"`) and `exp` (seconds since the
//! Unix epoch). [`mint_hs256`] also writes `iat`. Other claims are ignored.
//!
//! * **Algorithm**: a verifier accepts exactly one algorithm (HS256 by default; EdDSA
//!   or RS256 with a public key). A token whose header names another one is refused
//!   with [`AuthError::WrongAlgorithm`] before any key is used, so a token cannot pick
//!   how it is checked. `alg: none` does not even parse as a header and is refused as
//!   [`AuthError::Malformed`].
//! * **Expiry**: zero leeway. A token is valid up to and including the second `exp`
//!   and expired from `exp + 1` on; nodes are expected to run NTP, and clients mint or
//!   fetch a fresh token rather than rely on slack.
//! * **Bounds**: a token longer than [`TOKEN_BYTES_MAX`] is refused unparsed; a
//!   service name longer than [`SERVICE_NAME_BYTES_MAX`] is refused.
//! * **Crypto backend**: jsonwebtoken 10 needs a process-wide provider; this module
//!   installs the RustCrypto one on first use (idempotently, and harmlessly if someone
//!   installed one first).

use std::fmt;
use std::str::FromStr;
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_client::wire::{Principal, Refusal, RefusalCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

/// Longest token accepted, in bytes; longer ones are refused as malformed without parsing.
pub const TOKEN_BYTES_MAX: usize = 8 * 1024;

/// Longest service name (`sub` of a `role: service` token), in bytes; longer is malformed.
pub const SERVICE_NAME_BYTES_MAX: usize = 256;

/// The signature algorithms a broker can be configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenAlgorithm {
    /// HMAC-SHA256 with a shared secret (the default).
    Hs256,
    /// Ed25519 signatures; the broker holds the public key.
    EdDsa,
    /// RSA PKCS#1 v1.5 with SHA-256; the broker holds the public key.
    Rs256,
}

impl TokenAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            TokenAlgorithm::Hs256 => Algorithm::HS256,
            TokenAlgorithm::EdDsa => Algorithm::EdDSA,
            TokenAlgorithm::Rs256 => Algorithm::RS256,
        }
    }
}

impl fmt::Display for TokenAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenAlgorithm::Hs256 => "HS256",
            TokenAlgorithm::EdDsa => "EdDSA",
            TokenAlgorithm::Rs256 => "RS256",
        })
    }
}

impl FromStr for TokenAlgorithm {
    type Err = AuthError;

    /// Parses the configuration names `HS256`, `EdDSA` and `RS256` (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "HS256" => Ok(TokenAlgorithm::Hs256),
            "EDDSA" => Ok(TokenAlgorithm::EdDsa),
            "RS256" => Ok(TokenAlgorithm::Rs256),
            _ => Err(AuthError::Key {
                reason: format!("unknown token algorithm `{s}`: expected HS256, EdDSA or RS256"),
            }),
        }
    }
}

/// Why a token was refused or could not be made.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// The token's `exp` has passed (zero leeway).
    #[error("the token has expired; get a fresh one (e.g. `herald token`) and reconnect")]
    Expired,
    /// The signature does not verify with this broker's secret or key.
    #[error(
        "the token's signature does not verify with this broker's key; \
         it was signed with another secret or key — mint it with the cluster's token secret"
    )]
    BadSignature,
    /// The token is signed with an algorithm this broker is not configured for.
    #[error("the token is signed with {found}, but this broker accepts only {expected}; mint it with {expected}")]
    WrongAlgorithm {
        /// The algorithm named in the token's header.
        found: String,
        /// The one algorithm this broker accepts.
        expected: TokenAlgorithm,
    },
    /// The token is not a well-formed JWT or its claims are missing or wrong.
    #[error(
        "the token is malformed: {reason}; expected a JWT with claims \
         `sub`, `role` (\"user\" or \"service\") and `exp`"
    )]
    Malformed {
        /// What exactly is wrong.
        reason: String,
    },
    /// The broker's own secret or key is unusable (a configuration problem, not the client's).
    #[error("the token key is unusable: {reason}")]
    Key {
        /// What is wrong with the key and how to fix it.
        reason: String,
    },
}

impl AuthError {
    /// The refusal sent to the client: `TokenExpired`, `BadSignature`, `WrongAlgorithm`
    /// or `MalformedToken`; a broker key problem is `Internal` (the client cannot fix it).
    pub fn refusal(&self) -> Refusal {
        let code = match self {
            AuthError::Expired => RefusalCode::TokenExpired,
            AuthError::BadSignature => RefusalCode::BadSignature,
            AuthError::WrongAlgorithm { .. } => RefusalCode::WrongAlgorithm,
            AuthError::Malformed { .. } => RefusalCode::MalformedToken,
            AuthError::Key { .. } => RefusalCode::Internal,
        };
        Refusal::new(code, self.to_string())
    }

    fn malformed(reason: impl Into<String>) -> Self {
        AuthError::Malformed {
            reason: reason.into(),
        }
    }
}

/// Checks tokens against one key and one algorithm. Cheap to clone; holds no state
/// beyond the key.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    algorithm: TokenAlgorithm,
    key: DecodingKey,
    validation: Validation,
    /// An empty HS256 secret would let anyone mint tokens: every verify is refused.
    empty_secret: bool,
}

impl TokenVerifier {
    /// A verifier for HS256 tokens signed with `secret`.
    ///
    /// An empty secret is accepted here but makes every [`TokenVerifier::verify`] fail
    /// with [`AuthError::Key`], so a misconfigured node refuses everyone instead of
    /// accepting tokens anybody could forge.
    pub fn hs256(secret: &[u8]) -> Self {
        Self::with_key(
            TokenAlgorithm::Hs256,
            DecodingKey::from_secret(secret),
            secret.is_empty(),
        )
    }

    /// A verifier for EdDSA or RS256 tokens, given the signer's public key in PEM
    /// (`-----BEGIN PUBLIC KEY-----`, SPKI; RS256 also takes PKCS#1 `RSA PUBLIC KEY`).
    ///
    /// The key is checked here, so a bad key fails at startup, not at the first client.
    pub fn from_public_key_pem(algorithm: TokenAlgorithm, pem: &[u8]) -> Result<Self, AuthError> {
        ensure_crypto_provider();
        let key = match algorithm {
            TokenAlgorithm::Hs256 => {
                return Err(AuthError::Key {
                    reason: "HS256 uses a shared secret, not a public key; \
                             configure the secret file instead (TokenVerifier::hs256)"
                        .into(),
                })
            }
            TokenAlgorithm::EdDsa => {
                let key = DecodingKey::from_ed_pem(pem).map_err(|e| AuthError::Key {
                    reason: format!("not an Ed25519 public key in PEM (SPKI): {e}"),
                })?;
                // The verifier slices the first 32 bytes; anything else would panic there.
                if key.as_bytes().len() != 32 {
                    return Err(AuthError::Key {
                        reason: format!(
                            "an Ed25519 public key has 32 bytes, this PEM holds {}",
                            key.as_bytes().len()
                        ),
                    });
                }
                key
            }
            TokenAlgorithm::Rs256 => {
                DecodingKey::from_rsa_pem(pem).map_err(|e| AuthError::Key {
                    reason: format!("not an RSA public key in PEM: {e}"),
                })?
            }
        };
        // Build the verifier once with a dummy signature: this parses the key.
        jsonwebtoken::crypto::verify("AAAA", b"probe", &key, algorithm.jwt()).map_err(|e| {
            AuthError::Key {
                reason: format!("the {algorithm} public key does not load: {e}"),
            }
        })?;
        Ok(Self::with_key(algorithm, key, false))
    }

    fn with_key(algorithm: TokenAlgorithm, key: DecodingKey, empty_secret: bool) -> Self {
        let mut validation = Validation::new(algorithm.jwt());
        validation.set_required_spec_claims(&["exp"]);
        // `exp` is checked by `verify_at` (zero leeway, testable clock).
        validation.validate_exp = false;
        validation.leeway = 0;
        TokenVerifier {
            algorithm,
            key,
            validation,
            empty_secret,
        }
    }

    /// The algorithm this verifier accepts.
    pub fn algorithm(&self) -> TokenAlgorithm {
        self.algorithm
    }

    /// Checks signature, algorithm and `exp` (against the system clock) and returns
    /// who the token is for. `sub` must be a u64 for `role: user`, a non-empty name of
    /// at most [`SERVICE_NAME_BYTES_MAX`] bytes for `role: service`.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_at(token, unix_now_s())
    }

    /// [`TokenVerifier::verify`] with the current time given, in seconds since the
    /// Unix epoch. Valid while `now_unix_s <= exp`.
    pub fn verify_at(&self, token: &str, now_unix_s: u64) -> Result<Principal, AuthError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(AuthError::malformed(format!(
                "it is {} bytes long, above the maximum of {TOKEN_BYTES_MAX}",
                token.len()
            )));
        }
        if self.empty_secret {
            return Err(AuthError::Key {
                reason: "the HS256 secret is empty; configure a secret of at least 32 random bytes"
                    .into(),
            });
        }
        ensure_crypto_provider();
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| self.map_jwt_error(e, token))?;
        principal_from_claims(&data.claims, now_unix_s)
    }

    fn map_jwt_error(&self, err: jsonwebtoken::errors::Error, token: &str) -> AuthError {
        match err.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm {
                found: jsonwebtoken::decode_header(token)
                    .map(|h| format!("{:?}", h.alg))
                    .unwrap_or_else(|_| "an unknown algorithm".into()),
                expected: self.algorithm,
            },
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::MissingAlgorithm
            | ErrorKind::Provider(_) => AuthError::Key {
                reason: err.to_string(),
            },
            ErrorKind::MissingRequiredClaim(claim) => {
                AuthError::malformed(format!("claim `{claim}` is missing"))
            }
            ErrorKind::InvalidToken => {
                AuthError::malformed("it is not three base64url parts separated by dots")
            }
            ErrorKind::Json(_) => AuthError::malformed(format!(
                "its header or claims are not valid JWT JSON \
                 (an unsupported `alg` such as `none` ends up here): {err}"
            )),
            _ => AuthError::malformed(err.to_string()),
        }
    }
}

/// Reads `exp`, `role` and `sub` from verified claims.
fn principal_from_claims(
    claims: &Map<String, Value>,
    now_unix_s: u64,
) -> Result<Principal, AuthError> {
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or_else(|| AuthError::malformed("claim `exp` must be seconds since the Unix epoch"))?;
    if now_unix_s > exp {
        return Err(AuthError::Expired);
    }
    let role = match claims.get("role") {
        None => return Err(AuthError::malformed("claim `role` is missing")),
        Some(Value::String(role)) => role.as_str(),
        Some(other) => {
            return Err(AuthError::malformed(format!(
                "claim `role` must be the string \"user\" or \"service\", got {other}"
            )))
        }
    };
    let sub = claims
        .get("sub")
        .ok_or_else(|| AuthError::malformed("claim `sub` is missing"))?;
    match role {
        "user" => {
            let id = match sub {
                Value::String(s) => s.parse::<u64>().ok(),
                Value::Number(n) => n.as_u64(),
                _ => None,
            };
            id.map(Principal::User).ok_or_else(|| {
                AuthError::malformed(format!(
                    "claim `sub` of a user token must be the numeric user id (0..=2^64-1), got {sub}"
                ))
            })
        }
        "service" => match sub {
            Value::String(name) if !name.is_empty() && name.len() <= SERVICE_NAME_BYTES_MAX => {
                Ok(Principal::Service(name.clone()))
            }
            _ => Err(AuthError::malformed(format!(
                "claim `sub` of a service token must be the service name \
                 (1 to {SERVICE_NAME_BYTES_MAX} bytes), got {sub}"
            ))),
        },
        other => Err(AuthError::malformed(format!(
            "claim `role` must be \"user\" or \"service\", got \"{other}\""
        ))),
    }
}

/// Mints an HS256 token for `principal`, valid for `ttl` from now:
/// claims `{sub, role: "user"|"service", exp = now + ttl, iat = now}` (seconds).
///
/// Refuses an empty secret ([`AuthError::Key`]) and a service name that
/// [`TokenVerifier::verify`] would refuse ([`AuthError::Malformed`]).
pub fn mint_hs256(
    secret: &[u8],
    principal: &Principal,
    ttl: Duration,
) -> Result<String, AuthError> {
    mint_hs256_at(secret, principal, ttl, unix_now_s())
}

/// [`mint_hs256`] with the current time given, in seconds since the Unix epoch.
pub fn mint_hs256_at(
    secret: &[u8],
    principal: &Principal,
    ttl: Duration,
    now_unix_s: u64,
) -> Result<String, AuthError> {
    if secret.is_empty() {
        return Err(AuthError::Key {
            reason: "the HS256 secret is empty; use a secret of at least 32 random bytes".into(),
        });
    }
    let (sub, role) = match principal {
        Principal::User(id) => (id.to_string(), "user"),
        Principal::Service(name) => {
            if name.is_empty() || name.len() > SERVICE_NAME_BYTES_MAX {
                return Err(AuthError::malformed(format!(
                    "a service name must be 1 to {SERVICE_NAME_BYTES_MAX} bytes, got {} bytes",
                    name.len()
                )));
            }
            (name.clone(), "service")
        }
    };
    let claims = serde_json::json!({
        "sub": sub,
        "role": role,
        "exp": now_unix_s.saturating_add(ttl.as_secs()),
        "iat": now_unix_s,
    });
    ensure_crypto_provider();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| AuthError::Key {
        reason: format!("signing failed: {e}"),
    })
}

/// Seconds since the Unix epoch; 0 if the clock is set before 1970.
fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Installs jsonwebtoken's RustCrypto provider once per process. If another provider
/// is already installed, that one stays (both verify the same algorithms).
fn ensure_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _already_installed =
            jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    /// A throwaway 2048-bit RSA key generated for these tests only; it protects nothing.
    const TEST_RSA_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQCvl3RYNuiGugEj
1EkKxVt4C0Cj88mJV+mYgGeBF4ozusYh95Jwi5Dsl/xfLJHedOS0s1PweiSE287A
0aK77uhi0KEzdYEOkqRIcVwhWr0nAngeFcTGe/ViHd/poQ97pF9RmtHBru3rVFVB
nwye47at45glilWIG30rK/MYO/oNymueVZG03ngdQPDGgzRlrpyo379+6/sPgCQC
R76mRbwNFXbg9nwS1HkfoWchYHM82l2zQmut/+AhSXrGVuS0vLf9z7N7L3M9mkEp
ZMCTPmYNzkLDRuWZch4ThAwIp5XNcdjVmIW0uIUoFjA+stOXojXiGKk9XH/Lv1/D
bZXO8qCxAgMBAAECggEAAprhOWGWtsJOO+mtZNg8YIxg2th+/jWTgxxnrLM4+ynR
slj5wSQFXsjCOst1weC8MIwaiGq766FWhhGvAfwzGWSj+V9MZ1rGzpupQvfcmU8r
WLLqT5iio0PWwNmdy6/1bPJzVBXiWEd7g6aoPsaLSzV2kv6rVkmmHTySg/gi7mQy
xBpnjgKHSN35KqBuW0AKWPiL735o7+rpVnC70GRgsQTR7algBQyurV4fPUQfPaSx
LjynyInlWGD0/Qci3Qq0QXcFoG/SFRn0g2i/Lui1Hyx8qNz0qXBuGGqi1BlnfGFJ
Pavec/VoTpUHW2yu1eMiPOpj9Zi6wR9LPutRJ3Tf2wKBgQDy9BPemi7ApNDR7HDR
ZuPzfNZbJmThC0fu6ssnGcVZulvMjEQpuYJiIafLVPojTtwKUJLUrmrDkloQUliW
QjNgltnm+6sAo1N612P3JtQxltrfec0DnObnpHdZS27jThxrh9HZHkNN7kgPGDyV
tA+OnneajmrYVJtzKoatK/0tDwKBgQC5BVev+1i03W7eSbbZzEPtpDd+ddaqWZGA
QkEItIQxzQoSw1k/4RnB2HMBWCkI6k9wYbhCPPFIQJFouyOfA5T62hSYZ6xkFUzq
2i1kRosM/IRoPc1T0WWjts+T14i0BFhhElRL4qHKJkbLiCKmH1IVNTdcayc3XkKt
XSzPXGbWPwKBgGPkWy8RcdufaISHlLNkfKEmWPRNSvkErGTdgP3oqK4F46ysl3IY
ZjV25QjDPb26tNpA2r47oIYc7I79bJMLURiLrbg9DchLXw2I9f8updxlzERKTjMI
FiB0DOZYD5XCDglgZLXCraWjLVmXe4GJ8UOQgFi56dBcqTWm7IzTI1udAoGARWj1
rnVyn9d6YjXxPN/ek+ZJU03NzHZxmVZBo4xlE3HCV6ulbct6qDgVXOm/6zJLvvNJ
9r96HQrsAghCosLrPvhVRZ+PErTS+EAFS1sTizmoSpr0zn79zF8mnGX9SNtgdHo1
2YoZ/AZEBNL7fKq/VmlybV9dhO39wZ/00Y3unm0CgYAJA9ApTdbbDF8Jc4A+wUB5
tUIkrjsW8VKAICijA9KdJdiu/hT45z+K/i970HFkdYA7S5Ky+t43l8DtIM2DQ8pA
G4r9h9e48WtfgFAMTd9g3aUr/K6Ave1DKLchfFHTkyIx1FO7QPw550TOG+aNipQB
cQwhPWVFQWPW4kLuKMLREQ==
-----END PRIVATE KEY-----
";
    const TEST_RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAr5d0WDbohroBI9RJCsVb
eAtAo/PJiVfpmIBngReKM7rGIfeScIuQ7Jf8XyyR3nTktLNT8HokhNvOwNGiu+7o
YtChM3WBDpKkSHFcIVq9JwJ4HhXExnv1Yh3f6aEPe6RfUZrRwa7t61RVQZ8MnuO2
reOYJYpViBt9KyvzGDv6DcprnlWRtN54HUDwxoM0Za6cqN+/fuv7D4AkAke+pkW8
DRV24PZ8EtR5H6FnIWBzPNpds0Jrrf/gIUl6xlbktLy3/c+zey9zPZpBKWTAkz5m
Dc5Cw0blmXIeE4QMCKeVzXHY1ZiFtLiFKBYwPrLTl6I14hipPVx/y79fw22VzvKg
sQIDAQAB
-----END PUBLIC KEY-----
";

    /// Signs arbitrary claims, for tokens `mint_hs256` would never make.
    fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
        ensure_crypto_provider();
        jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
    }

    fn hs256(claims: Value) -> String {
        sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET), claims)
    }

    fn verifier() -> TokenVerifier {
        TokenVerifier::hs256(SECRET)
    }

    fn assert_malformed(result: Result<Principal, AuthError>) {
        match result {
            Err(e @ AuthError::Malformed { .. }) => {
                assert_eq!(e.refusal().code, RefusalCode::MalformedToken)
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn user_token_round_trips() {
        let token = mint_hs256(SECRET, &Principal::User(42), Duration::from_secs(3600)).unwrap();
        assert_eq!(verifier().verify(&token).unwrap(), Principal::User(42));
        let max = mint_hs256(SECRET, &Principal::User(u64::MAX), Duration::from_secs(60)).unwrap();
        assert_eq!(verifier().verify(&max).unwrap(), Principal::User(u64::MAX));
    }

    #[test]
    fn service_token_round_trips() {
        let who = Principal::Service("billing".into());
        let token = mint_hs256(SECRET, &who, Duration::from_secs(3600)).unwrap();
        assert_eq!(verifier().verify(&token).unwrap(), who);
    }

    #[test]
    fn minted_claims_are_sub_role_exp_iat() {
        let token =
            mint_hs256_at(SECRET, &Principal::User(7), Duration::from_secs(600), NOW).unwrap();
        let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
            .unwrap()
            .claims;
        assert_eq!(
            claims,
            serde_json::json!({"sub": "7", "role": "user", "exp": NOW + 600, "iat": NOW})
        );
    }

    #[test]
    fn expired_token_is_refused_with_token_expired() {
        let token =
            hs256(serde_json::json!({"sub": "1", "role": "user", "exp": unix_now_s() - 10}));
        let err = verifier().verify(&token).unwrap_err();
        assert_eq!(err, AuthError::Expired);
        assert_eq!(err.refusal().code, RefusalCode::TokenExpired);
    }

    #[test]
    fn expiry_has_zero_leeway_and_exp_second_is_still_valid() {
        let token =
            mint_hs256_at(SECRET, &Principal::User(1), Duration::from_secs(60), NOW).unwrap();
        let exp = NOW + 60;
        assert_eq!(verifier().verify_at(&token, exp), Ok(Principal::User(1)));
        assert_eq!(
            verifier().verify_at(&token, exp + 1),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn forged_token_is_bad_signature() {
        let token = mint_hs256(
            b"some-other-secret",
            &Principal::User(1),
            Duration::from_secs(60),
        )
        .unwrap();
        let err = verifier().verify(&token).unwrap_err();
        assert_eq!(err, AuthError::BadSignature);
        assert_eq!(err.refusal().code, RefusalCode::BadSignature);
        // A tampered payload under the right secret fails the same way.
        let good = mint_hs256(SECRET, &Principal::User(1), Duration::from_secs(60)).unwrap();
        let other = mint_hs256(SECRET, &Principal::User(2), Duration::from_secs(60)).unwrap();
        let g: Vec<&str> = good.split('.').collect();
        let o: Vec<&str> = other.split('.').collect();
        let spliced = format!("{}.{}.{}", g[0], o[1], g[2]);
        assert_eq!(verifier().verify(&spliced), Err(AuthError::BadSignature));
    }

    #[test]
    fn hs384_token_is_wrong_algorithm() {
        let claims = serde_json::json!({"sub": "1", "role": "user", "exp": unix_now_s() + 60});
        let token = sign(Algorithm::HS384, &EncodingKey::from_secret(SECRET), claims);
        let err = verifier().verify(&token).unwrap_err();
        assert_eq!(
            err,
            AuthError::WrongAlgorithm {
                found: "HS384".into(),
                expected: TokenAlgorithm::Hs256
            }
        );
        assert_eq!(err.refusal().code, RefusalCode::WrongAlgorithm);
        assert!(err.to_string().contains("HS256"), "{err}");
    }

    #[test]
    fn alg_none_token_is_refused() {
        let good = mint_hs256(SECRET, &Principal::User(1), Duration::from_secs(60)).unwrap();
        let payload = good.split('.').nth(1).unwrap();
        // base64url of {"alg":"none","typ":"JWT"}
        let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        for token in [
            format!("{none_header}.{payload}."),
            format!("{none_header}.{payload}"),
        ] {
            let err = verifier().verify(&token).unwrap_err();
            assert!(
                matches!(
                    err,
                    AuthError::Malformed { .. } | AuthError::WrongAlgorithm { .. }
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let long = "a".repeat(TOKEN_BYTES_MAX + 1);
        for token in [
            "",
            "garbage",
            "a.b.c",
            "a.b",
            "...",
            "ey.ey.ey",
            "é.é.é",
            long.as_str(),
        ] {
            assert_malformed(verifier().verify(token));
        }
    }

    #[test]
    fn user_with_non_numeric_sub_is_malformed() {
        let exp = unix_now_s() + 60;
        for sub in [
            serde_json::json!("alice"),
            serde_json::json!("-1"),
            serde_json::json!("18446744073709551616"),
            serde_json::json!(1.5),
            serde_json::json!(null),
            serde_json::json!(["1"]),
        ] {
            let token = hs256(serde_json::json!({"sub": sub, "role": "user", "exp": exp}));
            assert_malformed(verifier().verify(&token));
        }
    }

    #[test]
    fn user_sub_may_be_a_json_number() {
        let token = hs256(serde_json::json!({"sub": 99, "role": "user", "exp": unix_now_s() + 60}));
        assert_eq!(verifier().verify(&token), Ok(Principal::User(99)));
    }

    #[test]
    fn missing_or_unknown_role_is_malformed() {
        let exp = unix_now_s() + 60;
        for claims in [
            serde_json::json!({"sub": "1", "exp": exp}),
            serde_json::json!({"sub": "1", "role": "admin", "exp": exp}),
            serde_json::json!({"sub": "1", "role": 1, "exp": exp}),
        ] {
            assert_malformed(verifier().verify(&hs256(claims)));
        }
    }

    #[test]
    fn missing_sub_or_exp_is_malformed() {
        let exp = unix_now_s() + 60;
        assert_malformed(
            verifier().verify(&hs256(serde_json::json!({"role": "user", "exp": exp}))),
        );
        assert_malformed(
            verifier().verify(&hs256(serde_json::json!({"sub": "1", "role": "user"}))),
        );
        assert_malformed(verifier().verify(&hs256(
            serde_json::json!({"sub": "1", "role": "user", "exp": "tomorrow"}),
        )));
    }

    #[test]
    fn bad_service_names_are_malformed() {
        let exp = unix_now_s() + 60;
        let long = "s".repeat(SERVICE_NAME_BYTES_MAX + 1);
        for sub in [
            serde_json::json!(""),
            serde_json::json!(long),
            serde_json::json!(5),
        ] {
            let token = hs256(serde_json::json!({"sub": sub, "role": "service", "exp": exp}));
            assert_malformed(verifier().verify(&token));
        }
        let err = mint_hs256(
            SECRET,
            &Principal::Service(String::new()),
            Duration::from_secs(1),
        );
        assert!(matches!(err, Err(AuthError::Malformed { .. })), "{err:?}");
    }

    #[test]
    fn empty_secret_refuses_to_mint_and_to_verify() {
        assert!(matches!(
            mint_hs256(b"", &Principal::User(1), Duration::from_secs(60)),
            Err(AuthError::Key { .. })
        ));
        // A token signed with the empty key must not be accepted by an empty-secret verifier.
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b""),
            serde_json::json!({"sub": "1", "role": "user", "exp": unix_now_s() + 60}),
        );
        let err = TokenVerifier::hs256(b"").verify(&token).unwrap_err();
        assert!(matches!(err, AuthError::Key { .. }), "{err:?}");
        assert_eq!(err.refusal().code, RefusalCode::Internal);
    }

    #[test]
    fn eddsa_round_trip_and_other_algorithms_refused() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let signing = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap();
        let verifier = TokenVerifier::from_public_key_pem(
            TokenAlgorithm::EdDsa,
            pair.public_key_pem().as_bytes(),
        )
        .unwrap();
        assert_eq!(verifier.algorithm(), TokenAlgorithm::EdDsa);
        let claims =
            serde_json::json!({"sub": "push", "role": "service", "exp": unix_now_s() + 60});
        let token = sign(Algorithm::EdDSA, &signing, claims);
        assert_eq!(
            verifier.verify(&token),
            Ok(Principal::Service("push".into()))
        );
        // An HS256 token (e.g. signed with the public key as an HMAC secret) is refused.
        let hs = mint_hs256(
            pair.public_key_pem().as_bytes(),
            &Principal::User(1),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(matches!(
            verifier.verify(&hs),
            Err(AuthError::WrongAlgorithm {
                expected: TokenAlgorithm::EdDsa,
                ..
            })
        ));
        // Another Ed25519 key's signature is a bad signature.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let other_key = EncodingKey::from_ed_pem(other.serialize_pem().as_bytes()).unwrap();
        let forged = sign(
            Algorithm::EdDSA,
            &other_key,
            serde_json::json!({"sub": "push", "role": "service", "exp": unix_now_s() + 60}),
        );
        assert_eq!(verifier.verify(&forged), Err(AuthError::BadSignature));
    }

    #[test]
    fn rs256_round_trip() {
        let signing = EncodingKey::from_rsa_pem(TEST_RSA_PRIVATE_PEM.as_bytes()).unwrap();
        let verifier = TokenVerifier::from_public_key_pem(
            TokenAlgorithm::Rs256,
            TEST_RSA_PUBLIC_PEM.as_bytes(),
        )
        .unwrap();
        let token = sign(
            Algorithm::RS256,
            &signing,
            serde_json::json!({"sub": "5", "role": "user", "exp": unix_now_s() + 60}),
        );
        assert_eq!(verifier.verify(&token), Ok(Principal::User(5)));
        let hs = mint_hs256(SECRET, &Principal::User(5), Duration::from_secs(60)).unwrap();
        assert!(matches!(
            verifier.verify(&hs),
            Err(AuthError::WrongAlgorithm { .. })
        ));
    }

    #[test]
    fn unusable_public_keys_are_key_errors() {
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ed_public = ed.public_key_pem();
        let cases: [(TokenAlgorithm, &[u8]); 6] = [
            (TokenAlgorithm::Hs256, TEST_RSA_PUBLIC_PEM.as_bytes()),
            (TokenAlgorithm::EdDsa, b"not a pem"),
            (TokenAlgorithm::EdDsa, TEST_RSA_PUBLIC_PEM.as_bytes()),
            (TokenAlgorithm::Rs256, b""),
            (TokenAlgorithm::Rs256, ed_public.as_bytes()),
            (
                TokenAlgorithm::Rs256,
                b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            ),
        ];
        for (alg, pem) in cases {
            let result = TokenVerifier::from_public_key_pem(alg, pem);
            assert!(
                matches!(result, Err(AuthError::Key { .. })),
                "{alg}: {result:?}"
            );
        }
    }

    #[test]
    fn token_algorithm_parses_config_names() {
        assert_eq!("HS256".parse::<TokenAlgorithm>(), Ok(TokenAlgorithm::Hs256));
        assert_eq!("EdDSA".parse::<TokenAlgorithm>(), Ok(TokenAlgorithm::EdDsa));
        assert_eq!("rs256".parse::<TokenAlgorithm>(), Ok(TokenAlgorithm::Rs256));
        assert!("HS384".parse::<TokenAlgorithm>().is_err());
        for alg in [
            TokenAlgorithm::Hs256,
            TokenAlgorithm::EdDsa,
            TokenAlgorithm::Rs256,
        ] {
            assert_eq!(alg.to_string().parse::<TokenAlgorithm>(), Ok(alg));
        }
    }

    #[test]
    fn every_error_maps_to_its_refusal_code() {
        let cases = [
            (AuthError::Expired, RefusalCode::TokenExpired),
            (AuthError::BadSignature, RefusalCode::BadSignature),
            (
                AuthError::WrongAlgorithm {
                    found: "HS512".into(),
                    expected: TokenAlgorithm::Hs256,
                },
                RefusalCode::WrongAlgorithm,
            ),
            (AuthError::malformed("x"), RefusalCode::MalformedToken),
            (AuthError::Key { reason: "x".into() }, RefusalCode::Internal),
        ];
        for (err, code) in cases {
            let refusal = err.refusal();
            assert_eq!(refusal.code, code);
            assert_eq!(refusal.detail, err.to_string());
        }
    }
}
