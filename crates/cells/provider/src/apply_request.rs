//! The agent's `PUT /v1/pod` request for a pod the node resolved: the pod without its status,
//! its resolved environment and volume files, and the pod's network on the cell.

use k8s_openapi::api::core::v1::Pod;
use updraft_cell_api::{
    ApplyPodRequest, DnsSettings, EnvValue, PodInterface, PodNetworkConfig, VolumeContent,
    VolumeFile,
};
use updraft_provider::ResolvedPod;

use crate::config::PodNetworkSettings;

/// The agent's request for `resolved`, with the pod's interface on the cell.
pub fn apply_request(
    resolved: &ResolvedPod,
    interface: Option<PodInterface>,
    network: Option<&PodNetworkSettings>,
) -> ApplyPodRequest {
    // Works whether the node hands the pod by value or shared.
    let mut pod = Pod::clone(&resolved.pod);
    pod.status = None;
    pod.metadata.managed_fields = None;
    let env = resolved
        .env
        .iter()
        .map(|(container, vars)| {
            let values = vars
                .iter()
                .map(|v| EnvValue {
                    name: v.name.clone(),
                    value: v.value.clone(),
                })
                .collect();
            (container.clone(), values)
        })
        .collect();
    let volumes = resolved
        .volumes
        .iter()
        .map(|(name, files)| {
            let files = files
                .iter()
                .map(|(path, file)| VolumeFile {
                    path: path.clone(),
                    content: file.data.clone(),
                    mode: Some(file.mode),
                })
                .collect();
            (name.clone(), VolumeContent { files })
        })
        .collect();
    // The node forms the resolver file as the kubelet does; the config's servers are for
    // pods it formed none for.
    let dns = match &resolved.dns {
        Some(dns) => DnsSettings {
            nameservers: dns.nameservers.clone(),
            searches: dns.searches.clone(),
            options: dns.options.clone(),
        },
        None => network.map_or_else(DnsSettings::default, |settings| DnsSettings {
            nameservers: settings.nameservers.clone(),
            searches: settings.searches.clone(),
            options: Vec::new(),
        }),
    };
    ApplyPodRequest {
        pod,
        env,
        volumes,
        // The node does not resolve imagePullSecrets yet (providers never read Secrets):
        // private registries need credentials on the cell until it does.
        pull_secrets: Vec::new(),
        network: PodNetworkConfig { interface, dns },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::collections::BTreeMap;
    use updraft_provider::{EnvVar, VolumeFile as ResolvedFile};

    #[test]
    fn apply_request_carries_env_volumes_and_network() {
        let mut resolved = ResolvedPod::unresolved(Pod::default());
        resolved.env.insert(
            "app".into(),
            vec![EnvVar {
                name: "A".into(),
                value: "1".into(),
            }],
        );
        resolved.volumes.insert(
            "cfg".into(),
            BTreeMap::from([(
                "k".to_string(),
                ResolvedFile {
                    data: b"v".to_vec(),
                    mode: 0o600,
                },
            )]),
        );
        let network = PodNetworkSettings {
            bridge: "br0".into(),
            host_veth: "veth-pod".into(),
            prefix_len: 24,
            host_netns: None,
            gateway: None,
            nameservers: vec!["10.0.0.53".into()],
            searches: vec![],
        };
        let interface = PodInterface {
            host_netns: None,
            bridge: network.bridge.clone(),
            host_veth: network.host_veth.clone(),
            address: "10.1.0.7".parse().unwrap(),
            prefix_len: 24,
            gateway: None,
        };
        let request = apply_request(&resolved, Some(interface), Some(&network));
        assert_eq!(request.env["app"][0].value, "1");
        assert_eq!(request.volumes["cfg"].files[0].content, b"v");
        assert_eq!(request.volumes["cfg"].files[0].mode, Some(0o600));
        let interface = request.network.interface.unwrap();
        assert_eq!(interface.address.to_string(), "10.1.0.7");
        assert_eq!(request.network.dns.nameservers, vec!["10.0.0.53"]);
        // What the node formed wins over the config's servers.
        resolved.dns = Some(updraft_provider::PodDns {
            nameservers: vec!["10.96.0.10".into()],
            searches: vec!["ns.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        });
        let request = apply_request(&resolved, None, Some(&network));
        assert_eq!(request.network.dns.nameservers, vec!["10.96.0.10"]);
        assert_eq!(request.network.dns.options, vec!["ndots:5"]);
    }
}
