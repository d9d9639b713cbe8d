//! Credential finding on arbitrary request headers.
//!
//! Arbitrary header names and values (any bytes; pairs `http` refuses are skipped, as a server
//! would refuse them before keygate sees them) go into a `HeaderMap`, which `CredentialRules::find`
//! searches under a fuzzed source list, key-length bound and issued-key prefixes. It must never
//! panic, and what it returns must agree with the rules in `src/gate/credential.rs`:
//!
//! - no credential header at all: `Missing`;
//! - a `Key` is non-empty, within the length bound, printable ASCII (0x21..=0x7e), and is the
//!   value of a source header (the `x-api-key` value, or the token of `Authorization: Bearer`);
//! - a `Key` with an environment starts with that environment's prefix followed by a
//!   well-formed issued body (22 + 6 base62) whose checksum is right.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use http::header::{AUTHORIZATION, CONNECTION};
use http::{HeaderMap, HeaderName, HeaderValue};
use keygate::config::{CredentialSource, CredentialsConfig};
use keygate::gate::Fields;
use keygate::gate::credential::{
    checksum, CredentialRules, Found, ISSUED_CHECKSUM_LEN, ISSUED_RANDOM_LEN, X_API_KEY,
};
use libfuzzer_sys::fuzz_target;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Header names biased towards the ones the credential rules look at.
#[derive(Debug, Arbitrary)]
enum Name {
    ApiKey,
    Authorization,
    Connection,
    Other(Vec<u8>),
}

/// Header values: raw bytes, a Bearer token, or a key in keygate's issued format.
#[derive(Debug, Arbitrary)]
enum Value {
    Raw(Vec<u8>),
    Bearer {
        scheme_case: u8,
        spaces: u8,
        token: Vec<u8>,
    },
    /// `<prefix><22 base62><6 base62 checksum>`; `corrupt` flips the checksum.
    Issued {
        prefix: u8,
        random: [u8; ISSUED_RANDOM_LEN],
        corrupt: bool,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    api_key: bool,
    bearer: bool,
    bearer_first: bool,
    max_key_length: u16,
    prefixes: Vec<(String, String)>,
    headers: Vec<(Name, Value)>,
}

fn issued(prefix: &str, random: &[u8; ISSUED_RANDOM_LEN], corrupt: bool) -> Vec<u8> {
    let random: Vec<u8> = random.iter().map(|b| BASE62[*b as usize % 62]).collect();
    let mut sum = checksum(prefix.as_bytes(), &random);
    if corrupt {
        sum[0] = if sum[0] == b'0' { b'1' } else { b'0' };
    }
    let mut v = prefix.as_bytes().to_vec();
    v.extend_from_slice(&random);
    v.extend_from_slice(&sum);
    v
}

fuzz_target!(|input: Input| {
    let mut sources = Vec::new();
    if input.api_key {
        sources.push(CredentialSource::ApiKeyHeader);
    }
    if input.bearer {
        sources.push(CredentialSource::Bearer);
    }
    if input.bearer_first {
        sources.reverse();
    }
    let prefixes: BTreeMap<String, String> = if input.prefixes.is_empty() {
        BTreeMap::from([
            ("live".to_owned(), "sk_live_".to_owned()),
            ("test".to_owned(), "sk_test_".to_owned()),
        ])
    } else {
        input.prefixes.iter().take(4).cloned().collect()
    };
    let prefix_list: Vec<&String> = prefixes.values().collect();
    let rules = CredentialRules::new(
        &CredentialsConfig {
            sources: sources.clone(),
            max_key_length: usize::from(input.max_key_length),
        },
        &prefixes,
    );

    let mut headers = HeaderMap::new();
    for (name, value) in input.headers.iter().take(16) {
        let name = match name {
            Name::ApiKey => X_API_KEY.clone(),
            Name::Authorization => AUTHORIZATION,
            Name::Connection => CONNECTION,
            Name::Other(b) => match HeaderName::from_bytes(b) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        let bytes = match value {
            Value::Raw(b) => b.clone(),
            Value::Bearer {
                scheme_case,
                spaces,
                token,
            } => {
                let scheme: &[u8] = match scheme_case % 4 {
                    0 => b"Bearer",
                    1 => b"bearer",
                    2 => b"BEARER",
                    _ => b"Basic",
                };
                let mut v = scheme.to_vec();
                v.extend(std::iter::repeat_n(b' ', 1 + usize::from(*spaces % 4)));
                v.extend_from_slice(token);
                v
            }
            Value::Issued {
                prefix,
                random,
                corrupt,
            } => {
                let p = if prefix_list.is_empty() {
                    ""
                } else {
                    prefix_list[usize::from(*prefix) % prefix_list.len()].as_str()
                };
                issued(p, random, *corrupt)
            }
        };
        let Ok(value) = HeaderValue::from_bytes(&bytes) else {
            continue;
        };
        headers.append(name, value);
    }

    let found = rules.find(Fields::Map(&headers));

    // The refusal lane's view of the same fields, names in mixed case, reads alike.
    let mut head = Vec::new();
    let mut spans = Vec::new();
    for (i, (name, value)) in headers.iter().enumerate() {
        let n0 = head.len();
        head.extend(name.as_str().bytes().map(|b| if i % 2 == 1 { b.to_ascii_uppercase() } else { b }));
        let v0 = head.len() + 2;
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        spans.push((n0..v0 - 2, v0..head.len()));
        head.extend_from_slice(b"\r\n");
    }
    let raw = rules.find(Fields::Raw {
        head: &head,
        spans: &spans,
    });
    assert_eq!(raw, found, "the raw fields read otherwise than the map");

    let has_source_header = sources.iter().any(|s| match s {
        CredentialSource::ApiKeyHeader => headers.contains_key(&X_API_KEY),
        CredentialSource::Bearer => headers.contains_key(AUTHORIZATION),
    });
    if !has_source_header {
        assert_eq!(found, Found::Missing, "no credential header, yet {found:?}");
    }

    if let Found::Key(p) = &found {
        let key = p.bytes;
        assert!(!key.is_empty(), "an empty key was accepted");
        assert!(
            key.len() <= usize::from(input.max_key_length),
            "a key over the length bound was accepted"
        );
        assert!(
            key.iter().all(|b| (0x21..=0x7e).contains(b)),
            "a key with a byte outside printable ASCII was accepted"
        );
        let from_a_source = sources.iter().any(|s| match s {
            CredentialSource::ApiKeyHeader => headers
                .get_all(&X_API_KEY)
                .iter()
                .any(|v| v.as_bytes() == key),
            CredentialSource::Bearer => headers.get_all(AUTHORIZATION).iter().any(|v| {
                let b = v.as_bytes();
                b.len() > 7 && b[..6].eq_ignore_ascii_case(b"bearer") && b.ends_with(key)
            }),
        });
        assert!(
            from_a_source,
            "the key is not the value of any source header"
        );
        if let Some(env) = p.environment {
            let prefix = prefixes
                .get(env)
                .unwrap_or_else(|| panic!("environment {env:?} has no prefix"));
            let body = key
                .strip_prefix(prefix.as_bytes())
                .expect("a key with an environment starts with its prefix");
            assert_eq!(body.len(), ISSUED_RANDOM_LEN + ISSUED_CHECKSUM_LEN);
            let (random, sum) = body.split_at(ISSUED_RANDOM_LEN);
            assert_eq!(
                checksum(prefix.as_bytes(), random),
                sum,
                "a key with a wrong checksum was given an environment"
            );
        }
    }

    // The checksum itself, on arbitrary prefix and random bytes: six base62 characters.
    for (prefix, random) in input.prefixes.iter().take(2) {
        let sum = checksum(prefix.as_bytes(), random.as_bytes());
        assert!(sum.iter().all(|c| BASE62.contains(c)));
    }
});
