//! Finding the API key in a request, and the cheap checks made before any hashing or lookup.
//!
//! Sources are `x-api-key` and `Authorization: Bearer`, as configured. The rules, in order:
//! - a source named in the request's `Connection` header is hop-by-hop by the client's own
//!   declaration, so it is ignored (it would be stripped before the upstream anyway);
//! - a source sent twice, or two sources that disagree, is ambiguous: *invalid*;
//! - nothing (or only empty values) found: *missing*;
//! - over the length bound, or any byte outside printable ASCII: *invalid*;
//! - a key in keygate's own issued format (`<prefix><22 base62 random><6 base62 CRC-32>`) whose
//!   checksum is wrong: *invalid*, without touching the cache or the store.
//!
//! Keys imported as digests may have any printable format and are checked by digest alone.

use http::header::{AUTHORIZATION, CONNECTION};
use http::HeaderName;

use super::Fields;
use crate::config::{CredentialSource, CredentialsConfig};

pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Length of the random part of an issued key, in base62 characters (≈131 bits).
pub const ISSUED_RANDOM_LEN: usize = 22;
/// Length of the checksum part of an issued key.
pub const ISSUED_CHECKSUM_LEN: usize = 6;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// What the credential step found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<'a> {
    /// A well-formed key.
    Key(Presented<'a>),
    Missing,
    Invalid,
}

/// A key as presented by the client. Its `Debug` never shows the key.
#[derive(PartialEq, Eq)]
pub struct Presented<'a> {
    pub bytes: &'a [u8],
    /// The environment, when the key is in keygate's issued format.
    pub environment: Option<&'a str>,
}

impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presented")
            .field("len", &self.bytes.len())
            .field("environment", &self.environment)
            .finish_non_exhaustive()
    }
}

/// The credential rules of one config snapshot.
#[derive(Debug, Clone)]
pub struct CredentialRules {
    sources: Vec<CredentialSource>,
    /// The header of each source, in order (stripped before forwarding).
    headers: Vec<&'static HeaderName>,
    max_len: usize,
    /// (environment, prefix) for keygate-issued keys.
    prefixes: Vec<(String, String)>,
}

impl CredentialRules {
    pub fn new(
        cfg: &CredentialsConfig,
        prefixes: &std::collections::BTreeMap<String, String>,
    ) -> Self {
        CredentialRules {
            headers: cfg
                .sources
                .iter()
                .map(|s| match s {
                    CredentialSource::ApiKeyHeader => &X_API_KEY,
                    CredentialSource::Bearer => &AUTHORIZATION,
                })
                .collect(),
            sources: cfg.sources.clone(),
            max_len: cfg.max_key_length,
            prefixes: prefixes
                .iter()
                .map(|(e, p)| (e.clone(), p.clone()))
                .collect(),
        }
    }

    /// The header names that carry credentials (stripped before forwarding).
    pub fn header_names(&self) -> &[&'static HeaderName] {
        &self.headers
    }

    /// Finds and checks the key in a request's fields.
    pub fn find<'a>(&'a self, fields: Fields<'a>) -> Found<'a> {
        let mut found: Option<&'a [u8]> = None;
        for source in &self.sources {
            let name = match source {
                CredentialSource::ApiKeyHeader => &X_API_KEY,
                CredentialSource::Bearer => &AUTHORIZATION,
            };
            let mut values = fields.get_all(name);
            let Some(first) = values.next() else { continue };
            if values.next().is_some() {
                return Found::Invalid;
            }
            if named_in_connection(fields, name) {
                continue;
            }
            let value = match source {
                CredentialSource::ApiKeyHeader => first,
                CredentialSource::Bearer => match bearer_token(first) {
                    Some(t) => t,
                    // Another scheme (Basic, …) is the upstream's business, not a key of ours.
                    None => continue,
                },
            };
            if value.is_empty() {
                continue;
            }
            match found {
                Some(prev) if prev != value => return Found::Invalid,
                _ => found = Some(value),
            }
        }
        let Some(key) = found else {
            return Found::Missing;
        };
        if key.len() > self.max_len || !key.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
            return Found::Invalid;
        }
        let mut environment = None;
        for (env, prefix) in &self.prefixes {
            if let Some(body) = key.strip_prefix(prefix.as_bytes()) {
                if is_issued_shape(body) {
                    if !checksum_ok(prefix.as_bytes(), body) {
                        return Found::Invalid;
                    }
                    environment = Some(env.as_str());
                }
                break;
            }
        }
        Found::Key(Presented {
            bytes: key,
            environment,
        })
    }
}

fn bearer_token(b: &[u8]) -> Option<&[u8]> {
    if b.len() < 7 || !b[..6].eq_ignore_ascii_case(b"bearer") || b[6] != b' ' {
        return None;
    }
    let token = &b[7..];
    let start = token.iter().position(|&c| c != b' ').unwrap_or(token.len());
    Some(&token[start..])
}

fn named_in_connection(fields: Fields<'_>, name: &HeaderName) -> bool {
    fields.get_all(&CONNECTION).any(|v| {
        v.split(|&b| b == b',').any(|t| {
            t.trim_ascii()
                .eq_ignore_ascii_case(name.as_str().as_bytes())
        })
    })
}

fn is_issued_shape(body: &[u8]) -> bool {
    body.len() == ISSUED_RANDOM_LEN + ISSUED_CHECKSUM_LEN
        && body.iter().all(u8::is_ascii_alphanumeric)
}

fn checksum_ok(prefix: &[u8], body: &[u8]) -> bool {
    let (random, sum) = body.split_at(ISSUED_RANDOM_LEN);
    checksum(prefix, random) == sum
}

/// The base62 CRC-32 of prefix + random part, zero-padded to [`ISSUED_CHECKSUM_LEN`] characters.
pub fn checksum(prefix: &[u8], random: &[u8]) -> [u8; ISSUED_CHECKSUM_LEN] {
    let mut h = crc32fast::Hasher::new();
    h.update(prefix);
    h.update(random);
    let mut n = h.finalize() as u64;
    let mut out = [b'0'; ISSUED_CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Makes a new key in keygate's issued format from 22 base62 characters of OS randomness.
pub fn issue(prefix: &str) -> String {
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    let random: Vec<u8> = (0..ISSUED_RANDOM_LEN)
        .map(|_| BASE62[rng.gen_range(0..62)])
        .collect();
    let sum = checksum(prefix.as_bytes(), &random);
    let mut key = String::with_capacity(prefix.len() + ISSUED_RANDOM_LEN + ISSUED_CHECKSUM_LEN);
    key.push_str(prefix);
    key.push_str(std::str::from_utf8(&random).unwrap_or_default());
    key.push_str(std::str::from_utf8(&sum).unwrap_or_default());
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use http::{HeaderMap, HeaderValue};

    use crate::gate::fields::map_of as headers;

    fn rules(sources: &[CredentialSource]) -> CredentialRules {
        CredentialRules::new(
            &CredentialsConfig {
                sources: sources.to_vec(),
                max_key_length: 64,
            },
            &BTreeMap::from([
                ("live".into(), "sk_live_".into()),
                ("test".into(), "sk_test_".into()),
            ]),
        )
    }

    fn key(f: Found<'_>) -> Option<Vec<u8>> {
        match f {
            Found::Key(p) => Some(p.bytes.to_vec()),
            _ => None,
        }
    }

    #[test]
    fn api_key_header() {
        let r = rules(&[CredentialSource::ApiKeyHeader]);
        assert_eq!(
            key(r.find(Fields::Map(&headers(&[("x-api-key", "abc123")])))),
            Some(b"abc123".to_vec())
        );
        assert_eq!(r.find(Fields::Map(&headers(&[]))), Found::Missing);
        assert_eq!(
            r.find(Fields::Map(&headers(&[("x-api-key", "")]))),
            Found::Missing
        );
        assert_eq!(
            r.find(Fields::Map(&headers(&[
                ("x-api-key", "a"),
                ("x-api-key", "a")
            ]))),
            Found::Invalid
        );
        assert_eq!(
            r.find(Fields::Map(&headers(&[("x-api-key", "a b")]))),
            Found::Invalid
        );
        assert_eq!(
            r.find(Fields::Map(&headers(&[("x-api-key", &"k".repeat(65))]))),
            Found::Invalid
        );
        // Bearer is not a source here.
        assert_eq!(
            r.find(Fields::Map(&headers(&[("authorization", "Bearer abc")]))),
            Found::Missing
        );
    }

    #[test]
    fn non_ascii_and_control_bytes_are_invalid() {
        let r = rules(&[CredentialSource::ApiKeyHeader]);
        let mut h = HeaderMap::new();
        h.insert(&X_API_KEY, HeaderValue::from_bytes(b"abc\xc3\xa9").unwrap());
        assert_eq!(r.find(Fields::Map(&h)), Found::Invalid);
        h.insert(&X_API_KEY, HeaderValue::from_bytes(b"abc\tdef").unwrap());
        assert_eq!(r.find(Fields::Map(&h)), Found::Invalid);
    }

    #[test]
    fn bearer_and_disagreement() {
        let r = rules(&[CredentialSource::ApiKeyHeader, CredentialSource::Bearer]);
        assert_eq!(
            key(r.find(Fields::Map(&headers(&[("authorization", "Bearer tok")])))),
            Some(b"tok".to_vec())
        );
        assert_eq!(
            key(r.find(Fields::Map(&headers(&[("authorization", "bearer  tok")])))),
            Some(b"tok".to_vec())
        );
        assert_eq!(
            r.find(Fields::Map(&headers(&[(
                "authorization",
                "Basic dXNlcjpw"
            )]))),
            Found::Missing
        );
        assert_eq!(
            key(r.find(Fields::Map(&headers(&[
                ("authorization", "Bearer same"),
                ("x-api-key", "same")
            ])))),
            Some(b"same".to_vec())
        );
        assert_eq!(
            r.find(Fields::Map(&headers(&[
                ("authorization", "Bearer one"),
                ("x-api-key", "two")
            ]))),
            Found::Invalid
        );
    }

    #[test]
    fn a_key_named_in_connection_is_not_a_key() {
        let r = rules(&[CredentialSource::ApiKeyHeader]);
        assert_eq!(
            r.find(Fields::Map(&headers(&[
                ("x-api-key", "abc"),
                ("connection", "keep-alive, X-Api-Key")
            ]))),
            Found::Missing
        );
    }

    #[test]
    fn issued_keys_carry_a_checksum() {
        let r = rules(&[CredentialSource::ApiKeyHeader]);
        let k = issue("sk_live_");
        assert_eq!(k.len(), 8 + 28);
        match r.find(Fields::Map(&headers(&[("x-api-key", &k)]))) {
            Found::Key(p) => assert_eq!(p.environment, Some("live")),
            other => panic!("{other:?}"),
        }
        // One changed character in the random part: refused without a lookup.
        let mut bad = k.into_bytes();
        bad[10] = if bad[10] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            r.find(Fields::Map(&headers(&[(
                "x-api-key",
                std::str::from_utf8(&bad).unwrap()
            )]))),
            Found::Invalid
        );
        // Imported keys in another shape with the same prefix are checked by digest alone.
        match r.find(Fields::Map(&headers(&[(
            "x-api-key",
            "sk_live_benchkey_0000000000000000000000",
        )]))) {
            Found::Key(p) => assert_eq!(p.environment, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let p = Presented {
            bytes: b"sk_live_secret",
            environment: None,
        };
        assert!(!format!("{p:?}").contains("secret"));
    }
}
