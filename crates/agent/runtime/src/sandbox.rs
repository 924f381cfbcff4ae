//! The pod sandbox: network namespace, cgroup parent, and the pod's etc files.

use std::fmt::Write as _;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cgroup::{Cgroup, CgroupDriver, Resources};
use crate::error::{Error, Result, io};

/// Pod network wiring: a veth pair from a bridge in `host_netns` into the pod netns.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    /// Named netns (under /run/netns) holding the bridge; `None` = this process's netns.
    pub host_netns: Option<String>,
    /// Bridge the host side of the veth is attached to.
    pub bridge: String,
    /// Name of the host-side veth (at most 15 bytes).
    pub host_veth: String,
    /// Pod address on `eth0`.
    pub address: Ipv4Addr,
    /// Prefix length of `address`.
    pub prefix_len: u8,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

/// DNS settings written to the pod's `/etc/resolv.conf`.
#[derive(Debug, Clone, Default)]
pub struct DnsConfig {
    /// `nameserver` lines.
    pub nameservers: Vec<String>,
    /// `search` domains.
    pub searches: Vec<String>,
    /// `options` entries (e.g. `ndots:5`).
    pub options: Vec<String>,
}

/// What a sandbox is made of.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Unique id, used for the netns name (`updraft-<id>`) and cgroup path; `[a-z0-9-]`, ≤ 40.
    pub id: String,
    /// Hostname of the pod's containers.
    pub hostname: String,
    /// Use the host's network namespace (`hostNetwork: true`).
    pub host_network: bool,
    /// Pod network; ignored with `host_network`. Without it the pod has only loopback.
    pub network: Option<PodNetwork>,
    /// DNS for resolv.conf.
    pub dns: DnsConfig,
    /// Extra `/etc/hosts` lines: IP and names.
    pub host_aliases: Vec<(String, Vec<String>)>,
    /// Pod-level limits on the cgroup parent.
    pub resources: Resources,
    /// Directory for the sandbox's files (created; removed on teardown).
    pub state_dir: PathBuf,
    /// cgroup path under which pod cgroups are created (e.g. `updraft`).
    pub cgroup_root: PathBuf,
}

/// A created sandbox. Dropping it tears everything down (containers must be stopped first).
#[derive(Debug)]
pub struct PodSandbox {
    spec: SandboxSpec,
    netns_name: Option<String>,
    netns: File,
    cgroup: Cgroup,
    detached: bool,
}

fn run_ip(args: &[&str]) -> Result<()> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(io("run", "ip"))?;
    if out.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    stderr.truncate(500);
    Err(Error::Command { command, stderr })
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 40
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl PodSandbox {
    /// Creates the netns (unless host network), wires the network, creates the cgroup parent with
    /// the pod limits and writes hosts/resolv.conf/hostname. Partial work is undone on error.
    pub fn create(driver: &CgroupDriver, spec: SandboxSpec) -> Result<Self> {
        if !valid_id(&spec.id) {
            return Err(Error::InvalidSpec(format!(
                "sandbox id {:?} must be 1-40 of [a-z0-9-]",
                spec.id
            )));
        }
        if spec.hostname.is_empty() || spec.hostname.len() > 64 {
            return Err(Error::InvalidSpec(format!(
                "hostname {:?} must be 1-64 bytes",
                spec.hostname
            )));
        }
        std::fs::create_dir_all(&spec.state_dir)
            .map_err(io("create directory", &spec.state_dir))?;
        let cgroup = Cgroup::create(driver, spec.cgroup_root.join(&spec.id))?;
        cgroup.apply(&spec.resources)?;
        let (netns_name, netns) = if spec.host_network {
            (
                None,
                File::open("/proc/self/ns/net").map_err(io("open", "/proc/self/ns/net"))?,
            )
        } else {
            let name = format!("updraft-{}", spec.id);
            run_ip(&["netns", "add", &name])?;
            let path = Path::new("/run/netns").join(&name);
            match File::open(&path) {
                Ok(f) => (Some(name), f),
                Err(e) => {
                    let _ = run_ip(&["netns", "del", &name]);
                    return Err(io("open", path)(e));
                }
            }
        };
        let sandbox = Self {
            spec,
            netns_name,
            netns,
            cgroup,
            detached: false,
        };
        // From here on Drop undoes the work if a step fails.
        sandbox.setup_network()?;
        sandbox.write_etc_files()?;
        Ok(sandbox)
    }

    fn setup_network(&self) -> Result<()> {
        let Some(pod) = &self.netns_name else {
            return Ok(());
        };
        run_ip(&["-n", pod, "link", "set", "lo", "up"])?;
        let Some(net) = &self.spec.network else {
            return Ok(());
        };
        if net.host_veth.is_empty() || net.host_veth.len() > 15 {
            return Err(Error::InvalidSpec(format!(
                "veth name {:?} must be 1-15 bytes",
                net.host_veth
            )));
        }
        let mut host: Vec<&str> = Vec::new();
        if let Some(ns) = &net.host_netns {
            host.extend(["-n", ns.as_str()]);
        }
        let mut add = host.clone();
        add.extend([
            "link",
            "add",
            &net.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod,
        ]);
        run_ip(&add)?;
        let mut attach = host;
        attach.extend(["link", "set", &net.host_veth, "master", &net.bridge, "up"]);
        run_ip(&attach)?;
        let cidr = format!("{}/{}", net.address, net.prefix_len);
        run_ip(&["-n", pod, "addr", "add", &cidr, "dev", "eth0"])?;
        run_ip(&["-n", pod, "link", "set", "eth0", "up"])?;
        if let Some(gw) = net.gateway {
            run_ip(&["-n", pod, "route", "add", "default", "via", &gw.to_string()])?;
        }
        Ok(())
    }

    fn write_etc_files(&self) -> Result<()> {
        let s = &self.spec;
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        let ip = s
            .network
            .as_ref()
            .filter(|_| !s.host_network)
            .map(|n| n.address.to_string());
        let _ = writeln!(
            hosts,
            "{}\t{}",
            ip.as_deref().unwrap_or("127.0.1.1"),
            s.hostname
        );
        for (ip, names) in &s.host_aliases {
            let _ = writeln!(hosts, "{ip}\t{}", names.join(" "));
        }
        let mut resolv = String::new();
        for ns in &s.dns.nameservers {
            let _ = writeln!(resolv, "nameserver {ns}");
        }
        if !s.dns.searches.is_empty() {
            let _ = writeln!(resolv, "search {}", s.dns.searches.join(" "));
        }
        if !s.dns.options.is_empty() {
            let _ = writeln!(resolv, "options {}", s.dns.options.join(" "));
        }
        for (name, text) in [
            ("hosts", hosts),
            ("resolv.conf", resolv),
            ("hostname", format!("{}\n", s.hostname)),
        ] {
            let path = s.state_dir.join(name);
            std::fs::write(&path, text).map_err(io("write", &path))?;
        }
        Ok(())
    }

    /// Takes over the sandbox an earlier instance of the agent created with the same spec:
    /// opens its netns and cgroup and rewrites the etc files; nothing is created anew.
    pub fn adopt(driver: &CgroupDriver, spec: SandboxSpec) -> Result<Self> {
        if !valid_id(&spec.id) {
            return Err(Error::InvalidSpec(format!(
                "sandbox id {:?} must be 1-40 of [a-z0-9-]",
                spec.id
            )));
        }
        std::fs::create_dir_all(&spec.state_dir)
            .map_err(io("create directory", &spec.state_dir))?;
        let cgroup = Cgroup::create(driver, spec.cgroup_root.join(&spec.id))?;
        let (netns_name, netns) = if spec.host_network {
            (
                None,
                File::open("/proc/self/ns/net").map_err(io("open", "/proc/self/ns/net"))?,
            )
        } else {
            let name = format!("updraft-{}", spec.id);
            let path = Path::new("/run/netns").join(&name);
            (Some(name), File::open(&path).map_err(io("open", path))?)
        };
        let sandbox = Self {
            spec,
            netns_name,
            netns,
            cgroup,
            detached: false,
        };
        sandbox.write_etc_files()?;
        Ok(sandbox)
    }

    /// Leaves everything in place when this handle is dropped (for [`PodSandbox::adopt`]).
    pub fn detach(mut self) {
        self.detached = true;
        self.cgroup.keep();
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// The pod hostname.
    pub fn hostname(&self) -> &str {
        &self.spec.hostname
    }

    /// The pod's network namespace (held open for as long as the sandbox lives).
    pub fn netns(&self) -> &File {
        &self.netns
    }

    /// Name of the pod netns under /run/netns (`None` with host network).
    pub fn netns_name(&self) -> Option<&str> {
        self.netns_name.as_deref()
    }

    /// The pod-level cgroup (parent of the containers' cgroups).
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// Path of the generated `hosts`, `resolv.conf` or `hostname` file.
    pub fn etc_file(&self, name: &str) -> PathBuf {
        self.spec.state_dir.join(name)
    }

    /// Pod-level usage.
    pub fn stats(&self) -> Result<crate::cgroup::CgroupStats> {
        self.cgroup.stats()
    }

    /// Removes the netns (which also deletes the veth pair), the cgroup and the state dir.
    pub fn teardown(mut self) -> Result<()> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<()> {
        let mut first_err = None;
        if let Some(name) = self.netns_name.take()
            && let Err(e) = run_ip(&["netns", "del", &name])
        {
            first_err.get_or_insert(e);
        }
        if let Err(e) = self.cgroup.remove() {
            first_err.get_or_insert(e);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.spec.state_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            first_err.get_or_insert(io("remove", &self.spec.state_dir)(e));
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for PodSandbox {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(e) = self.teardown_inner() {
            tracing::warn!(sandbox = %self.spec.id, error = %e, "sandbox teardown failed");
        }
    }
}
