//! Durability, tampering and leak checks, against the real binary and the
//! real database file.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_broker::proto;
use tessera_e2e::{World, authed};
use tonic::Code;

/// What the load clients of [`issue_load`] saw.
#[derive(Default)]
struct Seen {
    /// Acknowledged leases, with the time each call started.
    acked: Vec<(std::time::Instant, String)>,
    /// The error each client stopped on.
    errors: Vec<tonic::Status>,
}

/// Starts `clients` clients issuing leases on `load/key` back to back (at
/// most 10,000 each; a client stops at its first error) and returns once
/// `min` have been acknowledged (at most 120 s).
async fn issue_load(
    w: &World,
    token: &str,
    clients: usize,
    min: usize,
) -> (Arc<Mutex<Seen>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let seen = Arc::clone(&seen);
        let token = token.to_string();
        let mut c = w.broker_client().await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..10_000 {
                let started = std::time::Instant::now();
                let req = proto::IssueRequest {
                    secret: "load/key".into(),
                    ttl_seconds: 600,
                };
                let got = c.issue(authed(req, &token)).await;
                let mut seen = seen.lock().expect("lock");
                match got {
                    Ok(l) => seen.acked.push((started, l.get_ref().lease_id.clone())),
                    Err(e) => {
                        seen.errors.push(e);
                        return;
                    }
                }
            }
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while seen.lock().expect("lock").acked.len() < min {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker acknowledged fewer than {min} leases in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (seen, tasks)
}

/// A passphrase-sealed broker serving a secret `load/key` and the token
/// of an agent allowed to read it: the setup of every load test here.
fn load_world() -> (World, tessera_e2e::Server, String) {
    let w = World::new();
    w.init_passphrase();
    let s = w.serve(&[]);
    w.put("load/key", b"load-value");
    let token = w.agent("loader", "load/*", "15m");
    (w, s, token)
}

/// Every lease id in the store.
fn stored_leases(w: &World) -> HashSet<String> {
    let conn =
        rusqlite::Connection::open_with_flags(w.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db");
    let mut stmt = conn.prepare("SELECT id FROM leases").expect("prepare");
    stmt.query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// Every lease the client saw acknowledged survives a `kill -9` mid-load,
/// and the audit chain still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_load_keeps_every_acknowledged_lease() {
    let (w, mut s, token) = load_world();
    // Let the load run, then pull the plug.
    let (seen, tasks) = issue_load(&w, &token, 32, 500).await;
    s.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let acked: Vec<String> = seen
        .lock()
        .expect("lock")
        .acked
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    assert!(acked.len() >= 500);

    let _s2 = w.serve(&[]);
    let stored = stored_leases(&w);
    let conn =
        rusqlite::Connection::open_with_flags(w.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db");
    let missing: Vec<_> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged leases lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    // Every stored lease has its audit record.
    let audited: i64 = conn
        .query_row(
            "SELECT count(*) FROM audit WHERE action = 'lease.issue' AND decision = 'allow'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(audited as usize, stored.len());
    w.run(&["audit", "verify"]).ok();
}

fn sql(w: &World, stmt: &str) {
    let conn = rusqlite::Connection::open(w.db()).expect("open db");
    conn.execute_batch(stmt).expect("edit db");
}

/// The one number `query` (a `SELECT count(*) …`) gives on the store.
fn count(w: &World, query: &str) -> i64 {
    let conn = rusqlite::Connection::open(w.db()).expect("open db");
    conn.query_row(query, [], |r| r.get(0)).expect("count")
}

/// `serve` with the right passphrase, expected to refuse to start with
/// exit 9 (stored data failed authentication).
fn serve_refused(w: &World) -> tessera_e2e::Ran {
    w.run_with(
        &["serve"],
        None,
        &[("TESSERA_PASSPHRASE", tessera_e2e::PASSPHRASE)],
    )
    .fails_with(9)
}

/// Swapping ciphertext rows in the file is detected at read time
/// (DATA_LOSS, exit 9), and nothing else is affected.
#[test]
fn swapped_secret_rows_are_detected() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    w.put("a/one", b"value-one");
    w.put("a/two", b"value-two");
    w.put("a/three", b"value-three");
    let token = w.agent("reader", "a/*", "15m");
    s.terminate();
    sql(
        &w,
        "UPDATE secret_versions SET ciphertext = (SELECT ciphertext FROM secret_versions WHERE name = 'a/two'),
                                    wrapped_key = (SELECT wrapped_key FROM secret_versions WHERE name = 'a/two')
         WHERE name = 'a/one';",
    );
    let _s = w.serve(&[]);
    let r = w.get("a/one", &token).fails_with(9);
    assert!(r.stderr.contains("failed authentication"), "{r:#?}");
    assert!(!r.stderr.contains("value-two"), "{r:#?}");
    assert_eq!(w.get("a/two", &token).ok().stdout, "value-two");
    assert_eq!(w.get("a/three", &token).ok().stdout, "value-three");
}

/// The states `agent list --json` shows, by agent name.
fn agent_states(w: &World) -> Vec<(String, bool, bool)> {
    let list = w.run(&["agent", "list", "--json"]).ok().json();
    list["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or_default().to_string(),
                a["tampered"] == true,
                !a["revoked_at"].is_null(),
            )
        })
        .collect()
}

/// An agent row edited while the broker runs, after the agent was
/// authenticated and cached, is refused at its next request, not served
/// from the cache; and from then on at authentication.
#[test]
fn an_agent_row_edited_while_the_broker_runs_is_refused() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("a/one", b"value-one");
    let reader = w.agent("reader", "a/*", "15m");
    assert_eq!(w.get("a/one", &reader).ok().stdout, "value-one");
    let refused = |w: &World| {
        let r = w.get("a/one", &reader).fails_with(9);
        assert!(
            r.stderr.contains("agent \"reader\" failed authentication"),
            "{r:#?}"
        );
    };
    sql(&w, "UPDATE agents SET allow = '*' WHERE name = 'reader';");
    refused(&w);
    // The cached agent was dropped: with the allow list put back and a
    // column the writer does not compare edited instead, the refusal now
    // comes from the row's MAC, checked as the agent is loaded again.
    sql(
        &w,
        "UPDATE agents SET allow = 'a/*', created_at = created_at + 1 WHERE name = 'reader';",
    );
    refused(&w);
}

/// `Renew` checks the agent's row in its transaction too: a lease cannot
/// be stretched with the limits of an agent whose row was edited since it
/// was cached, and the refusal is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_an_edited_agent_row_is_not_renewed() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("a/one", b"value-one");
    let reader = w.agent("reader", "a/*", "15m");
    let mut c = w.broker_client().await;
    let lease = c
        .issue(authed(
            proto::IssueRequest {
                secret: "a/one".into(),
                ttl_seconds: 60,
            },
            &reader,
        ))
        .await
        .expect("issue")
        .into_inner();
    sql(
        &w,
        "UPDATE agents SET max_ttl = 86400 WHERE name = 'reader';",
    );
    let e = c
        .renew(authed(
            proto::RenewRequest {
                lease_id: lease.lease_id.clone(),
                ttl_seconds: 86400,
            },
            &reader,
        ))
        .await
        .expect_err("renewed with an edited row");
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(
        e.message()
            .contains("agent \"reader\" failed authentication"),
        "{e:?}"
    );
    let expires: i64 = count(
        &w,
        &format!(
            "SELECT expires_at - issued_at FROM leases WHERE id = '{}'",
            lease.lease_id
        ),
    );
    assert_eq!(expires, 60);
    let audit = w
        .run(&["audit", "export"])
        .ok()
        .stdout
        .lines()
        .filter(|l| l.contains("\"lease.renew\""))
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(audit[0].contains("\"decision\":\"deny\""), "{audit:?}");
}

/// Agent rows edited in the file (a widened allow list, a forged agent, a
/// lifted revocation) fail their MAC: the broker refuses those tokens with
/// DATA_LOSS, `agent list` flags the rows, and a revoke is the remedy.
#[test]
fn edited_agent_rows_are_refused() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    w.put("a/one", b"value-one");
    w.put("b/two", b"value-two");
    let reader = w.agent("reader", "a/*", "15m");
    let other = w.agent("other", "a/*", "15m");
    let gone = w.agent("gone", "a/*", "15m");
    w.run(&["agent", "revoke", "gone"]).ok();
    s.terminate();
    let forged = "tsr_forged_by_someone_who_can_write_the_file";
    let forged_hash = tessera_broker::keys::hex(&tessera_broker::keys::token_hash(forged));
    sql(
        &w,
        &format!(
            "UPDATE agents SET allow = '*' WHERE name = 'reader';
             UPDATE agents SET revoked_at = NULL WHERE name = 'gone';
             INSERT INTO agents (name, token_hash, allow, max_ttl, max_lifetime, created_at, mac)
               SELECT 'forged', X'{forged_hash}', '*', max_ttl, max_lifetime, created_at, mac
               FROM agents WHERE name = 'other';"
        ),
    );
    let mut s = w.serve(&[]);
    for (token, name) in [
        (&reader, "reader"),
        (&gone, "gone"),
        (&forged.to_string(), "forged"),
    ] {
        for secret in ["a/one", "b/two"] {
            let r = w.get(secret, token).fails_with(9);
            assert!(
                r.stderr
                    .contains(&format!("agent \"{name}\" failed authentication")),
                "{r:#?}"
            );
            assert!(!r.stderr.contains("value-"), "{r:#?}");
        }
    }
    // The untouched agent works as before.
    assert_eq!(w.get("a/one", &other).ok().stdout, "value-one");
    let states = agent_states(&w);
    for (name, tampered, revoked) in &states {
        let expect = ["forged", "gone", "reader"].contains(&name.as_str());
        assert_eq!(*tampered, expect, "{name}: {states:?}");
        assert!(!*revoked, "{name}: {states:?}");
    }
    let text = w.run(&["agent", "list"]).ok();
    assert!(text.stdout.contains("TAMPERED"), "{text:#?}");
    // `status` names them, for monitoring.
    let status = w.run(&["status", "--json"]).ok().json();
    assert_eq!(
        status["tampered"],
        serde_json::json!(["agent:forged", "agent:gone", "agent:reader"]),
        "{status}"
    );
    // Revoking is the remedy: the rows are then ordinary revoked agents.
    for name in ["reader", "gone", "forged"] {
        w.run(&["agent", "revoke", name]).ok();
    }
    for (name, tampered, revoked) in agent_states(&w) {
        assert!(!tampered, "{name}");
        assert_eq!(revoked, name != "other", "{name}");
    }
    let status = w.run(&["status", "--json"]).ok().json();
    assert_eq!(status["tampered"], serde_json::json!([]), "{status}");
    let r = w.get("a/one", &reader).fails_with(4);
    assert!(r.stderr.contains("revoked"), "{r:#?}");
    w.run(&["audit", "verify"]).ok();
    s.terminate();
    // The refusals were audited.
    let refused = count(
        &w,
        "SELECT count(*) FROM audit WHERE decision = 'deny'
           AND reason LIKE '%failed authentication%'",
    );
    assert_eq!(refused, 6);
}

/// A secret's row edited in the file (its current version pointed back,
/// its rotation command swapped) fails its MAC: no value is issued, the
/// swapped command never runs, `secret show` flags it, and deleting and
/// storing the secret again is the remedy.
#[test]
fn edited_secret_rows_are_refused() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    w.put("a/one", b"old-value");
    w.put("a/one", b"new-value");
    w.put("a/two", b"two-value");
    w.run(&["secret", "config", "a/two", "--generate", "hex:16"])
        .ok();
    w.run(&["rotate", "schedule", "a/two", "--every", "1s"])
        .ok();
    let token = w.agent("reader", "a/*", "15m");
    s.terminate();
    let marker = w.data.join("command-ran");
    sql(
        &w,
        &format!(
            "UPDATE secrets SET current_version = 1 WHERE name = 'a/one';
             UPDATE secrets SET rotate_cmd = '[\"/usr/bin/touch\",\"{}\"]' WHERE name = 'a/two';",
            marker.display()
        ),
    );
    let _s = w.serve(&[]);
    for name in ["a/one", "a/two"] {
        let r = w.get(name, &token).fails_with(9);
        assert!(
            r.stderr.contains(&format!(
                "settings of secret \"{name}\" failed authentication"
            )),
            "{r:#?}"
        );
        assert!(!r.stderr.contains("-value"), "{r:#?}");
        let show = w.run(&["secret", "show", name, "--json"]).ok().json();
        assert_eq!(show["tampered"], true, "{show}");
    }
    let text = w.run(&["secret", "show", "a/one"]).ok();
    assert!(text.stdout.contains("TAMPERED"), "{text:#?}");
    let status = w.run(&["status"]).ok();
    assert!(
        status.stdout.contains("TAMPERED") && status.stdout.contains("secret:a/one, secret:a/two"),
        "{status:#?}"
    );
    // Nothing that would trust the row goes ahead.
    w.run(&["rotate", "now", "a/two"]).fails_with(9);
    assert!(!marker.exists(), "the swapped command ran");
    w.run(&["rotate", "schedule", "a/two", "--every", "1h"])
        .fails_with(9);
    w.run(&["secret", "config", "a/two", "--overlap", "1m"])
        .fails_with(9);
    let r = w
        .run_with(&["secret", "put", "a/one"], Some(b"newer"), &[])
        .fails_with(9);
    assert!(r.stderr.contains("secret rm"), "{r:#?}");
    // The remedy: delete it and store it again.
    w.run(&["secret", "rm", "a/one"]).ok();
    w.put("a/one", b"fresh-value");
    assert_eq!(w.get("a/one", &token).ok().stdout, "fresh-value");
    let show = w.run(&["secret", "show", "a/one", "--json"]).ok().json();
    assert_eq!(show["tampered"], false, "{show}");
    w.run(&["audit", "verify"]).ok();
    // The scheduler refused the edited a/two once, then backed off instead
    // of trying (and auditing) it on every tick.
    std::thread::sleep(Duration::from_secs(3));
    let scheduled_refusals = count(
        &w,
        "SELECT count(*) FROM audit WHERE action = 'secret.rotate' AND target = 'a/two'
           AND decision = 'deny' AND actor != 'admin'",
    );
    assert_eq!(scheduled_refusals, 1);
}

/// An admin credential swapped in the file fails its MAC: `serve` refuses
/// to start on it (exit 9) and changes nothing.
#[test]
fn an_edited_admin_credential_stops_serve() {
    let w = World::new();
    w.init_passphrase();
    drop(w.serve(&[]));
    let mine = "tsa_chosen_by_someone_who_can_write_the_file";
    let hash = tessera_broker::keys::hex(&tessera_broker::keys::token_hash(mine));
    sql(
        &w,
        &format!("UPDATE meta SET value = X'{hash}' WHERE key = 'admin_token_hash';"),
    );
    let before = std::fs::read(w.db()).expect("db");
    let r = serve_refused(&w);
    assert!(
        r.stderr.contains("admin credential failed authentication"),
        "{r:#?}"
    );
    assert_eq!(std::fs::read(w.db()).expect("db"), before);
}

/// The store's root key, unsealed with the test passphrase.
fn root_key(w: &World) -> tessera_broker::keys::RootKey {
    let conn = rusqlite::Connection::open(w.db()).expect("db");
    let store_id: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
            r.get::<_, Vec<u8>>(0)
        })
        .map(|v| String::from_utf8(v).expect("utf-8"))
        .expect("store id");
    tessera_broker::unseal::unseal(&conn, &store_id, Some(tessera_e2e::PASSPHRASE.as_bytes()))
        .expect("unseal")
}

/// Writes `check` as the store's root key check value.
fn write_check(conn: &rusqlite::Connection, check: &[u8]) {
    conn.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'root_key_check'",
        [check],
    )
    .expect("check value");
}

/// A store made before row MACs (its key check value says so) adopts its
/// agent rows and admin credential once, with an audit record; everything
/// keeps working, and later edits are caught.
#[test]
fn a_store_without_row_macs_adopts_its_rows_once() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    w.put("a/one", b"value-one");
    let token = w.agent("reader", "a/*", "15m");
    s.terminate();
    // Make it look like a store from before: no MACs, the old check value.
    let rk = root_key(&w);
    let conn = rusqlite::Connection::open(w.db()).expect("db");
    let legacy = rk.mac(&[b"tessera/v1/root-key-check"]);
    write_check(&conn, &legacy);
    conn.execute_batch(
        "UPDATE agents SET mac = NULL; UPDATE secrets SET mac = NULL;
         DELETE FROM meta WHERE key = 'admin_token_mac';",
    )
    .expect("no macs");
    drop(conn);
    let mut s = w.serve(&[]);
    assert_eq!(w.get("a/one", &token).ok().stdout, "value-one");
    w.run(&["secret", "list"]).ok();
    assert!(agent_states(&w).iter().all(|(_, tampered, _)| !tampered));
    w.run(&["audit", "verify"]).ok();
    s.terminate();
    let upgrades = || {
        count(
            &w,
            "SELECT count(*) FROM audit WHERE action = 'store.upgrade' AND target = 'row-macs'",
        )
    };
    assert_eq!(upgrades(), 1);
    // Once only; and from now on an edit is caught.
    sql(
        &w,
        "UPDATE secrets SET current_version = 0 WHERE name = 'a/one';",
    );
    let mut s = w.serve(&[]);
    w.get("a/one", &token).fails_with(9);
    s.terminate();
    sql(&w, "UPDATE agents SET allow = '*' WHERE name = 'reader';");
    let mut s = w.serve(&[]);
    w.get("a/one", &token).fails_with(9);
    s.terminate();
    assert_eq!(upgrades(), 1);
    // The old check value written back (from an older copy) is refused, not
    // taken as a reason to adopt the edited rows.
    sql(&w, "UPDATE agents SET allow = 'a/*' WHERE name = 'reader';");
    write_check(&rusqlite::Connection::open(w.db()).expect("db"), &legacy);
    let r = serve_refused(&w);
    assert!(r.stderr.contains("written back"), "{r:#?}");
    assert_eq!(upgrades(), 1);
}

/// A store whose agent and secret rows carry MACs but whose holder and
/// class rows do not yet (its key check value says so) adopts those once,
/// with an audit record; an edit after that is caught, and the older check
/// value written back is refused.
#[test]
fn a_store_without_retention_macs_adopts_holders_and_classes_once() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    for role in ["legal", "ciso"] {
        w.holder(role, true);
    }
    w.run(&[
        "class",
        "create",
        "c",
        "--retain",
        "1y",
        "--holders",
        "legal,ciso",
        "--threshold",
        "2",
    ])
    .ok();
    s.terminate();
    let rk = root_key(&w);
    let conn = rusqlite::Connection::open(w.db()).expect("db");
    let older = rk.mac(&[b"tessera/v1/root-key-check", b"row-macs"]);
    write_check(&conn, &older);
    conn.execute_batch("UPDATE holders SET mac = NULL; UPDATE classes SET mac = NULL;")
        .expect("no macs");
    drop(conn);
    let upgrades = || {
        count(
            &w,
            "SELECT count(*) FROM audit WHERE action = 'store.upgrade' AND target = 'retention-macs'",
        )
    };
    let mut s = w.serve(&[]);
    let status = w.run(&["status", "--json"]).ok().json();
    assert_eq!(status["tampered"], serde_json::json!([]), "{status}");
    w.run(&["class", "show", "c"]).ok();
    w.run(&["audit", "verify"]).ok();
    s.terminate();
    assert_eq!(upgrades(), 1);
    sql(&w, "UPDATE classes SET threshold = 1 WHERE name = 'c';");
    let mut s = w.serve(&[]);
    let status = w.run(&["status", "--json"]).ok().json();
    assert_eq!(
        status["tampered"],
        serde_json::json!(["class:c"]),
        "{status}"
    );
    s.terminate();
    sql(&w, "UPDATE classes SET threshold = 2 WHERE name = 'c';");
    write_check(&rusqlite::Connection::open(w.db()).expect("db"), &older);
    let r = serve_refused(&w);
    assert!(r.stderr.contains("written back"), "{r:#?}");
    assert_eq!(upgrades(), 1);
}

/// A secret's current version deleted in the file is DATA_LOSS, not a
/// missing secret, and no older value is served; a value that failed to
/// decrypt is not kept cached once the file is put right.
#[test]
fn a_deleted_or_swapped_version_is_data_loss_until_put_right() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("a/one", b"value-one");
    w.put("a/two", b"value-two");
    let token = w.agent("reader", "a/*", "15m");
    assert_eq!(w.get("a/one", &token).ok().stdout, "value-one");
    let swap = |w: &World| {
        let conn = rusqlite::Connection::open(w.db()).expect("db");
        let row = |name: &str| -> (Vec<u8>, Vec<u8>) {
            conn.query_row(
                "SELECT wrapped_key, ciphertext FROM secret_versions WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("row")
        };
        let (one, two) = (row("a/one"), row("a/two"));
        for (name, (k, c)) in [("a/one", two), ("a/two", one)] {
            conn.execute(
                "UPDATE secret_versions SET wrapped_key = ?2, ciphertext = ?3 WHERE name = ?1",
                rusqlite::params![name, k, c],
            )
            .expect("swap");
        }
    };
    swap(&w);
    w.get("a/one", &token).fails_with(9);
    swap(&w);
    assert_eq!(w.get("a/one", &token).ok().stdout, "value-one");
    w.put("a/one", b"value-one-v2");
    sql(
        &w,
        "DELETE FROM secret_versions WHERE name = 'a/one' AND version = 2;",
    );
    let r = w.get("a/one", &token).fails_with(9);
    assert!(r.stderr.contains("is missing from the store"), "{r:#?}");
    assert!(!r.stdout.contains("value-one"), "{r:#?}");
}

fn tampered_audit_is_detected(edit: &str, expect: &str) {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    for i in 0..5 {
        w.put(&format!("s/{i}"), b"v");
    }
    w.run(&["audit", "verify"]).ok();
    s.terminate();
    sql(&w, edit);
    let _s = w.serve(&[]);
    let r = w.run(&["audit", "verify", "--json"]).fails_with(8);
    assert_eq!(r.json()["ok"], false);
    assert!(r.json()["records"].is_null(), "{r:#?}");
    assert!(r.json()["first_bad_seq"].is_u64(), "{r:#?}");
    let problem = r.json()["problem"].as_str().unwrap_or_default().to_string();
    assert!(problem.contains(expect), "{problem} lacks {expect:?}");
}

#[test]
fn audit_verify_detects_a_changed_record() {
    tampered_audit_is_detected(
        "UPDATE audit SET target = 's/other' WHERE seq = 3;",
        "record 3 is not intact: its contents do not match",
    );
}

#[test]
fn audit_verify_detects_a_deleted_record() {
    tampered_audit_is_detected("DELETE FROM audit WHERE seq = 3;", "record 3 is not intact");
}

#[test]
fn audit_verify_detects_deleted_newest_records() {
    tampered_audit_is_detected(
        "DELETE FROM audit WHERE seq >= (SELECT max(seq) - 1 FROM audit);",
        "newest records were deleted",
    );
}

#[test]
fn audit_verify_detects_an_inserted_record() {
    tampered_audit_is_detected(
        "UPDATE audit SET seq = seq + 1000 WHERE seq >= 3;
         UPDATE audit SET seq = seq - 999 WHERE seq >= 1003;
         INSERT INTO audit SELECT 3, time, actor, action, 'forged', decision, reason, request_id, prev_hash, hash
           FROM audit WHERE seq = 2;",
        "record 3 is not intact",
    );
}

#[test]
fn audit_verify_detects_reordered_records() {
    tampered_audit_is_detected(
        "UPDATE audit SET seq = -1 WHERE seq = 3;
         UPDATE audit SET seq = 3 WHERE seq = 4;
         UPDATE audit SET seq = 4 WHERE seq = -1;",
        "record 3 is not intact",
    );
}

/// If the audit record cannot be written, the request fails UNAVAILABLE
/// and no lease is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_fails_unavailable_when_audit_cannot_be_written() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    w.put("x/key", b"v");
    let token = w.agent("bot", "x/*", "15m");
    // A fault we can cause for real: the audit table refuses inserts.
    sql(
        &w,
        "CREATE TRIGGER audit_full BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
    );
    let mut c = w.broker_client().await;
    let e = c
        .issue(authed(
            proto::IssueRequest {
                secret: "x/key".into(),
                ttl_seconds: 0,
            },
            &token,
        ))
        .await
        .expect_err("issued without an audit record");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let conn = rusqlite::Connection::open(w.db()).expect("db");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM leases", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 0);
    conn.execute_batch("DROP TRIGGER audit_full;")
        .expect("drop trigger");
    c.issue(authed(
        proto::IssueRequest {
            secret: "x/key".into(),
            ttl_seconds: 0,
        },
        &token,
    ))
    .await
    .expect("issue after the fault is gone");
}

/// A scenario with known secret values and tokens: none of them may appear
/// in the broker's logs, the audit export, or the database files.
#[test]
fn secrets_and_tokens_never_leak() {
    let w = World::new();
    w.init_passphrase();
    let admin = w.admin_token();
    let mut s = w.serve_env(
        &["--log-format", "json"],
        &[
            ("TESSERA_PASSPHRASE", tessera_e2e::PASSPHRASE),
            ("TESSERA_LOG", "trace"),
        ],
    );
    let value = "sk-LEAKCHECK-5f1e2d3c4b5a69788796a5b4c3d2e1f0";
    w.put("leak/api", value.as_bytes());
    let token = w.agent("leaky", "leak/*", "15m");
    assert_eq!(w.get("leak/api", &token).ok().stdout, value);
    w.get("leak/api", "tsr_wrong-token-LEAKCHECK").fails_with(4);
    w.run_with(
        &["secret", "list"],
        None,
        &[("TESSERA_ADMIN_TOKEN", "tsa_bad-admin-LEAKCHECK")],
    )
    .fails_with(4);
    let export = w.run(&["audit", "export"]).ok().stdout;
    assert!(export.lines().count() >= 5);
    for line in export.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("JSON line");
    }
    s.terminate();
    let logs = s.logs();
    assert!(logs.contains("tessera broker ready"));
    let mut files = vec![std::fs::read(w.db()).expect("db")];
    for ext in ["db-wal", "db-shm"] {
        if let Ok(b) = std::fs::read(w.db().with_extension(ext)) {
            files.push(b);
        }
    }
    for needle in [
        value,
        &token,
        &admin,
        "tsr_wrong-token-LEAKCHECK",
        "tsa_bad-admin-LEAKCHECK",
        tessera_e2e::PASSPHRASE,
    ] {
        assert!(!logs.contains(needle), "log leaks {needle:?}");
        assert!(!export.contains(needle), "audit export leaks {needle:?}");
        for f in &files {
            assert!(
                !f.windows(needle.len()).any(|win| win == needle.as_bytes()),
                "database file holds {needle:?} in plaintext"
            );
        }
    }
}

/// Copies the store's files (database and, if present, WAL) from `from` to
/// `to`, for a broker that is stopped.
fn copy_store(from: &std::path::Path, to: &std::path::Path) {
    for suffix in ["", "-wal"] {
        let src = std::path::PathBuf::from(format!("{}{suffix}", from.display()));
        let dst = std::path::PathBuf::from(format!("{}{suffix}", to.display()));
        if src.exists() {
            std::fs::copy(&src, &dst).expect("copy the store");
        } else {
            let _ = std::fs::remove_file(&dst);
        }
    }
}

/// A store rolled back to an older copy has an intact trail of its own;
/// a signed checkpoint taken later, kept elsewhere, catches it. Checkpoints
/// from another broker and altered checkpoints are refused.
#[test]
fn a_signed_checkpoint_catches_a_store_rolled_back_to_an_older_copy() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    w.put("s/one", b"v1");
    s.terminate();
    let old = w.tmp.path().join("old-copy.db");
    copy_store(&w.db(), &old);

    let mut s = w.serve(&[]);
    w.put("s/two", b"v2");
    let cp = w.tmp.path().join("checkpoint.txt");
    let cp_arg = cp.to_str().expect("utf-8 path");
    let r = w
        .run(&["audit", "checkpoint", "--out", cp_arg, "--json"])
        .ok();
    let seq = r.json()["seq"].as_u64().expect("seq");
    let text = std::fs::read_to_string(&cp).expect("checkpoint written");
    // A kept checkpoint is never overwritten.
    let again = w
        .run(&["audit", "checkpoint", "--out", cp_arg])
        .fails_with(5);
    assert!(again.stderr.contains("already exists"), "{again:#?}");
    assert_eq!(std::fs::read_to_string(&cp).expect("kept"), text);
    assert!(text.starts_with("tessera-audit-checkpoint-v1\n"), "{text}");
    // The JSON line (as a log keeps it) is a checkpoint file too.
    let line = w.tmp.path().join("checkpoint.json");
    std::fs::write(&line, r.stdout.trim()).expect("write");
    // The trail still reaches it, also after more records.
    w.put("s/three", b"v3");
    w.run(&["audit", "verify", "--checkpoint", cp_arg]).ok();
    w.run(&[
        "audit",
        "verify",
        "--checkpoint",
        line.to_str().expect("utf-8"),
    ])
    .ok();
    // So is the line as syslog or the journal shows it, with its prefix.
    let logged = w.tmp.path().join("checkpoint.log");
    std::fs::write(
        &logged,
        format!(
            "Dec 01 05:00:00 host tessera-checkpoint[1234]: {}\n",
            r.stdout.trim()
        ),
    )
    .expect("write");
    w.run(&[
        "audit",
        "verify",
        "--checkpoint",
        logged.to_str().expect("utf-8"),
    ])
    .ok();
    // An --out in a directory that does not exist is refused before the
    // broker signs anything.
    let nowhere = w.tmp.path().join("no-such-dir").join("cp");
    let r = w
        .run(&[
            "audit",
            "checkpoint",
            "--out",
            nowhere.to_str().expect("utf-8"),
        ])
        .fails_with(7);
    assert!(r.stderr.contains("does not exist"), "{r:#?}");

    // An altered checkpoint is the caller's mistake: INVALID_ARGUMENT (exit 7).
    let forged = w.tmp.path().join("forged.txt");
    std::fs::write(&forged, text.replace(&format!("seq: {seq}"), "seq: 1")).expect("write");
    let r = w
        .run(&[
            "audit",
            "verify",
            "--checkpoint",
            forged.to_str().expect("utf-8"),
        ])
        .fails_with(7);
    assert!(r.stderr.contains("altered after signing"), "{r:#?}");
    s.terminate();

    // Roll the whole store back to the older copy: its own chain is intact.
    copy_store(&old, &w.db());
    let _s = w.serve(&[]);
    w.run(&["audit", "verify"]).ok();
    let r = w
        .run(&["audit", "verify", "--checkpoint", cp_arg, "--json"])
        .fails_with(8);
    assert_eq!(r.json()["first_bad_seq"].as_u64(), Some(seq), "{r:#?}");
    let problem = r.json()["problem"].as_str().unwrap_or_default().to_string();
    assert!(
        problem.contains("rolled back to an older copy"),
        "{problem}"
    );
    // Written past the checkpoint's record since the rollback: still caught.
    for i in 0..(seq + 2) {
        w.put(&format!("s/after-{i}"), b"v");
    }
    let r = w
        .run(&["audit", "verify", "--checkpoint", cp_arg, "--json"])
        .fails_with(8);
    assert_eq!(r.json()["first_bad_seq"].as_u64(), Some(seq), "{r:#?}");
    let problem = r.json()["problem"].as_str().unwrap_or_default().to_string();
    assert!(problem.contains("differs at or before it"), "{problem}");

    // A checkpoint signed by another broker is refused as such.
    let other = World::new();
    other.init_passphrase();
    let _o = other.serve(&[]);
    let r = other
        .run(&["audit", "verify", "--checkpoint", cp_arg])
        .fails_with(7);
    assert!(r.stderr.contains("signed by another broker"), "{r:#?}");
}

/// SIGTERM under load: requests already running are answered, the broker
/// exits 0, and the store holds exactly the leases clients were told of
/// (none cut off between commit and reply) with an intact audit chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_running_requests_then_exits() {
    let (w, mut s, token) = load_world();
    let (seen, tasks) = issue_load(&w, &token, 16, 200).await;
    let code = tokio::task::spawn_blocking(move || {
        let code = s.terminate();
        (code, s.logs())
    })
    .await
    .expect("terminate");
    assert_eq!(code.0, 0, "exit code; log:\n{}", code.1);
    for t in tasks {
        t.await.expect("client task");
    }
    // After the stop, calls fail as "unavailable" (refused or cut at the
    // transport), never as a broker error. A call the client sent as the
    // broker's GOAWAY crossed it comes back from tonic itself as INTERNAL
    // "h2 protocol error" (GOAWAY NO_ERROR), which the CLI also reads as
    // unavailable; the broker never says that.
    let seen = seen.lock().expect("lock");
    for e in &seen.errors {
        let cut = e.code() == Code::Internal
            && e.message().starts_with("h2 protocol error")
            && format!("{e:?}").contains("NO_ERROR, Remote)");
        assert!(
            (cut || matches!(
                e.code(),
                Code::Unavailable | Code::Cancelled | Code::Unknown
            )) && !e.message().contains("store"),
            "unexpected failure during shutdown: {e:?}"
        );
    }
    let acked: HashSet<String> = seen.acked.iter().map(|(_, id)| id.clone()).collect();
    let stored = stored_leases(&w);
    assert!(
        acked.is_subset(&stored),
        "acknowledged leases missing after a clean stop"
    );
    let unanswered = stored.difference(&acked).count();
    assert_eq!(
        unanswered, 0,
        "{unanswered} leases were stored but their replies never reached the client"
    );
    let _s2 = w.serve(&[]);
    w.run(&["audit", "verify"]).ok();
}

/// Under load, concurrent requests share commits (`status` counts them),
/// and `agent revoke` is atomic: once it has answered, no call with the
/// token succeeds, and none of the agent's leases is left active (no lease
/// issued concurrently slips past the revoke).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_revoke_under_load_leaves_no_active_lease() {
    let (w, _s, token) = load_world();
    let (seen, tasks) = issue_load(&w, &token, 16, 200).await;
    // Group commit: concurrent requests share transactions (and syncs).
    let status = tokio::task::block_in_place(|| w.run(&["status", "--json"]).ok().json());
    let (commits, writes) = (
        status["store_commits"].as_u64().expect("commits"),
        status["store_writes"].as_u64().expect("writes"),
    );
    assert!(commits > 0 && writes > commits, "{status}");
    let out =
        tokio::task::block_in_place(|| w.run(&["agent", "revoke", "loader", "--json"]).ok().json());
    let revoked_at = std::time::Instant::now();
    assert!(out["leases_revoked"].as_u64() > Some(0), "{out}");
    let errors =
        load_stopped_by(&w, seen, tasks, revoked_at, Code::Unauthenticated, "revoke").await;
    for m in errors {
        assert!(m.contains("revoked"), "{m}");
    }
}

/// Waits for the load's clients (each stops on its first error) after
/// `what` answered at `answered`, and checks what it must leave behind: no
/// call made after it succeeded, every client stopped with `code`, no
/// active lease, an intact audit trail. Returns the clients' messages.
async fn load_stopped_by(
    w: &World,
    seen: Arc<Mutex<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    answered: std::time::Instant,
    code: Code,
    what: &str,
) -> Vec<String> {
    let clients = tasks.len();
    for t in tasks {
        t.await.expect("client task");
    }
    let seen = seen.lock().expect("lock");
    let late = seen.acked.iter().filter(|(at, _)| *at > answered).count();
    assert_eq!(late, 0, "calls made after the {what} answered succeeded");
    assert_eq!(seen.errors.len(), clients);
    for e in &seen.errors {
        assert_eq!(e.code(), code, "{e:?}");
    }
    let conn =
        rusqlite::Connection::open_with_flags(w.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db");
    let active: i64 = conn
        .query_row("SELECT count(*) FROM leases WHERE state = 0", [], |r| {
            r.get(0)
        })
        .expect("count");
    assert_eq!(
        active, 0,
        "leases issued around the {what} are still active"
    );
    w.run(&["audit", "verify"]).ok();
    seen.errors
        .iter()
        .map(|e| e.message().to_string())
        .collect()
}

/// A secret deleted while agents are issuing leases on it keeps no active
/// lease: an `Issue` that read the value before the delete committed is
/// refused in its own transaction, NOT_FOUND, instead of leaving a lease
/// on a deleted secret behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_delete_under_load_leaves_no_active_lease() {
    let (w, _s, token) = load_world();
    let (seen, tasks) = issue_load(&w, &token, 16, 200).await;
    tokio::task::block_in_place(|| w.run(&["secret", "rm", "load/key"]).ok());
    let deleted_at = std::time::Instant::now();
    load_stopped_by(&w, seen, tasks, deleted_at, Code::NotFound, "delete").await;
}
