//! A key holder's private keys: an age X25519 identity (shares are sealed
//! to it) and an Ed25519 signing key (ceremony statements and requests are
//! signed with it). Kept in the holder's own OS keychain, or in an identity
//! file (0600) that `age -d -i FILE` reads directly: the signing key rides
//! along in a comment line, which age ignores.

use std::path::Path;
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use tessera_broker::unseal::{KeychainItem, KeychainStore};
use tessera_shred::holder::{HolderPublicKey, request_text, sign};
use tessera_shred::{hex, unhex};
use tonic::Request;
use zeroize::Zeroizing;

use crate::client::{CliError, Exit};

/// Keychain service under which holder keys are filed (user = role).
pub const KEYCHAIN_SERVICE: &str = "tessera-holder";
const SIGNING_LINE: &str = "# tessera-ed25519-pkcs8: ";

/// A holder's private keys. No `Debug`, no `Clone`.
pub struct HolderKey {
    /// The role the keys were made for.
    pub role: String,
    identity: age::x25519::Identity,
    signing: Zeroizing<Vec<u8>>,
}

impl HolderKey {
    /// Fresh keys for `role`.
    pub fn generate(role: &str) -> Result<Self, CliError> {
        // The role the key will be enrolled for: refuse a name the broker
        // would refuse, before a key is written.
        tessera_broker::names::role(role, "role")?;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| {
            CliError::new(
                Exit::Failure,
                "cannot generate an Ed25519 key (OS randomness)",
            )
        })?;
        Ok(HolderKey {
            role: role.to_string(),
            identity: age::x25519::Identity::generate(),
            signing: Zeroizing::new(pkcs8.as_ref().to_vec()),
        })
    }

    /// The public keys, as `holder enroll --pubkey` takes them.
    pub fn public(&self) -> Result<HolderPublicKey, CliError> {
        Ok(HolderPublicKey {
            age_recipient: self.identity.to_public().to_string(),
            signing_key: tessera_shred::holder::public_of(&self.signing)
                .map_err(|e| CliError::new(Exit::DataLoss, e.to_string()))?,
        })
    }

    /// The identity-file text (what the keychain also stores).
    fn to_text(&self) -> Result<Zeroizing<String>, CliError> {
        Ok(Zeroizing::new(format!(
            "# tessera holder key for role {role}: keep it private.\n\
             # `age -d -i THIS_FILE share.age` opens this holder's shares.\n\
             # public key: {public}\n\
             {SIGNING_LINE}{signing}\n\
             {identity}\n",
            role = self.role,
            public = self.public()?.to_text(),
            signing = Zeroizing::new(hex(&self.signing)).as_str(),
            identity = self.identity.to_string().expose_secret(),
        )))
    }

    fn parse(role: &str, text: &str, source: &str) -> Result<Self, CliError> {
        let bad = |m: &str| {
            CliError::new(
                Exit::InvalidArgument,
                format!(
                    "{source} is not a tessera holder key ({m}); `tessera holder init` makes one"
                ),
            )
        };
        let signing = text
            .lines()
            .find_map(|l| l.strip_prefix(SIGNING_LINE))
            .and_then(|h| unhex(h.trim()))
            .map(Zeroizing::new)
            .ok_or_else(|| bad("no signing key line"))?;
        let identity = text
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .and_then(|l| age::x25519::Identity::from_str(l.trim()).ok())
            .ok_or_else(|| bad("no age identity"))?;
        let key = HolderKey {
            role: role.to_string(),
            identity,
            signing,
        };
        key.public()
            .map_err(|_| bad("the signing key is damaged"))?;
        Ok(key)
    }

    /// Loads the keys of `role`: from `identity_file` when given, else from
    /// the holder's OS keychain.
    pub fn load(role: &str, identity_file: Option<&Path>) -> Result<Self, CliError> {
        match identity_file {
            Some(f) => {
                let text = Zeroizing::new(std::fs::read_to_string(f).map_err(|e| {
                    CliError::new(
                        Exit::InvalidArgument,
                        format!("cannot read --identity-file {}: {e}", f.display()),
                    )
                })?);
                Self::parse(role, &text, &f.display().to_string())
            }
            None => {
                let raw = keychain_item(role).read().map_err(|e| {
                    CliError::new(
                        Exit::Precondition,
                        format!(
                            "{e}. No holder key for role {role} in this keychain: run `tessera \
                             holder init --role {role}` first, or pass --identity-file"
                        ),
                    )
                })?;
                let text = Zeroizing::new(String::from_utf8_lossy(&raw).to_string());
                Self::parse(role, &text, "the keychain entry")
            }
        }
    }

    /// Saves the keys to `identity_file` (created 0600, never overwritten)
    /// or to the OS keychain (refusing to replace an existing key).
    pub fn save(&self, identity_file: Option<&Path>) -> Result<String, CliError> {
        let text = self.to_text()?;
        match identity_file {
            Some(f) => {
                tessera_broker::init::write_private_file(f, text.as_bytes()).map_err(|e| {
                    if f.exists() {
                        CliError::new(
                            Exit::Precondition,
                            format!(
                                "{e}; an existing holder key is never overwritten (move it away \
                                 first)"
                            ),
                        )
                    } else {
                        CliError::new(
                            Exit::InvalidArgument,
                            format!(
                                "{e}; give --identity-file a path in a directory that exists and \
                                 that you can write to"
                            ),
                        )
                    }
                })?;
                Ok(format!("identity file {}", f.display()))
            }
            None => {
                let item = keychain_item(&self.role);
                if item.exists() {
                    return Err(CliError::new(
                        Exit::Precondition,
                        format!(
                            "this keychain already holds a holder key for role {}; it is never \
                             overwritten (delete it with secret-tool, or use --identity-file)",
                            self.role
                        ),
                    ));
                }
                item.write(Zeroizing::new(text.as_bytes().to_vec()))?;
                Ok(format!(
                    "OS keychain (service {KEYCHAIN_SERVICE}, user {})",
                    self.role
                ))
            }
        }
    }

    /// Signs `message` with the holder's Ed25519 key.
    pub fn sign(&self, message: &[u8]) -> Result<[u8; 64], CliError> {
        sign(&self.signing, message).map_err(|e| CliError::new(Exit::DataLoss, e.to_string()))
    }

    /// The age identity, to open sealed shares.
    pub fn identity(&self) -> &age::x25519::Identity {
        &self.identity
    }

    /// `msg` signed as this holder for `method` on `target`.
    pub fn request<T>(&self, msg: T, method: &str, target: &str) -> Result<Request<T>, CliError> {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let sig = self.sign(request_text(&self.role, method, target, t).as_bytes())?;
        let mut req = Request::new(msg);
        let bad = || CliError::new(Exit::InvalidArgument, "the role cannot be sent as metadata");
        let md = req.metadata_mut();
        md.insert("x-tessera-holder", self.role.parse().map_err(|_| bad())?);
        md.insert(
            "x-tessera-holder-time",
            t.to_string().parse().map_err(|_| bad())?,
        );
        md.insert(
            "x-tessera-holder-signature",
            hex(&sig).parse().map_err(|_| bad())?,
        );
        Ok(req)
    }
}

fn keychain_item(role: &str) -> KeychainItem {
    KeychainItem {
        store: KeychainStore::Os,
        service: KEYCHAIN_SERVICE.into(),
        user: role.into(),
        what: "holder key",
    }
}

/// Decrypts an age file (armored or binary) with `identity`.
pub fn age_decrypt(
    sealed: &[u8],
    identities: &[&age::x25519::Identity],
) -> Result<Zeroizing<Vec<u8>>, String> {
    use std::io::Read;
    let reader = age::armor::ArmoredReader::new(sealed);
    let dec = age::Decryptor::new(reader).map_err(|e| e.to_string())?;
    let ids = identities.iter().map(|i| *i as &dyn age::Identity);
    let mut r = dec.decrypt(ids).map_err(|e| e.to_string())?;
    let mut out = Zeroizing::new(Vec::new());
    r.read_to_end(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}
