//! Certificates and the encrypted byte stream: PEM loading, what each side trusts
//! ([`PeerTrust`]: pinned certificates and CAs, kept apart), the rustls configurations of
//! both sides, certificate generation, and `Io`: one handshaken connection's TLS state and
//! socket, used under one lock by whoever sends or decrypts, never waiting on the socket.
//! Nothing here knows about frames or jobs.

use crate::error::{Error, Result};
use crate::protocol::Role;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_name};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, Connection, DigitallySignedStruct, DistinguishedName,
    RootCertStore, ServerConfig, SignatureScheme,
};
use std::fmt;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// A certificate chain and its private key: who this side is.
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Identity({} certificate(s), key hidden)",
            self.certs.len()
        )
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))
}

fn certs_from_pem(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem(format!("{origin}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Pem(format!("{origin}: no CERTIFICATE block found")));
    }
    Ok(certs)
}

impl Identity {
    /// An identity from PEM text: the certificate chain (leaf first) and its key
    /// (`PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity> {
        Identity::from_pem_named(cert_pem, key_pem, "certificate", "key")
    }

    /// An identity from two PEM files.
    pub fn from_pem_files(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Identity> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        Identity::from_pem_named(
            &read_file(cert_path, "certificate")?,
            &read_file(key_path, "key")?,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    fn from_pem_named(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Identity> {
        let certs = certs_from_pem(cert_pem, cert_origin)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| Error::Pem(format!("{key_origin}: no usable private key ({e})")))?;
        let identity = Identity { certs, key };
        // Refuse a key that does not belong to the certificate now, not at the first handshake.
        rustls::sign::CertifiedKey::from_der(
            identity.certs.clone(),
            identity.key.clone_key(),
            &provider(),
        )
        .map_err(|e| Error::Tls(format!("{key_origin} does not fit {cert_origin}: {e}")))?;
        Ok(identity)
    }
}

/// What one side trusts for its peer, as two separate lists:
///
/// - **pinned** certificates: self-signed certificates accepted only as themselves, when
///   the peer presents exactly these bytes (within their validity period, and for the
///   right purpose when they carry an extendedKeyUsage). A pinned certificate never vouches
///   for another certificate, even when it says `CA:TRUE` (as `openssl req -x509` makes
///   them).
/// - **CAs**: issuers. A peer certificate that chains to one of them is accepted through
///   WebPki path validation; a CA certificate is never accepted as a peer's own.
#[derive(Clone, Debug, Default)]
pub struct PeerTrust {
    pinned: Vec<CertificateDer<'static>>,
    cas: Vec<CertificateDer<'static>>,
}

/// The name [`PeerTrust`] had before pinned certificates and CAs were told apart. Its
/// [`from_pem`](PeerTrust::from_pem), [`from_pem_files`](PeerTrust::from_pem_files),
/// [`add_pem`](PeerTrust::add_pem) and [`add_pem_file`](PeerTrust::add_pem_file) pin.
pub type TrustRoots = PeerTrust;

impl PeerTrust {
    /// Nothing trusted yet.
    pub fn new() -> PeerTrust {
        PeerTrust::default()
    }

    /// Pins the self-signed certificates in PEM text.
    pub fn pinned_pem(pem: &[u8]) -> Result<PeerTrust> {
        let mut trust = PeerTrust::new();
        trust.add_pinned_pem(pem)?;
        Ok(trust)
    }

    /// Pins the self-signed certificates in PEM files.
    pub fn pinned_pem_files<P: AsRef<Path>>(
        paths: impl IntoIterator<Item = P>,
    ) -> Result<PeerTrust> {
        let mut trust = PeerTrust::new();
        for p in paths {
            trust.add_pinned_pem_file(p)?;
        }
        Ok(trust)
    }

    /// Trusts the CA certificates in PEM text as issuers.
    pub fn ca_pem(pem: &[u8]) -> Result<PeerTrust> {
        let mut trust = PeerTrust::new();
        trust.add_ca_pem(pem)?;
        Ok(trust)
    }

    /// Trusts the CA certificates in PEM files as issuers.
    pub fn ca_pem_files<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Result<PeerTrust> {
        let mut trust = PeerTrust::new();
        for p in paths {
            trust.add_ca_pem_file(p)?;
        }
        Ok(trust)
    }

    /// Pins the self-signed certificates in PEM text.
    pub fn add_pinned_pem(&mut self, pem: &[u8]) -> Result<()> {
        self.add_pinned(
            certs_from_pem(pem, "pinned certificates")?,
            "pinned certificate",
        )
    }

    /// Pins the self-signed certificates in a PEM file.
    pub fn add_pinned_pem_file(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let pem = read_file(path, "certificate")?;
        self.add_pinned(certs_from_pem(&pem, &origin)?, &origin)
    }

    /// Trusts the CA certificates in PEM text as issuers.
    pub fn add_ca_pem(&mut self, pem: &[u8]) -> Result<()> {
        self.add_cas(certs_from_pem(pem, "CA certificates")?, "CA certificate")
    }

    /// Trusts the CA certificates in a PEM file as issuers.
    pub fn add_ca_pem_file(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let pem = read_file(path, "CA certificate")?;
        self.add_cas(certs_from_pem(&pem, &origin)?, &origin)
    }

    fn add_pinned(&mut self, certs: Vec<CertificateDer<'static>>, origin: &str) -> Result<()> {
        for cert in &certs {
            let parsed = webpki::EndEntityCert::try_from(cert)
                .map_err(|e| Error::Pem(format!("{origin}: not a usable certificate ({e})")))?;
            if parsed.issuer() != parsed.subject() {
                return Err(Error::InvalidConfig(format!(
                    "{origin}: a pinned certificate must be self-signed (this one names another \
                     issuer); trust the CA that issued it as a CA instead"
                )));
            }
        }
        self.pinned.extend(certs);
        Ok(())
    }

    fn add_cas(&mut self, certs: Vec<CertificateDer<'static>>, origin: &str) -> Result<()> {
        for cert in &certs {
            webpki::anchor_from_trusted_cert(cert)
                .map_err(|e| Error::Pem(format!("{origin}: not usable as a CA ({e})")))?;
        }
        self.cas.extend(certs);
        Ok(())
    }

    /// Same as [`PeerTrust::pinned_pem`].
    pub fn from_pem(pem: &[u8]) -> Result<PeerTrust> {
        PeerTrust::pinned_pem(pem)
    }

    /// Same as [`PeerTrust::pinned_pem_files`].
    pub fn from_pem_files<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Result<PeerTrust> {
        PeerTrust::pinned_pem_files(paths)
    }

    /// Same as [`PeerTrust::add_pinned_pem`].
    pub fn add_pem(&mut self, pem: &[u8]) -> Result<()> {
        self.add_pinned_pem(pem)
    }

    /// Same as [`PeerTrust::add_pinned_pem_file`].
    pub fn add_pem_file(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.add_pinned_pem_file(path)
    }

    /// How many pinned certificates.
    pub fn pinned_count(&self) -> usize {
        self.pinned.len()
    }

    /// How many CA certificates.
    pub fn ca_count(&self) -> usize {
        self.cas.len()
    }

    /// How many certificates of both kinds.
    pub fn len(&self) -> usize {
        self.pinned.len() + self.cas.len()
    }

    /// Whether nothing is trusted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The CAs as WebPki trust anchors (each was checked when added).
    fn ca_store(&self) -> Result<Option<Arc<RootCertStore>>> {
        if self.cas.is_empty() {
            return Ok(None);
        }
        let mut store = RootCertStore::empty();
        for c in &self.cas {
            store
                .add(c.clone())
                .map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
        }
        Ok(Some(Arc::new(store)))
    }
}

/// How long generated certificates are valid unless told otherwise (10 years).
pub const DEFAULT_VALIDITY_DAYS: u32 = 3650;

/// A freshly generated self-signed certificate and its key, as PEM text. Its `Debug`
/// shows the certificate, never the key.
#[derive(Clone)]
pub struct GeneratedCertificate {
    /// The certificate (`CERTIFICATE`).
    pub cert_pem: String,
    /// Its private key (`PRIVATE KEY`, PKCS#8, ECDSA P-256).
    pub key_pem: String,
}

impl fmt::Debug for GeneratedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedCertificate")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"(hidden)")
            .finish()
    }
}

impl GeneratedCertificate {
    /// Writes the certificate (mode 0644) and the key (mode 0600) as PEM files.
    ///
    /// Neither is ever written through an existing file or symlink. Without `replace`, a
    /// path that exists already (a symlink too, dangling or not) is an error and is left
    /// as it was. With `replace`, each file is written under a fresh temporary name in
    /// the same folder (`O_EXCL|O_NOFOLLOW`, its mode set at creation) and renamed over
    /// the old path: the old file is replaced, not rewritten, keeps nothing of its mode,
    /// and a symlink there is replaced itself, not followed.
    pub fn write_pem_files(
        &self,
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
        replace: bool,
    ) -> Result<()> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        if !replace {
            // Refuse before writing either, so that a refusal leaves no half-written pair.
            for p in [cert_path, key_path] {
                if p.symlink_metadata().is_ok() {
                    return Err(Error::io(
                        format!(
                            "{} exists already (replacing it must be asked for)",
                            p.display()
                        ),
                        io::ErrorKind::AlreadyExists.into(),
                    ));
                }
            }
        }
        write_new_file(key_path, self.key_pem.as_bytes(), 0o600, replace)?;
        write_new_file(cert_path, self.cert_pem.as_bytes(), 0o644, replace)
    }
}

/// Writes `contents` to a file at `path` that did not exist before this call (see
/// [`GeneratedCertificate::write_pem_files`]).
fn write_new_file(path: &Path, contents: &[u8], mode: u32, replace: bool) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |what: &str, e: io::Error| Error::io(format!("{what} {}", path.display()), e);
    let create = |p: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true) // O_CREAT|O_EXCL: never an existing file, never through a symlink
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(mode)
            .open(p)
    };
    let fill = |mut f: std::fs::File| -> io::Result<()> {
        // The umask can only take bits away; set exactly `mode` (still only ours).
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()
    };
    if !replace {
        let f = create(path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Error::io(
                    format!(
                        "{} exists already (replacing it must be asked for)",
                        path.display()
                    ),
                    e,
                )
            } else {
                io("creating", e)
            }
        })?;
        return fill(f).map_err(|e| {
            let _ = std::fs::remove_file(path);
            io("writing", e)
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let base = path
        .file_name()
        .ok_or_else(|| Error::InvalidConfig(format!("{} names no file", path.display())))?;
    let mut attempt = 0u32;
    let (tmp, f) = loop {
        let mut name = std::ffi::OsString::from(".");
        name.push(base);
        name.push(format!(".{}.{attempt}.tmp", std::process::id()));
        let tmp = dir.join(name);
        match create(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(io("creating a temporary file next to", e)),
        }
    };
    let written = fill(f).and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io("replacing", e)
    })
}

/// What a generated certificate is for (its extendedKeyUsage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificatePurpose {
    /// The manager's: serverAuth only. Workers refuse it as a worker's certificate.
    Manager,
    /// A worker's or a submitter's: clientAuth only. Workers and submitters refuse it
    /// as the manager's certificate.
    Worker,
    /// No extendedKeyUsage: accepted for either side.
    Any,
}

/// Generates a self-signed end-entity certificate (`CA:FALSE`, ECDSA P-256) for the
/// given DNS names and IP addresses (the first is also its common name), marked for
/// `purpose`, valid from an hour ago (for clocks a little behind) for `days` days.
pub fn generate_certificate(
    purpose: CertificatePurpose,
    names: &[&str],
    days: u32,
) -> Result<GeneratedCertificate> {
    /// 9999-12-31T23:59:59Z, the last time an X.509 certificate can name.
    const LAST_SECOND: u64 = 253_402_300_799;
    if days == 0 {
        return Err(Error::InvalidConfig(
            "a certificate must be valid for at least one day".into(),
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| Error::InvalidConfig("the system clock is before 1970".into()))?
        .as_secs();
    let not_before = now.saturating_sub(3600);
    let not_after = now
        .checked_add(u64::from(days) * 86_400)
        .filter(|&t| t <= LAST_SECOND)
        .ok_or_else(|| {
            Error::InvalidConfig(format!(
                "{days} days from now is past the year 9999, the last a certificate can name"
            ))
        })?;
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names.clone())
        .map_err(|e| Error::Tls(format!("certificate parameters: {e}")))?;
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, first.as_str());
    }
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + std::time::Duration::from_secs(not_before);
    params.not_after = epoch + std::time::Duration::from_secs(not_after);
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match purpose {
        CertificatePurpose::Manager => vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
        CertificatePurpose::Worker => vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
        CertificatePurpose::Any => Vec::new(),
    };
    let key = rcgen::KeyPair::generate().map_err(|e| Error::Tls(format!("key generation: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::Tls(format!("self-signing: {e}")))?;
    Ok(GeneratedCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A manager's certificate for the given names: serverAuth, valid for `days` days.
pub fn generate_manager_certificate(names: &[&str], days: u32) -> Result<GeneratedCertificate> {
    generate_certificate(CertificatePurpose::Manager, names, days)
}

/// A worker's certificate for the given names: clientAuth, valid for `days` days.
pub fn generate_worker_certificate(names: &[&str], days: u32) -> Result<GeneratedCertificate> {
    generate_certificate(CertificatePurpose::Worker, names, days)
}

/// A submitter's certificate for the given names: clientAuth, as a worker's, valid for
/// `days` days. What makes it a submitter's is the list the manager trusts it in (its
/// submitter trust): a certificate only that list accepts cannot take jobs.
pub fn generate_submitter_certificate(names: &[&str], days: u32) -> Result<GeneratedCertificate> {
    generate_certificate(CertificatePurpose::Worker, names, days)
}

/// A certificate for either side (no extendedKeyUsage), valid for
/// [`DEFAULT_VALIDITY_DAYS`]. Each side pins the other's.
pub fn generate_self_signed(names: &[&str]) -> Result<GeneratedCertificate> {
    generate_certificate(CertificatePurpose::Any, names, DEFAULT_VALIDITY_DAYS)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which of the manager's two trust lists accepted a peer's certificate: what roles the
/// peer may take. A certificate in both lists may take both; without TLS there are no
/// certificates and no roles to check ([`PeerRoles::ANY`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerRoles {
    /// The worker trust accepted it: it may take jobs.
    pub worker: bool,
    /// The submitter trust accepted it: it may submit jobs.
    pub submitter: bool,
}

impl PeerRoles {
    /// Any role (no certificates to tell: plaintext, or the manager seen by its peer).
    pub(crate) const ANY: PeerRoles = PeerRoles {
        worker: true,
        submitter: true,
    };

    /// `None` when a hello of `role` is allowed; else the one line that tells the peer
    /// why it is refused.
    pub(crate) fn refusal(self, role: Role) -> Option<&'static str> {
        match (role, self.worker, self.submitter) {
            (Role::Worker, true, _) | (Role::Submitter, _, true) => None,
            (Role::Submitter, true, false) => Some(
                "this certificate is trusted for workers, not for submitters: \
                 a worker certificate cannot submit jobs",
            ),
            (Role::Worker, false, true) => Some(
                "this certificate is trusted for submitters, not for workers: \
                 a submitter certificate cannot take jobs",
            ),
            (_, false, false) => Some(
                "this certificate is trusted neither for workers nor for submitters (any more)",
            ),
        }
    }
}

/// The manager's TLS: its rustls configuration, whose client-certificate verifier
/// accepts a certificate that either trust list accepts, and those two lists' verifiers,
/// to tell after the handshake which of them accepted the peer ([`ServerTls::peer_roles`]).
pub(crate) struct ServerTls {
    pub(crate) config: Arc<ServerConfig>,
    roles: Arc<RolesVerifier>,
}

impl ServerTls {
    /// Which trust lists accept the peer's certificate chain (end entity first), as a
    /// handshake checks it now. No certificate: no role.
    pub(crate) fn peer_roles(&self, chain: &[CertificateDer<'_>]) -> PeerRoles {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return PeerRoles {
                worker: false,
                submitter: false,
            };
        };
        let now = UnixTime::now();
        let accepts =
            |v: &PeerVerifier| v.verify_client_cert(end_entity, intermediates, now).is_ok();
        PeerRoles {
            worker: accepts(&self.roles.worker),
            submitter: accepts(&self.roles.submitter),
        }
    }
}

/// The manager's server configuration: its identity, and client certificates required,
/// accepted when the worker trust or the submitter trust accepts them (at least one of
/// the two must trust something).
pub(crate) fn server_config(
    identity: &Identity,
    workers: &PeerTrust,
    submitters: &PeerTrust,
) -> Result<ServerTls> {
    if workers.is_empty() && submitters.is_empty() {
        return Err(Error::InvalidConfig(
            "no worker or submitter certificates or CAs are trusted: no peer could connect".into(),
        ));
    }
    let provider = provider();
    let roles = Arc::new(RolesVerifier {
        worker: PeerVerifier::new(workers, provider.clone(), false)?,
        submitter: PeerVerifier::new(submitters, provider.clone(), false)?,
        algorithms: provider.signature_verification_algorithms,
    });
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(roles.clone())
        .with_single_cert(identity.certs.clone(), identity.key.clone_key())?;
    Ok(ServerTls {
        config: Arc::new(config),
        roles,
    })
}

/// The worker's client configuration: its identity, and how it checks the manager.
pub(crate) fn client_config(
    identity: &Identity,
    manager: &PeerTrust,
    verify_hostname: bool,
) -> Result<Arc<ClientConfig>> {
    if manager.is_empty() {
        return Err(Error::InvalidConfig(
            "no manager certificate or CA is trusted: the manager could not be verified".into(),
        ));
    }
    let provider = provider();
    let verifier = Arc::new(PeerVerifier::new(
        manager,
        provider.clone(),
        verify_hostname,
    )?);
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.certs.clone(), identity.key.clone_key())?;
    Ok(Arc::new(config))
}

/// Accepts a peer certificate that is byte-for-byte one of the pinned ones (checked by
/// [`check_pinned`]), or one that chains to one of the CAs through rustls' WebPki
/// verifiers. The two never mix: a pinned certificate is no trust anchor, and a CA's
/// certificate is no peer certificate.
struct PeerVerifier {
    pinned: Vec<CertificateDer<'static>>,
    server: Option<Arc<WebPkiServerVerifier>>,
    client: Option<Arc<dyn ClientCertVerifier>>,
    verify_hostname: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerVerifier({} pinned)", self.pinned.len())
    }
}

impl PeerVerifier {
    fn new(
        trust: &PeerTrust,
        provider: Arc<CryptoProvider>,
        verify_hostname: bool,
    ) -> Result<PeerVerifier> {
        let store = trust.ca_store()?;
        let tls = |e: rustls::server::VerifierBuilderError| Error::Tls(e.to_string());
        let server = match &store {
            Some(s) => Some(
                WebPkiServerVerifier::builder_with_provider(s.clone(), provider.clone())
                    .build()
                    .map_err(tls)?,
            ),
            None => None,
        };
        let client = match &store {
            Some(s) => Some(
                WebPkiClientVerifier::builder_with_provider(s.clone(), provider.clone())
                    .build()
                    .map_err(tls)?,
            ),
            None => None,
        };
        Ok(PeerVerifier {
            pinned: trust.pinned.clone(),
            server,
            client,
            verify_hostname,
            algorithms: provider.signature_verification_algorithms,
        })
    }

    /// `None` when the certificate is not one of the pinned ones; else whether it passes.
    fn pinned_ok(
        &self,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Option<Result<(), rustls::Error>> {
        if !self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return None;
        }
        Some(check_pinned(end_entity, now, usage, &self.algorithms))
    }
}

/// Checks a pinned certificate, once it is known to be byte-for-byte a pinned one, with
/// rustls-webpki: it is verified as an end entity whose only trust anchor is itself, for
/// `usage` (serverAuth or clientAuth, required when the certificate has an
/// extendedKeyUsage). That checks its validity period, its extendedKeyUsage and its
/// self-signature.
///
/// One refusal is overruled: `CaUsedAsEndEntity`, which WebPki gives any certificate
/// with `CA:TRUE` (every one `openssl req -x509` makes with its defaults). WebPki checks
/// the validity period before basicConstraints, so such a certificate has passed that
/// check (tests below hold WebPki to this order). Its extendedKeyUsage, checked after
/// basicConstraints, is then not looked at.
fn check_pinned(
    cert: &CertificateDer<'_>,
    now: UnixTime,
    usage: webpki::KeyUsage,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<(), rustls::Error> {
    let end_entity = webpki::EndEntityCert::try_from(cert).map_err(pki_error)?;
    let anchor = webpki::anchor_from_trusted_cert(cert).map_err(pki_error)?;
    match end_entity.verify_for_usage(algorithms.all, &[anchor], &[], now, usage, None, None) {
        Ok(_) | Err(webpki::Error::CaUsedAsEndEntity) => Ok(()),
        Err(e) => Err(pki_error(e)),
    }
}

/// A WebPki refusal as the rustls error a verifier returns.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let error = match e {
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::InvalidCertValidity => CertificateError::Expired,
        #[allow(deprecated)]
        E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) => {
            CertificateError::InvalidPurpose
        }
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(error)
}

fn unknown_issuer() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(valid) = self.pinned_ok(end_entity, now, webpki::KeyUsage::server_auth()) {
            valid?;
            if self.verify_hostname {
                verify_server_name(&ParsedCertificate::try_from(end_entity)?, server_name)?;
            }
            return Ok(ServerCertVerified::assertion());
        }
        let webpki = self.server.as_ref().ok_or_else(unknown_issuer)?;
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.verify_hostname => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Some(valid) = self.pinned_ok(end_entity, now, webpki::KeyUsage::client_auth()) {
            return valid.map(|()| ClientCertVerified::assertion());
        }
        let webpki = self.client.as_ref().ok_or_else(unknown_issuer)?;
        webpki.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The manager's client-certificate verifier: a certificate passes when the worker
/// trust or the submitter trust accepts it, each checked as [`PeerVerifier`] does (an
/// empty list accepts nothing). Which one accepted it is asked again after the handshake
/// ([`ServerTls::peer_roles`]).
struct RolesVerifier {
    worker: PeerVerifier,
    submitter: PeerVerifier,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for RolesVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RolesVerifier(workers: {:?}, submitters: {:?})",
            self.worker, self.submitter
        )
    }
}

impl ClientCertVerifier for RolesVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let as_worker = self
            .worker
            .verify_client_cert(end_entity, intermediates, now);
        let Err(worker_error) = as_worker else {
            return as_worker;
        };
        match self
            .submitter
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(v) => Ok(v),
            // The more telling refusal: an unknown issuer says only that the list did
            // not know the certificate (always so for an empty list).
            Err(e) if worker_error == unknown_issuer() => Err(e),
            Err(_) => Err(worker_error),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Runs a TLS handshake to completion before `deadline`, however the peer spaces its
/// bytes: one socket operation at a time, each with the time left as its timeout.
/// (`Connection::complete_io` would loop over many reads under one timeout, so a peer
/// sending a byte now and then would never be timed out.)
pub(crate) fn handshake(conn: &mut Connection, tcp: &TcpStream, deadline: Instant) -> Result<()> {
    let mut sock = tcp;
    let failed = |e: io::Error| Error::io("TLS handshake", e);
    // A socket timeout may end a little before the deadline (the kernel counts in
    // ticks): then the operation is tried again with what is left.
    let early = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
        )
    };
    loop {
        while conn.wants_write() {
            set_timeouts(tcp, Some(time_left(deadline)?))?;
            match conn.write_tls(&mut sock) {
                Err(e) if early(&e) => {}
                r => {
                    r.map_err(failed)?;
                }
            }
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        set_timeouts(tcp, Some(time_left(deadline)?))?;
        let read = match conn.read_tls(&mut sock) {
            Err(e) if early(&e) => continue,
            r => r.map_err(failed)?,
        };
        if read == 0 {
            return Err(Error::io(
                "TLS handshake",
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ),
            ));
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (rustls queued an alert), as far as the deadline allows.
            while conn.wants_write() {
                let sent = time_left(deadline)
                    .and_then(|left| set_timeouts(tcp, Some(left)))
                    .and_then(|()| conn.write_tls(&mut sock).map_err(failed));
                if sent.is_err() {
                    break;
                }
            }
            return Err(Error::Tls(e.to_string()));
        }
    }
}

/// The time left before `deadline`; a timeout error when none is.
fn time_left(deadline: Instant) -> Result<std::time::Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout("TLS handshake".into()));
    }
    Ok(left)
}

pub(crate) fn set_timeouts(tcp: &TcpStream, t: Option<std::time::Duration>) -> Result<()> {
    tcp.set_read_timeout(t)
        .and_then(|()| tcp.set_write_timeout(t))
        .map_err(|e| Error::io("setting socket timeouts", e))
}

/// A live connection's sending side and its TLS session (none for plain TCP), kept
/// under one lock by whoever sends on the link or decrypts what arrived. Every socket
/// call made through it is non-blocking, so the lock is never held across a wait: what
/// the socket does not take at once stays in `pending`, in order, until a later
/// [`Io::push`] (usually the process's flusher thread, when the socket can take more).
///
/// One descriptor serves the whole link: the socket is shared (`&TcpStream` reads and
/// writes), not duplicated. [`Io::release`] lets go of it and of the TLS state, so a
/// link that ended keeps no descriptor open however long other holders keep the `Io`.
pub(crate) struct Io {
    tcp: Option<Arc<TcpStream>>,
    tls: Option<Connection>,
    /// Bytes for the socket (ciphertext under TLS), sent from `from` on.
    pending: Vec<u8>,
    from: usize,
    /// Set once a clean close is asked for: nothing more is queued, and once `pending`
    /// is out the socket is shut down this way.
    closing: Option<Shutdown>,
    /// The socket failed, was cut or shut down for writing: nothing more is sent.
    dead: bool,
    /// When the socket last took bytes, or bytes started to wait for it.
    progress: Instant,
}

/// `pending` keeps at most this much capacity once empty (a burst's buffer is let go).
const KEPT_PENDING_CAPACITY: usize = 128 << 10;

impl Io {
    /// The sending side of a handshaken connection.
    pub(crate) fn new(tcp: Arc<TcpStream>, tls: Option<Connection>) -> Io {
        Io::over(Some(tcp), tls)
    }

    fn over(tcp: Option<Arc<TcpStream>>, tls: Option<Connection>) -> Io {
        Io {
            tcp,
            tls,
            pending: Vec::new(),
            from: 0,
            closing: None,
            dead: false,
            progress: Instant::now(),
        }
    }

    /// An `Io` without a socket or TLS (in-memory tests): what is queued stays in
    /// `pending`, where [`Io::take_pending`] finds it.
    #[cfg(test)]
    pub(crate) fn detached() -> Io {
        Io::over(None, None)
    }

    /// What a detached `Io` was given to send (plain bytes), taken.
    #[cfg(test)]
    pub(crate) fn take_pending(&mut self) -> Vec<u8> {
        self.from = 0;
        std::mem::take(&mut self.pending)
    }

    /// The socket, while the link holds it.
    pub(crate) fn socket(&self) -> Option<&Arc<TcpStream>> {
        self.tcp.as_ref()
    }

    /// Whether more may be queued: not closing, not failed.
    pub(crate) fn is_open(&self) -> bool {
        !self.dead && self.closing.is_none()
    }

    /// Whether a clean close was asked for (or the socket is gone).
    pub(crate) fn is_closing(&self) -> bool {
        self.dead || self.closing.is_some()
    }

    /// Bytes waiting for the socket.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len() - self.from
    }

    /// When the socket last took bytes (or, if none went since, when bytes started to
    /// wait): how long a peer has left them unread.
    pub(crate) fn last_progress(&self) -> Instant {
        self.progress
    }

    /// Encrypts the pieces as one run of bytes (records are made across the pieces,
    /// which are not gathered first) after what is pending. Nothing is sent here.
    pub(crate) fn queue(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if !self.is_open() {
            return Err(io::ErrorKind::NotConnected.into());
        }
        if self.pending() == 0 {
            self.progress = Instant::now();
        }
        // Bytes already sent are let go of once they are half the buffer, so that a
        // buffer that never quite empties (a peer that reads as fast as it is written
        // to) does not grow with everything that passed through it. Each byte is moved
        // at most once per time the buffer doubles: linear in the bytes.
        if self.from > 0 && self.from >= self.pending.len() / 2 {
            self.pending.drain(..self.from);
            self.from = 0;
        }
        let Some(conn) = &mut self.tls else {
            for p in parts {
                self.pending.extend_from_slice(p);
            }
            return Ok(());
        };
        // Where the next byte to encrypt is: part `i`, offset `at`.
        let (mut i, mut at) = (0, 0);
        let mut slices = Vec::with_capacity(parts.len());
        while i < parts.len() {
            slices.clear();
            slices.push(io::IoSlice::new(&parts[i][at..]));
            slices.extend(parts[i + 1..].iter().map(|p| io::IoSlice::new(p)));
            let mut n = conn.writer().write_vectored(&slices)?;
            // (0: rustls' send buffer is full; draining it below makes room.)
            while i < parts.len() && n >= parts[i].len() - at {
                n -= parts[i].len() - at;
                (i, at) = (i + 1, 0);
            }
            at += n;
            while conn.wants_write() {
                conn.write_tls(&mut self.pending)?;
            }
        }
        Ok(())
    }

    /// Sends what is pending, only what the socket takes at once. True when nothing is
    /// left (and then, after a clean close, the socket is shut down). An error means
    /// the link is broken: what was pending is dropped and nothing more is sent.
    pub(crate) fn push(&mut self) -> io::Result<bool> {
        while self.from < self.pending.len() {
            let Some(tcp) = &self.tcp else {
                if self.dead {
                    return Err(io::ErrorKind::NotConnected.into());
                }
                return Ok(false); // detached: nothing ever takes it
            };
            match send_now(tcp, &self.pending[self.from..]) {
                Ok(0) => return Err(self.fail(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.from += n;
                    self.progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(self.fail(e)),
            }
        }
        self.pending.clear();
        self.from = 0;
        if self.pending.capacity() > KEPT_PENDING_CAPACITY {
            self.pending = Vec::new();
        }
        if let Some(how) = self.closing
            && !self.dead
        {
            self.dead = true;
            if let Some(tcp) = &self.tcp {
                let _ = tcp.shutdown(how);
            }
        }
        Ok(true)
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        // These bytes must never be sent again (a later close would repeat half a record).
        self.dead = true;
        self.pending = Vec::new();
        self.from = 0;
        e
    }

    /// Asks for a clean close: close_notify after what is pending, then (once all of
    /// it is out, see [`Io::push`]) the socket shut down `how`. Nothing more is queued.
    pub(crate) fn close(&mut self, how: Shutdown) {
        if !self.is_open() {
            return;
        }
        if let Some(conn) = &mut self.tls {
            conn.send_close_notify();
            while conn.wants_write() {
                if conn.write_tls(&mut self.pending).is_err() {
                    break;
                }
            }
        }
        self.closing = Some(how);
    }

    /// Shuts the socket down both ways now: a thread waiting on it wakes at once, what
    /// was pending is dropped.
    pub(crate) fn cut(&mut self) {
        if let Some(tcp) = &self.tcp {
            let _ = tcp.shutdown(Shutdown::Both);
        }
        let _ = self.fail(io::ErrorKind::NotConnected.into());
    }

    /// Cuts the link and lets go of its socket and TLS state.
    pub(crate) fn release(&mut self) {
        self.cut();
        self.tcp = None;
        self.tls = None;
    }

    /// Decrypts `cipher` (bytes read from the socket) into `plain`; returns whether the
    /// peer ended the stream cleanly (its close_notify came: nothing after it counts). Anything rustls has to say
    /// back (an alert) is queued for [`Io::push`]. Without TLS the bytes are the plain
    /// text.
    pub(crate) fn feed(&mut self, cipher: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        let Some(conn) = &mut self.tls else {
            plain.extend_from_slice(cipher);
            return Ok(false);
        };
        let mut rest = cipher;
        let mut ended = false;
        loop {
            let state = conn.process_new_packets();
            while conn.wants_write() {
                if conn.write_tls(&mut self.pending).is_err() {
                    break;
                }
            }
            state.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // rustls takes more only while its plaintext buffer is not full: empty it.
            loop {
                let mut reader = conn.reader();
                match io::BufRead::fill_buf(&mut reader) {
                    Ok([]) => {
                        ended = true;
                        break;
                    }
                    Ok(chunk) => {
                        let n = chunk.len();
                        plain.extend_from_slice(chunk);
                        io::BufRead::consume(&mut reader, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if ended || rest.is_empty() {
                break;
            }
            if conn.read_tls(&mut rest)? == 0 {
                break;
            }
        }
        Ok(ended)
    }

    /// The socket reached its end (a read returned 0): `Ok` when the peer's
    /// close_notify came first, else `UnexpectedEof`.
    pub(crate) fn feed_eof(&mut self, plain: &mut Vec<u8>) -> io::Result<()> {
        let Some(conn) = &mut self.tls else {
            return Ok(());
        };
        conn.read_tls(&mut io::empty())?;
        if self.feed(&[], plain)? {
            return Ok(());
        }
        Err(io::ErrorKind::UnexpectedEof.into())
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_NOW_FLAGS: libc::c_int = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
// (Elsewhere SIGPIPE is blocked on every thread workpool starts: see `thread`.)
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_NOW_FLAGS: libc::c_int = libc::MSG_DONTWAIT;

/// One send that takes only what the socket accepts at once (`WouldBlock` if nothing).
fn send_now(tcp: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `bytes` is a live slice of `bytes.len()` bytes; the descriptor is the
    // stream's own, open for as long as `tcp` is borrowed.
    let n = unsafe {
        libc::send(
            tcp.as_raw_fd(),
            bytes.as_ptr() as *const libc::c_void,
            bytes.len(),
            SEND_NOW_FLAGS,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One read that takes only what the socket holds now, into `buf`'s spare capacity
/// (`WouldBlock` if nothing; 0 at the end of the stream). The bytes read are appended.
pub(crate) fn recv_now(tcp: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    // SAFETY: `spare` is the vector's own allocated, unused capacity of `spare.len()`
    // bytes, which recv() only writes into; the descriptor is the stream's own.
    let n = unsafe {
        libc::recv(
            tcp.as_raw_fd(),
            spare.as_mut_ptr() as *mut libc::c_void,
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: recv() initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_buffer_that_never_empties_does_not_keep_what_was_sent() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut far, _) = listener.accept().unwrap();
        far.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut io = Io::new(Arc::new(near), None);
        let chunk = vec![7u8; 64 << 10];
        let mut buf = vec![0u8; 60 << 10];
        // The reader takes a little less than is written, so that the buffer never
        // empties once the socket's own buffer is full: 128 MiB pass through it.
        for _ in 0..2048 {
            io.queue(&[&chunk]).unwrap();
            io.push().unwrap();
            far.read_exact(&mut buf).unwrap();
        }
        assert!(io.pending() > 0, "the buffer never emptied");
        assert!(
            io.pending.capacity() <= 4 * io.pending() + (1 << 20),
            "{} bytes of capacity for {} pending",
            io.pending.capacity(),
            io.pending()
        );
    }

    #[test]
    fn a_mismatched_key_is_refused_when_loaded() {
        let a = generate_self_signed(&["a"]).unwrap();
        let b = generate_self_signed(&["b"]).unwrap();
        let err = Identity::from_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn pem_without_certificates_is_a_clear_error() {
        let err = TrustRoots::from_pem(b"hello").unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
    }

    fn der_of(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// A verifier that trusts `trust` (hostname checks off).
    fn verifier(trust: &TrustRoots) -> PeerVerifier {
        PeerVerifier::new(trust, provider(), false).unwrap()
    }

    fn as_client(
        v: &PeerVerifier,
        cert: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        v.verify_client_cert(cert, &[], now).map(|_| ())
    }

    fn as_server(
        v: &PeerVerifier,
        cert: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        v.verify_server_cert(cert, &[], &name, &[], now).map(|_| ())
    }

    fn unix(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
    }

    /// 2001-01-01 and 2002-01-01 as Unix seconds.
    const Y2001: u64 = 978_307_200;
    const Y2002: u64 = 1_009_843_200;

    /// A self-signed certificate made by rcgen: CA:TRUE or not, with the given
    /// extendedKeyUsage, valid in 2001 only or (by default) from 1975 to 4096.
    fn self_signed(
        ca: bool,
        eku: &[rcgen::ExtendedKeyUsagePurpose],
        in_2001: bool,
    ) -> (rcgen::CertificateParams, rcgen::KeyPair, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pinned");
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        params.extended_key_usages = eku.to_vec();
        if in_2001 {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let pem = params.self_signed(&key).unwrap().pem();
        (params, key, pem)
    }

    #[test]
    fn a_pinned_certificate_issues_nothing_even_when_it_says_ca() {
        for ca in [true, false] {
            let (params, key, pinned) = self_signed(ca, &[], false);
            let issuer = rcgen::Issuer::new(params, &key);
            let minted_key = rcgen::KeyPair::generate().unwrap();
            let minted = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
                .unwrap()
                .signed_by(&minted_key, &issuer)
                .unwrap();
            let v = verifier(&TrustRoots::from_pem(pinned.as_bytes()).unwrap());
            let now = UnixTime::now();
            as_client(&v, &der_of(&pinned), now).unwrap();
            as_server(&v, &der_of(&pinned), now).unwrap();
            let minted = CertificateDer::from(minted.der().to_vec());
            assert!(
                as_client(&v, &minted, now).is_err(),
                "CA:{ca}: accepted as a client"
            );
            assert!(
                as_server(&v, &minted, now).is_err(),
                "CA:{ca}: accepted as a server"
            );
        }
    }

    #[test]
    fn a_pinned_certificate_is_refused_outside_its_validity_period_ca_or_not() {
        // WebPki checks the validity period before basicConstraints: a CA:TRUE pinned
        // certificate (whose CaUsedAsEndEntity is overruled) is still refused when out
        // of date. This holds WebPki to that order.
        for ca in [true, false] {
            let (_, _, pem) = self_signed(ca, &[], true);
            let cert = der_of(&pem);
            let v = verifier(&TrustRoots::from_pem(pem.as_bytes()).unwrap());
            let mid_2001 = unix(Y2001 + 180 * 86_400);
            as_client(&v, &cert, mid_2001).unwrap();
            as_server(&v, &cert, mid_2001).unwrap();
            for (when, what) in [(Y2002 + 1, "expired"), (Y2001 - 1, "not yet valid")] {
                let err = as_client(&v, &cert, unix(when)).unwrap_err();
                let expected = if when > Y2002 {
                    "expired"
                } else {
                    "not valid yet"
                };
                assert!(err.to_string().contains(expected), "CA:{ca} {what}: {err}");
                assert!(as_server(&v, &cert, unix(when)).is_err(), "CA:{ca} {what}");
            }
        }
    }

    #[test]
    fn a_pinned_certificate_is_accepted_only_for_its_purpose() {
        use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let now = UnixTime::now();
        let check = |eku: &[rcgen::ExtendedKeyUsagePurpose], client: bool, server: bool| {
            let (_, _, pem) = self_signed(false, eku, false);
            let v = verifier(&TrustRoots::from_pem(pem.as_bytes()).unwrap());
            let cert = der_of(&pem);
            assert_eq!(
                as_client(&v, &cert, now).is_ok(),
                client,
                "{eku:?} as a client"
            );
            assert_eq!(
                as_server(&v, &cert, now).is_ok(),
                server,
                "{eku:?} as a server"
            );
        };
        check(&[ClientAuth], true, false);
        check(&[ServerAuth], false, true);
        check(&[ServerAuth, ClientAuth], true, true);
        check(&[], true, true);
    }

    #[test]
    fn only_self_signed_certificates_can_be_pinned() {
        let (params, key, _) = self_signed(true, &[], false);
        let issuer = rcgen::Issuer::new(params, &key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["leaf".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let err = TrustRoots::from_pem(leaf.pem().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("must be self-signed"), "{err}");
        // As a CA's, the issuer's certificate is fine, and vouches for the leaf.
        let (_, _, ca) = self_signed(true, &[], false);
        PeerTrust::ca_pem(ca.as_bytes()).unwrap();
    }

    #[test]
    fn a_ca_vouches_for_what_it_issued_but_is_not_a_peer_itself() {
        let (params, key, ca_pem) = self_signed(true, &[], false);
        let issuer = rcgen::Issuer::new(params, &key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let leaf = CertificateDer::from(leaf.der().to_vec());
        let v = verifier(&PeerTrust::ca_pem(ca_pem.as_bytes()).unwrap());
        let now = UnixTime::now();
        as_client(&v, &leaf, now).unwrap();
        as_server(&v, &leaf, now).unwrap();
        assert!(as_client(&v, &der_of(&ca_pem), now).is_err());
        assert!(as_server(&v, &der_of(&ca_pem), now).is_err());
    }

    #[test]
    fn generated_certificates_say_what_they_are_for_and_when() {
        let days = 30;
        let manager = generate_manager_certificate(&["127.0.0.1"], days).unwrap();
        let worker = generate_worker_certificate(&["w"], days).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let both = {
            let mut t = TrustRoots::from_pem(manager.cert_pem.as_bytes()).unwrap();
            t.add_pem(worker.cert_pem.as_bytes()).unwrap();
            verifier(&t)
        };
        let (m, w) = (der_of(&manager.cert_pem), der_of(&worker.cert_pem));
        as_server(&both, &m, unix(now)).unwrap();
        as_client(&both, &w, unix(now)).unwrap();
        assert!(
            as_client(&both, &m, unix(now)).is_err(),
            "the manager's as a worker's"
        );
        assert!(
            as_server(&both, &w, unix(now)).is_err(),
            "a worker's as the manager's"
        );
        // Valid from an hour ago for `days` days, and not outside that.
        let last = now + u64::from(days) * 86_400;
        as_server(&both, &m, unix(now - 3000)).unwrap();
        as_server(&both, &m, unix(last - 60)).unwrap();
        assert!(as_server(&both, &m, unix(now - 4000)).is_err());
        assert!(as_server(&both, &m, unix(last + 60)).is_err());
        assert!(as_client(&both, &w, unix(last + 60)).is_err());

        let err = generate_worker_certificate(&["w"], 0).unwrap_err();
        assert!(err.to_string().contains("at least one day"), "{err}");
        let err = generate_worker_certificate(&["w"], u32::MAX).unwrap_err();
        assert!(err.to_string().contains("9999"), "{err}");
    }

    #[test]
    fn a_role_is_refused_unless_its_own_list_accepted_the_certificate() {
        let roles = |worker, submitter| PeerRoles { worker, submitter };
        for (r, worker_ok, submitter_ok) in [
            (roles(true, false), true, false),
            (roles(false, true), false, true),
            (roles(true, true), true, true),
            (roles(false, false), false, false),
            (PeerRoles::ANY, true, true),
        ] {
            assert_eq!(r.refusal(Role::Worker).is_none(), worker_ok, "{r:?}");
            assert_eq!(r.refusal(Role::Submitter).is_none(), submitter_ok, "{r:?}");
        }
        let why = roles(true, false).refusal(Role::Submitter).unwrap();
        assert!(
            why.contains("a worker certificate cannot submit jobs"),
            "{why}"
        );
        let why = roles(false, true).refusal(Role::Worker).unwrap();
        assert!(
            why.contains("a submitter certificate cannot take jobs"),
            "{why}"
        );
        for why in [
            roles(false, false).refusal(Role::Worker).unwrap(),
            roles(true, false).refusal(Role::Submitter).unwrap(),
        ] {
            assert!(!why.contains('\n'), "one line: {why:?}");
        }
    }

    /// A CA certificate (PEM), and a clientAuth leaf it issued (DER).
    fn ca_and_leaf(name: &str) -> (String, CertificateDer<'static>) {
        let (params, key, ca_pem) = self_signed(true, &[], false);
        let issuer = rcgen::Issuer::new(params, &key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
        (ca_pem, CertificateDer::from(leaf.der().to_vec()))
    }

    #[test]
    fn the_manager_accepts_either_list_and_tells_which_accepted_a_certificate() {
        let days = 30;
        let manager = generate_manager_certificate(&["127.0.0.1"], days).unwrap();
        let identity =
            Identity::from_pem(manager.cert_pem.as_bytes(), manager.key_pem.as_bytes()).unwrap();
        let worker = generate_worker_certificate(&["w"], days).unwrap();
        let submitter = generate_submitter_certificate(&["s"], days).unwrap();
        let both = generate_worker_certificate(&["b"], days).unwrap();
        let stranger = generate_worker_certificate(&["x"], days).unwrap();
        let (worker_ca, issued_worker) = ca_and_leaf("iw");
        let (submitter_ca, issued_submitter) = ca_and_leaf("is");

        let mut workers = PeerTrust::pinned_pem(worker.cert_pem.as_bytes()).unwrap();
        workers.add_pinned_pem(both.cert_pem.as_bytes()).unwrap();
        workers.add_ca_pem(worker_ca.as_bytes()).unwrap();
        let mut submitters = PeerTrust::pinned_pem(submitter.cert_pem.as_bytes()).unwrap();
        submitters.add_pinned_pem(both.cert_pem.as_bytes()).unwrap();
        submitters.add_ca_pem(submitter_ca.as_bytes()).unwrap();
        let tls = server_config(&identity, &workers, &submitters).unwrap();

        let roles = |worker, submitter| PeerRoles { worker, submitter };
        let now = UnixTime::now();
        for (what, cert, expected) in [
            (
                "pinned worker",
                der_of(&worker.cert_pem),
                roles(true, false),
            ),
            (
                "pinned submitter",
                der_of(&submitter.cert_pem),
                roles(false, true),
            ),
            ("pinned in both", der_of(&both.cert_pem), roles(true, true)),
            ("issued by the worker CA", issued_worker, roles(true, false)),
            (
                "issued by the submitter CA",
                issued_submitter,
                roles(false, true),
            ),
            ("stranger", der_of(&stranger.cert_pem), roles(false, false)),
            (
                "the worker CA itself",
                der_of(&worker_ca),
                roles(false, false),
            ),
        ] {
            assert_eq!(
                tls.peer_roles(std::slice::from_ref(&cert)),
                expected,
                "{what}"
            );
            let accepted = tls.roles.verify_client_cert(&cert, &[], now).is_ok();
            assert_eq!(
                accepted,
                expected.worker || expected.submitter,
                "{what}: accepted by the handshake"
            );
        }
        assert_eq!(tls.peer_roles(&[]), roles(false, false), "no certificate");

        // A refusal says why when one list does: an expired submitter certificate is
        // "expired", not an unknown issuer (which is all the worker list could say).
        let (_, _, old) = self_signed(false, &[], true);
        let tls = server_config(
            &identity,
            &workers,
            &PeerTrust::pinned_pem(old.as_bytes()).unwrap(),
        )
        .unwrap();
        let err = tls
            .roles
            .verify_client_cert(&der_of(&old), &[], now)
            .unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");

        // One list may be empty, not both.
        server_config(&identity, &PeerTrust::new(), &submitters).unwrap();
        server_config(&identity, &workers, &PeerTrust::new()).unwrap();
        let err = server_config(&identity, &PeerTrust::new(), &PeerTrust::new())
            .err()
            .unwrap();
        assert!(err.to_string().contains("no peer could connect"), "{err}");
    }

    #[test]
    fn the_debug_form_of_a_generated_certificate_hides_its_key() {
        let g = generate_self_signed(&["x"]).unwrap();
        let shown = format!("{g:?} {g:#?}");
        let key_body = g.key_pem.lines().nth(1).unwrap();
        assert!(!shown.contains(key_body), "{shown}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(shown.contains("BEGIN CERTIFICATE"), "{shown}");
    }

    mod files {
        use super::super::*;
        use std::os::unix::fs::{MetadataExt, PermissionsExt};

        fn dir(name: &str) -> std::path::PathBuf {
            let d =
                std::env::temp_dir().join(format!("workpool-tls-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            d
        }

        fn mode(p: &Path) -> u32 {
            std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
        }

        #[test]
        fn keys_are_new_files_of_mode_0600_and_existing_paths_need_replace() {
            let d = dir("write");
            let (cert, key) = (d.join("c.pem"), d.join("k.pem"));
            let g = generate_self_signed(&["x"]).unwrap();
            g.write_pem_files(&cert, &key, false).unwrap();
            assert_eq!(mode(&key), 0o600);
            assert_eq!(mode(&cert), 0o644);
            assert_eq!(std::fs::read_to_string(&key).unwrap(), g.key_pem);
            // Again without replace: refused, nothing changed.
            let g2 = generate_self_signed(&["y"]).unwrap();
            let err = g2.write_pem_files(&cert, &key, false).unwrap_err();
            assert!(err.to_string().contains("exists already"), "{err}");
            assert_eq!(std::fs::read_to_string(&key).unwrap(), g.key_pem);
            assert_eq!(std::fs::read_to_string(&cert).unwrap(), g.cert_pem);
            // An existing key of mode 0644 with a second link: replaced by a new file
            // (the other link keeps the old key), whose mode is 0600.
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
            let other = d.join("other-link");
            std::fs::hard_link(&key, &other).unwrap();
            let old_inode = std::fs::metadata(&key).unwrap().ino();
            g2.write_pem_files(&cert, &key, true).unwrap();
            assert_eq!(std::fs::read_to_string(&key).unwrap(), g2.key_pem);
            assert_eq!(mode(&key), 0o600);
            assert_ne!(std::fs::metadata(&key).unwrap().ino(), old_inode);
            assert_eq!(std::fs::read_to_string(&other).unwrap(), g.key_pem);
            // No temporary file is left behind.
            let left: Vec<_> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left.len(), 3, "{left:?}");
            std::fs::remove_dir_all(d).unwrap();
        }

        #[test]
        fn a_symlink_in_the_way_is_never_followed() {
            let d = dir("symlink");
            let target = d.join("target");
            std::fs::write(&target, "do not touch").unwrap();
            let (cert, key) = (d.join("c.pem"), d.join("k.pem"));
            std::os::unix::fs::symlink(&target, &key).unwrap();
            let dangling = d.join("dangling.pem");
            std::os::unix::fs::symlink(d.join("nowhere"), &dangling).unwrap();
            let g = generate_self_signed(&["x"]).unwrap();
            assert!(g.write_pem_files(&cert, &key, false).is_err());
            assert!(g.write_pem_files(&cert, &dangling, false).is_err());
            assert!(!d.join("nowhere").exists());
            assert!(
                !cert.exists(),
                "nothing is written when one path is refused"
            );
            g.write_pem_files(&cert, &key, true).unwrap();
            assert_eq!(std::fs::read_to_string(&target).unwrap(), "do not touch");
            assert!(
                std::fs::symlink_metadata(&key)
                    .unwrap()
                    .file_type()
                    .is_file()
            );
            assert_eq!(mode(&key), 0o600);
            assert_eq!(std::fs::read_to_string(&key).unwrap(), g.key_pem);
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
