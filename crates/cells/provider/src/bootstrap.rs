//! The bootstrap of a new cell: the agent's TLS files and the command that starts it.

use updraft_cells_backend::cloud_init::{Bootstrap, BootstrapFile};

use crate::config::AgentSettings;
use crate::pki::ServerCertificate;

/// Where the bootstrap puts the agent's TLS files.
pub struct AgentFiles {
    /// The client CA (the provider's CA).
    pub ca: String,
    /// The server certificate.
    pub cert: String,
    /// Its key.
    pub key: String,
}

/// The files and the command that start the agent on a new cell.
pub fn bootstrap(
    agent: &AgentSettings,
    listen_flag: bool,
    ca_pem: &str,
    server: &ServerCertificate,
) -> Bootstrap {
    let dir = agent.tls_dir.trim_end_matches('/');
    let files = AgentFiles {
        ca: format!("{dir}/client-ca.crt"),
        cert: format!("{dir}/server.crt"),
        key: format!("{dir}/server.key"),
    };
    let mut command = agent.command.clone();
    if listen_flag {
        command.extend(["--listen".to_owned(), format!("0.0.0.0:{}", agent.port)]);
    }
    command.extend([
        "--dir".to_owned(),
        agent.dir.clone(),
        "--tls-cert".to_owned(),
        files.cert.clone(),
        "--tls-key".to_owned(),
        files.key.clone(),
        "--client-ca".to_owned(),
        files.ca.clone(),
    ]);
    command.extend(agent.extra_args.iter().cloned());
    Bootstrap {
        files: vec![
            BootstrapFile {
                path: files.ca,
                contents: ca_pem.as_bytes().to_vec(),
                mode: 0o644,
            },
            BootstrapFile {
                path: files.cert,
                contents: server.cert_pem.as_bytes().to_vec(),
                mode: 0o644,
            },
            BootstrapFile {
                path: files.key,
                contents: server.key_pem.as_bytes().to_vec(),
                mode: 0o600,
            },
        ],
        commands: vec![command],
    }
}
