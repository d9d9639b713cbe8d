//! Config parsing and validation on arbitrary text.
//!
//! The input bytes, when they are UTF-8, are TOML for `Config::from_toml`. It must never panic
//! (the validator computes line numbers from spans and builds messages from user text), and a
//! refusal must say why: its `Display` is non-empty and, for `ConfigError::Invalid`, so is every
//! reported problem. An accepted config must also build a route table and credential rules, as
//! the gate does on load and reload.
//!
//! Note: a config with `[proxy.tls]` makes `from_toml` read the named certificate and key files
//! (validation builds the rustls config). The fuzzer only reads files; seeds name no such files.

#![no_main]

use keygate::config::{Config, ConfigError};
use keygate::gate::credential::CredentialRules;
use keygate::gate::route::RouteTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            assert!(
                !config.routes.is_empty(),
                "a config without routes was accepted"
            );
            let table = RouteTable::new(&config.routes);
            assert_eq!(table.len(), config.routes.len());
            let _ = CredentialRules::new(&config.credentials, &config.keys.prefixes);
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(
                !shown.trim().is_empty(),
                "an error that says nothing: {e:?}"
            );
            if let ConfigError::Invalid(problems) = &e {
                assert!(!problems.is_empty(), "ConfigError::Invalid with no problem");
                for p in problems {
                    assert!(!p.trim().is_empty(), "an empty problem in {problems:?}");
                }
            }
        }
    }
});
