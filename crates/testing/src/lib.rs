//! Shared harness for integration tests against the local control plane.
