//! End-to-end: the real `tessera` binary, a real SQLite file, a real Unix
//! socket, the real OS keychain.

use std::path::Path;
use std::time::Duration;

use tessera_broker::proto;
use tessera_e2e::{PASSPHRASE, World, authed, keychain_available};
use tonic::Code;

#[test]
fn keychain_unseal_put_issue_get_round_trip() {
    if !keychain_available("keychain_unseal_put_issue_get_round_trip") {
        return;
    }
    let w = World::new();
    let init = w.run(&["init", "--json"]).ok();
    assert_eq!(init.json()["unseal"], "keychain");
    assert!(
        init.json()["admin_token"]
            .as_str()
            .expect("token")
            .starts_with("tsa_")
    );
    let _s = w.serve_env(&[], &[]);
    w.put("openai/prod", b"sk-live-keychain-1");
    let token = w.agent("gw", "openai/*", "15m");
    assert!(token.starts_with("tsr_"));
    let got = w.get("openai/prod", &token).ok();
    assert_eq!(got.stdout, "sk-live-keychain-1");
    let leases = w.run(&["lease", "list", "--json"]).ok().json();
    assert_eq!(leases["leases"].as_array().map(Vec::len), Some(1));
    assert_eq!(leases["leases"][0]["agent"], "gw");
    w.run(&["audit", "verify"]).ok();
}

#[test]
fn store_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    for (path, mode) in [
        (w.data.clone(), 0o700),
        (w.db(), 0o600),
        (w.data.join("admin.token"), 0o600),
        (w.socket(), 0o600),
    ] {
        let m = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{} has mode {m:o}", path.display());
    }
}

/// A data directory made beforehand with a mode open to others keeps it
/// (tessera does not chmod what it did not create), so `init` and `serve`
/// say so, naming the fix; the store's own files stay 0600.
#[test]
fn a_data_dir_open_to_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    std::fs::create_dir_all(&w.data).expect("data dir");
    std::fs::set_permissions(&w.data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let r = w.init_passphrase();
    assert!(
        r.stderr.contains("has mode 755") && r.stderr.contains("chmod 700"),
        "{r:#?}"
    );
    let mut s = w.serve(&[]);
    s.terminate();
    let logs = s.logs();
    assert!(
        logs.contains("has mode 755") && logs.contains("chmod 700"),
        "{logs}"
    );
    // Made private, nothing more is said.
    std::fs::set_permissions(&w.data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut s = w.serve(&[]);
    s.terminate();
    assert!(!s.logs().contains("has mode"), "{}", s.logs());
}

#[test]
fn wrong_passphrase_is_refused_and_store_untouched() {
    let w = World::new();
    w.init_passphrase();
    let before = std::fs::read(w.db()).expect("db");
    let r = w
        .run_with(
            &["serve"],
            None,
            &[("TESSERA_PASSPHRASE", "not the passphrase")],
        )
        .fails_with(5);
    assert!(r.stderr.contains("passphrase does not unlock"), "{r:#?}");
    assert_eq!(std::fs::read(w.db()).expect("db"), before);
    // No passphrase at all, and no terminal: a clear precondition error.
    let r = w.run(&["serve"]).fails_with(5);
    assert!(r.stderr.contains("TESSERA_PASSPHRASE"), "{r:#?}");
    // And the right passphrase still works.
    let _s = w.serve(&[]);
}

#[test]
fn missing_store_is_a_clear_error() {
    let w = World::new();
    let r = w.run(&["serve"]).fails_with(6);
    assert!(r.stderr.contains("tessera init"), "{r:#?}");
    let r = w.run(&["secret", "list"]).fails_with(4);
    assert!(r.stderr.contains("admin credential"), "{r:#?}");
    assert!(r.stderr.contains("holds no store"), "{r:#?}");
}

#[test]
fn init_refuses_a_stray_admin_token_and_creates_nothing() {
    let w = World::new();
    let data = w.db().parent().expect("data dir").to_path_buf();
    std::fs::create_dir_all(&data).expect("data dir");
    let token = data.join("admin.token");
    std::fs::write(&token, b"tsa_left_behind").expect("stray token");
    let r = w
        .run_with(
            &["init", "--unseal", "passphrase"],
            None,
            &[("TESSERA_PASSPHRASE", "a passphrase")],
        )
        .fails_with(5);
    assert!(r.stderr.contains("no store next to it"), "{r:#?}");
    assert!(!w.db().exists(), "init created a database anyway");
    assert_eq!(std::fs::read(&token).expect("token"), b"tsa_left_behind");
    std::fs::remove_file(&token).expect("remove");
    w.init_passphrase();
}

/// `--passphrase-file` wins over TESSERA_PASSPHRASE, and a file others can
/// read is warned about.
#[test]
fn passphrase_file_is_used_and_checked() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    w.init_passphrase();
    let file = w.tmp.path().join("passphrase.txt");
    std::fs::write(&file, "not the passphrase\n").expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let r = w
        .run_with(
            &["serve", "--passphrase-file", file.to_str().expect("p")],
            None,
            &[("TESSERA_PASSPHRASE", PASSPHRASE)],
        )
        .fails_with(5);
    assert!(
        r.stderr.contains("can be read by other users") && r.stderr.contains("644"),
        "{r:#?}"
    );
    assert!(r.stderr.contains("passphrase does not unlock"), "{r:#?}");
    // The right one, kept private: served, with no warning.
    std::fs::write(&file, format!("{PASSPHRASE}\n")).expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let s = w.serve(&["--passphrase-file", file.to_str().expect("p")]);
    assert_eq!(w.run(&["status", "--json"]).ok().json()["sealed"], false);
    assert!(
        !s.logs().contains("can be read by other users"),
        "{}",
        s.logs()
    );
}

/// Runs `sh_cmd` at a terminal (a pty from `script`), types `input` once
/// the terminal shows "input is hidden"; returns the exit status and all
/// the terminal showed.
fn at_terminal(w: &World, sh_cmd: &str, input: &[u8]) -> (std::process::ExitStatus, String) {
    use std::io::{Read, Write};
    let template = w.command();
    let mut script = std::process::Command::new("script");
    script
        .args(["-qec", sh_cmd, "/dev/null"])
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in template.get_envs() {
        if let Some(v) = v {
            script.env(k, v);
        }
    }
    let mut child = script.spawn().expect("script (bsdutils)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    // Everything the terminal shows, read as it comes.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut shown = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&shown).contains("input is hidden") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(b) => shown.extend(b),
            Err(_) => panic!(
                "no prompt; the terminal showed {:?}",
                String::from_utf8_lossy(&shown)
            ),
        }
    }
    stdin.write_all(input).expect("type");
    drop(stdin);
    let status = child.wait().expect("wait script");
    while let Ok(b) = rx.recv_timeout(Duration::from_secs(2)) {
        shown.extend(b);
    }
    (status, String::from_utf8_lossy(&shown).into_owned())
}

/// A value typed or pasted at a terminal is not echoed, is taken whole up
/// to Ctrl-D (a multi-line paste is not left for the shell), and loses only
/// its final newline; a Ctrl-C while typing leaves the echo on.
#[test]
fn a_value_typed_at_a_terminal_is_hidden_and_taken_whole() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let bin = tessera_e2e::bin();
    // A paste of two lines, then Ctrl-D on a line of its own.
    let (status, shown) = at_terminal(
        &w,
        &format!("{} secret put tty/pasted", bin.display()),
        b"paste-line-1\npaste-line-2\n\x04",
    );
    assert!(status.success(), "{status:?}: {shown}");
    assert!(
        !shown.contains("paste-line"),
        "the value was echoed: {shown:?}"
    );
    let token = w.agent("tty", "tty/*", "15m");
    assert_eq!(
        w.get("tty/pasted", &token).ok().stdout,
        "paste-line-1\npaste-line-2"
    );
    // Ctrl-C half-way: nothing stored, and the terminal echoes again.
    let (_, shown) = at_terminal(
        &w,
        // The shell catches SIGINT (its command gets it as usual) and
        // goes on to show the terminal's flags.
        &format!(
            "trap true INT; {} secret put tty/cancelled; stty -a",
            bin.display()
        ),
        b"half-typed\x03",
    );
    assert!(shown.contains("interrupted"), "{shown}");
    let flags: Vec<&str> = shown.split_whitespace().collect();
    assert!(
        flags.contains(&"echo") && !flags.contains(&"-echo"),
        "{shown}"
    );
    w.get("tty/cancelled", &token).fails_with(3);
}

#[test]
fn bad_input_gets_precise_status_and_keeps_data() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&["--max-value-size", "1024"]);
    w.put("openai/prod", b"v1");
    let token = w.agent("bot", "openai/*", "15m");

    // Malformed names: INVALID_ARGUMENT naming the field (exit 7).
    for bad in ["", "/x", "a//b", "a b", "x/", "ü"] {
        let r = w
            .run_with(&["secret", "put", bad], Some(b"v"), &[])
            .fails_with(7);
        assert!(r.stderr.contains("invalid name"), "{r:#?}");
    }
    // Empty and oversized values.
    let r = w
        .run_with(&["secret", "put", "x"], Some(b""), &[])
        .fails_with(7);
    assert!(
        r.stderr.contains("invalid value") && r.stderr.contains("empty"),
        "{r:#?}"
    );
    let r = w
        .run_with(&["secret", "put", "x"], Some(&[b'a'; 2000]), &[])
        .fails_with(7);
    assert!(r.stderr.contains("over the limit of 1024"), "{r:#?}");
    // Too large for one gRPC message at all: refused before it is sent.
    let r = w
        .run_with(&["secret", "put", "x"], Some(&vec![b'a'; 1 << 20]), &[])
        .fails_with(7);
    assert!(r.stderr.contains("stores at most"), "{r:#?}");
    // Bad agent definitions.
    let r = w
        .run(&["agent", "create", "Bad Name", "--allow", "x"])
        .fails_with(7);
    assert!(r.stderr.contains("invalid name"), "{r:#?}");
    let r = w
        .run(&["agent", "create", "a2", "--allow", "x", "--max-ttl", "90d"])
        .fails_with(7);
    assert!(r.stderr.contains("invalid max_ttl"), "{r:#?}");
    let r = w.run(&["agent", "create", "a3", "--allow", "x", "--max-ttl", "soon"]);
    assert_eq!(r.code, 2, "{r:#?}");
    // Unknown secret: NOT_FOUND (exit 3).
    let r = w.get("openai/none", &token).fails_with(3);
    assert!(r.stderr.contains("no secret named"), "{r:#?}");
    // Outside the allow list: PERMISSION_DENIED naming the rule (exit 4).
    w.put("stripe/live", b"sk_live");
    let r = w.get("stripe/live", &token).fails_with(4);
    assert!(
        r.stderr.contains("openai/*") && r.stderr.contains("PermissionDenied"),
        "{r:#?}"
    );
    // Wrong token: UNAUTHENTICATED (exit 4).
    let r = w.get("openai/prod", "tsr_0000").fails_with(4);
    assert!(r.stderr.contains("Unauthenticated"), "{r:#?}");
    let r = w.run(&["get", "openai/prod"]).fails_with(4);
    assert!(r.stderr.contains("TESSERA_TOKEN"), "{r:#?}");
    // Wrong admin token.
    let r = w
        .run_with(
            &["secret", "list"],
            None,
            &[("TESSERA_ADMIN_TOKEN", "tsa_nope")],
        )
        .fails_with(4);
    assert!(r.stderr.contains("admin credential is not valid"), "{r:#?}");

    // Nothing above changed what is stored.
    assert_eq!(w.get("openai/prod", &token).ok().stdout, "v1");
    let list = w.run(&["secret", "list", "--json"]).ok().json();
    let names: Vec<_> = list["secrets"]
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["openai/prod", "stripe/live"]);

    // Revoked token: UNAUTHENTICATED, and its leases are gone.
    let r = w.run(&["agent", "revoke", "bot", "--json"]).ok();
    assert_eq!(r.json()["leases_revoked"], 1);
    let r = w.get("openai/prod", &token).fails_with(4);
    assert!(r.stderr.contains("revoked"), "{r:#?}");
    w.run(&["audit", "verify"]).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_rules_expired_and_revoked_leases() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&["--sweep-interval", "200ms"]);
    w.put("svc/key", b"value-1");
    let token = w.agent("short", "svc/*", "1s");
    let mut c = w.broker_client().await;
    let issue = |ttl| proto::IssueRequest {
        secret: "svc/key".into(),
        ttl_seconds: ttl,
    };
    // TTL is capped at the agent's max.
    let l = c
        .issue(authed(issue(3600), &token))
        .await
        .expect("issue")
        .into_inner();
    assert_eq!(l.value, b"value-1");
    assert!(l.expires_at - l.issued_at <= 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let e = c
        .renew(authed(
            proto::RenewRequest {
                lease_id: l.lease_id.clone(),
                ttl_seconds: 1,
            },
            &token,
        ))
        .await
        .expect_err("expired lease renewed");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("expired"), "{e:?}");
    // The sweeper marked it expired.
    let leases = w.run(&["lease", "list", "--all", "--json"]).ok().json();
    assert_eq!(leases["leases"][0]["state"], "expired");

    let l2 = c
        .issue(authed(issue(0), &token))
        .await
        .expect("issue")
        .into_inner();
    let r = c
        .revoke(authed(
            proto::RevokeRequest {
                lease_id: l2.lease_id.clone(),
            },
            &token,
        ))
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(r.revoked, 1);
    let e = c
        .renew(authed(
            proto::RenewRequest {
                lease_id: l2.lease_id.clone(),
                ttl_seconds: 1,
            },
            &token,
        ))
        .await
        .expect_err("revoked lease renewed");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("revoked"), "{e:?}");
    let renew = |lease_id: &str| {
        let mut c = c.clone();
        let req = authed(
            proto::RenewRequest {
                lease_id: lease_id.into(),
                ttl_seconds: 1,
            },
            &token,
        );
        async move { c.renew(req).await.expect_err("renewed") }
    };
    // An empty value, which the CLI refuses before sending, is refused by
    // the broker too.
    let e = w
        .admin_client()
        .await
        .put_secret(authed(
            proto::PutSecretRequest {
                name: "openai/empty".into(),
                value: Vec::new(),
            },
            &w.admin_token(),
        ))
        .await
        .expect_err("empty value stored");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("empty"), "{e:?}");
    let e = renew("lse_00000000000000000000000000000000").await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = renew("lse_nope").await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("lease_id"), "{e:?}");
    // What a caller sends before any token is checked is audited cut short,
    // control characters escaped: nobody fills the trail or puts terminal
    // escapes in the export.
    let huge = format!("\x1b[31m{}", "a".repeat(500_000));
    let e = c
        .issue(proto::IssueRequest {
            secret: huge,
            ttl_seconds: 0,
        })
        .await
        .expect_err("issued without a token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let export = w.run(&["audit", "export"]).ok().stdout;
    let last = export
        .lines()
        .rfind(|l| l.contains(r#""action":"lease.issue""#))
        .expect("the refused Issue's record");
    assert!(last.len() < 4096, "{} bytes", last.len());
    assert!(last.contains("\\u{1b}[31maaa"), "{last}");
    assert!(!last.contains('\x1b'), "{last}");
    w.run(&["audit", "verify"]).ok();
    let e = c
        .issue(authed(
            proto::IssueRequest {
                secret: "bad name".into(),
                ttl_seconds: 0,
            },
            &token,
        ))
        .await
        .expect_err("bad name issued");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("invalid secret"), "{e:?}");
}

#[test]
fn lease_revoke_by_lease_secret_agent_and_all() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("a/one", b"1");
    w.put("a/two", b"2");
    let t1 = w.agent("one", "a/*", "15m");
    let t2 = w.agent("two", "a/*", "15m");
    for t in [&t1, &t2] {
        w.get("a/one", t).ok();
        w.get("a/two", t).ok();
    }
    let list = w
        .run(&[
            "lease", "list", "--agent", "one", "--secret", "a/one", "--json",
        ])
        .ok()
        .json();
    let id = list["leases"][0]["lease_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(
        w.run(&["lease", "revoke", "--lease", &id, "--json"])
            .ok()
            .json()["revoked"],
        1
    );
    assert_eq!(
        w.run(&["lease", "revoke", "--secret", "a/two", "--json"])
            .ok()
            .json()["revoked"],
        2
    );
    assert_eq!(
        w.run(&["lease", "revoke", "--agent", "two", "--json"])
            .ok()
            .json()["revoked"],
        1
    );
    w.get("a/one", &t1).ok();
    assert_eq!(
        w.run(&["lease", "revoke", "--all", "--json"]).ok().json()["revoked"],
        1
    );
    let r = w
        .run(&[
            "lease",
            "revoke",
            "--lease",
            "lse_0000000000000000000000000000abcd",
        ])
        .fails_with(3);
    assert!(r.stderr.contains("no lease"), "{r:#?}");
    let r = w
        .run(&["lease", "revoke", "--lease", "lse_missing"])
        .fails_with(7);
    assert!(r.stderr.contains("invalid lease_id"), "{r:#?}");
    // Nor is a mistyped agent name "no leases".
    let r = w.run(&["lease", "list", "--agent", "nosuch"]).fails_with(3);
    assert!(r.stderr.contains("no agent named"), "{r:#?}");
    // A mistyped secret name is not "0 leases revoked".
    let r = w
        .run(&["lease", "revoke", "--secret", "a/mistyped"])
        .fails_with(3);
    assert!(r.stderr.contains("no secret named"), "{r:#?}");
    w.run(&["lease", "revoke"]).fails_with(2);
    // With --json, a usage error is a JSON document on stderr too.
    let r = w.run(&["lease", "revoke", "--json"]).fails_with(2);
    let doc: serde_json::Value = serde_json::from_str(r.stderr.trim()).expect("JSON error");
    assert_eq!(doc["error"]["exit"], 2, "{r:#?}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--lease")),
        "{r:#?}"
    );
    // secret rm revokes and deletes.
    w.get("a/one", &t1).ok();
    let r = w.run(&["secret", "rm", "a/one", "--json"]).ok().json();
    assert_eq!(r["leases_revoked"], 1);
    w.get("a/one", &t1).fails_with(3);
    w.run(&["secret", "rm", "a/one"]).fails_with(3);
}

/// One agent cannot fill the store with leases: past the cap its `Issue`
/// is refused, audited, until a revoke or an expiry frees a place; other
/// agents are not affected, and the count survives a restart.
#[test]
fn one_agent_cannot_hold_leases_without_end() {
    let w = World::new();
    w.init_passphrase();
    let serve = || w.serve(&["--max-leases-per-agent", "3"]);
    let mut s = serve();
    w.put("a/one", b"1");
    let gw = w.agent("gw", "a/*", "15m");
    let bot = w.agent("bot", "a/*", "15m");
    let short = w.agent("short", "a/*", "2s");
    let full = |token: &str| {
        let r = w.get("a/one", token).fails_with(1);
        assert!(
            r.stderr.contains("holds 3 unexpired leases")
                && r.stderr.contains("--max-leases-per-agent"),
            "{r:#?}"
        );
    };
    for _ in 0..3 {
        w.get("a/one", &gw).ok();
    }
    full(&gw);
    // Asked again at the cap: still refused (from what the writer knows).
    full(&gw);
    w.get("a/one", &bot).ok();
    // A revoke frees a place, and only one.
    let list = w
        .run(&["lease", "list", "--agent", "gw", "--json"])
        .ok()
        .json();
    let id = list["leases"][0]["lease_id"]
        .as_str()
        .expect("id")
        .to_string();
    w.run(&["lease", "revoke", "--lease", &id]).ok();
    w.get("a/one", &gw).ok();
    full(&gw);
    // The broker counts again from the store after a restart.
    assert_eq!(s.terminate(), 0, "log:\n{}", s.logs());
    let _s = serve();
    full(&gw);
    // A watcher at the cap still follows a new value: the lease it
    // replaces frees the place.
    let watcher = w.agent("watcher", "a/*", "15m");
    for _ in 0..2 {
        w.get("a/one", &watcher).ok();
    }
    let out = w.tmp.path().join("watch.out");
    let mut watch = w
        .command()
        .args(["get", "a/one", "--watch"])
        .env("TESSERA_TOKEN", &watcher)
        .stdout(std::fs::File::create(&out).expect("out"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn get --watch");
    let mut printed = |want: &str| {
        let start = std::time::Instant::now();
        while std::fs::read_to_string(&out).unwrap_or_default() != want {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "get --watch printed {:?}, exited {:?}",
                std::fs::read_to_string(&out),
                watch.try_wait()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    printed("1\n");
    w.put("a/one", b"2");
    printed("1\n2\n");
    tessera_e2e::signal_term(watch.id()).expect("SIGTERM");
    assert!(watch.wait().expect("wait").success());
    // Expiry frees places too, before any sweep has to run.
    for _ in 0..3 {
        w.run_with(
            &["get", "a/one", "--ttl", "1s"],
            None,
            &[("TESSERA_TOKEN", &short)],
        )
        .ok();
    }
    full(&short);
    let start = std::time::Instant::now();
    while w.get("a/one", &short).code != 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "no place freed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let audit = w.run(&["audit", "export"]).ok().stdout;
    let refused = audit
        .lines()
        .filter(|l| l.contains("lease.issue") && l.contains("unexpired leases"))
        .count();
    assert!(refused >= 5, "refusals not audited:\n{audit}");
}

/// `backup` copies the live store to a new private file; `restore` puts it
/// back while no broker serves, keeping the store it replaces, and the
/// next broker serves the store as it was (audited). A file that is not a
/// tessera store, or is another store's, is refused and changes nothing.
#[test]
fn backup_and_restore_bring_the_store_back_to_one_instant() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    w.put("a/one", b"first");
    let gw = w.agent("gw", "a/*", "15m");
    let out = w.tmp.path().join("b1.db");
    let out_s = out.to_str().expect("path");
    let b = w.run(&["backup", "--out", out_s, "--json"]).ok().json();
    assert!(b["bytes"].as_u64().is_some_and(|n| n > 0), "{b}");
    let mode = std::fs::metadata(&out)
        .expect("backup")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let r = w.run(&["backup", "--out", out_s]).fails_with(5);
    assert!(r.stderr.contains("already exists"), "{r:#?}");
    let out2 = w.tmp.path().join("b2.db");
    std::fs::write(w.tmp.path().join("b2.db.partial"), b"").expect("partial");
    let r = w
        .run(&["backup", "--out", out2.to_str().expect("path")])
        .fails_with(5);
    assert!(r.stderr.contains("interrupted backup"), "{r:#?}");
    assert!(!out2.exists());
    // After the backup: a new value and a new agent.
    w.put("a/one", b"second");
    w.agent("late", "a/*", "15m");
    let r = w.run(&["restore", out_s]).fails_with(5);
    assert!(r.stderr.contains("stop it before restoring"), "{r:#?}");
    assert_eq!(s.terminate(), 0, "log:\n{}", s.logs());
    // An offline `rotate --due` (any process with the store open) holds
    // the open lock shared: a restore waits for no one and is refused.
    let ready = w.tmp.path().join("ready");
    let mut holder = std::process::Command::new("flock")
        // -o: the lock stays with flock, which the test kills.
        .args(["-s", "-o"])
        .arg(w.db().with_file_name("open.lock"))
        .arg("-c")
        .arg(format!("touch {}; sleep 60", ready.display()))
        .spawn()
        .expect("flock");
    while !ready.exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = w.run(&["restore", out_s]).fails_with(5);
    assert!(r.stderr.contains("another process has the store"), "{r:#?}");
    holder.kill().expect("kill flock");
    holder.wait().expect("reap flock");
    let junk = w.tmp.path().join("junk.db");
    std::fs::write(
        &junk,
        b"not a database at all, but long enough to look like one",
    )
    .expect("write junk");
    let r = w
        .run(&["restore", junk.to_str().expect("path")])
        .fails_with(7);
    assert!(r.stderr.contains("is not a tessera store"), "{r:#?}");
    // Another store's backup.
    let other = World::new();
    other.init_passphrase();
    let theirs = w.tmp.path().join("theirs.db");
    {
        let _o = other.serve(&[]);
        other
            .run(&["backup", "--out", theirs.to_str().expect("path")])
            .ok();
    }
    let r = w
        .run(&["restore", theirs.to_str().expect("path")])
        .fails_with(5);
    assert!(r.stderr.contains("a backup of another store"), "{r:#?}");
    let r = w.run(&["restore", out_s, "--json"]).ok().json();
    let kept = r["kept"].as_str().expect("kept").to_string();
    assert!(Path::new(&kept).exists(), "{r}");
    let mode = std::fs::metadata(w.db()).expect("db").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut s = w.serve(&[]);
    assert_eq!(w.get("a/one", &gw).ok().stdout, "first");
    let agents = w.run(&["agent", "list"]).ok().stdout;
    assert!(
        agents.contains("gw") && !agents.contains("late"),
        "{agents}"
    );
    w.run(&["audit", "verify"]).ok();
    let audit = w.run(&["audit", "export"]).ok().stdout;
    assert!(
        audit.contains("store.restore") && audit.contains("store.backup"),
        "{audit}"
    );
    assert!(s.logs().contains("restored from a backup"), "{}", s.logs());
    // After `rekey root` the backup opens with no key the store has.
    w.run_with(
        &["rekey", "root"],
        None,
        &[("TESSERA_PASSPHRASE", tessera_e2e::PASSPHRASE)],
    )
    .ok();
    assert_eq!(s.terminate(), 0, "log:\n{}", s.logs());
    let r = w.run(&["restore", out_s]).fails_with(5);
    assert!(r.stderr.contains("another root key"), "{r:#?}");
    let db = w.db();
    let r = w
        .run(&["restore", db.to_str().expect("path")])
        .fails_with(7);
    assert!(r.stderr.contains("is the store itself"), "{r:#?}");
    let r = w.run(&["restore", "/nonexistent/b.db"]).fails_with(3);
    assert!(r.stderr.contains("does not exist"), "{r:#?}");
    // Into a data directory that does not exist yet: made private.
    let fresh = w.tmp.path().join("fresh");
    let fresh_s = fresh.to_str().expect("path");
    w.run(&["--data-dir", fresh_s, "restore", out_s]).ok();
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&fresh.join("tessera.db")), 0o600);
    let left: Vec<_> = std::fs::read_dir(&fresh)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("restoring"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Calls without a valid token cannot fill the audit trail: past the first
/// 100 in a 10 s window they are refused the same way and counted, and one
/// `auth.refused` record per window says how many; every call is in one
/// or the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_without_a_valid_token_is_counted_not_recorded_one_by_one() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("a/one", b"1");
    const CALLS: u64 = 400;
    let c = w.broker_client().await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let mut c = c.clone();
        let token = format!("tsr_bogus{i}");
        calls.spawn(async move {
            let req = proto::IssueRequest {
                secret: "a/one".into(),
                ttl_seconds: 0,
            };
            c.issue(authed(req, &token)).await
        });
    }
    while let Some(r) = calls.join_next().await {
        let r = r.expect("call task");
        assert_eq!(r.expect_err("refused").code(), Code::Unauthenticated);
    }
    let start = std::time::Instant::now();
    let (one_by_one, counted) = loop {
        let export = w.run(&["audit", "export"]).ok().stdout;
        let records: Vec<serde_json::Value> = export
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        let one_by_one = records
            .iter()
            .filter(|r| r["action"] == "lease.issue" && r["decision"] == "deny")
            .count() as u64;
        let counted: u64 = records
            .iter()
            .filter(|r| r["action"] == "auth.refused")
            .map(|r| {
                let reason = r["reason"].as_str().expect("reason");
                reason
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .expect("a count")
            })
            .sum();
        if one_by_one + counted == CALLS {
            break (one_by_one, counted);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{one_by_one} recorded and {counted} counted of {CALLS}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(one_by_one < CALLS && counted > 0, "{one_by_one} {counted}");
    w.run(&["audit", "verify"]).ok();
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    w.put("x/y", b"z");
    assert_eq!(s.terminate(), 0, "log:\n{}", s.logs());
    assert!(!w.socket().exists(), "socket left behind");
    assert!(s.logs().contains("stopped"));
    // It starts again on the same store, over a stale socket too.
    std::os::unix::net::UnixListener::bind(w.socket()).expect("stale socket");
    let _s2 = w.serve(&[]);
    w.run(&["status"]).ok();
}

#[test]
fn a_second_broker_on_the_same_store_or_socket_is_refused() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let pass = [("TESSERA_PASSPHRASE", PASSPHRASE)];
    // The same store, on its socket or on another one.
    let r = w.run_with(&["serve"], None, &pass).fails_with(5);
    assert!(r.stderr.contains("already serving the store"), "{r:#?}");
    let other = w.tmp.path().join("other.sock");
    let other = other.to_str().expect("utf-8");
    let r = w
        .run_with(&["serve", "--socket", other], None, &pass)
        .fails_with(5);
    assert!(r.stderr.contains("already serving the store"), "{r:#?}");
    assert!(!Path::new(other).exists(), "it bound nothing");
    // Another store on the first one's socket.
    let v = World::new();
    v.init_passphrase();
    let serve_on = |path: &Path| {
        v.run_with(
            &["serve", "--socket", path.to_str().expect("utf-8")],
            None,
            &pass,
        )
    };
    let r = serve_on(&w.socket()).fails_with(5);
    assert!(r.stderr.contains("already listening"), "{r:#?}");
    w.run(&["status"]).ok();
    // A --socket path that holds anything but a socket is never replaced.
    let file = v.tmp.path().join("notes.txt");
    std::fs::write(&file, "precious").expect("file");
    let r = serve_on(&file).fails_with(7);
    assert!(r.stderr.contains("is not a socket"), "{r:#?}");
    assert_eq!(std::fs::read_to_string(&file).expect("kept"), "precious");
}

#[test]
fn tcp_listen_rules() {
    let w = World::new();
    w.init_passphrase();
    let r = w
        .run_with(
            &["serve", "--listen", "0.0.0.0:0"],
            None,
            &[("TESSERA_PASSPHRASE", PASSPHRASE)],
        )
        .fails_with(7);
    assert!(r.stderr.contains("not a loopback address"), "{r:#?}");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let listen = format!("127.0.0.1:{port}");
    let _s = w.serve(&["--listen", &listen]);
    let addr = format!("http://127.0.0.1:{port}");
    let r = w.run(&["status", "--json", "--addr", &addr]).ok();
    assert_eq!(r.json()["sealed"], false);
}

/// `agent create --uid`: the token is accepted only from that Unix user
/// over the Unix socket (the kernel's peer credentials), refused from
/// another uid and over TCP; the binding is shown, audited, and covered by
/// the row's MAC.
#[test]
fn a_token_bound_to_a_uid_works_only_from_that_user_on_the_socket() {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self").expect("own uid").uid();
    let w = World::new();
    w.init_passphrase();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let _s = w.serve(&["--listen", &format!("127.0.0.1:{port}")]);
    w.put("svc/key", b"bound-value");
    let create = |name: &str, uid: u32| {
        let r = w
            .run(&[
                "agent",
                "create",
                name,
                "--allow",
                "svc/*",
                "--uid",
                &uid.to_string(),
                "--json",
            ])
            .ok();
        let v = r.json();
        assert_eq!(v["peer_uid"], uid, "{r:#?}");
        v["token"].as_str().expect("token").to_string()
    };
    let mine = create("mine", me);
    let other = create("other", me + 1);
    assert_eq!(w.get("svc/key", &mine).ok().stdout, "bound-value");
    let r = w.get("svc/key", &other).fails_with(4);
    assert!(
        r.stderr.contains(&format!(
            "is bound to Unix uid {}, but this request came from uid {me}",
            me + 1
        )),
        "{r:#?}"
    );
    let tcp = format!("http://127.0.0.1:{port}");
    let r = w
        .run_with(
            &["get", "svc/key", "--addr", &tcp],
            None,
            &[("TESSERA_TOKEN", mine.as_str())],
        )
        .fails_with(4);
    assert!(r.stderr.contains("came over TCP"), "{r:#?}");
    assert!(!r.stdout.contains("bound-value"), "{r:#?}");
    let r = w
        .run(&[
            "agent",
            "create",
            "nobody-here",
            "--allow",
            "svc/*",
            "--uid",
            "no-such-user-x",
        ])
        .fails_with(2);
    assert!(r.stderr.contains("no Unix user"), "{r:#?}");
    let list = w.run(&["agent", "list"]).ok().stdout;
    assert!(
        list.lines()
            .any(|l| l.starts_with("mine ") && l.contains(&format!(" {me}  svc/*"))),
        "{list}"
    );
    let audit = w.run(&["audit", "export"]).ok().stdout;
    assert!(
        audit.contains(&format!("bound to uid {}", me + 1)),
        "{audit}"
    );
    // A binding lifted in the file is an edit outside tessera: refused
    // (the cached agent is compared with its row), then by the row's MAC.
    rusqlite::Connection::open(w.db())
        .expect("open db")
        .execute("UPDATE agents SET peer_uid = NULL WHERE name = 'mine'", [])
        .expect("edit");
    let r = w.get("svc/key", &mine).fails_with(9);
    assert!(r.stderr.contains("failed authentication"), "{r:#?}");
    let r = w.get("svc/key", &mine).fails_with(9);
    assert!(r.stderr.contains("failed authentication"), "{r:#?}");
}

/// A broker whose stderr cannot be written (a full disk under its log
/// file) loses its log lines but keeps serving, and stops cleanly.
#[test]
fn a_broker_whose_log_cannot_be_written_keeps_serving() {
    let w = World::new();
    w.init_passphrase();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let mut child = w
        .command()
        .arg("serve")
        .env("TESSERA_PASSPHRASE", tessera_e2e::PASSPHRASE)
        .env("TESSERA_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(full)
        .spawn()
        .expect("spawn tessera serve");
    // No log line to wait for: wait until it answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while w.run(&["status"]).code != 0 {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "tessera serve exited"
        );
        assert!(std::time::Instant::now() < deadline, "never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.put("a/one", b"logged-nowhere");
    let token = w.agent("app", "a/*", "15m");
    assert_eq!(w.get("a/one", &token).ok().stdout, "logged-nowhere");
    tessera_e2e::signal_term(child.id()).expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(!w.socket().exists(), "the socket was left behind");
}

/// Calls the CLI would never make get a precise status too: a body that is
/// not the method's message, several credentials, the wrong kind of token,
/// an allow list too long to state in a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_get_precise_statuses() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("a/one", b"value-one");
    let token = w.agent("bot", "a/*", "15m");
    // Another method's message (a bytes field where Issue has a number).
    let mut g = tonic::client::Grpc::new(w.channel().await);
    g.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<proto::PutSecretRequest, proto::Lease>::default();
    let wrong = g
        .unary(
            authed(
                proto::PutSecretRequest {
                    name: "a/one".into(),
                    value: b"not a ttl".to_vec(),
                },
                &token,
            ),
            tonic::codegen::http::uri::PathAndQuery::from_static("/tessera.v1.Broker/Issue"),
            codec,
        )
        .await
        .expect_err("decoded");
    assert_eq!(wrong.code(), Code::InvalidArgument, "{wrong:?}");
    assert!(
        wrong.message().contains("could not be decoded"),
        "{wrong:?}"
    );
    // Two credentials: neither counts.
    let mut c = w.broker_client().await;
    let issue = || proto::IssueRequest {
        secret: "a/one".into(),
        ttl_seconds: 60,
    };
    let mut twice = authed(issue(), &token);
    twice.metadata_mut().append(
        "authorization",
        format!("Bearer {}", w.admin_token())
            .parse()
            .expect("header"),
    );
    let e = c.issue(twice).await.expect_err("two credentials");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("several authorization headers"),
        "{e:?}"
    );
    // The admin credential on an agent call, an agent token on an admin one.
    let e = c
        .issue(authed(issue(), &w.admin_token()))
        .await
        .expect_err("admin token issued");
    assert!(
        e.message().contains("this is the admin credential"),
        "{e:?}"
    );
    let r = w
        .run_with(
            &["secret", "list"],
            None,
            &[("TESSERA_ADMIN_TOKEN", token.as_str())],
        )
        .fails_with(4);
    assert!(r.stderr.contains("this is an agent token"), "{r:#?}");
    // At most 256 allow patterns; a refusal names the first few.
    let many: Vec<String> = (0..257).map(|i| format!("p{i}/*")).collect();
    let mut args = vec!["agent", "create", "greedy"];
    for p in &many {
        args.extend(["--allow", p.as_str()]);
    }
    let r = w.run(&args).fails_with(7);
    assert!(r.stderr.contains("more than the 256"), "{r:#?}");
    let mut args = vec!["agent", "create", "wide"];
    for p in &many[..20] {
        args.extend(["--allow", p.as_str()]);
    }
    args.push("--json");
    let wide = w.run(&args).ok().json()["token"]
        .as_str()
        .expect("token")
        .to_string();
    let r = w.get("a/one", &wide).fails_with(4);
    assert!(r.stderr.contains("p7/* and 12 more"), "{r:#?}");
    assert!(!r.stderr.contains("p8/*"), "{r:#?}");
}

#[test]
fn demo_walks_through_the_main_job() {
    let w = World::new();
    let r = w.run(&["demo"]).ok();
    for expect in [
        "PermissionDenied",
        "FailedPrecondition",
        "intact",
        "under legal hold",
        "ceremony done",
        "was shredded",
        "certificate valid",
        "Watch: secret.rotated openai/prod version 2",
        "the old lease still renews",
        "version 1: retired",
        "reaching the checkpoint",
    ] {
        assert!(
            r.stdout.contains(expect),
            "demo output lacks {expect}: {r:#?}"
        );
    }
    assert!(
        !r.stdout.contains("sk-demo-0123456789abcdef"),
        "demo printed the secret value"
    );
    // With --json, stdout is one JSON document; the narration goes to stderr.
    let r = w.run(&["demo", "--json"]).ok();
    assert_eq!(r.json()["ok"], true, "{r:#?}");
    assert!(r.stderr.contains("certificate valid"), "{r:#?}");
    // Stopped half-way (SIGTERM), it still removes its temporary store.
    let tmp = w.tmp.path().join("demo-tmp");
    std::fs::create_dir(&tmp).expect("tmp");
    let out = w.tmp.path().join("demo.out");
    let mut demo = w
        .command()
        .arg("demo")
        .env("TMPDIR", &tmp)
        .stdout(std::fs::File::create(&out).expect("out"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("demo");
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("[3]")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "demo did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    tessera_e2e::signal_term(demo.id()).expect("term");
    assert_eq!(demo.wait().expect("demo").code(), Some(1));
    let left: Vec<_> = std::fs::read_dir(&tmp).expect("tmp").collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_answers() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let ch = w.channel().await;
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tessera.v1.Broker".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// `audit export --since TIME` and `--from-seq N` select by time and by
/// sequence; reads such as `status` and malformed selectors are recorded.
#[test]
fn audit_export_selects_by_time_and_sequence() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("a/early", b"1");
    w.run(&["status"]).ok();
    let lines = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["audit", "export"];
        all.extend_from_slice(args);
        w.run(&all)
            .ok()
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    };
    let before = lines(&[]);
    assert!(
        before
            .iter()
            .any(|r| r["action"] == "status" && r["decision"] == "allow"),
        "status is not audited: {before:#?}"
    );
    // A reader that stops early (`| head`; here, before the first line)
    // ends the export, or any command's output, quietly.
    let closed_stdout = |args: &[&str]| {
        let mut early = w
            .command()
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn tessera");
        drop(early.stdout.take());
        early.wait_with_output().expect("wait")
    };
    for args in [
        &["audit", "export"][..],
        &["status"],
        &["secret", "list", "--json"],
        &["lease", "list"],
    ] {
        let out = closed_stdout(args);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{args:?}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // What is shown only once (an agent's token) is not lost quietly: the
    // agent nobody saw the token of is revoked. Also with stdout on
    // /dev/null, or closed (`>&-`, which Rust's runtime turns into
    // /dev/null).
    let out = closed_stdout(&["agent", "create", "unseen", "--allow", "a/*"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("agent unseen was revoked"), "{err}");
    let out = w
        .command()
        .args(["agent", "create", "unseen2", "--allow", "a/*", "--json"])
        .stdout(std::process::Stdio::from(
            std::fs::File::open("/dev/null").expect("null"),
        ))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("agent unseen2 was revoked"), "{err}");
    let sh = format!(
        "exec {} agent create unseen3 --allow 'a/*' >&-",
        tessera_e2e::bin().display()
    );
    let cli = w.command();
    let out = std::process::Command::new("sh")
        .args(["-c", &sh])
        .env_clear()
        .envs(cli.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .output()
        .expect("sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("agent unseen3 was revoked"), "{err}");
    // A full disk under stdout: the same, and a listing fails (exit 1).
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full")
    };
    let out = w
        .command()
        .args(["agent", "create", "unseen4", "--allow", "a/*"])
        .stdout(full())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("could not be written") && err.contains("agent unseen4 was revoked"),
        "{err}"
    );
    let out = w
        .command()
        .args(["agent", "list"])
        .stdout(full())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write stdout"), "{err}");
    let agents = w.run(&["agent", "list", "--json"]).ok().json();
    for name in ["unseen", "unseen2", "unseen3", "unseen4"] {
        let a = agents["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .find(|a| a["name"] == name)
            .expect("listed")
            .clone();
        assert!(a["revoked_at"].as_i64().is_some(), "{name}: {a}");
    }
    let last_ts = before.iter().map(|r| r["ts"].as_i64().expect("ts")).max();
    // Records carry whole seconds: the next ones land in a later second.
    std::thread::sleep(Duration::from_millis(1100));
    w.put("a/late", b"2");
    let r = w
        .run(&["lease", "list", "--secret", "not a name!"])
        .fails_with(7);
    assert!(r.stderr.contains("secret"), "{r:#?}");
    let r = w
        .run(&["lease", "revoke", "--agent", "Not An Agent"])
        .fails_with(7);
    assert!(r.stderr.contains("agent"), "{r:#?}");
    let all = lines(&[]);
    let first_late = all
        .iter()
        .find(|r| r["ts"].as_i64() > last_ts)
        .expect("a later record");
    let since = first_late["time"].as_str().expect("time").to_string();
    let late = lines(&["--since", &since]);
    assert_eq!(late.first(), Some(first_late));
    assert!(late.iter().all(|r| r["ts"].as_i64() > last_ts), "{late:#?}");
    assert!(late.iter().any(|r| r["target"] == "a/late"));
    assert!(!late.iter().any(|r| r["target"] == "a/early"));
    for (action, target) in [("lease.list", "*"), ("lease.revoke", "Not An Agent")] {
        assert!(
            late.iter()
                .any(|r| r["action"] == action && r["target"] == target && r["decision"] == "deny"),
            "no denial recorded for {action}: {late:#?}"
        );
    }
    let seq = first_late["seq"].as_u64().expect("seq");
    let from = lines(&["--from-seq", &seq.to_string()]);
    assert_eq!(from.first().and_then(|r| r["seq"].as_u64()), Some(seq));
    // Everything from `seq` on, in order (plus what the exports themselves
    // appended since).
    let tail: Vec<_> = all
        .iter()
        .filter(|r| r["seq"].as_u64() >= Some(seq))
        .collect();
    assert!(from.len() > tail.len());
    assert!(from.iter().zip(&tail).all(|(a, b)| a == *b));
    w.run(&["audit", "export", "--since", "yesterday"])
        .fails_with(2);
}

/// `--max-value-size` must fit in one gRPC message; 0 is refused too.
#[test]
fn serve_refuses_an_unusable_value_size_limit() {
    let w = World::new();
    w.init_passphrase();
    // Sweeps carry scheduled rotations and ceremony deadlines: at most 1h.
    for (flag, value, says) in [
        ("--max-value-size", "0", "--max-value-size"),
        ("--max-value-size", "2000000", "--max-value-size"),
        ("--sweep-interval", "0s", "--sweep-interval"),
        ("--sweep-interval", "2h", "at most 1h"),
        ("--lease-history", "500ms", "--lease-history"),
    ] {
        let r = w
            .run_with(
                &["serve", flag, value],
                None,
                &[("TESSERA_PASSPHRASE", PASSPHRASE)],
            )
            .fails_with(7);
        assert!(r.stderr.contains(says), "{r:#?}");
    }
    // The largest allowed limit works end to end.
    let max = tessera_broker::server::MAX_VALUE_SIZE.to_string();
    let _s = w.serve(&["--max-value-size", &max]);
    let big = vec![b'v'; tessera_broker::server::MAX_VALUE_SIZE];
    w.run_with(&["secret", "put", "big/one"], Some(&big), &[])
        .ok();
    let token = w.agent("big", "big/*", "15m");
    assert_eq!(w.get("big/one", &token).ok().stdout.len(), big.len());
}

/// `--socket-mode 660` opens the socket to the group, and a socket outside
/// the data directory is created with the mode asked for.
#[test]
fn socket_mode_660_and_a_socket_elsewhere() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    w.init_passphrase();
    let elsewhere = tempfile::tempdir().expect("dir");
    let sock = elsewhere.path().join("t.sock");
    let sock_arg = sock.display().to_string();
    let s = w.serve(&["--socket", &sock_arg, "--socket-mode", "660"]);
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    drop(s);
    let _s = w.serve(&["--socket", &sock_arg]);
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let addr = format!("unix://{sock_arg}");
    w.run_with(&["status"], None, &[("TESSERA_ADDR", &addr)])
        .ok();
}

/// A token made with `--expires-in` works until then, its leases end by
/// then, and afterwards it is refused (UNAUTHENTICATED, exit 4, audited)
/// while the store keeps what it had.
#[test]
fn expiring_agent_token_caps_its_leases_then_is_refused() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("a/key", b"v1");
    let created = w
        .run(&[
            "agent",
            "create",
            "brief",
            "--allow",
            "a/*",
            "--max-ttl",
            "1h",
            "--expires-in",
            "8s",
            "--json",
        ])
        .ok()
        .json();
    let token = created["token"].as_str().expect("token").to_string();
    let expires = created["expires_at"].as_i64().expect("expires_at");
    let env = [("TESSERA_TOKEN", token.as_str())];
    let lease = w
        .run_with(&["get", "a/key", "--json"], None, &env)
        .ok()
        .json();
    assert_eq!(lease["value"], "v1");
    assert!(lease["expires_at"].as_i64() <= Some(expires), "{lease:#?}");
    assert!(lease["renewable_until"].as_i64() <= Some(expires));
    // Out-of-range lifetimes are refused up front (by the broker, and
    // zero already by the CLI).
    for (life, field) in [("20y", "expires_in"), ("0s", "--expires-in")] {
        let args = [
            "agent",
            "create",
            "x",
            "--allow",
            "a/*",
            "--expires-in",
            life,
        ];
        let r = w.run(&args).fails_with(7);
        assert!(r.stderr.contains(field), "{r:#?}");
    }
    // Ten years (`10y`, 365.25 days each) is within the limit.
    w.run(&[
        "agent",
        "create",
        "decade",
        "--allow",
        "a/*",
        "--expires-in",
        "10y",
    ])
    .ok();
    // Zero and sub-second durations are refused, never taken as "0 = the
    // default" (which would be the agent's maximum).
    let zero: [(&[&str], &str); 4] = [
        (&["get", "a/key", "--ttl", "0s"], "--ttl"),
        (&["get", "a/key", "--ttl", "500ms"], "--ttl"),
        (
            &[
                "agent",
                "create",
                "y",
                "--allow",
                "a/*",
                "--max-lifetime",
                "0s",
            ],
            "--max-lifetime",
        ),
        (
            &[
                "agent",
                "create",
                "y",
                "--allow",
                "a/*",
                "--max-ttl",
                "1500ms",
            ],
            "--max-ttl",
        ),
    ];
    for (args, flag) in zero {
        let r = w.run_with(args, None, &env).fails_with(7);
        assert!(r.stderr.contains(flag), "{r:#?}");
    }

    // A watch open across the expiry ends with it.
    let watch = w
        .command()
        .args(["get", "a/key", "--watch"])
        .env("TESSERA_TOKEN", &token)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn get --watch");
    let db_before = std::fs::read(w.db()).expect("db");
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
        <= expires
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = w.run_with(&["get", "a/key"], None, &env).fails_with(4);
    assert!(r.stderr.contains("expired"), "{r:#?}");
    assert!(!r.stderr.contains(&token));
    let ended = watch.wait_with_output().expect("watch exits");
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert_eq!(ended.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("expired"), "{stderr}");
    let id = lease["lease_id"].as_str().expect("id");
    let list = w.run(&["agent", "list", "--json"]).ok().json();
    assert_eq!(list["agents"][0]["expires_at"].as_i64(), Some(expires));
    assert!(
        w.run(&["agent", "list"]).ok().stdout.contains("expired"),
        "agent list does not show the expiry"
    );
    let denials: Vec<String> = w
        .run(&["audit", "export"])
        .ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("audit line"))
        .filter(|r| {
            r["actor"] == "agent:brief"
                && r["decision"] == "deny"
                && r["reason"].as_str().is_some_and(|m| m.contains("expired"))
        })
        .map(|r| r["action"].as_str().expect("action").to_string())
        .collect();
    // The refused `get`; and the watcher's: the watch the broker ended or
    // its last calls (a renewal, a new lease, giving its lease back),
    // whichever came first. Nothing else is refused.
    assert!(denials.iter().any(|a| a == "lease.issue"), "{denials:?}");
    assert!(denials.len() >= 2, "{denials:?}");
    assert!(
        denials
            .iter()
            .all(|a| ["lease.issue", "watch", "lease.renew", "lease.revoke"].contains(&a.as_str())),
        "{denials:?}"
    );
    // Refusals changed nothing but the audit trail: the lease is still
    // there, and it ended with the token.
    assert!(std::fs::read(w.db()).expect("db").len() >= db_before.len());
    // (The sweeper marks it within a second or so.)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let leases = w.run(&["lease", "list", "--all", "--json"]).ok().json();
        assert_eq!(leases["leases"][0]["lease_id"].as_str(), Some(id));
        if leases["leases"][0]["state"] == "expired" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{leases:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    w.run(&["audit", "verify"]).ok();
}

/// A keychain store whose root key is gone from the keychain is refused at
/// `serve` with a clear error, and the store file is left as it was.
#[test]
fn missing_keychain_entry_is_a_clear_error() {
    if !keychain_available("missing_keychain_entry_is_a_clear_error") {
        return;
    }
    let w = World::new();
    let init = w.run(&["init", "--json"]).ok().json();
    let id = init["store_id"].as_str().expect("store id");
    let user = format!("root-key/{id}");
    let st = std::process::Command::new("secret-tool")
        .args(["clear", "service", "tessera", "username", &user])
        .status()
        .expect("run secret-tool (scripts/test.sh installs it)");
    assert!(st.success());
    let before = std::fs::read(w.db()).expect("db");
    let r = w.run(&["serve"]).fails_with(5);
    assert!(r.stderr.contains("no root key for this store"), "{r:#?}");
    assert_eq!(std::fs::read(w.db()).expect("db"), before);
}

/// `serve --json` prints one JSON line when it listens and one when it has
/// stopped (logs stay on stderr).
#[test]
fn serve_json_announces_ready_and_stopped() {
    use std::io::BufRead;
    let w = World::new();
    w.init_passphrase();
    let mut child = w
        .command()
        .args(["serve", "--json"])
        .env("TESSERA_PASSPHRASE", PASSPHRASE)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn serve");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line");
    assert_eq!(ready["ready"], true, "{line}");
    assert_eq!(ready["sealed"], false);
    assert_eq!(ready["unseal"], "passphrase");
    assert_eq!(ready["socket"], w.socket().display().to_string());
    w.run(&["status"]).ok();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    line.clear();
    out.read_line(&mut line).expect("read");
    let stopped: serde_json::Value = serde_json::from_str(&line).expect("stopped line");
    assert_eq!(stopped["stopped"], true);
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}

/// Ended leases (expired or revoked) are deleted once `--lease-history`
/// has passed since they ended, and `Watch` events once it has passed
/// since they were written; active leases stay, and so do the audit
/// records of all of them.
#[test]
fn ended_leases_are_deleted_after_the_lease_history() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&["--lease-history", "2s", "--sweep-interval", "200ms"]);
    w.put("a/key", b"v");
    let token = w.agent("short", "a/*", "15m");
    let env = [("TESSERA_TOKEN", token.as_str())];
    let ends = w
        .run_with(&["get", "a/key", "--ttl", "1s", "--json"], None, &env)
        .ok()
        .json();
    let revoked = w
        .run_with(&["get", "a/key", "--json"], None, &env)
        .ok()
        .json();
    let kept = w
        .run_with(&["get", "a/key", "--json"], None, &env)
        .ok()
        .json();
    let id = |v: &serde_json::Value| v["lease_id"].as_str().expect("id").to_string();
    w.run(&["lease", "revoke", "--lease", &id(&revoked)]).ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let all = w.run(&["lease", "list", "--all", "--json"]).ok().json();
        let ids: Vec<String> = all["leases"]
            .as_array()
            .expect("leases")
            .iter()
            .map(id)
            .collect();
        if ids == [id(&kept)] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ended leases were not deleted: {all:#?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The events `Watch` replays (an expiry warning, a revocation) go too.
    let events = || -> i64 {
        let db = rusqlite::Connection::open_with_flags(
            w.db(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open store");
        db.query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .expect("count events")
    };
    while events() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "old events were not deleted"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let export = w.run(&["audit", "export"]).ok().stdout;
    assert!(export.contains("\"lease.purge\""), "{export}");
    assert!(export.contains("\"event.purge\""), "{export}");
    for gone in [id(&ends), id(&revoked)] {
        assert!(export.contains(&gone), "the audit trail lost {gone}");
    }
    w.run(&["audit", "verify"]).ok();
    // A deleted lease is unknown (NOT_FOUND) from then on.
    let r = w
        .run(&["lease", "revoke", "--lease", &id(&ends)])
        .fails_with(3);
    assert!(r.stderr.contains("no lease"), "{r:#?}");
}

/// `get --json` carries a value that is not UTF-8 text as hex, unchanged.
#[test]
fn get_json_carries_a_binary_value_as_hex() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("a/bin", b"\xff\xfe\x00abc");
    let token = w.agent("bot", "a/*", "15m");
    let bin = w
        .run_with(
            &["get", "a/bin", "--json"],
            None,
            &[("TESSERA_TOKEN", &token)],
        )
        .ok()
        .json();
    assert_eq!(bin["value_hex"], "fffe00616263", "{bin}");
    assert!(bin.get("value").is_none(), "{bin}");
}

/// `unseal` at a broker that needs no operator shares (it unsealed from
/// its passphrase or the keychain) is refused, whatever it was given:
/// an operator at the wrong broker is not told that their share worked.
#[test]
fn unseal_at_a_broker_that_needs_no_shares_is_refused() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let r = w
        .run_with(&["unseal"], Some(b"garbage\n"), &[])
        .fails_with(5);
    assert!(r.stderr.contains("not sealed by operator shares"), "{r:#?}");
}
