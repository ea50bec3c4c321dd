//! The SPIFFE peer checks of HBONE's mutual TLS: which certificates a client accepts
//! from a server it expects to be a given identity, which client certificates a pod's
//! 15008 listener accepts, and what a workload certificate must be to be used.
//! Certificates are made here with rcgen, so that each one is wrong in one way only.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    pki_types::{CertificateDer, ServerName, UnixTime},
    CertificateError, ClientConnection, ConnectionCommon, Error as TlsError, ServerConnection,
};
use time::OffsetDateTime;

use crate::{
    hbone::tls::{client_cert_verifier, static_client_config},
    identity::{
        ca::authority::{new_csr, CertificateAuthority},
        pem::server_config as fixed_cert_server_config,
        spiffe::{spiffe_id, TrustBundle},
        Identity,
    },
};

const TRUST_DOMAIN: &str = "cluster.local";
const SERVER: &str = "spiffe://cluster.local/ns/apps/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/apps/sa/client";

fn id(text: &str) -> Identity {
    text.parse().unwrap()
}

/// A root CA of its own (the mesh's, or another one).
struct Root {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Root {
    fn new(name: &str) -> Root {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
        let pem = params.self_signed(&key).unwrap().pem();
        Root {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    fn trust(&self) -> TrustBundle {
        TrustBundle::from_pem(&self.pem).unwrap()
    }
}

/// What goes into a test certificate; `workload` is what the mesh CA issues.
#[derive(Clone)]
struct Spec {
    sans: Vec<SanType>,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    ca: bool,
}

fn uri(text: &str) -> SanType {
    SanType::URI(text.try_into().unwrap())
}

fn workload(spiffe: &str) -> Spec {
    let now = OffsetDateTime::now_utc();
    Spec {
        sans: vec![uri(spiffe)],
        ekus: vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        not_before: now - time::Duration::minutes(5),
        not_after: now + time::Duration::hours(1),
        ca: false,
    }
}

struct Leaf {
    der: CertificateDer<'static>,
    pem: String,
    key_pem: String,
    /// The leaf as an issuer (for chains through something that is not a CA).
    issuer: Issuer<'static, KeyPair>,
}

fn issue(by: &Issuer<'static, KeyPair>, spec: Spec) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = spec.sans;
    params.extended_key_usages = spec.ekus;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    if spec.ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    } else {
        params.is_ca = IsCa::ExplicitNoCa;
    }
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, by).unwrap();
    let key_pem = key.serialize_pem();
    Leaf {
        der: cert.der().clone(),
        pem: cert.pem(),
        key_pem,
        issuer: Issuer::new(params, key),
    }
}

/// Why a certificate was refused, whichever verifier (ours wraps webpki's errors,
/// rustls's maps them) refused it.
#[derive(Debug, PartialEq)]
enum Refused {
    Expired,
    NotYetValid,
    UnknownIssuer,
    WrongUsage,
    CaAsLeaf,
    NotACa,
    /// The chain is good, the SPIFFE ID is not the one expected (or not exactly one).
    Identity,
    Other(String),
}

fn refused(error: &TlsError) -> Refused {
    let TlsError::InvalidCertificate(cert) = error else {
        return Refused::Other(format!("{error:?}"));
    };
    match cert {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => Refused::Expired,
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            Refused::NotYetValid
        }
        CertificateError::UnknownIssuer => Refused::UnknownIssuer,
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            Refused::WrongUsage
        }
        CertificateError::ApplicationVerificationFailure => Refused::Identity,
        CertificateError::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(webpki::Error::CertExpired { .. }) => Refused::Expired,
            Some(webpki::Error::CertNotValidYet { .. }) => Refused::NotYetValid,
            Some(webpki::Error::UnknownIssuer) => Refused::UnknownIssuer,
            #[allow(deprecated)]
            Some(webpki::Error::RequiredEkuNotFound)
            | Some(webpki::Error::RequiredEkuNotFoundContext(_)) => Refused::WrongUsage,
            Some(webpki::Error::CaUsedAsEndEntity) => Refused::CaAsLeaf,
            Some(webpki::Error::EndEntityUsedAsCa) => Refused::NotACa,
            _ => Refused::Other(format!("{error:?}")),
        },
        _ => Refused::Other(format!("{error:?}")),
    }
}

/// Moves everything `from` has to send into `to`.
fn deliver<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>) {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    let mut rest = wire.as_slice();
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
    }
}

/// An HBONE client that expects `expected` connects, in memory, to a server presenting
/// `chain_pem`: the SPIFFE ID the client then sees, or why its verifier refused it.
fn connect_expecting(
    trust: &TrustBundle,
    expected: &str,
    chain_pem: &str,
    key_pem: &str,
) -> Result<Identity, TlsError> {
    let client_config = static_client_config(None, trust, id(expected)).unwrap();
    let server_config = fixed_cert_server_config(chain_pem, key_pem).unwrap();
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5)).into());
    let mut client = ClientConnection::new(client_config, name).unwrap();
    let mut server = ServerConnection::new(server_config).unwrap();
    for _ in 0..8 {
        deliver(&mut client, &mut server);
        server
            .process_new_packets()
            .expect("the server side has nothing to refuse");
        deliver(&mut server, &mut client);
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            let peer = client
                .peer_certificates()
                .expect("the server's certificate");
            return Ok(spiffe_id(&peer[0]).expect("the accepted certificate's SPIFFE ID"));
        }
    }
    panic!("the handshake neither finished nor failed");
}

fn server_refusal(trust: &TrustBundle, expected: &str, leaf: &Leaf) -> Refused {
    match connect_expecting(trust, expected, &leaf.pem, &leaf.key_pem) {
        Ok(seen) => panic!("a server presenting {seen} was accepted as {expected}"),
        Err(e) => refused(&e),
    }
}

/// What a pod's 15008 listener says of a client certificate chain.
fn client_cert_check(trust: &TrustBundle, chain: &[CertificateDer<'_>]) -> Result<(), Refused> {
    let verifier = client_cert_verifier(trust).unwrap();
    let (leaf, intermediates) = chain.split_first().unwrap();
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(|_| ())
        .map_err(|e| refused(&e))
}

fn expired(spiffe: &str) -> Spec {
    let now = OffsetDateTime::now_utc();
    Spec {
        not_before: now - time::Duration::hours(2),
        not_after: now - time::Duration::hours(1),
        ..workload(spiffe)
    }
}

fn not_yet_valid(spiffe: &str) -> Spec {
    let now = OffsetDateTime::now_utc();
    Spec {
        not_before: now + time::Duration::hours(1),
        not_after: now + time::Duration::hours(2),
        ..workload(spiffe)
    }
}

fn only_usage(spiffe: &str, usage: ExtendedKeyUsagePurpose) -> Spec {
    Spec {
        ekus: vec![usage],
        ..workload(spiffe)
    }
}

// ---- spiffe_id ----

#[test]
fn the_one_uri_san_of_a_ca_issued_certificate_is_its_identity() {
    let ca = CertificateAuthority::generate(TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
    let client = id(CLIENT);
    let (_key, csr) = new_csr(&client).unwrap();
    let chain = crate::identity::pem::certs_from_pem(&ca.sign(&csr, &client).unwrap()).unwrap();
    assert_eq!(
        spiffe_id(&chain[0]),
        Ok(Identity::new(TRUST_DOMAIN, "apps", "client"))
    );
}

#[test]
fn a_certificate_must_name_exactly_one_spiffe_id() {
    let root = Root::new("mesh");
    let one_and_a_dns_name = Spec {
        sans: vec![
            SanType::DnsName("server.apps.svc".try_into().unwrap()),
            uri(SERVER),
        ],
        ..workload(SERVER)
    };
    assert_eq!(
        spiffe_id(&issue(&root.issuer, one_and_a_dns_name).der),
        Ok(id(SERVER)),
        "other SAN kinds may sit beside the one URI SAN (X.509-SVID)"
    );

    let no_san = Spec {
        sans: vec![],
        ..workload(SERVER)
    };
    let only_dns = Spec {
        sans: vec![SanType::DnsName("server.apps.svc".try_into().unwrap())],
        ..workload(SERVER)
    };
    let two_uris = Spec {
        sans: vec![uri(SERVER), uri(CLIENT)],
        ..workload(SERVER)
    };
    let twice_the_same = Spec {
        sans: vec![uri(SERVER), uri(SERVER)],
        ..workload(SERVER)
    };
    let not_spiffe = Spec {
        sans: vec![uri("https://cluster.local/ns/apps/sa/server")],
        ..workload(SERVER)
    };
    for (case, spec, says) in [
        ("no SAN", no_san, "no SAN"),
        ("a DNS SAN only", only_dns, "found 0"),
        ("two URI SANs", two_uris, "found 2"),
        ("the same URI SAN twice", twice_the_same, "found 2"),
        (
            "a URI SAN that is not a SPIFFE ID",
            not_spiffe,
            "not a SPIFFE ID",
        ),
    ] {
        let err = spiffe_id(&issue(&root.issuer, spec).der).unwrap_err();
        assert!(err.contains(says), "{case}: {err}");
    }
    let garbage = CertificateDer::from(b"not a certificate".to_vec());
    assert!(spiffe_id(&garbage).is_err());
}

// ---- the client's check of the server (SpiffeServerVerifier) ----

#[test]
fn a_server_with_exactly_the_expected_spiffe_id_is_accepted() {
    let root = Root::new("mesh");
    let server = issue(&root.issuer, workload(SERVER));
    assert_eq!(
        connect_expecting(&root.trust(), SERVER, &server.pem, &server.key_pem)
            .map_err(|e| refused(&e)),
        Ok(Identity::new(TRUST_DOMAIN, "apps", "server"))
    );
    // What the mesh CA really issues, too.
    let ca = CertificateAuthority::generate(TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
    let (key, csr) = new_csr(&id(SERVER)).unwrap();
    let issued = ca.sign(&csr, &id(SERVER)).unwrap();
    let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
    assert_eq!(
        connect_expecting(&trust, SERVER, &issued, &key.serialize_pem()).map_err(|e| refused(&e)),
        Ok(id(SERVER))
    );
}

#[test]
fn a_server_with_another_spiffe_id_is_refused() {
    let root = Root::new("mesh");
    let trust = root.trust();
    for other in [
        "spiffe://cluster.local/ns/apps/sa/server2",
        "spiffe://cluster.local/ns/apps2/sa/server",
        "spiffe://cluster.local/ns/other/sa/client",
    ] {
        let server = issue(&root.issuer, workload(other));
        assert_eq!(
            server_refusal(&trust, SERVER, &server),
            Refused::Identity,
            "{other}"
        );
    }
}

#[test]
fn a_server_of_another_trust_domain_is_refused_even_under_the_same_root() {
    let root = Root::new("mesh");
    let server = issue(
        &root.issuer,
        workload("spiffe://other.domain/ns/apps/sa/server"),
    );
    assert_eq!(
        server_refusal(&root.trust(), SERVER, &server),
        Refused::Identity
    );
}

#[test]
fn a_server_certificate_without_exactly_one_uri_san_is_refused() {
    let root = Root::new("mesh");
    let trust = root.trust();
    let no_uri = Spec {
        sans: vec![SanType::DnsName("server.apps.svc".try_into().unwrap())],
        ..workload(SERVER)
    };
    let no_san = Spec {
        sans: vec![],
        ..workload(SERVER)
    };
    // The expected ID first, then another: accepting it would let one certificate
    // stand for two workloads.
    let expected_and_another = Spec {
        sans: vec![uri(SERVER), uri(CLIENT)],
        ..workload(SERVER)
    };
    let another_and_expected = Spec {
        sans: vec![uri(CLIENT), uri(SERVER)],
        ..workload(SERVER)
    };
    for (case, spec) in [
        ("a DNS SAN only", no_uri),
        ("no SAN", no_san),
        ("the expected URI SAN and another", expected_and_another),
        ("another URI SAN and the expected", another_and_expected),
    ] {
        let server = issue(&root.issuer, spec);
        assert_eq!(
            server_refusal(&trust, SERVER, &server),
            Refused::Identity,
            "{case}"
        );
    }
}

#[test]
fn an_expired_or_not_yet_valid_server_certificate_is_refused() {
    let root = Root::new("mesh");
    let trust = root.trust();
    let old = issue(&root.issuer, expired(SERVER));
    assert_eq!(server_refusal(&trust, SERVER, &old), Refused::Expired);
    let early = issue(&root.issuer, not_yet_valid(SERVER));
    assert_eq!(server_refusal(&trust, SERVER, &early), Refused::NotYetValid);
}

#[test]
fn a_certificate_for_client_authentication_only_is_refused_as_a_server() {
    let root = Root::new("mesh");
    let server = issue(
        &root.issuer,
        only_usage(SERVER, ExtendedKeyUsagePurpose::ClientAuth),
    );
    assert_eq!(
        server_refusal(&root.trust(), SERVER, &server),
        Refused::WrongUsage
    );
}

#[test]
fn a_server_certificate_chained_to_another_root_is_refused() {
    let mesh = Root::new("mesh");
    let other = Root::new("other");
    let server = issue(&other.issuer, workload(SERVER));
    assert_eq!(
        server_refusal(&mesh.trust(), SERVER, &server),
        Refused::UnknownIssuer
    );
}

#[test]
fn a_server_certificate_signed_by_a_workload_or_that_is_a_ca_is_refused() {
    let root = Root::new("mesh");
    let trust = root.trust();
    // A workload of the mesh signs a certificate naming another workload.
    let signer = issue(&root.issuer, workload(CLIENT));
    let forged = issue(&signer.issuer, workload(SERVER));
    let chain = format!("{}{}", forged.pem, signer.pem);
    assert_eq!(
        connect_expecting(&trust, SERVER, &chain, &forged.key_pem).map_err(|e| refused(&e)),
        Err(Refused::NotACa)
    );
    // A CA certificate is no workload certificate, whatever it names.
    let ca = issue(
        &root.issuer,
        Spec {
            ca: true,
            ..workload(SERVER)
        },
    );
    assert_eq!(server_refusal(&trust, SERVER, &ca), Refused::CaAsLeaf);
}

// ---- a pod's 15008 listener's check of the client (client_cert_verifier) ----

#[test]
fn the_listener_requires_a_client_certificate_and_accepts_a_mesh_workloads() {
    let root = Root::new("mesh");
    let trust = root.trust();
    let verifier = client_cert_verifier(&trust).unwrap();
    assert!(verifier.offer_client_auth());
    assert!(
        verifier.client_auth_mandatory(),
        "a client without a certificate must not get through"
    );
    let client = issue(&root.issuer, workload(CLIENT));
    assert_eq!(
        client_cert_check(&trust, std::slice::from_ref(&client.der)),
        Ok(())
    );
    // The SPIFFE ID the listener then reads from it.
    assert_eq!(spiffe_id(&client.der), Ok(id(CLIENT)));
}

#[test]
fn an_expired_or_not_yet_valid_client_certificate_is_refused() {
    let root = Root::new("mesh");
    let trust = root.trust();
    let old = issue(&root.issuer, expired(CLIENT));
    assert_eq!(client_cert_check(&trust, &[old.der]), Err(Refused::Expired));
    let early = issue(&root.issuer, not_yet_valid(CLIENT));
    assert_eq!(
        client_cert_check(&trust, &[early.der]),
        Err(Refused::NotYetValid)
    );
}

#[test]
fn a_certificate_for_server_authentication_only_is_refused_as_a_client() {
    let root = Root::new("mesh");
    let client = issue(
        &root.issuer,
        only_usage(CLIENT, ExtendedKeyUsagePurpose::ServerAuth),
    );
    assert_eq!(
        client_cert_check(&root.trust(), &[client.der]),
        Err(Refused::WrongUsage)
    );
}

#[test]
fn a_client_certificate_chained_to_another_root_is_refused() {
    let mesh = Root::new("mesh");
    let other = Root::new("other");
    let client = issue(&other.issuer, workload(CLIENT));
    assert_eq!(
        client_cert_check(&mesh.trust(), &[client.der]),
        Err(Refused::UnknownIssuer)
    );
    // Nor does sending the other root along help.
    let other_root = crate::identity::pem::certs_from_pem(&other.pem).unwrap();
    let client = issue(&other.issuer, workload(CLIENT));
    assert_eq!(
        client_cert_check(&mesh.trust(), &[client.der, other_root[0].clone()]),
        Err(Refused::UnknownIssuer)
    );
}

#[test]
fn a_client_certificate_signed_by_a_workload_is_refused() {
    let root = Root::new("mesh");
    let signer = issue(&root.issuer, workload(SERVER));
    let forged = issue(&signer.issuer, workload(CLIENT));
    assert_eq!(
        client_cert_check(&root.trust(), &[forged.der, signer.der]),
        Err(Refused::NotACa)
    );
}

// ---- TrustBundle ----

#[test]
fn a_trust_bundle_needs_a_root_certificate() {
    assert!(TrustBundle::from_pem("").is_err());
    assert!(TrustBundle::from_pem("not PEM at all").is_err());
    assert!(TrustBundle::from_pem(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    .is_err());
}

#[test]
fn a_workload_certificate_is_usable_only_if_both_ends_of_mtls_would_take_it() {
    let root = Root::new("mesh");
    let trust = root.trust();
    let good = issue(&root.issuer, workload(CLIENT));
    assert_eq!(trust.verify_workload(&[good.der]), Ok(()));
    // What the mesh CA issues is usable.
    let ca = CertificateAuthority::generate(TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
    let (_key, csr) = new_csr(&id(CLIENT)).unwrap();
    let chain = crate::identity::pem::certs_from_pem(&ca.sign(&csr, &id(CLIENT)).unwrap()).unwrap();
    assert_eq!(
        TrustBundle::from_pem(ca.root_pem())
            .unwrap()
            .verify_workload(&chain),
        Ok(())
    );

    let other = Root::new("other");
    for (case, leaf) in [
        ("expired", issue(&root.issuer, expired(CLIENT))),
        ("not yet valid", issue(&root.issuer, not_yet_valid(CLIENT))),
        (
            "server authentication only",
            issue(
                &root.issuer,
                only_usage(CLIENT, ExtendedKeyUsagePurpose::ServerAuth),
            ),
        ),
        (
            "client authentication only",
            issue(
                &root.issuer,
                only_usage(CLIENT, ExtendedKeyUsagePurpose::ClientAuth),
            ),
        ),
        ("another root", issue(&other.issuer, workload(CLIENT))),
    ] {
        assert!(trust.verify_workload(&[leaf.der]).is_err(), "{case}");
    }
    assert!(trust.verify_workload(&[]).is_err(), "an empty chain");
}
