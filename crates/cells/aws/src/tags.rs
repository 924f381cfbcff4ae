//! The tags that carry a cell's identity on EC2, and reading them back.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::Tag;
use updraft_cells_backend::CellIdentity;

/// The `Name` tag (shown by the EC2 console).
pub const TAG_NAME: &str = "Name";
/// The owning Updraft's controller id; listings and garbage collection filter on it.
pub const TAG_CONTROLLER_ID: &str = "updraft:controller-id";
/// The virtual node's name.
pub const TAG_NODE: &str = "updraft:node";
/// The pod's namespace.
pub const TAG_NAMESPACE: &str = "updraft:namespace";
/// The pod's name.
pub const TAG_POD: &str = "updraft:pod";
/// The pod's UID.
pub const TAG_POD_UID: &str = "updraft:pod-uid";
/// `true` on a standby cell (pre-started, owned by no pod yet); removed when a pod takes it.
pub const TAG_STANDBY: &str = "updraft:standby";
/// The client token of the start that launched the cell: a repeated start with the same token
/// finds the instance instead of launching a second one (EC2 dedupes client tokens itself;
/// the tag makes the check visible and works where the API does not, e.g. moto).
pub const TAG_START_TOKEN: &str = "updraft:start-token";
/// Prefix of the tags that copy pod labels: `updraft:label:app.kubernetes.io/name`.
pub const LABEL_PREFIX: &str = "updraft:label:";
/// At most this many pod labels are copied (EC2 allows 50 tags per resource; up to 7 are ours).
pub const MAX_POD_LABELS: usize = 40;

/// EC2 tag keys are at most 128 characters, values 256.
const MAX_KEY: usize = 128;
const MAX_VALUE: usize = 256;

pub(crate) fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

/// Whether EC2 accepts the text in a tag: letters, digits, spaces and `_ . : / = + - @`.
pub(crate) fn tag_text_ok(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c))
}

/// The tags of a cell: name, identity, and the pod labels that fit (sorted by key; labels whose
/// key or value EC2 would refuse are skipped). A standby identity gets [`TAG_STANDBY`] instead
/// of pod tags.
pub fn identity_tags(name: &str, identity: &CellIdentity) -> Vec<Tag> {
    let truncate = |text: &str| text.chars().take(MAX_VALUE).collect::<String>();
    if identity.is_standby() {
        return vec![
            tag(TAG_NAME, &truncate(name)),
            tag(TAG_CONTROLLER_ID, &identity.controller_id),
            tag(TAG_NODE, &identity.node),
            tag(TAG_STANDBY, "true"),
        ];
    }
    let mut tags = vec![
        tag(TAG_NAME, &truncate(name)),
        tag(TAG_CONTROLLER_ID, &identity.controller_id),
        tag(TAG_NODE, &identity.node),
        tag(TAG_NAMESPACE, &identity.namespace),
        tag(TAG_POD, &identity.pod_name),
        tag(TAG_POD_UID, &identity.pod_uid),
    ];
    tags.extend(
        identity
            .pod_labels
            .iter()
            .filter(|(key, value)| {
                LABEL_PREFIX.len() + key.len() <= MAX_KEY
                    && value.len() <= MAX_VALUE
                    && tag_text_ok(key)
                    && tag_text_ok(value)
            })
            .take(MAX_POD_LABELS)
            .map(|(key, value)| tag(&format!("{LABEL_PREFIX}{key}"), value)),
    );
    tags
}

/// The identity stored in a cell's tags; `None` unless controller id, namespace, pod name and
/// pod UID are all present, or the cell is a standby cell (controller id, [`TAG_STANDBY`] and no
/// pod tags). Pod tags win over a leftover standby tag (a claim interrupted between its two
/// tag calls still names the pod).
pub fn identity_from_tags(tags: &BTreeMap<String, String>) -> Option<CellIdentity> {
    let get = |key: &str| tags.get(key).filter(|v| !v.is_empty()).cloned();
    let no_pod_tags = [TAG_NAMESPACE, TAG_POD, TAG_POD_UID]
        .iter()
        .all(|key| get(key).is_none());
    if no_pod_tags && tags.get(TAG_STANDBY).map(String::as_str) == Some("true") {
        return Some(CellIdentity::standby(
            &get(TAG_CONTROLLER_ID)?,
            &get(TAG_NODE).unwrap_or_default(),
        ));
    }
    Some(CellIdentity {
        controller_id: get(TAG_CONTROLLER_ID)?,
        node: get(TAG_NODE).unwrap_or_default(),
        namespace: get(TAG_NAMESPACE)?,
        pod_name: get(TAG_POD)?,
        pod_uid: get(TAG_POD_UID)?,
        pod_labels: tags
            .iter()
            .filter_map(|(key, value)| {
                key.strip_prefix(LABEL_PREFIX)
                    .map(|label| (label.to_string(), value.clone()))
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_labels_are_limited() {
        let mut labels: BTreeMap<String, String> = (0..60)
            .map(|i| (format!("label-{i:02}"), format!("v{i}")))
            .collect();
        labels.insert("app.kubernetes.io/name".into(), "web".into());
        labels.insert(
            format!("example.com/{}", "k".repeat(120)),
            "too-long-key".into(),
        );
        labels.insert("bad".into(), "semi;colon".into());
        let identity = CellIdentity {
            controller_id: "ctl".into(),
            node: "burst".into(),
            namespace: "ns".into(),
            pod_name: "web-1".into(),
            pod_uid: "uid-1".into(),
            pod_labels: labels,
        };
        let tags = identity_tags("burst-ns-web-1", &identity);
        assert_eq!(tags.len(), 6 + MAX_POD_LABELS);
        let map: BTreeMap<String, String> = tags
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or("").to_string(),
                    t.value().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(map["updraft:label:app.kubernetes.io/name"], "web");
        assert!(!map.contains_key("updraft:label:bad"));
        let back = identity_from_tags(&map).expect("identity");
        assert_eq!(back.pod_uid, "uid-1");
        assert_eq!(back.pod_labels.len(), MAX_POD_LABELS);
        let mut partial = map.clone();
        partial.remove(TAG_POD_UID);
        assert!(identity_from_tags(&partial).is_none());
    }

    #[test]
    fn standby_identity_round_trips_and_pod_tags_win() {
        let standby = CellIdentity::standby("ctl", "burst");
        let tags = identity_tags("updraft-standby", &standby);
        let mut map: BTreeMap<String, String> = tags
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or("").to_string(),
                    t.value().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(map[TAG_STANDBY], "true");
        assert!(!map.contains_key(TAG_POD_UID));
        assert_eq!(identity_from_tags(&map), Some(standby));
        // A claim interrupted after the pod tags were written: the pod's.
        map.insert(TAG_NAMESPACE.into(), "ns".into());
        map.insert(TAG_POD.into(), "web".into());
        map.insert(TAG_POD_UID.into(), "uid-1".into());
        let claimed = identity_from_tags(&map).expect("identity");
        assert!(!claimed.is_standby());
        assert_eq!(claimed.pod_uid, "uid-1");
        // Without the standby tag, missing pod tags are an incomplete identity.
        map.remove(TAG_STANDBY);
        map.remove(TAG_POD_UID);
        assert!(identity_from_tags(&map).is_none());
    }
}
