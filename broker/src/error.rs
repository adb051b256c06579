//! The broker's one error type, and its one mapping to `tonic::Status`.
//!
//! Every variant says what happened in a sentence a person can act on. No
//! variant ever carries a secret value, a token or key material.

use tonic::{Code, Status};

/// Everything that can go wrong in the broker.
#[non_exhaustive]
#[derive(Debug)]
pub enum Error {
    /// A request field is malformed or out of range; names the field.
    InvalidArgument {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong with it and what would be accepted.
        problem: String,
    },
    /// The caller presented no credential, or one that is unknown, revoked
    /// or expired.
    Unauthenticated(String),
    /// The caller is known but not allowed; names the rule that decided.
    PermissionDenied(String),
    /// The named thing (secret, agent, lease) does not exist.
    NotFound(String),
    /// The thing already exists (for example an agent name).
    AlreadyExists(String),
    /// The broker is in a state that forbids the request (sealed, an
    /// expired lease, a revoked agent).
    FailedPrecondition(String),
    /// The store could not durably record the request; nothing changed.
    Unavailable(String),
    /// The caller holds the most of something it may (open watches).
    ResourceExhausted(String),
    /// Stored data failed authentication: a row was changed or swapped in
    /// the database file, or the wrong root key was used.
    Tampered(String),
    /// The store is missing, not initialised, or not readable.
    Store(String),
    /// The OS keychain could not give or keep the root key.
    Keychain(String),
    /// The passphrase did not unlock the root key.
    WrongPassphrase,
    /// An I/O problem outside the database (socket, files).
    Io(String),
    /// A bug: an invariant did not hold.
    Internal(String),
}

/// Shorthand for results in the broker.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: &'static str, problem: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            problem: problem.into(),
        }
    }

    /// The gRPC code this error travels as.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) | Error::WrongPassphrase | Error::Keychain(_) => {
                Code::FailedPrecondition
            }
            Error::Unavailable(_) | Error::Store(_) | Error::Io(_) => Code::Unavailable,
            Error::Tampered(_) => Code::DataLoss,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidArgument { field, problem } => write!(f, "invalid {field}: {problem}"),
            Error::Unauthenticated(m)
            | Error::PermissionDenied(m)
            | Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::FailedPrecondition(m)
            | Error::Unavailable(m)
            | Error::ResourceExhausted(m)
            | Error::Tampered(m)
            | Error::Store(m)
            | Error::Keychain(m)
            | Error::Io(m)
            | Error::Internal(m) => f.write_str(m),
            Error::WrongPassphrase => f.write_str(
                "the passphrase does not unlock this store's root key; nothing was changed. \
                 Check the passphrase given (TESSERA_PASSPHRASE, the prompt, or the file \
                 `serve --passphrase-file` names) and try again",
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        // SQLite errors name tables and constraints, never bound values, so
        // the text is safe to show; the remedy is generic.
        Error::Unavailable(format!(
            "the store could not complete the request ({e}); nothing was changed, try again"
        ))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}
