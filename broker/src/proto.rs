//! The wire contract, generated from `proto/tessera/v1/*.proto` at build
//! time. Messages that carry a secret value or a token have a hand-written
//! `Debug` that redacts it.

#![allow(missing_docs)]
#![allow(clippy::all)]

tonic::include_proto!("tessera.v1");

/// The encoded file descriptor set, for the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tessera_descriptor");

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("lease_id", &self.lease_id)
            .field("secret", &self.secret)
            .field("version", &self.version)
            .field("value", &"<redacted>")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("renewable_until", &self.renewable_until)
            .finish()
    }
}

impl std::fmt::Debug for PutSecretRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutSecretRequest")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Debug for CreateAgentResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateAgentResponse")
            .field("agent", &self.agent)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Debug for EncryptRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("class", &self.class)
            .field("plaintext", &"<redacted>")
            .field("context", &self.context)
            .finish()
    }
}

impl std::fmt::Debug for DecryptResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptResponse")
            .field("plaintext", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Debug for GenerateDataKeyResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateDataKeyResponse")
            .field("plaintext_key", &"<redacted>")
            .field("ciphertext", &self.ciphertext)
            .finish()
    }
}

impl std::fmt::Debug for RecoverClassRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoverClassRequest")
            .field("name", &self.name)
            .field("key_fingerprint", &self.key_fingerprint)
            .field("data_keys", &self.data_keys.len())
            .field("shares", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Debug for UnsealRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnsealRequest")
            .field("share", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Debug for RotateNowRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotateNowRequest")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("generate", &self.generate)
            .finish()
    }
}

impl std::fmt::Debug for RekeyRootRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RekeyRootRequest")
            .field("passphrase", &"<redacted>")
            .field("shares", &self.shares)
            .field("threshold", &self.threshold)
            .finish()
    }
}

impl std::fmt::Debug for RekeyRootResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RekeyRootResponse")
            .field("generation", &self.generation)
            .field("versions_rewrapped", &self.versions_rewrapped)
            .field("classes_rewrapped", &self.classes_rewrapped)
            .field("operator_shares", &"<redacted>")
            .finish()
    }
}

/// Wipes a message's secret fields when it is dropped, on either side of
/// the wire (the broker's replies and requests, the CLI's copies), so a
/// value does not linger in freed memory. Code that takes such a field out
/// uses `std::mem::take`, which leaves an empty one behind.
macro_rules! zeroize_on_drop {
    ($($ty:ident { $($field:ident),+ }),+ $(,)?) => {
        $(impl Drop for $ty {
            fn drop(&mut self) {
                use zeroize::Zeroize;
                $(self.$field.zeroize();)+
            }
        })+
    };
}

zeroize_on_drop! {
    Lease { value },
    PutSecretRequest { value },
    CreateAgentResponse { token },
    EncryptRequest { plaintext },
    DecryptResponse { plaintext },
    GenerateDataKeyResponse { plaintext_key },
    RecoverClassRequest { shares },
    UnsealRequest { share },
    RotateNowRequest { value },
    RekeyRootRequest { passphrase },
    RekeyRootResponse { operator_shares },
}
