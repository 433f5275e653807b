//! Certificates and the encrypted byte stream: PEM loading, what each side trusts
//! ([`PeerTrust`]: pinned certificates and CAs, kept apart), the rustls configurations of
//! both sides, certificate generation, and [`split`], which turns one handshaken connection
//! into a reader half and a writer half usable from two threads at once.
//! Nothing here knows about frames or jobs.

use crate::error::{Error, Result};
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
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
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
    /// A worker's: clientAuth only. Workers refuse it as the manager's certificate.
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

/// A certificate for either side (no extendedKeyUsage), valid for
/// [`DEFAULT_VALIDITY_DAYS`]. Each side pins the other's.
pub fn generate_self_signed(names: &[&str]) -> Result<GeneratedCertificate> {
    generate_certificate(CertificatePurpose::Any, names, DEFAULT_VALIDITY_DAYS)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The manager's server configuration: its identity, and client certificates required.
pub(crate) fn server_config(identity: &Identity, workers: &PeerTrust) -> Result<Arc<ServerConfig>> {
    if workers.is_empty() {
        return Err(Error::InvalidConfig(
            "no worker certificates or CAs are trusted: no worker could connect".into(),
        ));
    }
    let provider = provider();
    let verifier = Arc::new(PeerVerifier::new(workers, provider.clone(), false)?);
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.certs.clone(), identity.key.clone_key())?;
    Ok(Arc::new(config))
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

/// Runs a TLS handshake to completion before `deadline`, however the peer spaces its
/// bytes: one socket operation at a time, each with the time left as its timeout.
/// (`Connection::complete_io` would loop over many reads under one timeout, so a peer
/// sending a byte now and then would never be timed out.)
pub(crate) fn handshake(
    conn: &mut Connection,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> Result<()> {
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
            match conn.write_tls(tcp) {
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
        let read = match conn.read_tls(tcp) {
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
                    .and_then(|()| conn.write_tls(tcp).map_err(failed));
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

type Shared = Arc<Mutex<Connection>>;

fn lock(tls: &Shared) -> MutexGuard<'_, Connection> {
    // A panic elsewhere poisons the lock; the connection state is still consistent
    // enough to be torn down.
    crate::sync::lock(tls)
}

/// Splits a connection (TLS after its handshake, or plain TCP) into a reader half and
/// a writer half for two threads. The TLS state is shared behind a mutex that is never
/// held across a blocking socket call: the reader reads the socket unlocked and then
/// decrypts under the lock; the writer encrypts under the lock and then writes unlocked.
pub(crate) fn split(
    tcp: TcpStream,
    tls: Option<Connection>,
) -> io::Result<(ReadHalf, WriteHalf, Closer)> {
    let tls = tls.map(|c| Arc::new(Mutex::new(c)));
    let reader = ReadHalf {
        tcp: tcp.try_clone()?,
        tls: tls.clone(),
        raw: vec![0; 64 * 1024].into_boxed_slice(),
        start: 0,
        end: 0,
        eof: false,
        deadline: None,
    };
    let closer = Closer(Arc::new(tcp.try_clone()?));
    let writer = WriteHalf {
        tcp,
        tls,
        out: Vec::new(),
        queued: Vec::new(),
        queued_from: 0,
    };
    Ok((reader, writer, closer))
}

/// Closes the socket under both halves from any thread: a blocked read returns at once,
/// a blocked write fails.
#[derive(Clone, Debug)]
pub(crate) struct Closer(Arc<TcpStream>);

impl Closer {
    pub(crate) fn close(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// The reading half: plaintext out of the socket.
pub(crate) struct ReadHalf {
    tcp: TcpStream,
    tls: Option<Shared>,
    /// Ciphertext read from the socket and not yet handed to rustls: rustls takes more
    /// only while its plaintext buffer is not full, so leftovers wait here.
    raw: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    /// When set, every socket read is given the time left until then as its timeout, and
    /// none starts after it: however the peer spaces its bytes, reading ends by then.
    deadline: Option<Instant>,
}

impl ReadHalf {
    /// The socket underneath (for timeouts).
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Sets (or clears) an absolute deadline for reading (see the field).
    pub(crate) fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }
}

/// A socket read, under `deadline` when one is set (see `ReadHalf::deadline`).
fn read_socket(
    mut tcp: &TcpStream,
    deadline: Option<Instant>,
    into: &mut [u8],
) -> io::Result<usize> {
    let Some(deadline) = deadline else {
        return tcp.read(into);
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the deadline passed",
            ));
        }
        tcp.set_read_timeout(Some(left))?;
        match tcp.read(into) {
            // The timeout may end a little before the deadline (the kernel counts in ticks).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            r => return r,
        }
    }
}

impl Read for ReadHalf {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return read_socket(&self.tcp, self.deadline, out);
        };
        loop {
            {
                let mut conn = lock(tls);
                match conn.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    let mut pending = &self.raw[self.start..self.end];
                    match conn.read_tls(&mut pending)? {
                        0 => self.start = self.end, // close_notify seen: nothing more counts
                        n => self.start += n,
                    }
                    conn.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    continue;
                }
                if self.eof {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            let n = read_socket(&self.tcp, self.deadline, &mut self.raw)?;
            (self.start, self.end) = (0, n);
            if n == 0 {
                self.eof = true;
                let mut conn = lock(tls);
                conn.read_tls(&mut io::empty())?;
                conn.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
        }
    }
}

/// The writing half: the only code that writes to the socket once split.
pub(crate) struct WriteHalf {
    tcp: TcpStream,
    tls: Option<Shared>,
    out: Vec<u8>,
    /// Encrypted by `queue_parts`, sent from `queued_from` on.
    queued: Vec<u8>,
    queued_from: usize,
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

impl WriteHalf {
    /// Writes all of `data` (encrypting it first under TLS), after anything queued.
    pub(crate) fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.send_queued(true)?;
        let Some(tls) = &self.tls else {
            return self.tcp.write_all(data);
        };
        let mut rest = data;
        loop {
            {
                let mut conn = lock(tls);
                while !rest.is_empty() {
                    match conn.writer().write(rest)? {
                        0 => break, // rustls' send buffer is full: drain it first
                        n => rest = &rest[n..],
                    }
                }
                while conn.wants_write() {
                    conn.write_tls(&mut self.out)?;
                }
            }
            let sent = self.tcp.write_all(&self.out);
            // Sent or not, these bytes must never be sent again (a later close would
            // repeat half a record).
            self.out.clear();
            sent?;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }

    /// Encrypts the pieces as one run of bytes, without gathering them first (under
    /// TLS the records are made across the pieces), and keeps the result for
    /// [`WriteHalf::send_queued`]. Nothing touches the socket here.
    pub(crate) fn queue_parts(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let Some(tls) = &self.tls else {
            for p in parts {
                self.queued.extend_from_slice(p);
            }
            return Ok(());
        };
        // Where the next byte to encrypt is: part `i`, offset `at`.
        let (mut i, mut at) = (0, 0);
        let mut slices = Vec::with_capacity(parts.len());
        let mut conn = lock(tls);
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
                conn.write_tls(&mut self.queued)?;
            }
        }
        Ok(())
    }

    /// Whether bytes from [`WriteHalf::queue_parts`] wait to be sent.
    pub(crate) fn has_queued(&self) -> bool {
        self.queued_from < self.queued.len()
    }

    /// Sends what [`WriteHalf::queue_parts`] encrypted. With `wait`, all of it (blocking,
    /// up to the socket's write timeout); without, only what the socket takes at once.
    /// True when nothing is left.
    pub(crate) fn send_queued(&mut self, wait: bool) -> io::Result<bool> {
        while self.has_queued() {
            let rest = &self.queued[self.queued_from..];
            let sent = if wait {
                (&self.tcp).write(rest)
            } else {
                send_now(&self.tcp, rest)
            };
            match sent {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.queued_from += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if !wait && e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    // These bytes must never be sent again (a later close would repeat
                    // half a record).
                    self.queued.clear();
                    self.queued_from = 0;
                    return Err(e);
                }
            }
        }
        self.queued.clear();
        self.queued_from = 0;
        Ok(true)
    }

    /// Ends the stream cleanly: what is queued, close_notify, then no more writes.
    pub(crate) fn close(&mut self) {
        let _ = self.send_queued(true);
        if let Some(tls) = &self.tls {
            {
                let mut conn = lock(tls);
                conn.send_close_notify();
                while conn.wants_write() {
                    if conn.write_tls(&mut self.out).is_err() {
                        break;
                    }
                }
            }
            let _ = self.tcp.write_all(&self.out);
            self.out.clear();
        }
        let _ = self.tcp.shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (Identity, TrustRoots) {
        let g = generate_self_signed(&["localhost", "127.0.0.1"]).unwrap();
        (
            Identity::from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes()).unwrap(),
            TrustRoots::from_pem(g.cert_pem.as_bytes()).unwrap(),
        )
    }

    /// A connected, handshaken (server, client) pair over loopback.
    fn connected() -> ((ReadHalf, WriteHalf, Closer), (ReadHalf, WriteHalf, Closer)) {
        let (server_id, server_root) = pair();
        let (client_id, client_root) = pair();
        let sc = server_config(&server_id, &client_root).unwrap();
        let cc = client_config(&client_id, &server_root, true).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        let server = std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            let mut conn = Connection::Server(rustls::ServerConnection::new(sc).unwrap());
            handshake(&mut conn, &mut tcp, deadline).unwrap();
            set_timeouts(&tcp, None).unwrap();
            split(tcp, Some(conn)).unwrap()
        });
        let mut tcp = TcpStream::connect(addr).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = Connection::Client(rustls::ClientConnection::new(cc, name).unwrap());
        handshake(&mut conn, &mut tcp, deadline).unwrap();
        set_timeouts(&tcp, None).unwrap();
        let client = split(tcp, Some(conn)).unwrap();
        (server.join().unwrap(), client)
    }

    #[test]
    fn both_halves_move_data_at_once_in_both_directions() {
        let ((mut sr, mut sw, _sc), (mut cr, mut cw, _cc)) = connected();
        const N: usize = 8 << 20;
        let pattern = |i: usize| (i * 31 % 251) as u8;
        let data: Vec<u8> = (0..N).map(pattern).collect();
        let d2 = data.clone();
        // Each side writes 8 MiB in odd-sized pieces while its other half reads.
        let w1 = std::thread::spawn(move || {
            for c in d2.chunks(100_003) {
                sw.write_all(c).unwrap();
            }
            sw.close();
        });
        let w2 = std::thread::spawn(move || {
            for c in data.chunks(65_536) {
                cw.write_all(c).unwrap();
            }
            cw.close();
        });
        let read_all = |r: &mut ReadHalf| {
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            got
        };
        let r1 = std::thread::spawn(move || read_all(&mut cr));
        let got_s = read_all(&mut sr);
        let got_c = r1.join().unwrap();
        w1.join().unwrap();
        w2.join().unwrap();
        assert_eq!(got_s.len(), N);
        assert_eq!(got_c.len(), N);
        assert!(got_s.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        assert!(got_c.iter().enumerate().all(|(i, &b)| b == pattern(i)));
    }

    #[test]
    fn queued_pieces_go_out_in_order_without_waiting_on_a_full_socket() {
        let ((mut sr, _sw, _sc), (_cr, mut cw, _cc)) = connected();
        let pattern = |i: usize| (i * 7 % 253) as u8;
        let data: Vec<u8> = (0..200_000).map(pattern).collect();
        // Nobody reads yet: pieces are queued until the socket takes no more, and sending
        // then returns instead of waiting.
        let mut queued = 0;
        let mut full = false;
        while queued < 64 << 20 {
            let pieces: Vec<&[u8]> = data.chunks(7_919).collect();
            cw.queue_parts(&pieces).unwrap();
            queued += data.len();
            if !cw.send_queued(false).unwrap() {
                full = true;
                break;
            }
        }
        assert!(full, "64 MiB went into a socket nobody reads");
        assert!(cw.has_queued());
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; queued];
            sr.read_exact(&mut got).unwrap();
            got
        });
        // The rest goes when the peer reads; then everything arrived once, in order.
        assert!(cw.send_queued(true).unwrap());
        assert!(!cw.has_queued());
        let got = reader.join().unwrap();
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, &b)| b == pattern(i % data.len()))
        );
    }

    #[test]
    fn closing_the_socket_unblocks_a_blocked_reader() {
        let ((mut sr, _sw, sc), (_cr, _cw, _cc)) = connected();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            sr.read(&mut buf)
        });
        sc.close();
        // Either a clean 0 or an error: what matters is that the read returned.
        let r = t.join().unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }

    #[test]
    fn a_peer_closing_without_close_notify_is_an_unexpected_eof() {
        let ((mut sr, _sw, _sc), (_cr, _cw, cc)) = connected();
        cc.close();
        let mut buf = [0u8; 16];
        let err = sr.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
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
