//! What the provider receives: env and volume references resolved against the real API
//! server, with the kubelet's Events for missing references.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

mod support;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, PostParams};
use support::*;
use updraft_testing::{TestCluster, eventually, wait_for};

fn env_of(
    provider: &updraft_provider_mock::MockProvider,
    ns: &str,
    pod: &str,
) -> BTreeMap<String, String> {
    let resolved = provider
        .resolved(ns, pod)
        .expect("the provider runs the pod");
    resolved.env["main"]
        .iter()
        .map(|v| (v.name.clone(), v.value.clone()))
        .collect()
}

#[tokio::test]
async fn env_and_volumes_are_resolved_for_the_provider() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("resolve").await;
    let name = node_name();
    let vnode = start_node(&cluster, config(&name.0), mock()).await;
    wait_ready(&cluster, &name.0).await;

    let config_map: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "settings"}, "data": {"mode": "fast", "level": "3"}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(cluster.client(), ns.name())
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}
    }))
    .unwrap();
    Api::<Secret>::namespaced(cluster.client(), ns.name())
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let spec = serde_json::json!({
        "containers": [{
            "name": "main", "image": "busybox",
            "resources": {"limits": {"memory": "64Mi"}},
            "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
            "env": [
                {"name": "GREETING", "value": "hello"},
                {"name": "MESSAGE", "value": "$(GREETING) world, $(CFG_mode), $$(GREETING), $(UNDEFINED)"},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "MEMORY_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                {"name": "OPTIONAL", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "x", "optional": true}}}
            ]
        }],
        "volumes": [
            {"name": "config", "configMap": {"name": "settings", "items": [{"key": "mode", "path": "mode.txt"}]}},
            {"name": "secret", "secret": {"secretName": "creds", "defaultMode": 256}},
            {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}
        ]
    });
    let mut pod = pod(&name.0, "resolved", serde_json::json!({}), spec);
    pod.metadata.labels = Some(
        [("app".to_owned(), "demo".to_owned())]
            .into_iter()
            .collect(),
    );
    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    pods.create(&PostParams::default(), &pod).await.unwrap();
    wait_for(
        &pods,
        "resolved",
        "the pod to run",
        TIMEOUT,
        running_and_ready,
    )
    .await;

    let env = env_of(&vnode.provider, ns.name(), "resolved");
    assert_eq!(env["CFG_mode"], "fast");
    assert_eq!(env["CFG_level"], "3");
    assert_eq!(
        env["MESSAGE"],
        "hello world, fast, $(GREETING), $(UNDEFINED)"
    );
    assert_eq!(env["PASSWORD"], "s3cret");
    assert_eq!(env["POD_NAME"], "resolved");
    assert_eq!(env["NODE"], name.0);
    assert_eq!(env["MEMORY_MI"], "64");
    assert!(
        !env.contains_key("OPTIONAL"),
        "an absent optional key defines no variable"
    );

    let resolved = vnode.provider.resolved(ns.name(), "resolved").unwrap();
    let config = &resolved.volumes["config"];
    assert_eq!(config["mode.txt"].data, b"fast");
    assert_eq!(resolved.volumes["secret"]["password"].data, b"s3cret");
    assert_eq!(resolved.volumes["secret"]["password"].mode, 0o400);
    assert_eq!(resolved.volumes["info"]["labels"].data, b"app=\"demo\"");
    // The API server adds a projected service-account volume; its token came from the
    // TokenRequest API, bound to this pod.
    let token_volume = resolved
        .volumes
        .iter()
        .find(|(name, _)| name.starts_with("kube-api-access"))
        .expect("the projected token volume");
    let token = String::from_utf8(token_volume.1["token"].data.clone()).unwrap();
    assert_eq!(token.split('.').count(), 3, "a JWT");
    assert!(token_volume.1.contains_key("ca.crt") && token_volume.1.contains_key("namespace"));

    let ns_name = ns.name().to_owned();
    eventually(TIMEOUT, || {
        let (cluster, ns_name) = (&cluster, ns_name.clone());
        async move {
            let reasons = event_reasons(cluster, &ns_name, "resolved").await;
            if reasons.iter().any(|r| r == "OptionalConfigMapNotFound") {
                Ok(())
            } else {
                Err(format!("events: {reasons:?}"))
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_missing_mandatory_secret_holds_the_pod_until_it_exists() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("resolve-missing").await;
    let name = node_name();
    let vnode = start_node(&cluster, config(&name.0), mock()).await;
    wait_ready(&cluster, &name.0).await;

    let spec = serde_json::json!({
        "containers": [{
            "name": "main", "image": "busybox",
            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]
        }]
    });
    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    pods.create(
        &PostParams::default(),
        &pod(&name.0, "waiting", serde_json::json!({}), spec),
    )
    .await
    .unwrap();
    let ns_name = ns.name().to_owned();
    eventually(TIMEOUT, || {
        let (cluster, ns_name) = (&cluster, ns_name.clone());
        async move {
            let reasons = event_reasons(cluster, &ns_name, "waiting").await;
            if reasons.iter().any(|r| r == "MandatorySecretNotFound") {
                Ok(())
            } else {
                Err(format!("events: {reasons:?}"))
            }
        }
    })
    .await;
    assert!(
        vnode.provider.resolved(ns.name(), "waiting").is_none(),
        "not started without its secret"
    );

    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "later"}, "stringData": {"token": "abc"}
    }))
    .unwrap();
    Api::<Secret>::namespaced(cluster.client(), ns.name())
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    wait_for(
        &pods,
        "waiting",
        "the pod to start once its secret exists",
        TIMEOUT,
        running_and_ready,
    )
    .await;
    assert_eq!(
        env_of(&vnode.provider, ns.name(), "waiting")["TOKEN"],
        "abc"
    );
}

#[tokio::test]
async fn updates_to_referenced_config_maps_and_secrets_reach_the_provider() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("refupdate").await;
    let name = node_name();
    let vnode = start_node(&cluster, config(&name.0), mock()).await;
    wait_ready(&cluster, &name.0).await;

    let config_maps = Api::<ConfigMap>::namespaced(cluster.client(), ns.name());
    let secrets = Api::<Secret>::namespaced(cluster.client(), ns.name());
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "settings"}, "data": {"mode": "fast"}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "creds"}, "stringData": {"password": "first"}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let spec = serde_json::json!({
        "containers": [{
            "name": "main", "image": "busybox",
            "env": [
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}
            ]
        }],
        "volumes": [{"name": "config", "configMap": {"name": "settings"}}]
    });
    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    pods.create(
        &PostParams::default(),
        &pod(&name.0, "watcher", serde_json::json!({}), spec),
    )
    .await
    .unwrap();
    wait_for(&pods, "watcher", "Running", TIMEOUT, running_and_ready).await;
    let provider = vnode.provider.clone();
    let env = env_of(&provider, ns.name(), "watcher");
    assert_eq!(env["MODE"], "fast");
    assert_eq!(env["PASSWORD"], "first");

    let patch = |data: serde_json::Value| serde_json::json!({ "data": data });
    config_maps
        .patch(
            "settings",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch(serde_json::json!({"mode": "slow"}))),
        )
        .await
        .unwrap();
    secrets
        .patch(
            "creds",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"stringData": {"password": "second"}})),
        )
        .await
        .unwrap();
    let ns_name = ns.name().to_owned();
    eventually(TIMEOUT, || {
        let (provider, ns_name) = (provider.clone(), ns_name.clone());
        async move {
            let resolved = provider
                .resolved(&ns_name, "watcher")
                .ok_or("the provider lost the pod")?;
            let env = env_of(&provider, &ns_name, "watcher");
            let file = resolved.volumes["config"]
                .get("mode")
                .map(|f| String::from_utf8_lossy(&f.data).into_owned());
            if env["MODE"] == "slow"
                && env["PASSWORD"] == "second"
                && file.as_deref() == Some("slow")
            {
                Ok(())
            } else {
                Err(format!("MODE={} file={file:?}", env["MODE"]))
            }
        }
    })
    .await;
    // The pod kept running: updated in place, not re-created.
    assert_eq!(provider.pod_count(), 1);
}

#[tokio::test]
async fn projected_service_account_tokens_are_refreshed_before_they_expire() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("tokens").await;
    let name = node_name();
    let mut node_config = config(&name.0);
    // The API server's default token lives 3607 s; refresh after ~2 s instead of 80 %.
    node_config.token_refresh_fraction = 0.0005;
    let vnode = start_node(&cluster, node_config, mock()).await;
    wait_ready(&cluster, &name.0).await;

    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    let spec = serde_json::json!({"containers": [{"name": "main", "image": "busybox"}]});
    pods.create(
        &PostParams::default(),
        &pod(&name.0, "tokened", serde_json::json!({}), spec),
    )
    .await
    .unwrap();
    wait_for(&pods, "tokened", "Running", TIMEOUT, running_and_ready).await;
    let provider = vnode.provider.clone();
    let ns_name = ns.name().to_owned();
    let token_of = move |provider: &updraft_provider_mock::MockProvider| -> Option<Vec<u8>> {
        provider
            .resolved(&ns_name, "tokened")?
            .volumes
            .iter()
            .find(|(name, _)| name.starts_with("kube-api-access"))
            .map(|(_, files)| files["token"].data.clone())
    };
    let first = token_of(&provider).expect("a projected token");
    eventually(TIMEOUT, || {
        let (provider, first, token_of) = (provider.clone(), first.clone(), token_of.clone());
        async move {
            match token_of(&provider) {
                Some(now) if now != first && now.split(|b| *b == b'.').count() == 3 => Ok(()),
                _ => Err("the token was not renewed".to_owned()),
            }
        }
    })
    .await;
    assert_eq!(provider.pod_count(), 1, "updated in place, not re-created");
}

#[tokio::test]
async fn containers_get_the_service_variables_of_their_namespace() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("links").await;
    let name = node_name();
    let vnode = start_node(&cluster, config(&name.0), mock()).await;
    wait_ready(&cluster, &name.0).await;

    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "my-db"},
        "spec": {"ports": [{"name": "sql", "port": 5432}]}
    }))
    .unwrap();
    let service = Api::<Service>::namespaced(cluster.client(), ns.name())
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let cluster_ip = service.spec.unwrap().cluster_ip.unwrap();

    let container = serde_json::json!({
        "name": "main", "image": "busybox",
        "env": [{"name": "DSN", "value": "postgres://$(MY_DB_SERVICE_HOST):$(MY_DB_SERVICE_PORT_SQL)"}]
    });
    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    for (pod_name, links) in [("linked", true), ("unlinked", false)] {
        let spec =
            serde_json::json!({"enableServiceLinks": links, "containers": [container.clone()]});
        pods.create(
            &PostParams::default(),
            &pod(&name.0, pod_name, serde_json::json!({}), spec),
        )
        .await
        .unwrap();
        wait_for(
            &pods,
            pod_name,
            "the pod to run",
            TIMEOUT,
            running_and_ready,
        )
        .await;
    }

    let linked = env_of(&vnode.provider, ns.name(), "linked");
    assert_eq!(linked["MY_DB_SERVICE_HOST"], cluster_ip);
    assert_eq!(linked["MY_DB_PORT"], format!("tcp://{cluster_ip}:5432"));
    assert_eq!(linked["DSN"], format!("postgres://{cluster_ip}:5432"));
    assert!(linked.contains_key("KUBERNETES_SERVICE_HOST"));

    let unlinked = env_of(&vnode.provider, ns.name(), "unlinked");
    assert!(!unlinked.contains_key("MY_DB_SERVICE_HOST"), "{unlinked:?}");
    assert_eq!(
        unlinked["DSN"],
        "postgres://$(MY_DB_SERVICE_HOST):$(MY_DB_SERVICE_PORT_SQL)"
    );
    // The API server's own Service is always there, links or not.
    assert!(unlinked.contains_key("KUBERNETES_SERVICE_HOST"));
}
