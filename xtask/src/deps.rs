//! Debian packages listed in `xtask/apt-packages.txt`.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

const LIST: &str = include_str!("../apt-packages.txt");

/// Package names from the list: the first word of each line that is not a comment.
fn wanted() -> Vec<&'static str> {
    LIST.lines()
        .filter_map(|line| line.split('#').next())
        .filter_map(|line| line.split_whitespace().next())
        .collect()
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// Installs the packages that are missing (as root), or says which command would.
pub fn install_packages() -> Result<()> {
    let missing: Vec<&str> = wanted().into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!(
            "missing Debian packages; run: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    let update = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .context("apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed");
    }
    let install = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !install.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
        .unwrap_or(false)
}
