//! SASL as a Kafka producer authenticates: `PLAIN` (RFC 4616) and
//! `SCRAM-SHA-256` / `SCRAM-SHA-512` (RFC 5802, RFC 7677), client side.
//! The broker's framing of the exchange is the Kafka sink's; this module
//! only computes the messages.
//!
//! SCRAM never sends the password: it proves knowledge of it, and checks
//! the server's proof in return, so a broker that does not know the
//! password cannot pass for one that does. A hostile broker chooses the
//! iteration count, which sets how long the client hashes: counts outside
//! Kafka's own bounds (4,096 to 16,384) are refused before any hashing.
//! What a broker says back is cut short and escaped before it goes into a
//! message. The password is used as given (no SASLprep, as Kafka's Java
//! client does).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};

/// A mechanism pg_emit speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl Mechanism {
    pub const ALL: [Mechanism; 3] = [
        Mechanism::Plain,
        Mechanism::ScramSha256,
        Mechanism::ScramSha512,
    ];

    /// Its name in the protocol (and the `sasl_mechanism` option).
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }

    pub fn parse(s: &str) -> Option<Mechanism> {
        Mechanism::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
    }
}

/// A user and password, kept out of `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub mechanism: Mechanism,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ {}, username: {:?}, password: <hidden> }}",
            self.mechanism.name(),
            self.username
        )
    }
}

/// The fewest and most PBKDF2 iterations a server may ask for: Kafka's
/// `ScramMechanism` bounds.
const ITERATIONS: std::ops::RangeInclusive<u32> = 4096..=16_384;

/// A broker's words, as a message may carry them: at most 200 characters,
/// escaped (no newlines or control characters in a log line).
pub fn quoted(s: &str) -> String {
    let cut: String = s.chars().take(200).collect();
    let more = if cut.len() < s.len() { "…" } else { "" };
    format!("{:?}{more}", cut)
}

/// One authentication in progress.
pub enum Exchange {
    /// PLAIN: one message, and the broker's verdict.
    Plain,
    Scram(Scram),
}

/// A SCRAM exchange after the client's first message.
pub struct Scram {
    mechanism: Mechanism,
    password: String,
    nonce: String,
    client_first_bare: String,
    /// The server signature expected in the last message, once computed.
    expected: Option<Vec<u8>>,
}

impl Credentials {
    /// The first message and the exchange it starts; `nonce` is fresh
    /// randomness ([`nonce`]), a parameter so that tests can replay the
    /// RFC's example.
    pub fn start(&self, nonce: &str) -> (Vec<u8>, Exchange) {
        match self.mechanism {
            Mechanism::Plain => {
                let mut m = Vec::new();
                m.push(0);
                m.extend_from_slice(self.username.as_bytes());
                m.push(0);
                m.extend_from_slice(self.password.as_bytes());
                (m, Exchange::Plain)
            }
            mechanism => {
                let bare = format!("n={},r={nonce}", sasl_name(&self.username));
                let first = format!("n,,{bare}");
                (
                    first.into_bytes(),
                    Exchange::Scram(Scram {
                        mechanism,
                        password: self.password.clone(),
                        nonce: nonce.to_string(),
                        client_first_bare: bare,
                        expected: None,
                    }),
                )
            }
        }
    }
}

impl Scram {
    /// The client's final message, from the server's first.
    pub fn answer(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| "the server's SCRAM message is not UTF-8".to_string())?;
        if let Some(e) = server_first.strip_prefix("e=") {
            return Err(format!("the server refused: {}", quoted(e)));
        }
        // A mandatory extension this client does not know: RFC 5802 says
        // to fail.
        if server_first.starts_with("m=") || server_first.contains(",m=") {
            return Err(
                "the server demands a SCRAM extension (m=) this client does not speak".into(),
            );
        }
        let field = |k: &str| {
            server_first
                .split(',')
                .find_map(|f| f.strip_prefix(k))
                .ok_or_else(|| format!("the server's SCRAM message has no {k}"))
        };
        let nonce = field("r=")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err("the server's SCRAM nonce does not extend ours".into());
        }
        let salt = base64::engine::general_purpose::STANDARD
            .decode(field("s=")?)
            .map_err(|_| "the server's SCRAM salt is not base64".to_string())?;
        let iterations: u32 = field("i=")?
            .parse()
            .map_err(|_| "the server's SCRAM iteration count is not a number".to_string())?;
        if !ITERATIONS.contains(&iterations) {
            return Err(format!(
                "the server asks for {iterations} SCRAM iterations (accepted: {} to {})",
                ITERATIONS.start(),
                ITERATIONS.end()
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let hash = match self.mechanism {
            Mechanism::ScramSha512 => &SHA512,
            _ => &SHA256,
        };
        let (proof, server_signature) =
            proofs(hash, self.password.as_bytes(), &salt, iterations, &auth);
        self.expected = Some(server_signature);
        let proof = base64::engine::general_purpose::STANDARD.encode(proof);
        Ok(format!("{without_proof},p={proof}").into_bytes())
    }

    /// Checks the server's final message: it must prove it knows the
    /// password too.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), String> {
        let m = std::str::from_utf8(server_final).unwrap_or_default();
        if let Some(e) = m.strip_prefix("e=") {
            return Err(format!("the server refused: {}", quoted(e)));
        }
        // `v=…`, and extensions after it are allowed (RFC 5802, 7).
        let v = m
            .split(',')
            .next()
            .and_then(|f| f.strip_prefix("v="))
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok());
        let same = |a: &[u8], b: &[u8]| {
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
        };
        match (&self.expected, v) {
            (Some(want), Some(got)) if same(want, &got) => Ok(()),
            _ => Err("the server's SCRAM signature is wrong: it does not know the password".into()),
        }
    }
}

/// HMAC and the hash of one SCRAM mechanism.
struct Hash {
    mac: fn(&[u8], &[u8]) -> Vec<u8>,
    digest: fn(&[u8]) -> Vec<u8>,
}

const SHA256: Hash = Hash {
    mac: |key, data| {
        let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        m.update(data);
        m.finalize().into_bytes().to_vec()
    },
    digest: |d| Sha256::digest(d).to_vec(),
};

const SHA512: Hash = Hash {
    mac: |key, data| {
        let mut m = Hmac::<Sha512>::new_from_slice(key).expect("HMAC takes any key length");
        m.update(data);
        m.finalize().into_bytes().to_vec()
    },
    digest: |d| Sha512::digest(d).to_vec(),
};

/// `ClientProof` and `ServerSignature` (RFC 5802, section 3).
fn proofs(
    h: &Hash,
    password: &[u8],
    salt: &[u8],
    iterations: u32,
    auth: &str,
) -> (Vec<u8>, Vec<u8>) {
    // PBKDF2 with one block: the key is as long as the hash.
    let mut u = (h.mac)(password, &[salt, &1u32.to_be_bytes()].concat());
    let mut salted = u.clone();
    for _ in 1..iterations {
        u = (h.mac)(password, &u);
        salted.iter_mut().zip(&u).for_each(|(s, x)| *s ^= x);
    }
    let client_key = (h.mac)(&salted, b"Client Key");
    let stored_key = (h.digest)(&client_key);
    let signature = (h.mac)(&stored_key, auth.as_bytes());
    let proof = client_key
        .iter()
        .zip(&signature)
        .map(|(a, b)| a ^ b)
        .collect();
    let server_key = (h.mac)(&salted, b"Server Key");
    (proof, (h.mac)(&server_key, auth.as_bytes()))
}

/// A user name as SCRAM writes it (`,` and `=` escaped).
fn sasl_name(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// A fresh client nonce: 18 random bytes from the system, base64.
pub fn nonce() -> Result<String, String> {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 18];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "no randomness for a SCRAM nonce".to_string())?;
    Ok(base64::engine::general_purpose::STANDARD.encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(mechanism: Mechanism) -> Credentials {
        Credentials {
            mechanism,
            username: "user".into(),
            password: "pencil".into(),
        }
    }

    /// RFC 7677, section 3: the SCRAM-SHA-256 example, byte for byte.
    #[test]
    fn rfc_7677_example() {
        let (first, ex) = user(Mechanism::ScramSha256).start("rOprNGfwEbeRWgbNEkqO");
        assert_eq!(first, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let Exchange::Scram(mut s) = ex else { panic!() };
        let last = s
            .answer(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(
            String::from_utf8(last).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.finish(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(s
            .finish(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .is_err());
    }

    #[test]
    fn hostile_servers_are_refused() {
        let start = || match user(Mechanism::ScramSha512).start("abc").1 {
            Exchange::Scram(s) => s,
            Exchange::Plain => panic!(),
        };
        for (msg, why) in [
            ("r=abcdef,s=QUJD,i=100000000", "iterations"),
            ("r=abcdef,s=QUJD,i=16385", "iterations"),
            ("m=x,r=abcdef,s=QUJD,i=4096", "extension"),
            ("r=abcdef,s=QUJD,i=1", "iterations"),
            ("r=xyz,s=QUJD,i=4096", "does not extend"),
            ("r=abc,s=QUJD,i=4096", "does not extend"),
            ("e=unknown-user", "refused: \"unknown-user\""),
            ("r=abcdef,i=4096", "no s="),
        ] {
            let e = start().answer(msg.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{msg}: {e}");
        }
        // A last message before any proof was computed proves nothing.
        assert!(start().finish(b"v=AAAA").is_err());
    }

    #[test]
    fn plain_and_names() {
        let (m, _) = user(Mechanism::Plain).start("");
        assert_eq!(m, b"\0user\0pencil");
        assert_eq!(sasl_name("a=b,c"), "a=3Db=2Cc");
        assert_eq!(
            Mechanism::parse("scram-sha-512"),
            Some(Mechanism::ScramSha512)
        );
        assert_eq!(Mechanism::parse("GSSAPI"), None);
        assert!(!format!("{:?}", user(Mechanism::Plain)).contains("pencil"));
        assert_ne!(nonce().unwrap(), nonce().unwrap());
        assert_eq!(quoted("a\nb"), "\"a\\nb\"");
        assert_eq!(quoted(&"x".repeat(300)).chars().count(), 203);
    }
}
