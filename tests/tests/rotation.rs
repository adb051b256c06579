//! End-to-end: rotation with overlap windows, generators and commands,
//! schedules run by the broker and by `tessera rotate --due`, crash safety,
//! `Watch`, `tessera get --watch` and `tessera run`.

use std::path::Path;
use std::time::{Duration, Instant};

use tessera_broker::proto;
use tessera_e2e::{PASSPHRASE, World, authed};

fn show(w: &World, name: &str) -> serde_json::Value {
    w.run(&["secret", "show", name, "--json"]).ok().json()
}

fn states(d: &serde_json::Value) -> Vec<(u64, String)> {
    d["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().expect("version"),
                v["state"].as_str().expect("state").to_string(),
            )
        })
        .collect()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rotates `secret` to `value` and waits (up to a minute) until `out`, the
/// file a command under `tessera run` writes to, contains `expect`; on
/// failure shows what run said (`notes`, its stderr).
fn rotate_until_seen(w: &World, secret: &str, value: &str, out: &Path, expect: &str, notes: &Path) {
    w.run_with(
        &["rotate", "now", secret, "--from-stdin"],
        Some(value.as_bytes()),
        &[],
    )
    .ok();
    let start = Instant::now();
    while !std::fs::read_to_string(out)
        .unwrap_or_default()
        .contains(expect)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the rotation never reached the command; run said: {}",
            std::fs::read_to_string(notes).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A command for `tessera run` that appends `start <vars>` to `out` (e.g.
/// `$A $B`), then runs until SIGTERM, which it answers by appending
/// `stopped` and exiting 0.
fn looping_child(w: &World, out: &Path, vars: &str) -> String {
    script(
        w,
        "child.sh",
        &format!(
            "trap 'echo stopped >> {out}; exit 0' TERM; echo \"start {vars}\" >> {out}; \
             while true; do sleep 0.1; done",
            out = out.display()
        ),
    )
}

/// Starts `tessera run --env E… -- child` as the agent `token`; its stderr
/// goes to `notes`.
fn spawn_run(
    w: &World,
    token: &str,
    envs: &[&str],
    child: &str,
    notes: &Path,
) -> std::process::Child {
    let mut run = w.command();
    run.arg("run");
    for e in envs {
        run.args(["--env", e]);
    }
    run.args(["--", child])
        .env("TESSERA_TOKEN", token)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(notes).expect("notes file"));
    run.spawn().expect("spawn tessera run")
}

/// The ids of `agent`'s active leases.
fn active_leases(w: &World, agent: &str) -> Vec<String> {
    let l = w
        .run(&["lease", "list", "--agent", agent, "--json"])
        .ok()
        .json();
    l["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .map(|l| l["lease_id"].as_str().expect("id").to_string())
        .collect()
}

/// Sends SIGTERM to `run` and checks that it exits with its command's 0.
fn stop_run(mut run: std::process::Child) {
    std::process::Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .expect("kill");
    assert_eq!(run.wait().expect("run").code(), Some(0));
}

fn script(w: &World, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = w.tmp.path().join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p.display().to_string()
}

#[test]
fn old_leases_work_through_the_overlap_then_are_revoked() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("openai/prod", b"sk-old");
    w.run(&["secret", "config", "openai/prod", "--overlap", "3s"])
        .ok();
    let token = w.agent("gw", "openai/*", "15m");
    let old = w.get("openai/prod", &token).ok();
    let old_lease = w
        .run_with(
            &["get", "openai/prod", "--json"],
            None,
            &[("TESSERA_TOKEN", token.as_str())],
        )
        .ok()
        .json();
    assert_eq!(old.stdout, "sk-old");

    let r = w
        .run_with(
            &["rotate", "now", "openai/prod", "--from-stdin", "--json"],
            Some(b"sk-new"),
            &[],
        )
        .ok()
        .json();
    assert_eq!(r["outcome"], "rotated");
    assert_eq!(r["version"], 2);
    // Issue hands out the new value; the old lease still renews.
    assert_eq!(w.get("openai/prod", &token).ok().stdout, "sk-new");
    let d = show(&w, "openai/prod");
    assert_eq!(
        states(&d),
        vec![(1, "overlapping".into()), (2, "active".into())]
    );
    rt().block_on(async {
        let mut c = w.broker_client().await;
        c.renew(authed(
            proto::RenewRequest {
                lease_id: old_lease["lease_id"].as_str().expect("id").into(),
                ttl_seconds: 60,
            },
            &token,
        ))
        .await
        .expect("the old lease renews during the overlap");
    });
    // After the window: version 1 retired, its leases revoked.
    wait_for("version 1 to retire", 15, || {
        states(&show(&w, "openai/prod"))[0].1 == "retired"
    });
    let leases = w
        .run(&[
            "lease",
            "list",
            "--all",
            "--secret",
            "openai/prod",
            "--json",
        ])
        .ok()
        .json();
    for l in leases["leases"].as_array().expect("leases") {
        let expect = if l["version"] == 1 {
            "revoked"
        } else {
            "active"
        };
        assert_eq!(l["state"], expect, "{l}");
    }
    rt().block_on(async {
        let mut c = w.broker_client().await;
        let e = c
            .renew(authed(
                proto::RenewRequest {
                    lease_id: old_lease["lease_id"].as_str().expect("id").into(),
                    ttl_seconds: 60,
                },
                &token,
            ))
            .await
            .expect_err("revoked after the overlap");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    });
    // The retired value is gone from the store files (secure_delete).
    let audit = w.run(&["audit", "export"]).ok().stdout;
    assert!(audit.contains("secret.retire"));
    w.run(&["audit", "verify"]).ok();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A `rotate now` that rotates nothing because another rotation of the
/// secret is running fails (exit 5): a script rotating after a leak can
/// tell it from success.
#[test]
fn rotate_now_that_rotates_nothing_is_not_a_success() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("db/prod", b"pw-1");
    let marker = w.tmp.path().join("verifying");
    let verify = script(
        &w,
        "verify.sh",
        &format!("touch {}; sleep 3; exit 0", marker.display()),
    );
    w.run(&[
        "secret",
        "config",
        "db/prod",
        "--generate",
        "hex:8",
        "--verify-cmd",
        &verify,
    ])
    .ok();
    let mut first = w.command();
    first
        .args(["rotate", "now", "db/prod"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut first = first.spawn().expect("spawn rotate now");
    // The first holds the rotation lock while its verify command runs.
    wait_for("the first rotation's verify command", 30, || {
        marker.exists()
    });
    let second = w.run(&["rotate", "now", "db/prod"]).fails_with(5);
    assert!(
        second
            .stderr
            .contains("was not rotated: another rotation of it is running"),
        "{second:#?}"
    );
    assert!(first.wait().expect("first rotation").success());
    assert_eq!(show(&w, "db/prod")["current_version"], 2);
}

#[test]
fn a_rotation_whose_client_goes_away_still_stores_its_output() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("db/prod", b"pw-1");
    let marker = w.tmp.path().join("rotating");
    let go = w.tmp.path().join("go");
    let cmd = script(
        &w,
        "rotate.sh",
        &format!(
            "touch {}; while [ ! -e {} ]; do sleep 0.1; done; printf pw-new",
            marker.display(),
            go.display()
        ),
    );
    w.run(&["secret", "config", "db/prod", "--rotate-cmd", &cmd])
        .ok();
    let mut rotate = w.command();
    rotate
        .args(["rotate", "now", "db/prod"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut rotate = rotate.spawn().expect("spawn rotate now");
    // The command has changed the credential at its provider: a Ctrl-C of
    // the CLI now must not lose its output (nor keep the lock).
    wait_for("the rotation command", 30, || marker.exists());
    std::process::Command::new("kill")
        .args(["-INT", &rotate.id().to_string()])
        .status()
        .expect("kill");
    assert!(!rotate.wait().expect("rotate now").success());
    std::fs::write(&go, "").expect("go");
    wait_for("version 2", 30, || {
        show(&w, "db/prod")["current_version"] == 2
    });
    let token = w.agent("app", "db/*", "15m");
    assert_eq!(w.get("db/prod", &token).ok().stdout, "pw-new");
    w.run(&["rotate", "now", "db/prod"]).ok();
    assert_eq!(show(&w, "db/prod")["current_version"], 3);
}

#[test]
fn bad_rotation_input_is_refused_and_changes_nothing() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("db/prod", b"pw-1");
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["rotate", "schedule", "db/prod", "--cron", "61 * * * *"],
            7,
            "invalid cron",
        ),
        (
            &["rotate", "schedule", "db/prod", "--cron", "0 3 * *"],
            7,
            "5-field",
        ),
        (
            &["rotate", "schedule", "db/prod", "--every", "0s"],
            7,
            "positive",
        ),
        (
            &["rotate", "schedule", "db/prod"],
            2,
            "--every <EVERY>|--cron <CRON>",
        ),
        (
            &[
                "rotate", "schedule", "db/prod", "--every", "1h", "--jitter", "2h",
            ],
            7,
            "shorter than the interval",
        ),
        (
            &["secret", "config", "db/prod", "--generate", "uuid:4"],
            7,
            "unknown generator",
        ),
        (
            &[
                "secret",
                "config",
                "db/prod",
                "--generate",
                &"{hex:4096}".repeat(9),
            ],
            7,
            "values of 73728 bytes",
        ),
        (
            &["secret", "config", "db/prod", "--class", "nope"],
            3,
            "no retention class",
        ),
        (
            &["secret", "config", "db/prod", "--rotate-cmd", "rotate.sh"],
            7,
            "absolute path",
        ),
        (
            &["rotate", "schedule", "db/prod", "--every", "1h"],
            5,
            "no way to make new values",
        ),
        (&["rotate", "now", "nope/none"], 3, "no secret"),
        (&["rotate", "now", "Bad Name"], 7, "not allowed"),
        (&["secret", "show", "Bad Name"], 7, "not allowed"),
        (
            &[
                "rotate",
                "schedule",
                "db/prod",
                "--cron",
                "0 3 * * 1",
                "--tz",
                "Mars/Base",
            ],
            7,
            "time zone",
        ),
        (
            &[
                "rotate",
                "schedule",
                "db/prod",
                "--every",
                "1h",
                "--tz",
                "Europe/Berlin",
            ],
            7,
            "goes with --cron",
        ),
    ];
    for (args, code, text) in cases {
        let r = w.run(args).fails_with(*code);
        assert!(r.stderr.contains(text), "{args:?}: {r:#?}");
    }
    // Commands that fail leave the current version active.
    let empty = script(&w, "empty.sh", "exit 0");
    let huge = script(&w, "huge.sh", "head -c 70000 /dev/zero | tr '\\0' x");
    let missing = w.tmp.path().join("missing.sh").display().to_string();
    let bad_verify = script(&w, "reject.sh", "exit 3");
    let slow = script(&w, "slow.sh", "sleep 5; echo late");
    w.run(&[
        "secret",
        "config",
        "db/prod",
        "--rotate-cmd",
        &slow,
        "--cmd-timeout",
        "1s",
    ])
    .ok();
    let r = w.run(&["rotate", "now", "db/prod"]).fails_with(5);
    assert!(r.stderr.contains("did not finish within 1s"), "{r:#?}");
    for (cmd, verify, text) in [
        (&empty, None, "printed nothing"),
        (&huge, None, "more than"),
        (&missing, None, "does not exist"),
        (&empty, Some(&bad_verify), "printed nothing"),
    ] {
        let mut a = vec!["secret", "config", "db/prod", "--rotate-cmd", cmd.as_str()];
        if let Some(v) = verify {
            a.extend(["--verify-cmd", v.as_str()]);
        }
        w.run(&a).ok();
        let r = w.run(&["rotate", "now", "db/prod"]);
        assert_ne!(r.code, 0, "{r:#?}");
        assert!(r.stderr.contains(text), "{cmd}: {r:#?}");
    }
    let ok_cmd = script(&w, "new.sh", "cat >/dev/null; echo pw-2");
    w.run(&[
        "secret",
        "config",
        "db/prod",
        "--rotate-cmd",
        &ok_cmd,
        "--verify-cmd",
        &bad_verify,
    ])
    .ok();
    let r = w.run(&["rotate", "now", "db/prod"]).fails_with(5);
    assert!(r.stderr.contains("verify command rejected"), "{r:#?}");
    let d = show(&w, "db/prod");
    assert_eq!(d["current_version"], 1, "nothing was activated");
    assert!(
        states(&d).iter().all(|(v, s)| *v == 1 || s == "failed"),
        "{d:#}"
    );
    let token = w.agent("app", "db/*", "15m");
    assert_eq!(w.get("db/prod", &token).ok().stdout, "pw-1");
    let audit = w.run(&["audit", "export"]).ok().stdout;
    assert!(audit.contains("secret.verify") && !audit.contains("pw-2"));

    // A scheduled secret keeps a way to make values.
    w.run(&["rotate", "schedule", "db/prod", "--every", "30d"])
        .ok();
    let r = w
        .run(&["secret", "config", "db/prod", "--no-rotate-cmd"])
        .fails_with(5);
    assert!(r.stderr.contains("rotates on a schedule"), "{r:#?}");
    assert!(
        show(&w, "db/prod")["rotate_cmd"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    );
    w.run(&[
        "secret",
        "config",
        "db/prod",
        "--generate",
        "hex:8",
        "--no-rotate-cmd",
    ])
    .ok();
}

#[test]
fn rotation_and_verify_commands_get_values_off_argv() {
    let w = World::new();
    w.init_passphrase();
    let s = w.serve(&[]);
    w.put("github/bot", b"ghp-current");
    let seen = w.tmp.path().join("seen");
    let rotate = script(
        &w,
        "rotate.sh",
        &format!(
            "cur=$(cat); echo \"$cur\" > {seen}.stdin; echo \"$@\" > {seen}.argv; \
             echo 'leaked ghp-current' >&2; echo ghp-next",
            seen = seen.display()
        ),
    );
    let verify = script(
        &w,
        "verify.sh",
        &format!("echo \"$TESSERA_NEW_VALUE\" > {}.verify", seen.display()),
    );
    w.run(&[
        "secret",
        "config",
        "github/bot",
        "--rotate-cmd",
        &rotate,
        "--rotate-arg",
        "--org",
        "--rotate-arg",
        "acme",
        "--verify-cmd",
        &verify,
        "--value-via",
        "env",
    ])
    .ok();
    let r = w
        .run(&["rotate", "now", "github/bot", "--json"])
        .ok()
        .json();
    assert_eq!(r["version"], 2);
    let read = |ext: &str| {
        std::fs::read_to_string(format!("{}.{ext}", seen.display())).unwrap_or_default()
    };
    assert_eq!(
        read("argv").trim(),
        "--org acme",
        "only configured args reach argv"
    );
    assert_eq!(read("verify").trim(), "ghp-next");
    // With --value-via env the rotation command gets the current value in
    // TESSERA_CURRENT_VALUE, not on stdin.
    assert_eq!(read("stdin").trim(), "");
    let token = w.agent("bot", "github/*", "15m");
    assert_eq!(w.get("github/bot", &token).ok().stdout, "ghp-next");
    // The command's stderr is logged, with the secret masked.
    let logs = s.logs();
    assert!(logs.contains("leaked [redacted]"), "{logs}");
    assert!(!logs.contains("ghp-current") && !logs.contains("ghp-next"));
}

/// A broker (without its scheduler) serving `api/key` = "k0", due every
/// second and rotated by a command whose body is `cmd`, and the token of
/// an agent allowed to read it.
fn due_every_second(w: &World, cmd: &str) -> (tessera_e2e::Server, String) {
    w.init_passphrase();
    let s = w.serve(&["--no-scheduler"]);
    w.put("api/key", b"k0");
    let cmd = script(w, "rotate.sh", cmd);
    w.run(&["secret", "config", "api/key", "--rotate-cmd", &cmd])
        .ok();
    w.run(&["rotate", "schedule", "api/key", "--every", "1s"])
        .ok();
    (s, w.agent("bot", "api/*", "15m"))
}

/// Moves the broker's socket aside, so that the CLI no longer finds the
/// broker where it looks and `rotate --due` opens the store itself while
/// the broker keeps serving; waits until `api/key` is due. Dropped, it
/// puts the socket back.
struct SocketAside {
    socket: std::path::PathBuf,
    aside: std::path::PathBuf,
}

impl SocketAside {
    fn new(w: &World) -> Self {
        let (socket, aside) = (w.socket(), w.tmp.path().join("aside.sock"));
        std::fs::rename(&socket, &aside).expect("move the socket aside");
        std::thread::sleep(Duration::from_secs(2));
        SocketAside { socket, aside }
    }
}

impl Drop for SocketAside {
    fn drop(&mut self) {
        let _ = std::fs::rename(&self.aside, &self.socket);
    }
}

/// A rotation made by another process on the store (`rotate --due` from
/// cron, while the broker listens where the CLI does not look) reaches the
/// running broker's `Issue` at once: the version it had cached is read
/// again, not served.
#[test]
fn issue_serves_a_rotation_made_by_another_process() {
    let w = World::new();
    let (_s, token) = due_every_second(&w, "cat >/dev/null; echo k1");
    assert_eq!(w.get("api/key", &token).ok().stdout, "k0");
    let aside = SocketAside::new(&w);
    // With the socket's address given, as the systemd unit and the cron
    // job do: no broker answers there, so the store is opened here.
    let addr = format!("unix://{}", w.socket().display());
    let r = w
        .run_with(
            &["rotate", "--due", "--json"],
            None,
            &[("TESSERA_PASSPHRASE", PASSPHRASE), ("TESSERA_ADDR", &addr)],
        )
        .ok()
        .json();
    assert_eq!(r["results"][0]["outcome"], "rotated", "{r}");
    drop(aside);
    // The broker's writer continues the audit trail after the other
    // process's records (before, its next write clashed on their numbers).
    assert_eq!(w.get("api/key", &token).ok().stdout, "k1");
    w.run(&["audit", "verify"]).ok();
}

/// The version a broker had cached, rotated away by another process and
/// then retired by this broker at the end of its overlap, is read again,
/// not refused (before, every `Issue` failed until a restart).
#[test]
fn issue_rereads_a_cached_version_retired_after_another_process_rotated_it() {
    let w = World::new();
    let (_s, token) = due_every_second(&w, "cat >/dev/null; echo k1");
    w.run(&["secret", "config", "api/key", "--overlap", "1s"])
        .ok();
    assert_eq!(w.get("api/key", &token).ok().stdout, "k0");
    let aside = SocketAside::new(&w);
    // From a passphrase file this time, as a cron job would keep it.
    let file = w.tmp.path().join("passphrase");
    std::fs::write(&file, format!("{PASSPHRASE}\n")).expect("passphrase file");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let file = file.display().to_string();
    let without = w.run(&["rotate", "--due"]).fails_with(5);
    assert!(without.stderr.contains("--passphrase-file"), "{without:#?}");
    let r = w.run(&["rotate", "--due", "--json", "--passphrase-file", &file]);
    assert_eq!(r.ok().json()["results"][0]["outcome"], "rotated");
    drop(aside);
    wait_for("version 1 to be retired", 30, || {
        states(&show(&w, "api/key"))[0].1 == "retired"
    });
    assert_eq!(w.get("api/key", &token).ok().stdout, "k1");
    w.run(&["audit", "verify"]).ok();
}

/// A process that unsealed the store before the broker re-keyed it
/// (`rotate --due` opening the store itself) wraps nothing with its old
/// root key: the store's next start could not open it.
#[test]
fn a_rotation_by_a_process_with_a_replaced_root_key_stores_nothing() {
    let w = World::new();
    let (started, go) = (w.tmp.path().join("started"), w.tmp.path().join("go"));
    let (mut s, token) = due_every_second(
        &w,
        &format!(
            "cat >/dev/null; touch {}; while [ ! -e {} ]; do sleep 0.1; done; echo k1",
            started.display(),
            go.display()
        ),
    );
    // Time for the re-key (two Argon2id passes) on a busy machine.
    w.run(&["secret", "config", "api/key", "--cmd-timeout", "10m"])
        .ok();
    let aside = SocketAside::new(&w);
    let mut offline = w.command();
    offline
        .args(["rotate", "--due", "--json"])
        .env("TESSERA_PASSPHRASE", PASSPHRASE)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut offline = offline.spawn().expect("spawn rotate --due");
    wait_for("the rotate command", 60, || {
        assert!(
            offline.try_wait().expect("rotate --due").is_none(),
            "rotate --due ended before its command ran"
        );
        started.exists()
    });
    drop(aside);
    let pass = [("TESSERA_PASSPHRASE", PASSPHRASE)];
    w.run_with(&["rekey", "root", "--json"], None, &pass).ok();
    std::fs::write(&go, "").expect("let the command finish");
    let out = offline.wait_with_output().expect("rotate --due");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{doc} {stderr}");
    assert_eq!(doc["results"][0]["outcome"], "failed", "{doc}");
    let message = doc["results"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("root key was replaced"), "{doc}");
    // After a restart (the new key only) every version still opens.
    s.terminate();
    let _s = w.serve(&["--no-scheduler"]);
    assert_eq!(w.get("api/key", &token).ok().stdout, "k0");
    w.run(&["audit", "verify"]).ok();
}

#[test]
fn rotate_due_from_two_processes_rotates_once_and_missed_slots_rotate_once() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&["--no-scheduler"]);
    w.put("api/key", b"k0");
    let slow = script(&w, "slow.sh", "cat >/dev/null; sleep 1; echo k-$$");
    w.run(&["secret", "config", "api/key", "--rotate-cmd", &slow])
        .ok();
    w.run(&["rotate", "schedule", "api/key", "--every", "3s"])
        .ok();
    // The broker is down for several slots.
    s.terminate();
    std::thread::sleep(Duration::from_secs(8));
    let back = tessera_broker::init::now();
    let env = [("TESSERA_PASSPHRASE", PASSPHRASE)];
    let spawn = || {
        let mut c = w.command();
        c.args(["rotate", "--due", "--json"])
            .env("TESSERA_PASSPHRASE", PASSPHRASE);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().expect("spawn rotate --due")
    };
    let (a, b) = (spawn(), spawn());
    let outs = [
        a.wait_with_output().expect("a"),
        b.wait_with_output().expect("b"),
    ];
    let mut rotated = 0;
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        rotated += doc["results"]
            .as_array()
            .expect("results")
            .iter()
            .filter(|r| r["outcome"] == "rotated")
            .count();
    }
    assert_eq!(
        rotated, 1,
        "two runners, several missed slots: exactly one rotation"
    );
    // A re-run serves no slot of the downtime again.
    let again = w
        .run_with(&["rotate", "--due", "--json"], None, &env)
        .ok()
        .json();
    for r in again["results"].as_array().expect("results") {
        assert!(
            r["due_at"].as_i64().expect("due") > back,
            "a missed slot was served twice: {again}"
        );
    }
    let _s2 = w.serve(&["--no-scheduler"]);
    let d = show(&w, "api/key");
    let for_downtime = d["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter(|v| v["due_at"].as_i64().is_some_and(|t| t > 0 && t <= back))
        .count();
    assert_eq!(for_downtime, 1, "missed slots rotate once: {d:#}");
    // With a broker running, `rotate --due` goes through it, and exits 1
    // when a rotation fails.
    let fail = script(&w, "fail.sh", "exit 1");
    w.run(&["secret", "config", "api/key", "--rotate-cmd", &fail])
        .ok();
    wait_for("the next slot", 20, || {
        show(&w, "api/key")["next_due"].as_i64() <= Some(tessera_broker::init::now())
    });
    let r = w.run(&["rotate", "--due", "--json"]).fails_with(1);
    assert!(r.stdout.contains("\"failed\":1"), "{r:#?}");
    assert!(d["last_result"].as_str().expect("r").starts_with("ok"));
    let status = w.run(&["rotate", "status", "--json"]).ok().json();
    assert_eq!(status["secrets"][0]["name"], "api/key");
    assert!(status["secrets"][0]["next_due"].as_i64().expect("due") > 0);
}

#[test]
fn the_broker_scheduler_rotates_and_a_failing_command_retries_later() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("svc/token", b"t0");
    w.run(&[
        "secret",
        "config",
        "svc/token",
        "--generate",
        "tok-{hex:8}",
        "--overlap",
        "1h",
    ])
    .ok();
    w.run(&["rotate", "schedule", "svc/token", "--every", "2s"])
        .ok();
    wait_for("a scheduled rotation", 20, || {
        show(&w, "svc/token")["current_version"].as_u64() >= Some(2)
    });
    let fail = script(&w, "fail.sh", "echo 'provider down' >&2; exit 1");
    w.run(&["secret", "config", "svc/token", "--rotate-cmd", &fail])
        .ok();
    let before = show(&w, "svc/token")["current_version"]
        .as_u64()
        .expect("v");
    wait_for("a failed attempt", 20, || {
        show(&w, "svc/token")["last_result"]
            .as_str()
            .is_some_and(|r| r.starts_with("failed"))
    });
    let d = show(&w, "svc/token");
    assert_eq!(
        d["current_version"].as_u64(),
        Some(before),
        "the failure changed nothing"
    );
    assert!(d["failures"].as_u64() >= Some(1));
    // The retry waits (backoff), rather than hammering every tick.
    assert!(d["next_due"].as_i64().expect("due") >= tessera_broker::init::now() + 30);
    // Manual attempts that fail do not stretch the schedule's backoff...
    let counted = d["failures"].as_u64();
    for _ in 0..3 {
        let r = w.run(&["rotate", "now", "svc/token"]).fails_with(5);
        assert!(r.stderr.contains("failed (exit status: 1)"), "{r:#?}");
    }
    let d = show(&w, "svc/token");
    assert_eq!(d["failures"].as_u64(), counted, "{d}");
    assert!(
        d["last_result"]
            .as_str()
            .is_some_and(|r| r.starts_with("failed"))
    );
    // ...and a new schedule starts the count again: the first retry after
    // its first failure is a minute away, not the longer backoff.
    w.run(&["rotate", "schedule", "svc/token", "--every", "2s"])
        .ok();
    assert_eq!(show(&w, "svc/token")["failures"], 0);
    wait_for("a failed scheduled attempt", 20, || {
        show(&w, "svc/token")["failures"].as_u64() == Some(1)
    });
    let due = show(&w, "svc/token")["next_due"].as_i64().expect("due");
    assert!(due <= tessera_broker::init::now() + 60, "retry at {due}");
}

#[test]
fn a_crash_at_any_rotation_step_neither_loses_nor_doubles_a_version() {
    for point in [
        "rotate-after-value",
        "rotate-after-pending",
        "rotate-after-verify",
        "rotate-in-activate",
    ] {
        let w = World::new();
        w.init_passphrase();
        let mut s = w.serve(&["--no-scheduler"]);
        w.put("k/v", b"v0");
        let ok = script(&w, "verify.sh", "cat >/dev/null; exit 0");
        w.run(&[
            "secret",
            "config",
            "k/v",
            "--generate",
            "alnum:12",
            "--verify-cmd",
            &ok,
            "--cmd-timeout",
            "2s",
        ])
        .ok();
        w.run(&["rotate", "schedule", "k/v", "--every", "1s"]).ok();
        s.terminate();
        std::thread::sleep(Duration::from_millis(1500));
        let back = tessera_broker::init::now();
        let crashed = w.run_with(
            &["rotate", "--due"],
            None,
            &[("TESSERA_PASSPHRASE", PASSPHRASE), ("TESSERA_FAULT", point)],
        );
        assert_ne!(crashed.code, 0, "{point}: {crashed:#?}");
        // A re-run completes (or rolls back) what the crash left.
        let rerun = w
            .run_with(
                &["rotate", "--due", "--json"],
                None,
                &[("TESSERA_PASSPHRASE", PASSPHRASE)],
            )
            .ok()
            .json();
        let _s2 = w.serve(&["--no-scheduler"]);
        let d = show(&w, "k/v");
        let st = states(&d);
        let active: Vec<_> = st.iter().filter(|(_, s)| s == "active").collect();
        assert_eq!(active.len(), 1, "{point}: {st:?} / {rerun}");
        assert!(
            st.iter().all(|(_, s)| s != "pending"),
            "{point}: nothing stays pending: {st:?}"
        );
        // One due time, at most one version.
        let mut dues: Vec<i64> = d["versions"]
            .as_array()
            .expect("v")
            .iter()
            .filter_map(|v| v["due_at"].as_i64().filter(|d| *d > 0))
            .collect();
        let n = dues.len();
        dues.dedup();
        assert_eq!(dues.len(), n, "{point}: two versions for one due time");
        // The slot the crash hit was served exactly once, by a version
        // that was completed (not lost, not failed).
        let served: Vec<&serde_json::Value> = d["versions"]
            .as_array()
            .expect("v")
            .iter()
            .filter(|v| v["due_at"].as_i64().is_some_and(|t| t > 0 && t <= back))
            .collect();
        assert_eq!(served.len(), 1, "{point}: {d:#}");
        assert!(
            matches!(served[0]["state"].as_str(), Some("active" | "overlapping")),
            "{point}: {d:#}"
        );
        let token = w.agent("a", "k/*", "15m");
        assert_eq!(w.get("k/v", &token).ok().stdout.len(), 12, "{point}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_rotations_and_resumes_after_a_restart() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    w.put("openai/prod", b"a");
    w.put("stripe/live", b"x");
    let token = w.agent("gw", "openai/*", "15m");
    let mut c = w.broker_client().await;
    let mut stream = c
        .watch(authed(proto::WatchRequest::default(), &token))
        .await
        .expect("watch")
        .into_inner();
    w.run_with(
        &["rotate", "now", "stripe/live", "--from-stdin"],
        Some(b"y"),
        &[],
    )
    .ok();
    w.run_with(
        &["rotate", "now", "openai/prod", "--from-stdin"],
        Some(b"b"),
        &[],
    )
    .ok();
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event in time")
        .expect("stream")
        .expect("event");
    assert_eq!(
        (ev.kind.as_str(), ev.secret.as_str(), ev.version),
        ("secret.rotated", "openai/prod", 2),
        "out-of-scope events are not sent"
    );
    let last = ev.id;
    drop(stream);
    s.terminate();
    let _s2 = w.serve(&[]);
    w.run_with(
        &["rotate", "now", "openai/prod", "--from-stdin"],
        Some(b"c"),
        &[],
    )
    .ok();
    let mut c = w.broker_client().await;
    // An id past any event is refused, not read as "from the start".
    let e = c
        .watch(authed(
            proto::WatchRequest {
                after_event_id: u64::MAX,
                resume: true,
            },
            &token,
        ))
        .await
        .expect_err("a watch after u64::MAX");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("after_event_id"), "{e:?}");
    let mut stream = c
        .watch(authed(
            proto::WatchRequest {
                after_event_id: last,
                resume: false,
            },
            &token,
        ))
        .await
        .expect("watch")
        .into_inner();
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event in time")
        .expect("stream")
        .expect("event");
    assert_eq!(
        (ev.kind.as_str(), ev.version),
        ("secret.rotated", 3),
        "nothing missed"
    );
    // Revoking the agent's leases reaches its watch too.
    w.get("openai/prod", &token).ok();
    w.run(&["lease", "revoke", "--agent", "gw"]).ok();
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event in time")
        .expect("stream")
        .expect("event");
    assert_eq!(ev.kind, "lease.revoked");
    // A lease close to its end is announced.
    let short = w.agent("short", "openai/*", "10s");
    let mut c = w.broker_client().await;
    let mut stream = c
        .watch(authed(proto::WatchRequest::default(), &short))
        .await
        .expect("watch")
        .into_inner();
    w.get("openai/prod", &short).ok();
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event in time")
        .expect("stream")
        .expect("event");
    assert_eq!(ev.kind, "lease.expiring");
    assert!(ev.expires_at > 0);
}

/// Checks that version 2 of `k/v` was refused on its edited row: the row
/// is flagged, version 1 stays current and version 2 failed.
fn refused_version_2(w: &World) -> serde_json::Value {
    let d = show(w, "k/v");
    assert_eq!(d["tampered"], true, "{d:#}");
    assert_eq!(d["current_version"], 1, "{d:#}");
    assert_eq!(
        states(&d),
        [(1, "active".to_string()), (2, "failed".to_string())],
        "{d:#}"
    );
    d
}

/// A rotation that a crash left pending, on a secret whose row was then
/// edited in the file, is discarded, not activated (activating would seal
/// the edit as genuine). The refusal is audited once, and the schedule
/// backs off instead of retrying on every run.
#[test]
fn a_pending_rotation_of_an_edited_secret_is_discarded() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&["--no-scheduler"]);
    w.put("k/v", b"v0");
    w.run(&["secret", "config", "k/v", "--generate", "alnum:12"])
        .ok();
    w.run(&["rotate", "schedule", "k/v", "--every", "1s"]).ok();
    let token = w.agent("app", "k/*", "15m");
    s.terminate();
    std::thread::sleep(Duration::from_millis(1500));
    let pass = ("TESSERA_PASSPHRASE", PASSPHRASE);
    let crashed = w.run_with(
        &["rotate", "--due"],
        None,
        &[pass, ("TESSERA_FAULT", "rotate-after-verify")],
    );
    assert_ne!(crashed.code, 0, "{crashed:#?}");
    // Edited while nothing runs: a longer overlap for the old value.
    rusqlite::Connection::open(w.db())
        .expect("db")
        .execute_batch("UPDATE secrets SET overlap_secs = 999999 WHERE name = 'k/v';")
        .expect("edit");
    let r = w.run_with(&["rotate", "--due", "--json"], None, &[pass]);
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(r.stdout.contains("failed authentication"), "{r:#?}");
    // Nothing is due any more: the schedule backed off.
    let again = w.run_with(&["rotate", "--due", "--json"], None, &[pass]);
    assert_eq!(again.code, 0, "{again:#?}");
    let _s = w.serve(&["--no-scheduler"]);
    let d = refused_version_2(&w);
    assert!(d["next_due"].as_i64().expect("due") > tessera_broker::init::now() + 3000);
    w.run_with(&["get", "k/v"], None, &[("TESSERA_TOKEN", token.as_str())])
        .fails_with(9);
    let log = w.run(&["audit", "export"]).ok().stdout;
    let discarded = log
        .lines()
        .filter(|l| l.contains("version 2 was discarded"))
        .count();
    assert_eq!(discarded, 1, "{log}");
    w.run(&["audit", "verify"]).ok();
}

/// An edit made to a secret's row while its rotation's verify command runs
/// is caught in the transaction that would activate the new version: the
/// version is discarded (its sealed value kept, since the rotate step has
/// already happened), the edit is not sealed as genuine, and `rotate now`
/// fails with exit 9.
#[test]
fn an_edit_during_a_rotation_is_not_sealed() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&["--no-scheduler"]);
    w.put("k/v", b"v0");
    let started = w.tmp.path().join("verify-started");
    let go = w.tmp.path().join("verify-go");
    let verify = script(
        &w,
        "verify.sh",
        &format!(
            "cat >/dev/null; touch '{}'; while [ ! -e '{}' ]; do sleep 0.05; done; exit 0",
            started.display(),
            go.display()
        ),
    );
    w.run(&[
        "secret",
        "config",
        "k/v",
        "--generate",
        "alnum:12",
        "--verify-cmd",
        &verify,
        "--cmd-timeout",
        "60s",
    ])
    .ok();
    let run = w
        .command()
        .args(["rotate", "now", "k/v"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn rotate now");
    wait_for("the verify command to start", 30, || started.exists());
    rusqlite::Connection::open(w.db())
        .expect("db")
        .execute_batch("UPDATE secrets SET overlap_secs = 999999 WHERE name = 'k/v';")
        .expect("edit");
    std::fs::write(&go, b"").expect("go");
    let out = run.wait_with_output().expect("rotate now");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{stderr}");
    assert!(stderr.contains("failed authentication"), "{stderr}");
    refused_version_2(&w);
    let log = w.run(&["audit", "export"]).ok().stdout;
    assert!(
        log.contains("version 2 was discarded") && log.contains("reset that credential"),
        "{log}"
    );
    // Its sealed value is kept: the rotation had already happened outside.
    let kept: i64 = rusqlite::Connection::open(w.db())
        .expect("db")
        .query_row(
            "SELECT length(ciphertext) FROM secret_versions WHERE name = 'k/v' AND version = 2",
            [],
            |r| r.get(0),
        )
        .expect("version 2");
    assert!(kept > 0);
    w.run(&["audit", "verify"]).ok();
}

#[test]
fn tessera_run_restarts_its_command_with_the_new_value() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("openai/prod", b"sk-one");
    let token = w.agent("gw", "openai/*", "15m");
    let out = w.tmp.path().join("child.out");
    let child = script(
        &w,
        "child.sh",
        &format!(
            "trap 'echo term >> {out}; exit 7' TERM; \
             echo \"start $OPENAI_API_KEY token=${{TESSERA_TOKEN:-none}} \
             admin=${{TESSERA_ADMIN_TOKEN:-none}} pass=${{TESSERA_PASSPHRASE:-none}} \
             args=$*\" >> {out}; \
             while true; do sleep 0.1; done",
            out = out.display()
        ),
    );
    let notes = w.tmp.path().join("run.err");
    let mut run = w.command();
    run.args([
        "run",
        "--env",
        "OPENAI_API_KEY=openai/prod",
        "--",
        &child,
        "plain-arg",
    ])
    .env("TESSERA_TOKEN", &token)
    .env("TESSERA_ADMIN_TOKEN", "tsa_not-for-the-child")
    .env("TESSERA_PASSPHRASE", "not for the child")
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(&notes).expect("notes file"));
    let mut run = run.spawn().expect("spawn tessera run");
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_for("the child to start", 60, || read().contains("start sk-one"));
    assert!(
        read().contains("token=none admin=none pass=none args=plain-arg"),
        "{}",
        read()
    );
    rotate_until_seen(&w, "openai/prod", "sk-two", &out, "start sk-two", &notes);
    assert!(
        read().contains("term"),
        "the old child got SIGTERM: {}",
        read()
    );
    // SIGTERM to `tessera run` reaches the child; run exits with its status.
    let pid = run.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let status = run.wait().expect("wait run");
    assert_eq!(status.code(), Some(7));
    let leases = active_leases(&w, "gw");
    assert!(leases.is_empty(), "its leases were revoked");
    assert!(
        !Path::new(&out).exists() || !read().contains("sk-one args"),
        "values never in argv"
    );
}

#[test]
fn deploy_units_verify() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing; scripts/test.sh installs systemd"
        );
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().expect("tmp");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let bin = tessera_e2e::bin();
    let mut files = Vec::new();
    for e in std::fs::read_dir(&units).expect("units") {
        let p = e.expect("entry").path();
        let text = std::fs::read_to_string(&p).expect("unit");
        let dest = dir.path().join(p.file_name().expect("name"));
        std::fs::write(
            &dest,
            text.replace("/usr/local/bin/tessera", &bin.display().to_string()),
        )
        .expect("write");
        files.push(dest);
    }
    let r = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(&files)
        .output()
        .expect("systemd-analyze verify");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success() && err.trim().is_empty(), "{err}");
    let cron = std::fs::read_to_string(units.join("../cron/tessera")).expect("cron line");
    assert!(cron.contains("tessera rotate --due"));
}

#[test]
fn rekey_root_rewraps_everything_and_survives_a_crash_at_each_step() {
    for fault in ["", "rekey-before-commit", "rekey-after-commit"] {
        let w = World::new();
        w.init_passphrase();
        let mut s = w.serve(&[]);
        w.put("a/one", b"value-1");
        w.put("a/one", b"value-2");
        w.legal_and_ciso("c");
        let token = w.agent("app", "a/*", "15m");
        let env_agent = w.agent("arch", "class:c", "15m");
        let ct = w
            .run_with(
                &["encrypt", "--class", "c", "--json"],
                Some(b"archived"),
                &[("TESSERA_TOKEN", env_agent.as_str())],
            )
            .ok()
            .json();
        let ct_hex = ct["ciphertext"].as_str().expect("ct").to_string();
        let ct = tessera_shred::unhex(&ct_hex).expect("hex");
        let pass = [("TESSERA_PASSPHRASE", PASSPHRASE)];
        if !fault.is_empty() {
            // Restart the broker with the fault armed.
            s.terminate();
            s = w.serve_env(
                &[],
                &[("TESSERA_PASSPHRASE", PASSPHRASE), ("TESSERA_FAULT", fault)],
            );
        }
        let r = w.run_with(&["rekey", "root", "--json"], None, &pass);
        if fault.is_empty() {
            let doc = r.ok().json();
            assert_eq!(doc["generation"], 2);
            assert_eq!(doc["versions_rewrapped"], 2);
            assert_eq!(doc["classes_rewrapped"], 1);
            // Serving goes on with the new key before any restart.
            assert_eq!(w.get("a/one", &token).ok().stdout, "value-2");
            s.terminate();
        } else {
            assert_ne!(r.code, 0, "{fault}: the broker should have died: {r:#?}");
            assert_ne!(s.wait_exit(), 0);
        }
        // After a restart everything opens, with whichever key is current.
        let _s2 = w.serve(&[]);
        assert_eq!(w.get("a/one", &token).ok().stdout, "value-2", "{fault}");
        let plain = w
            .run_with(
                &["decrypt", "--class", "c"],
                Some(&ct),
                &[("TESSERA_TOKEN", env_agent.as_str())],
            )
            .ok();
        assert_eq!(plain.stdout, "archived", "{fault}");
        // The hex that `encrypt --json` printed decrypts as well.
        let plain = w
            .run_with(
                &["decrypt", "--class", "c"],
                Some(format!("{ct_hex}\n").as_bytes()),
                &[("TESSERA_TOKEN", env_agent.as_str())],
            )
            .ok();
        assert_eq!(plain.stdout, "archived", "{fault}");
        w.run(&["audit", "verify"]).ok();
        // A re-run completes the rotation (or rotates again).
        let again = w
            .run_with(&["rekey", "root", "--json"], None, &pass)
            .ok()
            .json();
        assert!(again["generation"].as_u64() >= Some(2), "{fault}: {again}");
        assert_eq!(w.get("a/one", &token).ok().stdout, "value-2");
        w.run(&["audit", "verify"]).ok();
        // The wrong passphrase is refused and changes nothing.
        w.run_with(
            &["rekey", "root"],
            None,
            &[("TESSERA_PASSPHRASE", "not the passphrase")],
        )
        .fails_with(5);
        // Shares asked of a passphrase store are refused, not ignored.
        let r = w
            .run_with(
                &["rekey", "root", "--shares", "3", "--threshold", "2"],
                None,
                &pass,
            )
            .fails_with(7);
        assert!(r.stderr.contains("leave out --shares"), "{r:#?}");
        assert_eq!(w.get("a/one", &token).ok().stdout, "value-2");
    }
}

#[test]
fn rekey_root_in_the_keychain() {
    if !tessera_e2e::keychain_available("rekey_root_in_the_keychain") {
        return;
    }
    let w = World::new();
    w.run(&["init"]).ok();
    let mut s = w.serve_env(&[], &[]);
    w.put("k/one", b"kept");
    let token = w.agent("app", "k/*", "15m");
    let r = w.run(&["rekey", "root", "--json"]).ok().json();
    assert_eq!(r["generation"], 2);
    s.terminate();
    let _s = w.serve_env(&[], &[]);
    assert_eq!(w.get("k/one", &token).ok().stdout, "kept");
    w.run(&["audit", "verify"]).ok();
}

#[test]
fn retired_versions_are_archived_under_the_class_and_die_with_its_shred() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let mut keys = Vec::new();
    for role in ["legal", "ciso"] {
        keys.push(w.holder(role, true).expect("identity file"));
    }
    w.run(&[
        "class",
        "create",
        "sox",
        "--retain",
        "1h",
        "--holders",
        "legal,ciso",
        "--threshold",
        "2",
    ])
    .ok();
    w.put("bank/api", b"old-credential");
    w.run(&[
        "secret",
        "config",
        "bank/api",
        "--class",
        "sox",
        "--overlap",
        "1s",
    ])
    .ok();
    w.run_with(
        &["rotate", "now", "bank/api", "--from-stdin"],
        Some(b"new-credential"),
        &[],
    )
    .ok();
    wait_for("version 1 to be archived", 15, || {
        states(&show(&w, "bank/api"))[0].1 == "archived"
    });
    let d = show(&w, "bank/api");
    assert_eq!(d["versions"][0]["archived_class"], "sox");
    let c = w.run(&["class", "show", "sox", "--json"]).ok().json();
    assert_eq!(
        c["data_keys"], 1,
        "the archived version's data key is under the class"
    );
    // Under a legal hold on its class, the secret is not deleted at all.
    let hold = ["--class", "sox", "--reason", "matter 7"];
    w.run(&[&["hold", "place"][..], &hold].concat()).ok();
    let held = w.run(&["secret", "rm", "bank/api"]).fails_with(5);
    assert!(held.stderr.contains("legal hold"), "{held:#?}");
    w.run(&[&["hold", "release"][..], &hold].concat()).ok();
    // Deleting the secret keeps its archived version: retention data, which
    // only a shred ceremony of its class destroys.
    let rm = w.run(&["secret", "rm", "bank/api", "--json"]).ok().json();
    assert_eq!(rm["versions_deleted"], 1, "{rm}");
    assert_eq!(rm["archived_kept"], 1, "{rm}");
    w.put("bank/api", b"new-credential");
    let d = show(&w, "bank/api");
    assert_eq!(
        states(&d),
        [(1, "archived".to_string()), (2, "active".to_string())],
        "{d}"
    );
    let c = w.run(&["class", "show", "sox", "--json"]).ok().json();
    assert_eq!(c["data_keys"], 1);
    // Shredding the class destroys the archived version's key with it.
    let id = w
        .run(&["shred", "open", "--class", "sox", "--early", "--json"])
        .ok()
        .json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    for (role, key) in ["legal", "ciso"].iter().zip(&keys) {
        w.run(&[
            "shred",
            "join",
            &id,
            "--role",
            role,
            "--yes",
            "--identity-file",
            key.to_str().expect("p"),
        ])
        .ok();
    }
    let c = w.run(&["class", "show", "sox", "--json"]).ok().json();
    assert_eq!(c["state"], "shredded");
    assert_eq!(c["data_keys"], 0);
    assert_eq!(
        states(&show(&w, "bank/api")),
        [(1, "shredded".to_string()), (2, "active".to_string())]
    );
    // The current version is untouched.
    let token = w.agent("app", "bank/*", "15m");
    assert_eq!(w.get("bank/api", &token).ok().stdout, "new-credential");
    // A shredded class takes no more secrets: it exists, so not NOT_FOUND.
    let r = w
        .run(&["secret", "config", "bank/api", "--class", "sox"])
        .fails_with(5);
    assert!(r.stderr.contains("shredded"), "{r:#?}");
}

#[test]
fn get_watch_prints_each_new_value_and_run_can_signal_instead() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("gh/token", b"ghp-1");
    let token = w.agent("bot", "gh/*", "15m");
    let out = w.tmp.path().join("watch.out");
    let err = w.tmp.path().join("watch.err");
    let mut watch = w.command();
    watch
        .args(["get", "gh/token", "--watch"])
        .env("TESSERA_TOKEN", &token)
        .env("TESSERA_LOG", "debug")
        .stdout(std::fs::File::create(&out).expect("out"))
        .stderr(std::fs::File::create(&err).expect("err"));
    let mut watch = watch.spawn().expect("spawn get --watch");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    // On a timeout, say what the watcher printed and logged.
    let seen = |want: &str| {
        let got = read(&out);
        if got.len() > want.len() || !want.starts_with(&got) {
            panic!("get --watch printed {got:?}; log:\n{}", read(&err));
        }
        got == want
    };
    wait_for("the first value", 30, || seen("ghp-1\n"));
    w.run_with(
        &["rotate", "now", "gh/token", "--from-stdin"],
        Some(b"ghp-2"),
        &[],
    )
    .ok();
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the rotated value", 30, || seen("ghp-1\nghp-2\n"))
    }));
    if done.is_err() {
        panic!(
            "no rotated value: get --watch printed {:?}, exited {:?}; log:\n{}\nbroker log:\n{}",
            read(&out),
            watch.try_wait(),
            read(&err),
            _s.logs()
        );
    }
    // Stopped by SIGTERM it ends cleanly, and it kept no lease: the one the
    // rotation replaced was given back then, the last one now.
    tessera_e2e::signal_term(watch.id()).expect("SIGTERM");
    let status = watch.wait().expect("wait get --watch");
    assert!(status.success(), "{status:?}; log:\n{}", read(&err));
    let leases = w
        .run(&["lease", "list", "--secret", "gh/token", "--json"])
        .ok()
        .json();
    let active = leases["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .filter(|l| l["state"] == "active")
        .count();
    assert_eq!(active, 0, "{leases}");

    // A signal that does not exist is a usage error, before anything runs.
    let bad = w
        .run(&[
            "run",
            "--env",
            "A=gh/token",
            "--on-rotate",
            "signal:NOPE",
            "--",
            "true",
        ])
        .fails_with(2);
    assert!(bad.stderr.contains("not a signal name"), "{bad:#?}");
    // --on-rotate signal:HUP: the command keeps running and gets SIGHUP.
    let log = w.tmp.path().join("hup.out");
    let child = script(
        &w,
        "hup.sh",
        &format!(
            "trap 'echo hup >> {log}' HUP; trap 'exit 0' TERM; echo start >> {log}; \
             while true; do sleep 0.1; done",
            log = log.display()
        ),
    );
    let mut run = w.command();
    run.args([
        "run",
        "--env",
        "T=gh/token",
        "--on-rotate",
        "signal:HUP",
        "--",
        &child,
    ])
    .env("TESSERA_TOKEN", &token)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let run = run.spawn().expect("spawn run");
    wait_for("the child", 20, || read(&log).contains("start"));
    w.run_with(
        &["rotate", "now", "gh/token", "--from-stdin"],
        Some(b"ghp-3"),
        &[],
    )
    .ok();
    wait_for("SIGHUP", 20, || read(&log).contains("hup"));
    assert_eq!(read(&log).matches("start").count(), 1, "not restarted");
    stop_run(run);
}

/// `get --watch` holds its lease like `run`: renewed before it ends, a
/// revoked one replaced (the same value is not printed again), the watch
/// resumed after a broker restart (a rotation made then is printed), and
/// it ends with NOT_FOUND once the secret is deleted.
#[test]
fn get_watch_renews_replaces_and_rides_out_a_broker_restart() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    w.put("gh/token", b"ghp-1");
    let token = w.agent("bot", "gh/*", "4s");
    let out = w.tmp.path().join("watch.out");
    let err = w.tmp.path().join("watch.err");
    let mut watch = w.command();
    watch
        .args(["get", "gh/token", "--watch"])
        .env("TESSERA_TOKEN", &token)
        .stdout(std::fs::File::create(&out).expect("out"))
        .stderr(std::fs::File::create(&err).expect("err"));
    let mut watch = watch.spawn().expect("spawn get --watch");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_for("the first value", 30, || read(&out) == "ghp-1\n");
    let first = active_leases(&w, "bot");
    // Its 4 s lease is renewed while it runs: the same lease, still active.
    std::thread::sleep(Duration::from_secs(6));
    let held = active_leases(&w, "bot");
    assert_eq!(held, first, "log:\n{}", read(&err));
    // A revoked lease is replaced; the value is the same, so not printed.
    w.run(&["lease", "revoke", "--secret", "gh/token"]).ok();
    wait_for("a new lease", 20, || {
        let now = active_leases(&w, "bot");
        now.len() == 1 && now != held
    });
    assert_eq!(read(&out), "ghp-1\n");
    // The broker restarts; a rotation made once it is back is printed.
    s.terminate();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        watch.try_wait().expect("try_wait").is_none(),
        "get --watch gave up while the broker was away; log:\n{}",
        read(&err)
    );
    let _s = w.serve(&[]);
    w.run_with(
        &["rotate", "now", "gh/token", "--from-stdin"],
        Some(b"ghp-2"),
        &[],
    )
    .ok();
    wait_for("the rotated value", 60, || read(&out) == "ghp-1\nghp-2\n");
    w.run(&["secret", "rm", "gh/token"]).ok();
    let status = watch.wait().expect("wait get --watch");
    assert_eq!(status.code(), Some(3), "log:\n{}", read(&err));
    assert!(active_leases(&w, "bot").is_empty());
}

/// `tessera run` keeps its command running while the broker restarts,
/// resumes its watch after the last event it saw (a rotation made once the
/// broker is back still reaches the command), and when it fails on its own
/// it stops the command and gives back every lease it holds.
#[test]
fn tessera_run_rides_out_a_broker_restart_and_cleans_up_when_it_fails() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    w.put("svc/a", b"a-one");
    w.put("svc/b", b"b-one");
    let token = w.agent("gw", "svc/*", "15m");
    let out = w.tmp.path().join("child.out");
    let child = looping_child(&w, &out, "$A $B");
    let notes = w.tmp.path().join("run.err");
    let mut run = spawn_run(&w, &token, &["A=svc/a", "B=svc/b"], &child, &notes);
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_for("the child to start", 20, || {
        read().contains("start a-one b-one")
    });

    s.terminate();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        run.try_wait().expect("try_wait").is_none(),
        "tessera run gave up while the broker was away"
    );
    let _s = w.serve(&[]);
    rotate_until_seen(&w, "svc/a", "a-two", &out, "start a-two b-one", &notes);

    // Deleting svc/b revokes its lease; no new one can be had, so run fails
    // (NOT_FOUND), stops the command (with SIGTERM, which it can catch) and
    // gives back the lease on svc/a.
    w.run(&["secret", "rm", "svc/b"]).ok();
    let status = run.wait().expect("wait run");
    assert_eq!(status.code(), Some(3), "run exits NOT_FOUND");
    assert!(
        read().ends_with("stopped\n"),
        "not stopped cleanly: {}",
        read()
    );
    let leases = active_leases(&w, "gw");
    assert!(leases.is_empty(), "every lease was given back: {leases:?}");
}

/// `tessera run` keeps a live lease for as long as its command runs: a
/// revocation of all the agent's leases is answered with a new lease at
/// once, and a lease about to reach its maximum lifetime is replaced before
/// it ends. The value is the same, so the command is never restarted.
#[test]
fn tessera_run_replaces_leases_without_restarting_when_the_value_is_unchanged() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("svc/a", b"a-one");
    let out = w.tmp.path().join("child.out");
    let child = looping_child(&w, &out, "$A");
    let notes = w.tmp.path().join("run.err");
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    let starts = || read().matches("start a-one").count();
    let active = |agent: &str| active_leases(&w, agent);
    let run_as = |token: &str| spawn_run(&w, token, &["A=svc/a"], &child, &notes);
    // One live lease that is not `old`, once any replacement has settled.
    let replaced = |agent: &str, old: &[String]| {
        let now = active(agent);
        now.len() == 1 && now != old
    };

    // A revocation: the lease lives 15 minutes, so only the event can
    // bring a new one.
    let steady = w.agent("steady", "svc/*", "15m");
    let run = run_as(&steady);
    wait_for("the child to start", 20, || starts() == 1);
    let first = active("steady");
    assert_eq!(first.len(), 1, "one lease: {first:?}");
    w.run(&["lease", "revoke", "--agent", "steady"]).ok();
    wait_for("a new lease after the revocation", 20, || {
        replaced("steady", &first)
    });
    assert_eq!(starts(), 1, "not restarted: {}", read());
    stop_run(run);
    assert!(active("steady").is_empty(), "its lease was given back");

    // The maximum lifetime (3 s): past two of them, run holds a newer
    // lease and the command still runs as first started.
    let r = w
        .run(&[
            "agent",
            "create",
            "brief",
            "--allow",
            "svc/*",
            "--max-ttl",
            "2s",
            "--max-lifetime",
            "3s",
            "--json",
        ])
        .ok();
    let brief = r.json()["token"].as_str().expect("token").to_string();
    let run = run_as(&brief);
    wait_for("the child to start again", 20, || starts() == 2);
    let mut first = Vec::new();
    wait_for("one lease", 20, || {
        first = active("brief");
        first.len() == 1
    });
    std::thread::sleep(Duration::from_secs(7));
    wait_for("a newer lease", 20, || replaced("brief", &first));
    assert_eq!(starts(), 2, "not restarted: {}", read());
    stop_run(run);
    assert!(active("brief").is_empty(), "its lease was given back");
}

/// A broker restarted sealed (operator shares) is a pause for `tessera run`,
/// not a failure: the command keeps running, and once the operators unseal,
/// a rotation reaches it.
#[test]
fn tessera_run_waits_while_a_restarted_broker_is_sealed() {
    let w = World::new();
    let init = w.init_shares(2, 2);
    let shares: Vec<String> = (0..2)
        .map(|i| {
            let p = w.tmp.path().join(format!("operator-{i}.share"));
            let text = init["operator_shares"][i].as_str().expect("share text");
            std::fs::write(&p, text).expect("write share");
            p.display().to_string()
        })
        .collect();
    let unseal = || {
        for p in &shares {
            w.run(&["unseal", p]).ok();
        }
    };
    let mut s = w.serve(&[]);
    unseal();
    w.put("svc/a", b"a-one");
    let token = w.agent("gw", "svc/*", "15m");
    let out = w.tmp.path().join("child.out");
    let child = looping_child(&w, &out, "$A");
    let notes = w.tmp.path().join("run.err");
    let mut run = spawn_run(&w, &token, &["A=svc/a"], &child, &notes);
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_for("the child to start", 20, || read().contains("start a-one"));

    s.terminate();
    let _s = w.serve(&[]);
    assert_eq!(w.run(&["status", "--json"]).ok().json()["sealed"], true);
    // Long enough for run to try its watch against the sealed broker.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        run.try_wait().expect("try_wait").is_none(),
        "tessera run gave up on a sealed broker: {}",
        std::fs::read_to_string(&notes).unwrap_or_default()
    );
    unseal();
    rotate_until_seen(&w, "svc/a", "a-two", &out, "start a-two", &notes);
    stop_run(run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_cannot_open_watches_without_end() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&["--max-watches-per-agent", "2"]);
    w.put("openai/prod", b"a");
    let token = w.agent("gw", "openai/*", "15m");
    let other = w.agent("bot", "openai/*", "15m");
    let c = w.broker_client().await;
    let open = |t: &str| {
        let mut c = c.clone();
        let req = authed(proto::WatchRequest::default(), t);
        async move { c.watch(req).await }
    };
    let first = open(&token).await.expect("first");
    let _second = open(&token).await.expect("second");
    let third = open(&token).await.expect_err("a third is refused");
    assert_eq!(third.code(), tonic::Code::ResourceExhausted);
    assert!(third.message().contains("2 watches open"), "{third:?}");
    // Another agent is not affected, and an ended watch frees its place.
    let _theirs = open(&other).await.expect("another agent's");
    drop(first);
    let start = Instant::now();
    while open(&token).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "no place freed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
