//! Installing a rendered table in a network namespace with the `nft` command.
//!
//! `nft -f -` runs the whole script as one netlink transaction: either the new table replaces
//! the old one or nothing changes. The command runs on a short-lived thread that joined the
//! target namespace (a child process starts in its parent thread's network namespace), so no
//! thread of the caller ever changes namespace.

use std::fs::File;
use std::io::{ErrorKind, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The table the rules live in (family and name).
pub const TABLE: &str = "ip updraft-proxy";

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// There is no `nft` on this host.
    #[error(
        "{program} is not installed here: routing Services from a cell needs the nftables command (Debian package nftables) in the cell's image"
    )]
    NftMissing {
        /// The command that was looked for.
        program: String,
    },
    /// The pod's network namespace could not be joined.
    #[error("joining the pod's network namespace to install Service rules")]
    Namespace(#[source] nix::Error),
    /// The command could not be run or fed.
    #[error("running {program}")]
    Run {
        /// The command.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `nft` refused the script (a kernel without nf_tables, a rule it cannot parse).
    #[error("{program} refused the Service rules ({status}): {stderr}")]
    Refused {
        /// The command.
        program: String,
        /// Its exit status.
        status: String,
        /// What it printed, trimmed.
        stderr: String,
    },
}

/// The `nft` command Service rules are installed with.
#[derive(Debug, Clone)]
pub struct Nft {
    program: PathBuf,
}

impl Default for Nft {
    /// `nft` from `PATH`.
    fn default() -> Self {
        Nft::new("nft")
    }
}

impl Nft {
    /// The command at `program`.
    pub fn new(program: impl Into<PathBuf>) -> Nft {
        Nft {
            program: program.into(),
        }
    }

    /// Runs `script` (a [`crate::Ruleset`]'s) in `netns`, or in the caller's namespace when
    /// `None`. Blocks until `nft` is done.
    pub fn apply(&self, netns: Option<&File>, script: &str) -> Result<(), ApplyError> {
        let netns = netns
            .map(File::try_clone)
            .transpose()
            .map_err(|source| ApplyError::Run {
                program: self.name(),
                source,
            })?;
        let nft = self.clone();
        let script = script.to_owned();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    if let Some(ns) = &netns {
                        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(ApplyError::Namespace)?;
                    }
                    nft.run(&script)
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(ApplyError::Run {
                        program: self.name(),
                        source: std::io::Error::other("the nft thread panicked"),
                    })
                })
        })
    }

    /// Removes the table from `netns` (nothing to do when it is not there).
    pub fn remove(&self, netns: Option<&File>) -> Result<(), ApplyError> {
        self.apply(netns, &format!("add table {TABLE}\ndelete table {TABLE}\n"))
    }

    fn name(&self) -> String {
        self.program.display().to_string()
    }

    fn run(&self, script: &str) -> Result<(), ApplyError> {
        let run_error = |source| ApplyError::Run {
            program: self.name(),
            source,
        };
        let mut child = match Command::new(&self.program)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(ApplyError::NftMissing {
                    program: self.name(),
                });
            }
            Err(e) => return Err(run_error(e)),
        };
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).map_err(run_error)?;
        }
        let output = child.wait_with_output().map_err(run_error)?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(ApplyError::Refused {
            program: self.name(),
            status: output.status.to_string(),
            stderr: stderr.trim().chars().take(2000).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_missing_command_names_the_package() {
        let err = Nft::new("/nonexistent/nft").apply(None, "").unwrap_err();
        assert!(matches!(err, ApplyError::NftMissing { .. }), "{err:?}");
        assert!(err.to_string().contains("nftables"), "{err}");
    }

    #[test]
    fn a_refusal_carries_what_the_command_said() {
        // `sh -f -` runs the script from standard input, like `nft -f -`.
        let err = Nft::new("/bin/sh")
            .apply(None, "echo 'Error: syntax error' >&2; exit 1")
            .unwrap_err();
        match err {
            ApplyError::Refused { stderr, .. } => assert_eq!(stderr, "Error: syntax error"),
            other => panic!("{other:?}"),
        }
    }
}
