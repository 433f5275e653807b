//! A remote client's settings: where the manager is, how the link is secured, and the
//! limits of its connect loop. Checked once, by [`Client::connect`](super::Client::connect).

use crate::error::{Error, Result};
use crate::tls::{Identity, PeerTrust};
use crate::worker::config::{MAX_GRACE, hostname};
use std::time::Duration;

/// How the client authenticates itself and the manager.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ClientSecurity {
    /// Mutual TLS: the client shows `identity` (a submitter certificate the manager
    /// trusts for that role); the manager's certificate must be exactly one of the
    /// pinned ones in `manager_trust`, or one that one of its CAs issued.
    MutualTls {
        /// The client's certificate and key.
        identity: Identity,
        /// The manager's certificate (pinned) and the CAs that issue it.
        manager_trust: PeerTrust,
        /// Check that the manager's certificate names the host dialled (on by default).
        verify_hostname: bool,
    },
    /// No TLS. For tests and trusted loopback only; logged loudly.
    InsecurePlaintext,
}

/// Settings of a [`Client`](super::Client).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The manager's host name or address.
    pub host: String,
    /// The manager's port.
    pub port: u16,
    /// How the link is secured.
    pub security: ClientSecurity,
    /// A name for the manager's logs (`HOST:PID` by default); not an identity (the
    /// certificate is).
    pub name: String,
    /// Deadline for connecting, the TLS handshake and the hello.
    pub connect_timeout: Duration,
    /// First wait before reconnecting; doubles per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
    /// How long the client tries to get back into its session after losing the
    /// manager before it gives the session up (its waiting requests fail and its jobs
    /// end `Rejected`). `None` (the default): the reconnect grace the manager announced,
    /// after which the manager has given the session up too.
    pub reconnect_grace: Option<Duration>,
    /// Most bytes of each stream that [`RemoteJob::wait`](super::RemoteJob::wait) keeps
    /// (16 MiB by default); beyond it the result says `truncated`. Live output events
    /// are never cut.
    pub result_output_limit: usize,
}

impl ClientConfig {
    /// A mutual-TLS client of the manager at `host:port`, hostname verification on.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        identity: Identity,
        manager_trust: PeerTrust,
    ) -> ClientConfig {
        ClientConfig::with_security(
            host,
            port,
            ClientSecurity::MutualTls {
                identity,
                manager_trust,
                verify_hostname: true,
            },
        )
    }

    /// A client without TLS (see [`ClientSecurity::InsecurePlaintext`]).
    pub fn insecure_plaintext(host: impl Into<String>, port: u16) -> ClientConfig {
        ClientConfig::with_security(host, port, ClientSecurity::InsecurePlaintext)
    }

    fn with_security(host: impl Into<String>, port: u16, security: ClientSecurity) -> ClientConfig {
        ClientConfig {
            host: host.into(),
            port,
            security,
            name: format!("{}:{}", hostname(), std::process::id()),
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            reconnect_grace: None,
            result_output_limit: 16 << 20,
        }
    }

    /// Sets the name.
    pub fn name(mut self, name: impl Into<String>) -> ClientConfig {
        self.name = name.into();
        self
    }

    /// Sets how long the client tries to get back into a lost session (see
    /// [`ClientConfig::reconnect_grace`]).
    pub fn reconnect_grace(mut self, grace: Duration) -> ClientConfig {
        self.reconnect_grace = Some(grace);
        self
    }

    /// Turns hostname verification of the manager's certificate off; the certificate
    /// itself is still verified.
    pub fn no_verify_hostname(mut self) -> ClientConfig {
        if let ClientSecurity::MutualTls {
            verify_hostname, ..
        } = &mut self.security
        {
            *verify_hostname = false;
        }
        self
    }

    /// Checks the settings; `Err` names what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        crate::protocol::check_label("the client name", &self.name).or_else(bad)?;
        if self.host.is_empty() {
            return bad("the manager host is empty".into());
        }
        if self.port == 0 {
            return bad("the manager port must not be 0".into());
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must be non-zero".into());
        }
        for (name, d) in [
            ("connect_timeout", Some(self.connect_timeout)),
            ("backoff_max", Some(self.backoff_max)),
            ("reconnect_grace", self.reconnect_grace),
        ] {
            if d.is_some_and(|d| d > MAX_GRACE) {
                return bad(format!("{name} must be at most 365 days"));
            }
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return bad("backoff_initial must be non-zero and at most backoff_max".into());
        }
        Ok(())
    }

    pub(crate) fn address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub(crate) fn server_name(&self) -> String {
        self.host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_with_what_is_wrong() {
        let ok = ClientConfig::insecure_plaintext("127.0.0.1", 9);
        ok.validate().unwrap();
        assert!(ok.name.contains(':'), "{}", ok.name);
        let cases: Vec<(ClientConfig, &str)> = vec![
            (ok.clone().name(""), "client name"),
            (ok.clone().name("a\nb"), "control"),
            (ClientConfig::insecure_plaintext("", 9), "host is empty"),
            (ClientConfig::insecure_plaintext("h", 0), "port"),
            (
                ClientConfig {
                    connect_timeout: Duration::ZERO,
                    ..ok.clone()
                },
                "connect_timeout",
            ),
            (
                ClientConfig {
                    backoff_initial: Duration::from_secs(20),
                    ..ok.clone()
                },
                "backoff_initial",
            ),
            (
                ok.clone()
                    .reconnect_grace(Duration::from_secs(400 * 86_400)),
                "reconnect_grace",
            ),
        ];
        for (config, words) in cases {
            let e = config.validate().unwrap_err().to_string();
            assert!(e.contains(words), "{e} (wanted {words:?})");
        }
        assert_eq!(
            ClientConfig::insecure_plaintext("::1", 7).address(),
            "[::1]:7"
        );
    }
}
