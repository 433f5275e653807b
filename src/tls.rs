//! Certificates and the encrypted byte stream: PEM loading, the rustls
//! configurations of both sides (with pinning of self-signed peer certificates),
//! certificate generation, and [`split`], which turns one handshaken connection
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

/// The certificates a side trusts for its peers: CA certificates, or the peers' own
/// self-signed certificates (pinned: trusted when byte-for-byte equal).
#[derive(Clone, Debug, Default)]
pub struct TrustRoots {
    certs: Vec<CertificateDer<'static>>,
}

impl TrustRoots {
    /// No roots yet.
    pub fn new() -> TrustRoots {
        TrustRoots::default()
    }

    /// Roots from PEM text holding one or more certificates.
    pub fn from_pem(pem: &[u8]) -> Result<TrustRoots> {
        let mut roots = TrustRoots::new();
        roots.add_pem(pem)?;
        Ok(roots)
    }

    /// Roots from PEM files.
    pub fn from_pem_files<P: AsRef<Path>>(
        paths: impl IntoIterator<Item = P>,
    ) -> Result<TrustRoots> {
        let mut roots = TrustRoots::new();
        for p in paths {
            roots.add_pem_file(p)?;
        }
        Ok(roots)
    }

    /// Adds the certificates in PEM text.
    pub fn add_pem(&mut self, pem: &[u8]) -> Result<()> {
        self.certs.extend(certs_from_pem(pem, "trust roots")?);
        Ok(())
    }

    /// Adds the certificates in a PEM file.
    pub fn add_pem_file(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let pem = read_file(path, "certificate")?;
        self.certs
            .extend(certs_from_pem(&pem, &path.display().to_string())?);
        Ok(())
    }

    /// How many certificates.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    fn root_store(&self) -> Option<Arc<RootCertStore>> {
        let mut store = RootCertStore::empty();
        for c in &self.certs {
            // A certificate that cannot serve as a trust anchor can still be pinned.
            let _ = store.add(c.clone());
        }
        (!store.is_empty()).then(|| Arc::new(store))
    }
}

/// A freshly generated self-signed certificate and its key, as PEM text.
#[derive(Clone, Debug)]
pub struct GeneratedCertificate {
    /// The certificate (`CERTIFICATE`).
    pub cert_pem: String,
    /// Its private key (`PRIVATE KEY`, PKCS#8, ECDSA P-256).
    pub key_pem: String,
}

/// Generates a self-signed end-entity certificate valid for the given DNS names and IP
/// addresses (the first is also its common name). Each side pins the other's.
pub fn generate_self_signed(names: &[&str]) -> Result<GeneratedCertificate> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names.clone())
        .map_err(|e| Error::Tls(format!("certificate parameters: {e}")))?;
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, first.as_str());
    }
    let key = rcgen::KeyPair::generate().map_err(|e| Error::Tls(format!("key generation: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::Tls(format!("self-signing: {e}")))?;
    Ok(GeneratedCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The manager's server configuration: its identity, and client certificates required.
pub(crate) fn server_config(
    identity: &Identity,
    worker_roots: &TrustRoots,
) -> Result<Arc<ServerConfig>> {
    if worker_roots.is_empty() {
        return Err(Error::InvalidConfig(
            "no worker trust roots: no worker could connect".into(),
        ));
    }
    let provider = provider();
    let verifier = Arc::new(PeerVerifier::new(worker_roots, provider.clone(), false)?);
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.certs.clone(), identity.key.clone_key())?;
    Ok(Arc::new(config))
}

/// The worker's client configuration: its identity, and how it checks the manager.
pub(crate) fn client_config(
    identity: &Identity,
    manager_roots: &TrustRoots,
    verify_hostname: bool,
) -> Result<Arc<ClientConfig>> {
    if manager_roots.is_empty() {
        return Err(Error::InvalidConfig(
            "no manager trust roots: the manager could not be verified".into(),
        ));
    }
    let provider = provider();
    let verifier = Arc::new(PeerVerifier::new(
        manager_roots,
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

/// Accepts a peer certificate that is byte-equal to a pinned one (inside its validity
/// period), or one that chains to a root through rustls' WebPki verifiers. Pinning is
/// what makes openssl-default self-signed certificates (`CA:TRUE`, often no SAN) usable
/// as their own trust anchor, which WebPki refuses as `CaUsedAsEndEntity`.
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
        roots: &TrustRoots,
        provider: Arc<CryptoProvider>,
        verify_hostname: bool,
    ) -> Result<PeerVerifier> {
        let store = roots.root_store();
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
            pinned: roots.certs.clone(),
            server,
            client,
            verify_hostname,
            algorithms: provider.signature_verification_algorithms,
        })
    }

    fn pinned_ok(
        &self,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Option<Result<(), rustls::Error>> {
        if !self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return None;
        }
        Some(check_validity(end_entity, now))
    }
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
        if let Some(valid) = self.pinned_ok(end_entity, now) {
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
        if let Some(valid) = self.pinned_ok(end_entity, now) {
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

/// Checks a certificate's notBefore/notAfter against `now` (pinned certificates skip
/// WebPki's path building, so this is done here).
fn check_validity(cert: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
    let (not_before, not_after) = der::validity(cert.as_ref()).ok_or(
        rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
    )?;
    let now = now.as_secs() as i64;
    if now < not_before {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
    }
    if now > not_after {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(())
}

/// Just enough DER to read a certificate's validity period.
mod der {
    /// Splits one TLV off the front: (tag, content, rest).
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | b as usize);
            rest = &rest[n..];
            len
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }

    /// (notBefore, notAfter) as Unix seconds.
    pub(super) fn validity(cert: &[u8]) -> Option<(i64, i64)> {
        let (0x30, cert, _) = tlv(cert)? else {
            return None;
        };
        let (0x30, tbs, _) = tlv(cert)? else {
            return None;
        };
        let (tag, _, mut rest) = tlv(tbs)?;
        if tag == 0xa0 {
            rest = tlv(rest)?.2; // the version was explicit; skip the serial too
        }
        let rest = tlv(rest)?.2; // signature algorithm
        let rest = tlv(rest)?.2; // issuer
        let (0x30, validity, _) = tlv(rest)? else {
            return None;
        };
        let (t1, v1, rest) = tlv(validity)?;
        let (t2, v2, _) = tlv(rest)?;
        Some((time(t1, v1)?, time(t2, v2)?))
    }

    fn time(tag: u8, v: &[u8]) -> Option<i64> {
        let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
        let (year, s) = match tag {
            0x17 if s.len() == 12 => {
                let yy: i64 = s[..2].parse().ok()?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
            }
            0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
            _ => return None,
        };
        let n = |i: usize| -> Option<i64> { s.get(i..i + 2)?.parse().ok() };
        let (month, day, h, m, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
        Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    #[cfg(test)]
    #[test]
    fn dates_convert_to_unix_seconds() {
        assert_eq!(time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(time(0x17, b"000229120000Z"), Some(951_825_600));
        assert_eq!(time(0x18, b"20500101000000Z"), Some(2_524_608_000));
        assert_eq!(time(0x18, b"2050010100000Z"), None);
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
    tls.lock().unwrap_or_else(|p| p.into_inner())
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
}

impl WriteHalf {
    /// Writes all of `data` (encrypting it first under TLS).
    pub(crate) fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
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

    /// Ends the stream cleanly: close_notify, then no more writes.
    pub(crate) fn close(&mut self) {
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

    #[test]
    fn generated_certificates_carry_a_readable_validity() {
        let g = generate_self_signed(&["x"]).unwrap();
        let der = CertificateDer::from_pem_slice(g.cert_pem.as_bytes()).unwrap();
        let (nb, na) = der::validity(der.as_ref()).unwrap();
        assert!(nb < na);
        check_validity(&der, UnixTime::now()).unwrap();
    }
}
