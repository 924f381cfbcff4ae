//! The one place that decides what a pod needs from the provider.
//!
//! [`needed`] is a pure function of what the node handed the provider for the pod (its
//! [`Handed`] record: spec hash, inputs hash, when its tokens are due) and of the pod as a
//! reconciliation sees it now ([`Seen`]). Nothing else decides whether the provider needs a
//! create or an update: the references watch only asks for a pod to be *resolved again*
//! (`Active::resolve_again`), and whether that changed what the provider receives is the
//! inputs-hash comparison below.
//!
//! # Decisions, first match wins
//!
//! | the pod | what was handed | needed |
//! |---|---|---|
//! | being deleted | anything | `Delete` |
//! | terminal (`Succeeded`/`Failed`) | anything | `Forget` |
//! | not in the provider | anything | `Create` |
//! | in the provider, no resolve asked, inputs not resolved | nothing (a restart) | `Adopt` |
//! | in the provider | another spec | `Update { why: Spec }` |
//! | in the provider | tokens due now or earlier | `Update { why: Tokens }` |
//! | in the provider, inputs resolved | the same inputs | `Nothing` |
//! | in the provider, inputs resolved | other inputs (or unknown: adopted or nothing handed) | `Update { why: Inputs }` |
//! | in the provider, resolve asked, inputs not resolved yet | anything | `Resolve` |
//! | in the provider, no resolve asked | the same spec | `Nothing` |
//!
//! Why it is shaped so:
//! - Resolving a pod reads its ConfigMaps and Secrets and requests its tokens, so it is not
//!   done on every reconciliation (every status write and resync triggers one): only when a
//!   create or an update needs the inputs, or when a referenced object changed. `Resolve`
//!   says "ask again with the inputs"; with the inputs known the answer is never `Resolve`.
//! - An adopted pod (running from before a restart) is left untouched: what it received is
//!   unknown, so its inputs hash is `None` and the next resolve it is asked for updates it.
//! - Due tokens update the pod whatever the inputs hash says: the update is what requests
//!   fresh tokens and moves the due time on.

use k8s_openapi::api::core::v1::Pod;
use tokio::time::Instant;

/// What the node knows of one pod it has handed (or tried to hand) to the provider.
///
/// One entry per pod, dropped when the pod is gone; rebuilt after a restart by adoption.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Handed {
    /// Hash of the spec the provider last received (or ran when adopted); `None`: nothing
    /// was handed since the node started (the entry only counts failures).
    pub spec: Option<u64>,
    /// Hash of the env and files it last received; `None`: unknown (adopted, or nothing
    /// handed).
    pub inputs: Option<u64>,
    /// When the pod's projected service-account tokens must be requested again.
    pub tokens_due: Option<Instant>,
    /// Consecutive failed reconciliations, for exponential backoff (not part of the
    /// decision).
    pub failures: u32,
}

/// The pod as one reconciliation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seen {
    /// It has a deletion timestamp.
    Deleting,
    /// Its phase is `Succeeded` or `Failed`.
    Terminal,
    /// It is to run.
    Active(Active),
}

/// What is known of a pod that is to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Active {
    /// Hash of its spec now ([`spec_hash`]).
    pub spec: u64,
    /// Whether the provider runs it (taken as true when a spec was handed, else asked).
    pub in_provider: bool,
    /// Whether its inputs must be resolved again: an object it references changed, or an
    /// update of it failed and must be retried. A trigger only: it decides nothing by itself.
    pub resolve_again: bool,
    /// Hash of its inputs ([`inputs_hash`]), once resolved in this reconciliation.
    pub inputs: Option<u64>,
}

/// What the pod needs from the node (the module doc has the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Needed {
    /// Stop it in the provider, then let this incarnation of the API object go.
    Delete,
    /// It finished: forget what was handed and what it references.
    Forget,
    /// The provider has what the pod needs.
    Nothing,
    /// It runs from before a restart: take it as handed without touching it.
    Adopt,
    /// Its inputs must be resolved before the answer is known: resolve, then ask again.
    Resolve,
    /// Create it in the provider.
    Create,
    /// Update it in the provider.
    Update {
        /// What differs from what was handed.
        why: Why,
    },
}

/// Why the provider needs an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// The spec changed.
    Spec,
    /// Its projected service-account tokens are due for refresh.
    Tokens,
    /// The resolved env or files differ from what it received (or what it received is
    /// unknown).
    Inputs,
}

/// What `seen` needs, given what was `handed` (`None`: nothing) and the time `now`.
pub(super) fn needed(handed: Option<&Handed>, seen: &Seen, now: Instant) -> Needed {
    let pod = match seen {
        Seen::Deleting => return Needed::Delete,
        Seen::Terminal => return Needed::Forget,
        Seen::Active(pod) => pod,
    };
    if !pod.in_provider {
        return Needed::Create;
    }
    let nothing = Handed::default();
    let handed = handed.unwrap_or(&nothing);
    match handed.spec {
        None if !pod.resolve_again && pod.inputs.is_none() => return Needed::Adopt,
        Some(spec) if spec != pod.spec => return Needed::Update { why: Why::Spec },
        _ => {}
    }
    if handed.tokens_due.is_some_and(|due| due <= now) {
        return Needed::Update { why: Why::Tokens };
    }
    match pod.inputs {
        Some(inputs) if handed.inputs == Some(inputs) => Needed::Nothing,
        Some(_) => Needed::Update { why: Why::Inputs },
        None if pod.resolve_again => Needed::Resolve,
        None => Needed::Nothing,
    }
}

/// Hash of a pod's spec: an update is sent only when the spec really changed.
pub(super) fn spec_hash(pod: &Pod) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&pod.spec)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// Hash of what the provider receives beyond the spec: the env and the volume files (the
/// resolver settings follow from the spec and the node's settings, so the spec hash covers
/// them).
pub(super) fn inputs_hash(resolved: &updraft_provider::ResolvedPod) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    resolved.env.hash(&mut hasher);
    resolved.volumes.hash(&mut hasher);
    hasher.finish()
}

/// Whether the pod's phase is `Succeeded` or `Failed`.
pub(super) fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SPEC: u64 = 1;
    const INPUTS: u64 = 10;

    fn active(in_provider: bool, resolve_again: bool, inputs: Option<u64>) -> Seen {
        Seen::Active(Active {
            spec: SPEC,
            in_provider,
            resolve_again,
            inputs,
        })
    }

    fn handed(spec: u64, inputs: Option<u64>, tokens_due: Option<Instant>) -> Handed {
        Handed {
            spec: Some(spec),
            inputs,
            tokens_due,
            failures: 0,
        }
    }

    #[test]
    fn a_new_pod_is_created() {
        let now = Instant::now();
        assert_eq!(
            needed(None, &active(false, false, None), now),
            Needed::Create
        );
        // Failures alone (nothing handed) change nothing; nor does a resolve request.
        let failed = Handed {
            failures: 3,
            ..Handed::default()
        };
        assert_eq!(
            needed(Some(&failed), &active(false, true, None), now),
            Needed::Create
        );
    }

    #[test]
    fn a_pod_the_provider_lost_is_created_again() {
        let handed = handed(SPEC, Some(INPUTS), None);
        assert_eq!(
            needed(Some(&handed), &active(false, false, None), Instant::now()),
            Needed::Create
        );
    }

    #[test]
    fn an_unchanged_pod_needs_nothing() {
        let now = Instant::now();
        let later = Some(now + Duration::from_secs(60));
        let handed = handed(SPEC, Some(INPUTS), later);
        assert_eq!(
            needed(Some(&handed), &active(true, false, None), now),
            Needed::Nothing
        );
    }

    #[test]
    fn a_changed_spec_is_an_update() {
        let handed = handed(SPEC + 1, Some(INPUTS), None);
        let now = Instant::now();
        assert_eq!(
            needed(Some(&handed), &active(true, false, None), now),
            Needed::Update { why: Why::Spec }
        );
        // Also when inputs are resolved and equal.
        assert_eq!(
            needed(Some(&handed), &active(true, true, Some(INPUTS)), now),
            Needed::Update { why: Why::Spec }
        );
    }

    #[test]
    fn a_changed_reference_asks_for_a_resolve_first() {
        let handed = handed(SPEC, Some(INPUTS), None);
        assert_eq!(
            needed(Some(&handed), &active(true, true, None), Instant::now()),
            Needed::Resolve
        );
    }

    #[test]
    fn changed_inputs_are_an_update() {
        let handed = handed(SPEC, Some(INPUTS), None);
        assert_eq!(
            needed(
                Some(&handed),
                &active(true, true, Some(INPUTS + 1)),
                Instant::now()
            ),
            Needed::Update { why: Why::Inputs }
        );
    }

    #[test]
    fn a_changed_reference_with_equal_inputs_needs_nothing() {
        let handed = handed(SPEC, Some(INPUTS), None);
        assert_eq!(
            needed(
                Some(&handed),
                &active(true, true, Some(INPUTS)),
                Instant::now()
            ),
            Needed::Nothing
        );
    }

    #[test]
    fn with_the_inputs_known_the_answer_is_never_resolve() {
        let now = Instant::now();
        for handed in [
            None,
            Some(handed(SPEC, None, None)),
            Some(handed(SPEC, Some(INPUTS), None)),
        ] {
            for inputs in [INPUTS, INPUTS + 1] {
                let seen = active(true, true, Some(inputs));
                assert_ne!(needed(handed.as_ref(), &seen, now), Needed::Resolve);
            }
        }
    }

    #[test]
    fn due_tokens_are_an_update() {
        let now = Instant::now();
        let handed = handed(SPEC, Some(INPUTS), Some(now));
        assert_eq!(
            needed(Some(&handed), &active(true, false, None), now),
            Needed::Update { why: Why::Tokens }
        );
        // Before they are due, nothing.
        assert_eq!(
            needed(
                Some(&handed),
                &active(true, false, None),
                now - Duration::from_secs(1)
            ),
            Needed::Nothing
        );
        // Due tokens win over a resolve request: the update resolves anyway.
        assert_eq!(
            needed(Some(&handed), &active(true, true, None), now),
            Needed::Update { why: Why::Tokens }
        );
    }

    #[test]
    fn a_pod_running_from_before_a_restart_is_adopted() {
        let now = Instant::now();
        assert_eq!(needed(None, &active(true, false, None), now), Needed::Adopt);
        let failed = Handed {
            failures: 1,
            ..Handed::default()
        };
        assert_eq!(
            needed(Some(&failed), &active(true, false, None), now),
            Needed::Adopt
        );
    }

    #[test]
    fn an_adopted_pod_is_left_alone_until_asked_to_resolve() {
        let now = Instant::now();
        // Adopted: the spec is known, what it received is not.
        let adopted = handed(SPEC, None, None);
        assert_eq!(
            needed(Some(&adopted), &active(true, false, None), now),
            Needed::Nothing
        );
        assert_eq!(
            needed(Some(&adopted), &active(true, true, None), now),
            Needed::Resolve
        );
        // Whatever the inputs are, the provider's are unknown: it is updated.
        assert_eq!(
            needed(Some(&adopted), &active(true, true, Some(INPUTS)), now),
            Needed::Update { why: Why::Inputs }
        );
        // Adopted with tokens: given fresh ones at once.
        let with_tokens = handed(SPEC, None, Some(now));
        assert_eq!(
            needed(Some(&with_tokens), &active(true, false, None), now),
            Needed::Update { why: Why::Tokens }
        );
    }

    #[test]
    fn a_pod_in_the_provider_with_nothing_handed_and_a_resolve_asked_is_updated() {
        // Its create reported a failure but the provider runs it, and a reference changed.
        let now = Instant::now();
        assert_eq!(
            needed(None, &active(true, true, None), now),
            Needed::Resolve
        );
        assert_eq!(
            needed(None, &active(true, true, Some(INPUTS)), now),
            Needed::Update { why: Why::Inputs }
        );
    }

    #[test]
    fn terminal_and_deleting_pods_win_over_everything() {
        let now = Instant::now();
        let handed = handed(SPEC + 1, Some(INPUTS), Some(now));
        for handed in [None, Some(&handed)] {
            assert_eq!(needed(handed, &Seen::Terminal, now), Needed::Forget);
            assert_eq!(needed(handed, &Seen::Deleting, now), Needed::Delete);
        }
    }

    #[test]
    fn terminal_phases() {
        let pod = |phase: &str| -> Pod {
            serde_json::from_value(serde_json::json!({"status": {"phase": phase}}))
                .unwrap_or_default()
        };
        assert!(is_terminal(&pod("Succeeded")));
        assert!(is_terminal(&pod("Failed")));
        assert!(!is_terminal(&pod("Running")));
        assert!(!is_terminal(&Pod::default()));
    }
}
