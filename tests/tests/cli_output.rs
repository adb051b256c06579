//! Snapshot tests of what people read: help texts, human output and error
//! sentences. A change in wording shows up as a snapshot diff to review
//! (`INSTA_UPDATE=always cargo test -p tessera-e2e --test cli_output`, then
//! read the diff).

use tessera_e2e::World;

/// One command of a transcript: arguments, stdin, extra environment.
type Step<'a> = (&'a [&'a str], Option<&'a [u8]>, &'a [(&'a str, &'a str)]);

fn transcript(w: &World, steps: &[Step<'_>]) -> String {
    let mut out = String::new();
    for (args, stdin, env) in steps {
        let r = w.run_with(args, *stdin, env);
        out.push_str(&format!("$ tessera {}\n", args.join(" ")));
        out.push_str(&redact_tokens(&r.stdout));
        out.push_str(&redact_tokens(&r.stderr));
        out.push_str(&format!("[exit {}]\n\n", r.code));
    }
    // The temp dir differs from run to run.
    out.replace(&w.tmp.path().display().to_string(), "$TMP")
}

/// Replaces each freshly minted `tsr_` token (64 hex digits) with a marker,
/// so the snapshot is stable.
fn redact_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("tsr_") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 4..];
        let hex = tail.bytes().take_while(u8::is_ascii_hexdigit).count();
        if hex == 64 {
            out.push_str("tsr_<64 hex digits>");
        } else {
            out.push_str(&rest[i..i + 4 + hex]);
        }
        rest = &tail[hex..];
    }
    out.push_str(rest);
    out
}

#[test]
fn help_texts() {
    let w = World::new();
    let mut out = String::new();
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["agent", "create", "--help"],
        &["lease", "revoke", "--help"],
        &["init", "--help"],
        &["holder", "--help"],
        &["class", "create", "--help"],
        &["shred", "--help"],
        &["shred", "join", "--help"],
        &["audit", "--help"],
        &["audit", "verify", "--help"],
    ] {
        let r = w.run(args).ok();
        out.push_str(&format!("$ tessera {}\n{}\n", args.join(" "), r.stdout));
    }
    insta::assert_snapshot!("help_texts", out);
}

#[test]
fn admin_and_agent_session() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let token = {
        w.put("openai/prod", b"sk-snapshot");
        w.agent("gw", "openai/*", "15m")
    };
    let agent_env: &[(&str, &str)] = &[("TESSERA_TOKEN", &token)];
    let file = |name: &str| w.tmp.path().join(name).display().to_string();
    let (cp, garbage, missing) = (file("cp.txt"), file("garbage.txt"), file("missing.txt"));
    std::fs::write(&garbage, "tessera-audit-checkpoint-v1\nseq: 1\n").expect("write");
    let text = transcript(
        &w,
        &[
            (&["secret", "put", "openai/dev"], Some(b"v"), &[]),
            (&["secret", "put", "bad name"], Some(b"v"), &[]),
            (&["secret", "put", "openai/empty"], Some(b""), &[]),
            (
                &[
                    "agent",
                    "create",
                    "ci-bot",
                    "--allow",
                    "github/*",
                    "--allow",
                    "npm/*",
                    "--max-ttl",
                    "5m",
                ],
                None,
                &[],
            ),
            (&["agent", "create", "gw", "--allow", "x"], None, &[]),
            (&["agent", "list"], None, &[]),
            (&["get", "openai/prod"], None, agent_env),
            (&["get", "stripe/live"], None, agent_env),
            (&["get", "openai/missing"], None, agent_env),
            (
                &["get", "openai/prod"],
                None,
                &[("TESSERA_TOKEN", "tsr_not-a-real-token")],
            ),
            (&["lease", "revoke"], None, &[]),
            (&["lease", "revoke", "--all"], None, &[]),
            (&["agent", "revoke", "gw"], None, &[]),
            (&["get", "openai/prod"], None, agent_env),
            (&["secret", "rm", "openai/dev"], None, &[]),
            (&["audit", "verify"], None, &[]),
            (&["audit", "checkpoint", "--out", &cp], None, &[]),
            (&["audit", "verify", "--checkpoint", &cp], None, &[]),
            (&["audit", "verify", "--checkpoint", &garbage], None, &[]),
            (&["audit", "verify", "--checkpoint", &missing], None, &[]),
        ],
    );
    insta::assert_snapshot!("admin_and_agent_session", text);
}
