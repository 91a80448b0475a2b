//! A throwaway certificate authority, made in memory, for tests, the load harness and local demos:
//! it issues server and client certificates whose keys never leave the process that asked for them
//! (unless it writes them out). Not for production: its key is not kept anywhere safe.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::SpkiPin;

/// A CA made now, with a new key.
pub struct DevCa(CertifiedIssuer<'static, KeyPair>);

/// A certificate the CA issued, with its new key.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The pin of its public key.
    pub pin: SpkiPin,
}

impl DevCa {
    /// A CA whose certificate's common name is `name`.
    pub fn new(name: &str) -> DevCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names to parse");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("generating a key");
        DevCa(CertifiedIssuer::self_signed(params, key).expect("self-signing the CA"))
    }

    /// The CA's certificate, PEM: what clients trust.
    pub fn cert_pem(&self) -> Vec<u8> {
        self.0.pem().into_bytes()
    }

    /// A certificate for `names` (DNS names or IP addresses) with a new key.
    pub fn issue(&self, names: &[&str]) -> Issued {
        let key = KeyPair::generate().expect("generating a key");
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let params = CertificateParams::new(names).expect("DNS names or IP addresses");
        let cert = params.signed_by(&key, &self.0).expect("signing the certificate");
        Issued {
            pin: SpkiPin::of_certificate(cert.der()).expect("rcgen writes valid certificates"),
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
        }
    }
}
