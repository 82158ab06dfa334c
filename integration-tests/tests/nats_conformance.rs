//! The transport conformance suite against the machine's nats-server
//! (JetStream): every feature the NATS transport claims.

use keel_integration_tests::nats_transport;

keel_core::conformance_tests!(nats_transport().await);
