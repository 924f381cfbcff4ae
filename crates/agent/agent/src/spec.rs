//! Kubernetes container spec rules: command/args vs image entrypoint/cmd, env order,
//! resource quantities.

use k8s_openapi::api::core::v1::Container;
use updraft_cell_runtime::Resources;
use updraft_common::quantity;

use crate::images::PreparedImage;

/// argv by the Kubernetes rules: `command` replaces the entrypoint (and drops the image cmd),
/// `args` replaces the cmd.
pub fn argv(c: &Container, image: &PreparedImage) -> Vec<String> {
    let command = c.command.clone().filter(|v| !v.is_empty());
    let args = c.args.clone().filter(|v| !v.is_empty());
    match (command, args) {
        (Some(cmd), Some(args)) => cmd.into_iter().chain(args).collect(),
        (Some(cmd), None) => cmd,
        (None, Some(args)) => image.entrypoint.iter().cloned().chain(args).collect(),
        (None, None) => image
            .entrypoint
            .iter()
            .chain(image.cmd.iter())
            .cloned()
            .collect(),
    }
}

/// Image env, then the pod's resolved env (later names override earlier ones in place).
pub fn env(image: &PreparedImage, resolved: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match out.iter_mut().find(|(n, _)| n == k) {
        Some(slot) => slot.1 = v.to_owned(),
        None => out.push((k.to_owned(), v.to_owned())),
    };
    if !image.env.iter().any(|(k, _)| k == "PATH") {
        set(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    for (k, v) in image.env.iter().chain(resolved) {
        set(k, v);
    }
    out
}

/// cgroup limits from `resources.limits` (cpu → CFS quota per 100 ms, memory → bytes) and
/// `requests.cpu` → shares.
pub fn resources(c: &Container) -> Resources {
    let r = c.resources.as_ref();
    // A value that is not a quantity of zero or more sets no limit (the API server has
    // validated the spec; this is only defensive).
    let limit = |name: &str, convert: fn(&str) -> Result<u64, _>| {
        r.and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get(name))
            .and_then(|q| convert(&q.0).ok())
    };
    let request_milli = r
        .and_then(|r| r.requests.as_ref())
        .and_then(|l| l.get("cpu"))
        .and_then(|q| quantity::cpu_millis(&q.0).ok());
    Resources {
        // 1 CPU = 100_000 µs per 100_000 µs period; quota never below the kernel minimum.
        cpu_quota_us: limit("cpu", quantity::cpu_millis).map(|milli| (milli * 100).max(1000)),
        cpu_period_us: None,
        cpu_shares: request_milli.map(|m| (m * 1024 / 1000).max(2)),
        memory_limit_bytes: limit("memory", quantity::bytes),
        pids_max: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_rules() {
        let image = PreparedImage {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["c1".into()],
            ..PreparedImage::default()
        };
        let mut c = Container::default();
        assert_eq!(argv(&c, &image), ["/ep", "c1"]);
        c.args = Some(vec!["a".into()]);
        assert_eq!(argv(&c, &image), ["/ep", "a"]);
        c.command = Some(vec!["/cmd".into()]);
        assert_eq!(argv(&c, &image), ["/cmd", "a"]);
        c.args = None;
        assert_eq!(argv(&c, &image), ["/cmd"]);
        let e = env(
            &PreparedImage {
                env: vec![("A".into(), "1".into()), ("PATH".into(), "/bin".into())],
                ..PreparedImage::default()
            },
            &[("A".into(), "2".into()), ("B".into(), "3".into())],
        );
        assert_eq!(
            e,
            [
                ("A".to_owned(), "2".to_owned()),
                ("PATH".into(), "/bin".into()),
                ("B".into(), "3".into())
            ]
        );
    }
}
