//! keygate: an authenticating reverse-proxy gateway.
//!
//! The crate is a library with a thin binary. [`gate`] is the pure decision core (no sockets);
//! [`proxy`] is the hyper shell around it; [`admin`] serves metrics, health and the admin API;
//! [`server::run`] wires them to listeners it is given.

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod gate;
pub mod manage;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod signal;
pub mod store;
pub mod tls;
