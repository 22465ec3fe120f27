//! NATS NKeys: a user's Ed25519 seed (`SU…`), as `nk` and the NATS
//! tools write it, answering the server's nonce with a signature. The
//! seed never leaves pg_emit; the server learns the public key (`U…`)
//! and a signature of its nonce. Also `.creds` files (`nsc`, Synadia
//! Cloud): a user JWT, signed by its account, with the user's seed.

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair};

/// The prefix bytes NKeys put in front of a key's bytes.
const SEED: u8 = 18 << 3;
const USER: u8 = 20 << 3;

/// A user's key pair, from its seed.
pub struct UserKey(Ed25519KeyPair);

impl UserKey {
    /// From an `SU…` seed; the error says what is wrong, never the seed.
    pub fn from_seed(seed: &str) -> Result<UserKey, String> {
        if seed.starts_with('U') {
            return Err("nkey_seed is a public key (U…): give the user's seed (SU…)".into());
        }
        let raw = base32_decode(seed.trim()).ok_or("nkey_seed is not an NKey seed (base32)")?;
        if raw.len() != 36 {
            return Err("nkey_seed is not an NKey seed (length)".into());
        }
        let (body, crc) = raw.split_at(34);
        if crc16(body).to_le_bytes() != crc {
            return Err("nkey_seed is not an NKey seed (checksum)".into());
        }
        // Two prefix bytes: the seed marker and the key's type (user).
        let kind = (body[0] & 7) << 5 | (body[1] >> 3);
        if body[0] & 0xf8 != SEED || kind != USER {
            return Err("nkey_seed is not a user's seed (SU…)".into());
        }
        Ed25519KeyPair::from_seed_unchecked(&body[2..])
            .map(UserKey)
            .map_err(|_| "nkey_seed is not a valid Ed25519 seed".to_string())
    }

    /// The public key, `U…`, as the server's configuration names it.
    pub fn public(&self) -> String {
        let mut raw = vec![USER];
        raw.extend_from_slice(self.0.public_key().as_ref());
        let crc = crc16(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        base32_encode(&raw)
    }

    /// The nonce's signature as `CONNECT` carries it (`sig`).
    pub fn sign(&self, nonce: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0.sign(nonce.as_bytes()))
    }
}

/// A `.creds` file's text: the user's JWT and key. Its errors say what
/// is wrong, never the text.
pub struct Creds {
    pub jwt: String,
    pub key: UserKey,
}

impl Creds {
    /// Reads `text` as the NATS tools write it: the JWT, then the seed,
    /// each alone on a line between two dashed `BEGIN`/`END` lines.
    pub fn parse(text: &str) -> Result<Creds, String> {
        let lines: Vec<&str> = text
            .trim_start_matches('\u{feff}')
            .lines()
            .map(str::trim)
            .collect();
        let dashed = |l: &str| l.starts_with("---") && l.ends_with("---");
        let blocks: Vec<&str> = lines
            .windows(3)
            .filter(|w| dashed(w[0]) && dashed(w[2]) && !w[1].is_empty() && !dashed(w[1]))
            .map(|w| w[1])
            .collect();
        let [jwt, seed, ..] = blocks[..] else {
            return Err("creds is not a .creds file (a user JWT and its NKey seed, \
                        each between BEGIN and END lines)"
                .into());
        };
        let key =
            UserKey::from_seed(seed).map_err(|e| e.replacen("nkey_seed", "creds' seed", 1))?;
        let subject = user_jwt_subject(jwt).ok_or("creds' JWT is not a NATS user JWT")?;
        if subject != key.public() {
            return Err("creds' JWT is for another user than its seed".into());
        }
        Ok(Creds {
            jwt: jwt.to_string(),
            key,
        })
    }
}

/// The `sub` claim of a NATS user JWT (three base64url parts, claims of
/// `nats.type` `user`), unverified: the server verifies it; this only
/// catches a file whose parts do not belong together.
fn user_jwt_subject(jwt: &str) -> Option<String> {
    let mut parts = jwt.split('.');
    let (_, claims, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&claims).ok()?;
    if claims["nats"]["type"] != "user" {
        return None;
    }
    claims["sub"].as_str().map(str::to_string)
}

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

fn base32_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn base32_encode(b: &[u8]) -> String {
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &byte in b {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// CRC-16/XMODEM, the NKeys checksum.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The user seed and public key of the NATS documentation's NKeys
    /// example (docs.nats.io, "NKeys"; the pair checked with the NATS
    /// project's Python `nkeys`).
    const SEED: &str = "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY";
    const PUBLIC: &str = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";

    #[test]
    fn the_documented_key_pair() {
        let k = UserKey::from_seed(SEED).unwrap();
        assert_eq!(k.public(), PUBLIC);
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(k.sign("nonce"))
            .unwrap();
        assert_eq!(sig.len(), 64);
        let raw = base32_decode(PUBLIC).unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &raw[1..33])
            .verify(b"nonce", &sig)
            .unwrap();
    }

    /// A `.creds` file as `nsc generate creds` writes it, for [`PUBLIC`]
    /// (the JWT's signature is not checked here, the server checks it).
    fn creds_for(subject: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!(
            "{}.{}.c2ln",
            b64(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
            b64(&format!(
                r#"{{"sub":"{subject}","nats":{{"type":"user"}}}}"#
            ))
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{SEED}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        )
    }

    #[test]
    fn creds_files() {
        let c = Creds::parse(&creds_for(PUBLIC)).unwrap();
        assert_eq!(c.key.public(), PUBLIC);
        assert_eq!(c.jwt.split('.').count(), 3);
        // Windows line ends and a byte-order mark, too.
        assert!(Creds::parse(&creds_for(PUBLIC).replace('\n', "\r\n")).is_ok());
        assert!(Creds::parse(&format!("\u{feff}{}", creds_for(PUBLIC))).is_ok());
        // An account's JWT is not a user's.
        let account = creds_for(PUBLIC).replace(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!(r#"{{"sub":"{PUBLIC}","nats":{{"type":"user"}}}}"#)),
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
                r#"{{"sub":"{PUBLIC}","nats":{{"type":"account"}}}}"#
            )),
        );
        let e = Creds::parse(&account).err().unwrap();
        assert!(e.contains("not a NATS user JWT"), "{e}");
        let other = creds_for("UAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        for (text, why) in [
            (other.as_str(), "another user"),
            ("", "not a .creds file"),
            (SEED, "not a .creds file"),
        ] {
            let e = Creds::parse(text).err().unwrap();
            assert!(e.contains(why) && !e.contains(SEED), "{e}");
        }
        let bad_jwt = creds_for(PUBLIC).replace("c2ln", "c2ln.x");
        let e = Creds::parse(&bad_jwt).err().unwrap();
        assert!(e.contains("not a NATS user JWT"), "{e}");
    }

    #[test]
    fn bad_seeds_are_refused_without_echo() {
        let mut wrong = SEED.to_string();
        wrong.replace_range(10..11, "B");
        for bad in [&wrong[..], "SUAM", "not base32!", PUBLIC] {
            let e = UserKey::from_seed(bad).err().unwrap();
            assert!(!e.contains(SEED) && e.contains("nkey_seed"), "{e}");
        }
    }
}
