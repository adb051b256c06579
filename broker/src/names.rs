//! Validation of the names users choose: secrets, agents, allow patterns.

use crate::error::{Error, Result};

/// Longest secret name.
pub const MAX_SECRET_NAME: usize = 128;
/// Longest agent name.
pub const MAX_AGENT_NAME: usize = 64;

/// A secret name: one or more `/`-separated segments of letters, digits,
/// `.`, `_` and `-`, each starting with a letter or digit, e.g. `openai/prod`.
pub fn secret(name: &str, field: &'static str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "the secret name is empty"));
    }
    if name.len() > MAX_SECRET_NAME {
        return Err(Error::invalid(
            field,
            format!("the secret name is longer than {MAX_SECRET_NAME} characters"),
        ));
    }
    for seg in name.split('/') {
        segment(seg, field, "secret names are segments like `openai/prod`")?;
    }
    Ok(())
}

/// A lease id as tessera makes them: `lse_` and 32 hex digits.
pub fn lease_id(id: &str, field: &'static str) -> Result<()> {
    let ok = id
        .strip_prefix("lse_")
        .is_some_and(|rest| rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "a lease id looks like `lse_` and 32 hex digits; `tessera lease list` shows them",
        ))
    }
}

/// An agent name: one segment, as in a secret name.
pub fn agent(name: &str, field: &'static str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "the agent name is empty"));
    }
    if name.len() > MAX_AGENT_NAME {
        return Err(Error::invalid(
            field,
            format!("the agent name is longer than {MAX_AGENT_NAME} characters"),
        ));
    }
    segment(
        name,
        field,
        "agent names look like `ci-bot` or `openclaw.gw1`",
    )
}

/// A retention class name: one segment, e.g. `sox-7y`.
pub fn class(name: &str, field: &'static str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_AGENT_NAME {
        return Err(Error::invalid(
            field,
            format!("a class name has 1 to {MAX_AGENT_NAME} characters, like `sox-7y`"),
        ));
    }
    segment(name, field, "class names look like `sox-7y` or `gdpr-30d`")
}

/// A holder role: one segment, e.g. `legal` or `board-escrow`.
pub fn role(name: &str, field: &'static str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_AGENT_NAME {
        return Err(Error::invalid(
            field,
            format!("a role has 1 to {MAX_AGENT_NAME} characters, like `legal`"),
        ));
    }
    segment(
        name,
        field,
        "roles look like `legal`, `ciso` or `board-escrow`",
    )
}

/// Prefix of allow rules that grant envelope encryption under a class.
pub const CLASS_RULE: &str = "class:";

fn segment(seg: &str, field: &'static str, hint: &str) -> Result<()> {
    let mut chars = seg.chars();
    match chars.next() {
        None => Err(Error::invalid(
            field,
            format!("it has an empty segment (a leading, trailing or double `/`); {hint}"),
        )),
        Some(c) if !c.is_ascii_alphanumeric() => Err(Error::invalid(
            field,
            format!("each segment must start with a letter or digit; {hint}"),
        )),
        _ => {
            if let Some(bad) = seg
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            {
                Err(Error::invalid(
                    field,
                    format!(
                        "the character {bad:?} is not allowed (only ASCII letters, digits, `.`, \
                         `_` and `-`); {hint}"
                    ),
                ))
            } else {
                Ok(())
            }
        }
    }
}

/// An allow pattern: a secret name in which `*` matches any run of
/// characters (including `/`), e.g. `openai/*`; or `class:NAME` (with `*`
/// allowed) for envelope encryption under a retention class.
pub fn pattern(p: &str) -> Result<()> {
    if p == "*" {
        return Ok(());
    }
    if let Some(c) = p.strip_prefix(CLASS_RULE) {
        return class(&c.replace('*', "x"), "allow").map_err(|_| {
            Error::invalid(
                "allow",
                format!("{p:?} is not a valid class rule: use `class:NAME`, e.g. `class:sox-7y`"),
            )
        });
    }
    let probe = p.replace('*', "x");
    secret(&probe, "allow").map_err(|_| {
        Error::invalid(
            "allow",
            format!("{p:?} is not a valid pattern: use a secret name with `*` wildcards, e.g. `openai/*`"),
        )
    })
}

/// Whether `name` matches the glob `pattern` (`*` = any run of characters).
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names() {
        assert!(secret("openai/prod", "name").is_ok());
        assert!(secret("a", "name").is_ok());
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            ".a",
            "a b",
            "a\n",
            "ä",
            &"x".repeat(129),
        ] {
            assert!(secret(bad, "name").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn lease_ids() {
        let made = crate::keys::lease_id(1).expect("lease id");
        assert!(lease_id(&made, "lease_id").is_ok(), "{made}");
        for bad in [
            "",
            "lse_",
            "lse_xyz",
            "sk-1234",
            &format!("lse_{}", "a".repeat(61)),
            &format!("lse_{}", "a".repeat(31)),
            &format!("lse_{}", "a".repeat(33)),
        ] {
            assert!(lease_id(bad, "lease_id").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn globs() {
        assert!(matches("openai/*", "openai/prod"));
        assert!(matches("openai/*", "openai/a/b"));
        assert!(!matches("openai/*", "openai"));
        assert!(!matches("openai/*", "stripe/live"));
        assert!(matches("*", "x/y"));
        assert!(matches("a*c", "abbbc"));
        assert!(!matches("a*c", "abbbd"));
        assert!(matches("gh/bot", "gh/bot"));
    }
}
