//! End-to-end: retention classes, key holders, legal holds and the quorum
//! shred ceremony, through the real `tessera` binary, with holder keys in
//! the real OS keychain and in identity files, shares opened by the Debian
//! `age` tool, and the database and WAL files scanned after shredding.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_e2e::{World, keychain_available};

/// `--identity-file FILE` arguments for a holder (none for the keychain).
fn id_args(key: &Option<PathBuf>) -> Vec<String> {
    match key {
        Some(k) => vec!["--identity-file".into(), k.display().to_string()],
        None => vec![],
    }
}

fn run(w: &World, args: &[String]) -> tessera_e2e::Ran {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    w.run(&a)
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// `holder init --role ROLE` into a new identity file `file` (in the test's
/// temp dir): (the file, the public key to enrol, its fingerprint).
fn new_holder_key(w: &World, role: &str, file: &str) -> (PathBuf, String, String) {
    let key = w.tmp.path().join(file);
    let made = w
        .run(&[
            "holder",
            "init",
            "--role",
            role,
            "--identity-file",
            key.to_str().expect("p"),
            "--json",
        ])
        .ok()
        .json();
    let field = |f: &str| made[f].as_str().expect(f).to_string();
    (key, field("pubkey"), field("key_fingerprint"))
}

fn join(w: &World, ceremony: &str, role: &str, key: &Option<PathBuf>) -> tessera_e2e::Ran {
    let mut a = strings(&["shred", "join", ceremony, "--role", role, "--yes", "--json"]);
    a.extend(id_args(key));
    run(w, &a)
}

fn class_json(w: &World, class: &str) -> serde_json::Value {
    w.run(&["class", "show", class, "--json"]).ok().json()
}

/// Polls `class show` until `pred` holds (the broker's tick is 1 s).
fn wait_class(w: &World, class: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let start = Instant::now();
    loop {
        let c = class_json(w, class);
        if pred(&c) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "class {class} never reached: {what}; last: {c:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Enrols holders for legal, ciso and board, each key in a file.
fn three_holders(w: &World) -> Vec<Option<PathBuf>> {
    ["legal", "ciso", "board"]
        .iter()
        .map(|r| w.holder(r, true))
        .collect()
}

/// Creates `class`, kept for `retain`, split 2 of 3 among legal, ciso and
/// board.
fn two_of_three(w: &World, class: &str, retain: &str) {
    w.run(&[
        "class",
        "create",
        class,
        "--retain",
        retain,
        "--holders",
        "legal,ciso,board",
        "--threshold",
        "2",
    ])
    .ok();
}

/// Runs `stmt` on the store's database file, as someone who can write it.
fn edit_db(w: &World, stmt: &str) {
    rusqlite::Connection::open(w.db())
        .expect("db")
        .execute_batch(stmt)
        .expect("edit db");
}

/// Asserts that `tessera status` lists each of `rows` as tampered.
/// ... and that `class list`, `class show` and `holder list` mark them.
fn assert_flagged(w: &World, rows: &[&str]) {
    let status = w.run(&["status", "--json"]).ok().json();
    let flagged = status["tampered"].as_array().expect("tampered").clone();
    let classes = w.run(&["class", "list", "--json"]).ok().json();
    let holders = w.run(&["holder", "list", "--json"]).ok().json();
    let marked = |list: &serde_json::Value, key: &str, name: &str| {
        list.as_array()
            .expect("list")
            .iter()
            .find(|x| x[key] == name)
            .map(|x| x["tampered"] == true)
    };
    // The lists mark exactly the rows status names.
    for (list, key, kind) in [
        (&classes["classes"], "name", "class"),
        (&holders["holders"], "role", "holder"),
    ] {
        for x in list.as_array().expect("list") {
            let row = format!("{kind}:{}", x[key].as_str().expect("name"));
            assert_eq!(
                x["tampered"] == true,
                flagged.contains(&row.clone().into()),
                "{row}"
            );
        }
    }
    for row in rows {
        assert!(flagged.contains(&(*row).into()), "{row}: {flagged:?}");
        if let Some(class) = row.strip_prefix("class:") {
            assert_eq!(
                marked(&classes["classes"], "name", class),
                Some(true),
                "{row}"
            );
            let shown = w.run(&["class", "show", class, "--json"]).ok().json();
            assert_eq!(shown["tampered"], true, "{row}");
            let text = w.run(&["class", "show", class]).ok().stdout;
            assert!(text.contains("TAMPERED"), "{text}");
        } else if let Some(role) = row.strip_prefix("holder:") {
            assert_eq!(
                marked(&holders["holders"], "role", role),
                Some(true),
                "{row}"
            );
        }
    }
}

/// Opens an early shred ceremony of `class`; returns its id.
fn open_early(w: &World, class: &str) -> String {
    w.run(&["shred", "open", "--class", class, "--early", "--json"])
        .ok()
        .json()["id"]
        .as_str()
        .expect("id")
        .to_string()
}

fn open_ceremony(c: &serde_json::Value) -> Option<String> {
    c["ceremonies"]
        .as_array()?
        .iter()
        .find(|x| x["state"] == "open")
        .and_then(|x| x["id"].as_str())
        .map(str::to_string)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file of the store (database, WAL, shared memory) as bytes.
fn store_files(w: &World) -> Vec<(PathBuf, Vec<u8>)> {
    ["tessera.db", "tessera.db-wal", "tessera.db-shm"]
        .iter()
        .map(|f| w.data.join(f))
        .filter(|p| p.exists())
        .map(|p| {
            let b = std::fs::read(&p).expect("read store file");
            (p, b)
        })
        .collect()
}

fn unhex(s: &str) -> Vec<u8> {
    tessera_shred::unhex(s).expect("hex")
}

fn age_decrypt(identity: &PathBuf, file: &PathBuf) -> String {
    let out = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg(file)
        .output()
        .expect("run age (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "age -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 share")
}

fn wrapped_key(w: &World, class: &str) -> Option<Vec<u8>> {
    let c =
        rusqlite::Connection::open_with_flags(w.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db");
    c.query_row(
        "SELECT wrapped_key FROM classes WHERE name = ?1",
        [class],
        |r| r.get(0),
    )
    .expect("class row")
}

#[test]
fn whole_shred_story_through_the_binary() {
    let w = World::new();
    w.init_passphrase();
    let server = w.serve(&[]);
    // Legal keeps its key in the OS keychain (where there is one); the
    // others in identity files, as separate keychains would.
    let legal = w.holder(
        "legal",
        !keychain_available("shred story (legal in keychain)"),
    );
    let ciso = w.holder("ciso", true);
    let board = w.holder("board", true);
    let holders = w.run(&["holder", "list", "--json"]).ok().json();
    assert_eq!(holders["holders"].as_array().map(Vec::len), Some(3));

    w.run(&[
        "class",
        "create",
        "sox",
        "--retain",
        "12s",
        "--holders",
        "legal,ciso,board",
        "--threshold",
        "2",
    ])
    .ok();
    let created = class_json(&w, "sox");
    assert_eq!(created["state"], "active");
    assert_eq!(created["threshold"], 2);
    assert_eq!(created["early_threshold"], 3);
    let fingerprint = created["key_fingerprint"].as_str().expect("fp").to_string();

    // An agent encrypts client data under the class, with a context.
    let token = w.agent("archiver", "class:sox", "15m");
    let env = [("TESSERA_TOKEN", token.as_str())];
    let ct = w
        .run_with(
            &[
                "encrypt",
                "--class",
                "sox",
                "--context",
                "ledger=2019",
                "--json",
            ],
            Some(b"general ledger 2019"),
            &env,
        )
        .ok()
        .json();
    let ciphertext = unhex(ct["ciphertext"].as_str().expect("ciphertext"));
    let plain = w
        .run_with(
            &["decrypt", "--class", "sox", "--context", "ledger=2019"],
            Some(&ciphertext),
            &env,
        )
        .ok();
    assert_eq!(plain.stdout, "general ledger 2019");
    let doc = w
        .run_with(
            &[
                "decrypt",
                "--class",
                "sox",
                "--context",
                "ledger=2019",
                "--json",
            ],
            Some(&ciphertext),
            &env,
        )
        .ok()
        .json();
    assert_eq!(
        unhex(doc["plaintext"].as_str().expect("hex")),
        b"general ledger 2019"
    );
    let wrong = w
        .run_with(
            &["decrypt", "--class", "sox", "--context", "ledger=2020"],
            Some(&ciphertext),
            &env,
        )
        .fails_with(7);
    assert!(wrong.stderr.contains("encryption context"), "{wrong:#?}");
    let other_agent = w.agent("nosy", "openai/*", "15m");
    w.run_with(
        &["decrypt", "--class", "sox", "--context", "ledger=2019"],
        Some(&ciphertext),
        &[("TESSERA_TOKEN", other_agent.as_str())],
    )
    .fails_with(4);

    // Holders export their sealed shares; Debian's age opens them.
    let mut sealed = Vec::new();
    for (role, key) in [("ciso", &ciso), ("board", &board)] {
        let out = w.tmp.path().join(format!("{role}.share.age"));
        let mut a = strings(&[
            "holder", "share", "export", "--role", role, "--class", "sox",
        ]);
        a.extend(id_args(key));
        a.extend(strings(&["--out", out.to_str().expect("path")]));
        run(&w, &a).ok();
        let text = age_decrypt(key.as_ref().expect("identity file"), &out);
        assert!(text.starts_with("tessera-share-v1\nclass: sox\n"), "{text}");
        assert!(text.contains(&format!("key-fingerprint: {fingerprint}")));
        assert!(text.contains(&format!("role: {role}\n")));
        sealed.push((out, text));
    }
    // Before shredding, a quorum can recover the class key offline.
    let ids = [
        ciso.as_ref().expect("file").display().to_string(),
        board.as_ref().expect("file").display().to_string(),
    ];
    let combined = w
        .run(&[
            "shares",
            "combine",
            sealed[0].0.to_str().expect("p"),
            sealed[1].0.to_str().expect("p"),
            "--identity-file",
            &ids[0],
            "--identity-file",
            &ids[1],
            "--reveal",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(combined["key_fingerprint"], fingerprint.as_str());
    let class_key = unhex(combined["key"].as_str().expect("key"));
    assert_eq!(class_key.len(), 32);
    // One share, or the same share twice, is refused with a reason.
    let one = w
        .run(&[
            "shares",
            "combine",
            sealed[0].0.to_str().expect("p"),
            "--identity-file",
            &ids[0],
        ])
        .fails_with(7);
    assert!(one.stderr.contains("needs 2 of 3"), "{one:#?}");
    let dup = w
        .run(&[
            "shares",
            "combine",
            sealed[0].0.to_str().expect("p"),
            sealed[0].0.to_str().expect("p"),
            "--identity-file",
            &ids[0],
        ])
        .fails_with(7);
    assert!(dup.stderr.contains("given twice"), "{dup:#?}");
    // A tampered share is caught by the key check value.
    let tampered_path = w.tmp.path().join("tampered.share");
    let (_, text) = &sealed[1];
    let share_line = text.lines().last().expect("share line");
    let flipped = {
        let mut b = share_line.as_bytes().to_vec();
        let i = "share: ".len() + 2;
        b[i] = if b[i] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).expect("utf-8")
    };
    std::fs::write(&tampered_path, text.replace(share_line, &flipped)).expect("write");
    let bad = w
        .run(&[
            "shares",
            "combine",
            sealed[0].0.to_str().expect("p"),
            tampered_path.to_str().expect("p"),
            "--identity-file",
            &ids[0],
        ])
        .fails_with(7);
    assert!(bad.stderr.contains("check value mismatch"), "{bad:#?}");
    let wrapped = wrapped_key(&w, "sox").expect("wrapped key before shredding");

    // Before the deadline a shred is refused; a legal hold blocks it after.
    let early = w.run(&["shred", "open", "--class", "sox"]).fails_with(5);
    assert!(early.stderr.contains("must be kept until"), "{early:#?}");
    w.run(&[
        "hold",
        "place",
        "--class",
        "sox",
        "--reason",
        "litigation 2026-17",
    ])
    .ok();
    let deadline = created["deadline"].as_i64().expect("deadline");
    while tessera_broker::init::now() <= deadline + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let held = w.run(&["shred", "open", "--class", "sox"]).fails_with(5);
    assert!(
        held.stderr.contains("legal hold") && held.stderr.contains("litigation 2026-17"),
        "{held:#?}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        open_ceremony(&class_json(&w, "sox")),
        None,
        "no ceremony opens while a hold stands"
    );
    // Each matter's hold is lifted on its own.
    let second = w
        .run(&[
            "hold",
            "place",
            "--class",
            "sox",
            "--reason",
            "audit 2027",
            "--json",
        ])
        .ok()
        .json()["id"]
        .as_u64()
        .expect("hold id");
    let release = |more: &[&str]| {
        let mut a = vec![
            "hold",
            "release",
            "--class",
            "sox",
            "--reason",
            "case closed",
        ];
        a.extend_from_slice(more);
        w.run(&a)
    };
    let which = release(&[]).fails_with(5);
    assert!(which.stderr.contains("--hold ID"), "{which:#?}");
    // With two holds standing, the refusal's hint names --hold too.
    let two = w.run(&["shred", "open", "--class", "sox"]).fails_with(5);
    assert!(two.stderr.contains("--hold ID"), "{two:#?}");
    release(&["--hold", &(second + 100).to_string()]).fails_with(3);
    let released = release(&["--hold", &second.to_string(), "--json"])
        .ok()
        .json();
    assert!(released["placed_at"].as_i64() > Some(0), "{released}");
    assert!(released["released_at"].as_i64() >= released["placed_at"].as_i64());
    let still = w.run(&["shred", "open", "--class", "sox"]).fails_with(5);
    assert!(still.stderr.contains("litigation 2026-17"), "{still:#?}");
    release(&[]).ok();

    // The broker opens the ceremony itself now that the deadline passed.
    wait_class(&w, "sox", "an open ceremony", |c| {
        open_ceremony(c).is_some()
    });
    let ceremony = open_ceremony(&class_json(&w, "sox")).expect("ceremony");

    // A signature by the wrong key is refused; the same role counts once.
    let r = run(
        &w,
        &strings(&["shred", "join", &ceremony, "--role", "board", "--yes"])
            .into_iter()
            .chain(id_args(&ciso))
            .collect::<Vec<_>>(),
    )
    .fails_with(4);
    assert!(r.stderr.contains("enrolled key of role board"), "{r:#?}");
    // The refusal (of the join's first step, reading the statement) is
    // audited under the operation's own name, as a success would be, not
    // under the gRPC method's.
    let audit = w.run(&["audit", "export"]).ok().stdout;
    let refused = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("audit line"))
        .find(|r| r["actor"] == "holder:board" && r["decision"] == "deny")
        .expect("the refused join is audited");
    assert_eq!(refused["action"], "shred.show", "{refused}");
    assert_eq!(refused["target"], ceremony.as_str(), "{refused}");
    let first = join(&w, &ceremony, "legal", &legal).ok().json();
    assert_eq!(first["state"], "open");
    let again = join(&w, &ceremony, "legal", &legal).ok().json();
    assert_eq!(again["joined"].as_array().map(Vec::len), Some(1));
    let mut a = strings(&["shred", "join", &ceremony, "--role", "legal", "--yes"]);
    a.extend(id_args(&legal));
    let told = run(&w, &a).ok();
    assert!(
        told.stdout.starts_with("Already joined as legal: 1 of 2"),
        "{told:#?}"
    );
    let done = join(&w, &ceremony, "ciso", &ciso).ok().json();
    assert_eq!(done["state"], "done");
    let shredded = class_json(&w, "sox");
    assert_eq!(shredded["state"], "shredded");
    assert_eq!(shredded["data_keys"], 0);

    // No page of the database or WAL holds the key or its wrapped form.
    for (path, bytes) in store_files(&w) {
        assert!(
            !contains(&bytes, &class_key),
            "{} still holds the class key",
            path.display()
        );
        assert!(
            !contains(&bytes, &wrapped),
            "{} still holds the wrapped class key",
            path.display()
        );
    }

    // Decrypting class data now fails, naming the certificate.
    let refused = w
        .run_with(
            &["decrypt", "--class", "sox", "--context", "ledger=2019"],
            Some(&ciphertext),
            &env,
        )
        .fails_with(5);
    let digest = shredded["certificate"]
        .as_str()
        .expect("certificate digest");
    assert!(
        refused.stderr.contains("shredded") && refused.stderr.contains(&digest[..16]),
        "{refused:#?}"
    );

    // The certificate verifies offline against the pinned broker key.
    let broker_key = w.run(&["status", "--json"]).ok().json()["broker_key"]
        .as_str()
        .expect("broker key")
        .to_string();
    let cert = w.tmp.path().join("sox.cert");
    w.run(&[
        "shred",
        "certificate",
        "show",
        "--class",
        "sox",
        "--out",
        cert.to_str().expect("p"),
    ])
    .ok();
    let verify_pinned = |key: &str| {
        w.run(&[
            "shred",
            "certificate",
            "verify",
            cert.to_str().expect("p"),
            "--broker-key",
            key,
            "--json",
        ])
    };
    let verified = verify_pinned(&broker_key).ok().json();
    assert_eq!(verified["class"], "sox");
    assert_eq!(verified["key_fingerprint"], fingerprint.as_str());
    assert_eq!(verified["irrecoverable"], false);
    assert_eq!(verified["outstanding"], 3);
    let text = std::fs::read_to_string(&cert).expect("cert");
    let forged = w.tmp.path().join("forged.cert");
    std::fs::write(&forged, text.replace("required: 2", "required: 1")).expect("write");
    w.run(&[
        "shred",
        "certificate",
        "verify",
        forged.to_str().expect("p"),
    ])
    .fails_with(9);
    let pinned = verify_pinned(&"00".repeat(32)).fails_with(9);
    // It names both keys as `status` and --broker-key write them.
    assert!(
        pinned.stderr.contains(&broker_key) && pinned.stderr.contains(&"00".repeat(32)),
        "{pinned:#?}"
    );

    // Holders confirm destroying their offline shares: once fewer than k
    // remain anywhere, the certificate says the key is irrecoverable.
    for (role, key) in [("ciso", &ciso), ("board", &board)] {
        let mut a = strings(&[
            "shred", "confirm", "--class", "sox", "--role", role, "--json",
        ]);
        a.extend(id_args(key));
        run(&w, &a).ok();
    }
    // A holder enrolled for the role since never held its share: their
    // confirmation is refused, and the certificate still verifies.
    let (new_legal, pubkey, _) = new_holder_key(&w, "legal", "new-legal.key");
    w.run(&["holder", "replace", "--role", "legal", "--pubkey", &pubkey])
        .ok();
    let mut a = strings(&["shred", "confirm", "--class", "sox", "--role", "legal"]);
    a.extend(id_args(&Some(new_legal)));
    let refused = run(&w, &a).fails_with(4);
    assert!(
        refused
            .stderr
            .contains("the key that held role legal's share"),
        "{refused:#?}"
    );
    w.run(&[
        "shred",
        "certificate",
        "show",
        "--class",
        "sox",
        "--out",
        w.tmp.path().join("sox2.cert").to_str().expect("p"),
    ])
    .ok();
    let verified = w
        .run(&[
            "shred",
            "certificate",
            "verify",
            w.tmp.path().join("sox2.cert").to_str().expect("p"),
            "--broker-key",
            &broker_key,
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(verified["irrecoverable"], true);
    assert_eq!(verified["outstanding"], 1);

    // Everything is audited; nothing secret reached the trail or the logs.
    w.run(&["audit", "verify"]).ok();
    let audit = w.run(&["audit", "export"]).ok().stdout;
    for action in [
        "holder.enroll",
        "class.create",
        "share.export",
        "hold.place",
        "hold.release",
        "shred.open",
        "shred.join",
        "shred.destroy",
        "shred.confirm",
        "envelope.encrypt",
        "envelope.decrypt",
    ] {
        assert!(audit.contains(action), "no {action} in the audit trail");
    }
    let logs = server.logs();
    for (_, share_text) in &sealed {
        let share_hex = share_text
            .lines()
            .last()
            .expect("line")
            .trim_start_matches("share: ");
        assert!(!audit.contains(share_hex) && !logs.contains(share_hex));
    }
    let key_hex = tessera_shred::hex(&class_key);
    assert!(!audit.contains(&key_hex) && !logs.contains(&key_hex));
}

#[test]
fn early_shred_needs_the_stricter_quorum_and_ceremonies_expire() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let keys = three_holders(&w);
    two_of_three(&w, "gdpr", "1h");
    // Bad input is refused precisely and changes nothing.
    let bad = w
        .run(&[
            "class",
            "create",
            "x",
            "--retain",
            "1h",
            "--holders",
            "legal,ciso",
            "--threshold",
            "3",
        ])
        .fails_with(7);
    assert!(bad.stderr.contains("invalid threshold"), "{bad:#?}");
    let unenrolled = w
        .run(&[
            "class",
            "create",
            "y",
            "--retain",
            "1h",
            "--holders",
            "legal,cfo",
            "--threshold",
            "2",
        ])
        .fails_with(5);
    assert!(unenrolled.stderr.contains("cfo"), "{unenrolled:#?}");
    w.run(&[
        "shred",
        "join",
        "cer_nope",
        "--role",
        "legal",
        "--yes",
        "--identity-file",
        keys[0].as_ref().expect("f").to_str().expect("p"),
    ])
    .fails_with(3);

    let opened = w
        .run(&[
            "shred",
            "open",
            "--class",
            "gdpr",
            "--early",
            "--expires",
            "4s",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(opened["action"], "shred-early");
    assert_eq!(opened["required"], 3);
    assert_eq!(
        opened["reason"],
        "shredded early, before the retention period ended"
    );
    let id = opened["id"].as_str().expect("id").to_string();
    w.run(&["shred", "open", "--class", "gdpr", "--early"])
        .fails_with(5);
    join(&w, &id, "legal", &keys[0]).ok();
    let two = join(&w, &id, "ciso", &keys[1]).ok().json();
    assert_eq!(two["state"], "open", "two of three do not suffice early");
    assert!(class_json(&w, "gdpr")["key_fingerprint"].is_string());
    std::thread::sleep(Duration::from_secs(5));
    let late = join(&w, &id, "board", &keys[2]).fails_with(5);
    assert!(late.stderr.contains("expired"), "{late:#?}");
    let c = class_json(&w, "gdpr");
    assert_eq!(c["state"], "active");
    assert!(wrapped_key(&w, "gdpr").is_some(), "nothing was destroyed");

    // A hold cancels an open ceremony.
    let opened = w
        .run(&["shred", "open", "--class", "gdpr", "--early", "--json"])
        .ok()
        .json();
    let id = opened["id"].as_str().expect("id").to_string();
    w.run(&[
        "hold",
        "place",
        "--class",
        "gdpr",
        "--reason",
        "regulator inquiry",
    ])
    .ok();
    let cancelled = join(&w, &id, "legal", &keys[0]).fails_with(5);
    assert!(cancelled.stderr.contains("cancelled"), "{cancelled:#?}");
    w.run(&["audit", "verify"]).ok();
}

#[test]
fn a_join_that_loses_to_a_hold_says_nothing_was_destroyed() {
    let w = World::new();
    w.init_passphrase();
    let pause = w.tmp.path().join("pause");
    std::fs::create_dir(&pause).expect("pause dir");
    let _s = w.serve_env(
        &[],
        &[
            ("TESSERA_PASSPHRASE", tessera_e2e::PASSPHRASE),
            ("TESSERA_FAULT", "shred-destroy:pause"),
            ("TESSERA_PAUSE_DIR", pause.to_str().expect("utf-8")),
        ],
    );
    let [a, b] = w.legal_and_ciso("c");
    let id = open_early(&w, "c");
    join(&w, &id, "legal", &a).ok();
    // The destruction waits (whether the join or the tick runs it); a legal hold
    // placed meanwhile wins, and the join says so instead of reporting a
    // met quorum.
    let r = std::thread::scope(|s| {
        let joining = s.spawn(|| join(&w, &id, "ciso", &b));
        let start = Instant::now();
        while !pause.join("paused").exists() {
            assert!(start.elapsed() < Duration::from_secs(60), "never paused");
            std::thread::sleep(Duration::from_millis(50));
        }
        w.run(&["hold", "place", "--class", "c", "--reason", "race"])
            .ok();
        std::fs::write(pause.join("resume"), "").expect("resume");
        joining.join().expect("join thread")
    });
    let r = r.fails_with(5);
    assert!(r.stderr.contains("cancelled meanwhile"), "{r:#?}");
    assert_eq!(class_json(&w, "c")["state"], "active");
    assert!(wrapped_key(&w, "c").is_some(), "nothing was destroyed");

    // A join of a ceremony that is over asks for no signature: it says
    // why at once (stdin is no terminal here, which would stop a prompt).
    let mut args = strings(&["shred", "join", &id, "--role", "legal"]);
    args.extend(id_args(&a));
    let late = run(&w, &args).fails_with(5);
    assert!(late.stderr.contains("was cancelled"), "{late:#?}");
    assert!(!late.stderr.contains("You are asked"), "{late:#?}");
    w.run(&["audit", "verify"]).ok();
}

/// A backup taken before a shred still holds the class key: its restore
/// is refused (and changes nothing), so that no restore brings back what a
/// ceremony destroyed; a backup taken after the shred restores.
#[test]
fn a_backup_from_before_a_shred_is_never_restored() {
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&[]);
    let [a, b] = w.legal_and_ciso("c");
    let before = w.tmp.path().join("before.db");
    let after = w.tmp.path().join("after.db");
    let path = |p: &PathBuf| p.to_str().expect("utf-8").to_string();
    w.run(&["backup", "--out", &path(&before)]).ok();
    let id = open_early(&w, "c");
    join(&w, &id, "legal", &a).ok();
    join(&w, &id, "ciso", &b).ok();
    wait_class(&w, "c", "shredded", |c| c["state"] == "shredded");
    w.run(&["backup", "--out", &path(&after)]).ok();
    assert_eq!(s.terminate(), 0, "log:\n{}", s.logs());
    let r = w.run(&["restore", &path(&before)]).fails_with(5);
    assert!(
        r.stderr.contains("still holds the key of c (shredded"),
        "{r:#?}"
    );
    w.run(&["restore", &path(&after)]).ok();
    let _s = w.serve(&[]);
    assert_eq!(class_json(&w, "c")["state"], "shredded");
    assert!(wrapped_key(&w, "c").is_none(), "the key came back");
    w.run(&["audit", "verify"]).ok();
}

#[test]
fn shred_is_crash_safe_at_every_step() {
    for point in [
        "shred-before-destroy",
        "shred-in-destroy",
        "shred-before-compact",
        "shred-mid-compact",
    ] {
        let w = World::new();
        w.init_passphrase();
        let mut s = w.serve_env(
            &[],
            &[
                ("TESSERA_PASSPHRASE", tessera_e2e::PASSPHRASE),
                ("TESSERA_FAULT", point),
            ],
        );
        let [a, b] = w.legal_and_ciso("c");
        let wrapped = wrapped_key(&w, "c").expect("wrapped");
        let id = w
            .run(&["shred", "open", "--class", "c", "--early", "--json"])
            .ok()
            .json()["id"]
            .as_str()
            .expect("id")
            .to_string();
        join(&w, &id, "legal", &a).ok();
        // The quorum-making join hits the fault: the broker dies mid-way.
        let r = join(&w, &id, "ciso", &b);
        assert_ne!(r.code, 0, "{point}: the broker should have aborted: {r:#?}");
        let status = s.wait_exit();
        assert_ne!(status, 0, "{point}: broker exit");

        // On disk: either the key is intact and the ceremony open, or the
        // key is gone and the certificate written. Never a key destroyed
        // without a certificate.
        {
            let c = rusqlite::Connection::open(w.db()).expect("db");
            let (key, cert, state): (Option<Vec<u8>>, Option<String>, String) = c
                .query_row(
                    "SELECT wrapped_key, certificate, state FROM classes WHERE name = 'c'",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .expect("class row");
            match (key.is_some(), cert.is_some()) {
                (true, false) => assert_eq!(state, "shredding", "{point}"),
                (false, true) => assert_eq!(state, "shredded", "{point}"),
                other => panic!("{point}: inconsistent key/certificate state {other:?}"),
            }
        }

        // A restart completes the ceremony and the compaction.
        let _s2 = w.serve(&[]);
        wait_class(&w, "c", "shredded", |c| c["state"] == "shredded");
        let start = Instant::now();
        loop {
            let files = store_files(&w);
            let clean = files.iter().all(|(_, b)| !contains(b, &wrapped));
            if clean {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{point}: the wrapped key is still on disk after restart"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let cert = w.tmp.path().join("c.cert");
        w.run(&[
            "shred",
            "certificate",
            "show",
            "--class",
            "c",
            "--out",
            cert.to_str().expect("p"),
        ])
        .ok();
        w.run(&["shred", "certificate", "verify", cert.to_str().expect("p")])
            .ok();
        w.run(&["audit", "verify"]).ok();
    }
}

/// One key holds one role: a person holding two roles would meet a quorum
/// alone (and get two shares of each class), and a replaced key whose
/// shares were destroyed does not come back.
#[test]
fn a_holder_key_holds_one_role_and_a_replaced_one_never_returns() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let pubkey = |role: &str, file: &str| new_holder_key(&w, role, file).1;
    // A role the broker would refuse gets no key written for it.
    let bad = w.tmp.path().join("bad.key");
    let r = w
        .run(&[
            "holder",
            "init",
            "--role",
            "bad/role",
            "--identity-file",
            bad.to_str().expect("p"),
        ])
        .fails_with(7);
    assert!(r.stderr.contains("role"), "{r:#?}");
    assert!(!bad.exists());
    let nowhere = w.tmp.path().join("no-such-dir").join("legal.key");
    let r = w
        .run(&[
            "holder",
            "init",
            "--role",
            "legal",
            "--identity-file",
            nowhere.to_str().expect("p"),
        ])
        .fails_with(7);
    assert!(r.stderr.contains("a directory that exists"), "{r:#?}");
    let legal = pubkey("legal", "legal.key");
    w.run(&["holder", "enroll", "--role", "legal", "--pubkey", &legal])
        .ok();
    let twice = w
        .run(&["holder", "enroll", "--role", "ciso", "--pubkey", &legal])
        .fails_with(5);
    assert!(
        twice
            .stderr
            .contains("already the holder key of role \"legal\""),
        "{twice:#?}"
    );
    w.holder("ciso", true);
    w.run(&["holder", "replace", "--role", "ciso", "--pubkey", &legal])
        .fails_with(5);
    let legal2 = pubkey("legal", "legal2.key");
    w.run(&["holder", "replace", "--role", "legal", "--pubkey", &legal2])
        .ok();
    let back = w
        .run(&["holder", "enroll", "--role", "board", "--pubkey", &legal])
        .fails_with(7);
    assert!(back.stderr.contains("never enrolled again"), "{back:#?}");
    let holders = w.run(&["holder", "list", "--json"]).ok().json();
    assert_eq!(holders["holders"].as_array().map(Vec::len), Some(2));
    w.run(&["audit", "verify"]).ok();
}

#[test]
fn holder_replace_rekeys_and_old_shares_open_nothing() {
    use tessera_broker::keys::{SymmetricKey, class_data_key_aad};
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let keys = three_holders(&w);
    two_of_three(&w, "hr", "1h");
    let before = class_json(&w, "hr");
    let token = w.agent("payroll", "class:hr", "15m");
    let env = [("TESSERA_TOKEN", token.as_str())];
    let mut cts = Vec::new();
    for (ctx, text) in [
        ("year=2024", "salaries 2024"),
        ("year=2025", "salaries 2025"),
    ] {
        let ct = w
            .run_with(
                &["encrypt", "--class", "hr", "--context", ctx, "--json"],
                Some(text.as_bytes()),
                &env,
            )
            .ok()
            .json();
        cts.push((ctx, text, unhex(ct["ciphertext"].as_str().expect("ct"))));
    }
    let export = |role: &str, key: &Option<PathBuf>, name: &str| -> PathBuf {
        let out = w.tmp.path().join(name);
        let mut a = strings(&[
            "holder", "share", "export", "--role", role, "--class", "hr", "--out",
        ]);
        a.push(out.display().to_string());
        a.extend(id_args(key));
        run(&w, &a).ok();
        out
    };
    let combine = |files: &[&PathBuf]| -> serde_json::Value {
        let mut a = strings(&["shares", "combine", "--reveal", "--json"]);
        a.extend(files.iter().map(|f| f.display().to_string()));
        for k in &keys[1..] {
            a.extend(id_args(k));
        }
        run(&w, &a).ok().json()
    };
    let old_files = [
        export("ciso", &keys[1], "ciso.old"),
        export("board", &keys[2], "board.old"),
    ];
    let old = combine(&[&old_files[0], &old_files[1]]);
    assert_eq!(old["key_fingerprint"], before["key_fingerprint"]);
    let old_key = unhex(old["key"].as_str().expect("key"));
    let old_wrapped = wrapped_key(&w, "hr").expect("wrapped");

    // A ceremony open on the class names its old key: the handover
    // cancels it, and says so.
    let opened = w
        .run(&["shred", "open", "--class", "hr", "--early", "--json"])
        .ok()
        .json();

    // The legal role passes to a new holder.
    let (_, new_pubkey, new_fingerprint) = new_holder_key(&w, "legal", "legal-new.key");
    let replaced = w
        .run(&[
            "holder",
            "replace",
            "--role",
            "legal",
            "--pubkey",
            &new_pubkey,
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(replaced["rekeyed"], serde_json::json!(["hr"]));
    assert_eq!(
        replaced["cancelled_ceremonies"],
        serde_json::json!([opened["id"]])
    );
    let after = class_json(&w, "hr");
    assert_ne!(after["key_fingerprint"], before["key_fingerprint"]);

    // Data encrypted before the handover still decrypts through the broker.
    for (ctx, text, ct) in &cts {
        let r = w
            .run_with(
                &["decrypt", "--class", "hr", "--context", ctx],
                Some(ct),
                &env,
            )
            .ok();
        assert_eq!(&r.stdout, text);
    }
    // The old shares still combine to the old key, which opens no stored
    // data key; the new shares' key opens them all.
    let new_files = [
        export("ciso", &keys[1], "ciso.new"),
        export("board", &keys[2], "board.new"),
    ];
    let new = combine(&[&new_files[0], &new_files[1]]);
    assert_eq!(new["key_fingerprint"], after["key_fingerprint"]);
    let old_ck = SymmetricKey::from_bytes(&old_key).expect("key");
    let new_ck = SymmetricKey::from_bytes(&unhex(new["key"].as_str().expect("key"))).expect("key");
    let db =
        rusqlite::Connection::open_with_flags(w.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("db");
    let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = db
        .prepare("SELECT id, context_digest, wrapped FROM class_data_keys WHERE class = 'hr'")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("rows");
    assert_eq!(rows.len(), 2);
    for (id, digest, wrapped) in &rows {
        let aad = class_data_key_aad("hr", *id as u64, digest);
        assert!(
            old_ck.open(&aad, wrapped).is_none(),
            "the old key opens data key {id}"
        );
        assert!(
            new_ck.open(&aad, wrapped).is_some(),
            "the new key opens data key {id}"
        );
    }
    for (path, bytes) in store_files(&w) {
        assert!(
            !contains(&bytes, &old_wrapped),
            "{} keeps the old wrapped key",
            path.display()
        );
    }
    // The replaced holder's key is refused with a precise reason.
    let r = run(
        &w,
        &strings(&[
            "holder",
            "share",
            "export",
            "--role",
            "legal",
            "--class",
            "hr",
            "--out",
            "/dev/null",
        ])
        .into_iter()
        .chain(id_args(&keys[0]))
        .collect::<Vec<_>>(),
    )
    .fails_with(4);
    assert!(r.stderr.contains("replaced key"), "{r:#?}");
    let list = w.run(&["holder", "list", "--json"]).ok().json();
    let legal = list["holders"]
        .as_array()
        .and_then(|a| a.iter().find(|h| h["role"] == "legal"))
        .expect("legal");
    assert_eq!(legal["key_fingerprint"], new_fingerprint.as_str());
    w.run(&["audit", "verify"]).ok();
}

#[test]
fn class_recover_restores_a_class_into_a_new_store_from_shares() {
    let a = World::new();
    a.init_passphrase();
    let mut sa = a.serve(&[]);
    let keys = three_holders(&a);
    for class in ["tax", "other"] {
        two_of_three(&a, class, "1h");
    }
    a.run(&["hold", "place", "--class", "tax", "--reason", "audit 2026"])
        .ok();
    let token = a.agent("filer", "class:tax", "15m");
    let ct = a
        .run_with(
            &[
                "encrypt",
                "--class",
                "tax",
                "--context",
                "form=1120",
                "--json",
            ],
            Some(b"return 2025"),
            &[("TESSERA_TOKEN", token.as_str())],
        )
        .ok()
        .json();
    let ct = unhex(ct["ciphertext"].as_str().expect("ct"));
    let share = |class: &str, role: usize, name: &str| -> String {
        let out = a.tmp.path().join(name);
        let role_name = ["legal", "ciso", "board"][role];
        let mut args = strings(&[
            "holder", "share", "export", "--role", role_name, "--class", class, "--out",
        ]);
        args.push(out.display().to_string());
        args.extend(id_args(&keys[role]));
        run(&a, &args).ok();
        out.display().to_string()
    };
    let s_legal = share("tax", 0, "tax.legal");
    let s_board = share("tax", 2, "tax.board");
    let s_other = share("other", 1, "other.ciso");
    let s_other_legal = share("other", 0, "other.legal");
    let other_key = class_json(&a, "other")["key_fingerprint"].clone();
    sa.terminate();

    // The root key of store A is lost; store B gets the class back from
    // A's file and two holders' shares.
    let b = World::new();
    b.init_passphrase();
    let _sb = b.serve(&[]);
    let old_db = a.db().display().to_string();
    let ids: Vec<String> = keys.iter().flat_map(id_args).collect();
    let recover = |shares: &[&str]| -> tessera_e2e::Ran {
        let mut args = strings(&["class", "recover", "--class", "tax", "--from", &old_db]);
        for s in shares {
            args.push("--share".into());
            args.push((*s).to_string());
        }
        args.extend(ids.iter().cloned());
        run(&b, &args)
    };
    let missing = b.tmp.path().join("no-such.db").display().to_string();
    let mut args = strings(&["class", "recover", "--class", "tax", "--from", &missing]);
    args.extend(strings(&["--share", &s_legal, "--share", &s_board]));
    args.extend(ids.iter().cloned());
    let r = run(&b, &args).fails_with(7);
    assert!(r.stderr.contains("is not a file"), "{r:#?}");
    let few = recover(&[&s_legal]).fails_with(7);
    assert!(few.stderr.contains("needs 2 of 3"), "{few:#?}");
    let mixed = recover(&[&s_legal, &s_other]).fails_with(7);
    assert!(
        mixed.stderr.contains("belongs to class other"),
        "{mixed:#?}"
    );
    let dup = recover(&[&s_legal, &s_legal]).fails_with(7);
    assert!(dup.stderr.contains("twice"), "{dup:#?}");
    // An altered class row is refused with a reason: a raised threshold no
    // quorum could meet, a lowered one that fewer holders could meet.
    let set_threshold = |n: i64| {
        rusqlite::Connection::open(a.db())
            .expect("db")
            .execute("UPDATE classes SET threshold = ?1 WHERE name = 'tax'", [n])
            .expect("alter the class row");
    };
    for n in [9, 1] {
        set_threshold(n);
        let altered = recover(&[&s_legal, &s_board]).fails_with(7);
        assert!(
            altered.stderr.contains(&format!("{n} of 3 holders")),
            "{altered:#?}"
        );
    }
    set_threshold(2);
    assert_eq!(
        b.run(&["class", "show", "tax"]).code,
        3,
        "nothing was restored by the refused attempts"
    );
    let restored = recover(&[&s_legal, &s_board]).ok();
    assert!(
        restored.stdout.contains("Recovered class tax"),
        "{restored:#?}"
    );
    let c = class_json(&b, "tax");
    assert_eq!(c["data_keys"], 1);
    assert_eq!(
        c["holds"][0]["reason"], "audit 2026",
        "legal holds survive recovery"
    );
    let token_b = b.agent("filer", "class:tax", "15m");
    let plain = b
        .run_with(
            &["decrypt", "--class", "tax", "--context", "form=1120"],
            Some(&ct),
            &[("TESSERA_TOKEN", token_b.as_str())],
        )
        .ok();
    assert_eq!(plain.stdout, "return 2025");
    recover(&[&s_legal, &s_board]).fails_with(5);

    // The legal role has changed hands in store B since: the old file's
    // shares of class other are sealed to the old legal key, so the
    // recovered class is re-keyed for the holders enrolled here, and the
    // new legal holder's share opens it.
    let (new_legal, pubkey, _) = new_holder_key(&b, "legal", "legal.new");
    b.run(&["holder", "replace", "--role", "legal", "--pubkey", &pubkey])
        .ok();
    let mut args = strings(&["class", "recover", "--class", "other", "--from", &old_db]);
    args.extend(strings(&["--share", &s_other, "--share", &s_other_legal]));
    args.extend(ids.iter().cloned());
    let moved = run(&b, &args).ok();
    assert!(moved.stdout.contains("re-keyed"), "{moved:#?}");
    let now = class_json(&b, "other")["key_fingerprint"].clone();
    assert_ne!(now, other_key);
    let export = |role: &str, key: &Option<PathBuf>| -> String {
        let out = b.tmp.path().join(format!("other.{role}.new"));
        let mut a = strings(&[
            "holder", "share", "export", "--role", role, "--class", "other",
        ]);
        a.extend(strings(&["--out", &out.display().to_string()]));
        a.extend(id_args(key));
        run(&b, &a).ok();
        out.display().to_string()
    };
    let mut args = strings(&["shares", "combine", "--json"]);
    args.push(export("legal", &Some(new_legal.clone())));
    args.push(export("ciso", &keys[1]));
    args.extend(id_args(&Some(new_legal)));
    args.extend(id_args(&keys[1]));
    assert_eq!(run(&b, &args).ok().json()["key_fingerprint"], now);

    let audit = b.run(&["audit", "export"]).ok().stdout;
    assert!(audit.contains("class.recover"));
    b.run(&["audit", "verify"]).ok();
}

#[test]
fn operator_shares_keep_the_broker_sealed_until_a_quorum_unseals_it() {
    let w = World::new();
    // Each operator gets a share sealed to their own age key.
    let mut recipients = Vec::new();
    let mut op_keys = Vec::new();
    for i in 1..=3 {
        let (key, pubkey, _) = new_holder_key(&w, &format!("op{i}"), &format!("op{i}.key"));
        recipients.push(pubkey.split(':').nth(1).expect("age part").to_string());
        op_keys.push(key);
    }
    let shares_dir = w.tmp.path().join("shares");
    let init_to = |dir: &std::path::Path, third: &str| {
        w.run(&[
            "init",
            "--unseal",
            "shares",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--share-dir",
            dir.to_str().expect("p"),
            "--operator-recipient",
            &recipients[0],
            "--operator-recipient",
            &recipients[1],
            "--operator-recipient",
            third,
            "--json",
        ])
    };
    // An impossible split is refused before the data directory is made.
    let r = w
        .run(&[
            "init",
            "--unseal",
            "shares",
            "--shares",
            "2",
            "--threshold",
            "3",
        ])
        .fails_with(7);
    assert!(r.stderr.contains("threshold"), "{r:#?}");
    assert!(!w.data.exists(), "init left a data directory: {r:#?}");
    // Shares that could not all be delivered leave no store behind (one
    // whose shares were never handed out could never be unsealed).
    let typo = init_to(&shares_dir, "age1notarecipient").fails_with(7);
    assert!(typo.stderr.contains("recipient 3"), "{typo:#?}");
    let taken = w.tmp.path().join("taken");
    std::fs::create_dir(&taken).expect("dir");
    std::fs::write(taken.join("operator-2.share"), "an earlier share").expect("write");
    let clash = init_to(&taken, &recipients[2]).fails_with(5);
    assert!(clash.stderr.contains("operator-2.share"), "{clash:#?}");
    assert!(!w.db().exists(), "a store was created: {clash:#?}");
    let init = init_to(&shares_dir, &recipients[2]).ok().json();
    assert_eq!(init["unseal"], "shares");
    assert_eq!(init["operator_shares"].as_array().map(Vec::len), Some(3));
    let share = |i: usize| shares_dir.join(format!("operator-{i}.share"));
    let sealed_text = std::fs::read_to_string(share(1)).expect("share");
    assert!(sealed_text.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
    // Debian's age opens an operator's share with the operator's key.
    let opened = age_decrypt(&op_keys[0], &share(1));
    assert!(
        opened.starts_with("tessera-share-v1\nclass: tessera-root-key\n"),
        "{opened}"
    );

    let mut s = w.serve_env(&[], &[]);
    let status = w.run(&["status", "--json"]).ok().json();
    assert_eq!(status["sealed"], true);
    let sealed = w
        .run_with(&["secret", "put", "a/b"], Some(b"v"), &[])
        .fails_with(5);
    assert!(sealed.stderr.contains("sealed"), "{sealed:#?}");

    let unseal = |i: usize, key: usize| -> tessera_e2e::Ran {
        w.run(&[
            "unseal",
            share(i).to_str().expect("p"),
            "--identity-file",
            op_keys[key].to_str().expect("p"),
            "--json",
        ])
    };
    // Operators hold no admin token: a sealed broker tells anyone how far
    // unsealing has come (the flag wins over the data dir's token file).
    let no_token = [
        "status",
        "--json",
        "--admin-token-file",
        "/nonexistent/admin.token",
    ];
    assert_eq!(w.run(&no_token).ok().json()["sealed"], true);
    let first = unseal(1, 0).ok().json();
    assert_eq!(
        (first["sealed"].clone(), first["received"].clone()),
        (true.into(), 1.into())
    );
    let again = unseal(1, 0).fails_with(7);
    assert!(again.stderr.contains("already given"), "{again:#?}");
    unseal(2, 0).fails_with(7); // sealed to operator 2, not openable with operator 1's key
    // A share of another store's root key is refused.
    let other = World::new();
    let other_init = other.init_shares(2, 2);
    let foreign = w.tmp.path().join("foreign.share");
    std::fs::write(
        &foreign,
        other_init["operator_shares"][0].as_str().expect("text"),
    )
    .expect("w");
    let f = w
        .run(&["unseal", foreign.to_str().expect("p")])
        .fails_with(7);
    assert!(f.stderr.contains("not of this store's root key"), "{f:#?}");
    let done = unseal(2, 1).ok().json();
    assert_eq!(done["sealed"], false);

    w.put("db/prod", b"postgres://u:p@h/db");
    let status = w.run(&["status", "--json"]).ok().json();
    assert_eq!(status["sealed"], false);
    assert_eq!(status["unseal_source"], "shares");
    let admin = w.admin_token();
    let refused = w
        .run_with(&no_token, None, &[("TESSERA_ADMIN_TOKEN", &admin)])
        .fails_with(4);
    assert!(
        refused.stderr.contains("no admin credential"),
        "{refused:#?}"
    );
    w.run(&["audit", "verify"]).ok();
    let audit = w.run(&["audit", "export"]).ok().stdout;
    assert!(audit.contains("unseal.share") && audit.contains("store.unseal"));
    assert!(
        audit.contains("already given"),
        "refused attempts are audited too"
    );

    // After a restart it is sealed again; a wrong combination resets.
    s.terminate();
    let _s2 = w.serve_env(&[], &[]);
    assert_eq!(w.run(&["status", "--json"]).ok().json()["sealed"], true);
    let plain3 = age_decrypt(&op_keys[2], &share(3));
    let tampered = w.tmp.path().join("tampered.share");
    let line = plain3.lines().last().expect("share line").to_string();
    let mut bytes = line.clone().into_bytes();
    let i = "share: ".len();
    bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
    std::fs::write(
        &tampered,
        plain3.replace(&line, &String::from_utf8(bytes).expect("utf-8")),
    )
    .expect("write");
    unseal(1, 0).ok();
    let wrong = w
        .run(&["unseal", tampered.to_str().expect("p")])
        .fails_with(5);
    assert!(wrong.stderr.contains("reset"), "{wrong:#?}");
    assert_eq!(w.run(&["status", "--json"]).ok().json()["sealed"], true);
    unseal(1, 0).ok();
    w.run(&[
        "unseal",
        share(3).to_str().expect("p"),
        "--identity-file",
        op_keys[2].to_str().expect("p"),
    ])
    .ok();
    let got = w.run(&["secret", "list", "--json"]).ok().json();
    assert_eq!(got["secrets"][0]["name"], "db/prod");

    // A new root key hands out new shares as init did: sealed to each
    // operator, written to a new directory; none is printed in clear.
    let rekeyed = w.tmp.path().join("rekeyed");
    let mut args = vec![
        "rekey",
        "root",
        "--shares",
        "3",
        "--threshold",
        "2",
        "--json",
    ];
    let existing = shares_dir.to_str().expect("p");
    let r = w
        .run(&[&args[..], &["--share-dir", existing]].concat())
        .fails_with(5);
    assert!(r.stderr.contains("already exists"), "{r:#?}");
    let rekeyed_dir = rekeyed.to_str().expect("p");
    args.extend(["--share-dir", rekeyed_dir]);
    for r in &recipients {
        args.extend(["--operator-recipient", r.as_str()]);
    }
    let r = w.run(&args).ok();
    assert!(!r.stdout.contains("tessera-share-v1"), "{r:#?}");
    let new_share = |i: usize| rekeyed.join(format!("operator-{i}.share"));
    for i in 1..=3 {
        let mode = std::fs::metadata(new_share(i))
            .expect("share")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
    // Restarted, the broker is sealed under the new root key.
    drop(_s2);
    let _s3 = w.serve_env(&[], &[]);
    for i in [1, 3] {
        w.run(&[
            "unseal",
            new_share(i).to_str().expect("p"),
            "--identity-file",
            op_keys[i - 1].to_str().expect("p"),
        ])
        .ok();
    }
    let got = w.run(&["secret", "list", "--json"]).ok().json();
    assert_eq!(got["secrets"][0]["name"], "db/prod");
}

/// `rekey root` of an operator-share store keeps the new shares (written
/// and synced, or shown) before the store switches to their key: a broker
/// that dies just before or just after the switch leaves a store that one
/// of the two sets unseals, and the CLI says to keep both. A commit with
/// an unknown id changes nothing.
#[test]
fn an_operator_share_rekey_never_leaves_a_store_no_share_opens() {
    for fault in ["", "rekey-before-commit", "rekey-after-commit"] {
        let w = World::new();
        let init = w.init_shares(3, 2);
        let old: Vec<String> = init["operator_shares"]
            .as_array()
            .expect("shares")
            .iter()
            .map(|s| s.as_str().expect("text").to_string())
            .collect();
        let unseal = |share: &[u8]| w.run_with(&["unseal"], Some(share), &[]);
        let env: Vec<(&str, &str)> = if fault.is_empty() {
            vec![]
        } else {
            vec![("TESSERA_FAULT", fault)]
        };
        let mut s = w.serve_env(&[], &env);
        unseal(old[0].as_bytes()).ok();
        unseal(old[2].as_bytes()).ok();
        w.put("db/prod", b"value-kept");
        let dir = w.tmp.path().join("new-shares");
        let new: Vec<String> = if fault.is_empty() {
            // Shares that could not be shown are not switched to.
            let mut unseen = w
                .command()
                .args(["rekey", "root", "--shares", "3", "--threshold", "2"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn tessera");
            drop(unseen.stdout.take());
            let out = unseen.wait_with_output().expect("wait");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(err.contains("the root key was not replaced"), "{err}");
            // Printed: the JSON document comes before the switch.
            let r = w
                .run(&[
                    "rekey",
                    "root",
                    "--shares",
                    "3",
                    "--threshold",
                    "2",
                    "--json",
                ])
                .ok();
            let doc = r.json();
            assert_eq!(doc["generation"], 2, "{r:#?}");
            doc["operator_shares"]
                .as_array()
                .expect("shares")
                .iter()
                .map(|s| s.as_str().expect("text").to_string())
                .collect()
        } else {
            let r = w.run(&[
                "rekey",
                "root",
                "--shares",
                "3",
                "--threshold",
                "2",
                "--share-dir",
                dir.to_str().expect("p"),
            ]);
            assert_eq!(r.code, 1, "{fault}: {r:#?}");
            assert!(
                r.stderr.contains("may or may not have taken effect"),
                "{fault}: {r:#?}"
            );
            assert_ne!(s.wait_exit(), 0);
            let mode = std::fs::metadata(&dir).expect("dir").permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                0o700
            );
            (1..=3)
                .map(|i| {
                    std::fs::read_to_string(dir.join(format!("operator-{i}.share")))
                        .expect("share written before the switch")
                })
                .collect()
        };
        s.terminate();
        let _s = w.serve_env(&[], &[]);
        // Before the commit the old shares still open the store; after it
        // the new ones do, and the other set is refused.
        let (works, refused) = if fault == "rekey-before-commit" {
            (&old, &new)
        } else {
            (&new, &old)
        };
        let r = unseal(refused[0].as_bytes()).fails_with(7);
        assert!(
            r.stderr.contains("not of this store's root key"),
            "{fault}: {r:#?}"
        );
        unseal(works[1].as_bytes()).ok();
        unseal(works[2].as_bytes()).ok();
        // Unsealed, it still tells an operator which set is in effect.
        let r = unseal(refused[1].as_bytes()).fails_with(7);
        assert!(
            r.stderr.contains("not of the root key in effect"),
            "{fault}: {r:#?}"
        );
        let r = unseal(works[0].as_bytes()).fails_with(5);
        assert!(
            r.stderr.contains("of the root key in effect: keep it"),
            "{fault}: {r:#?}"
        );
        let status = w.run(&["status", "--json"]).ok().json();
        assert_eq!(status["sealed"], false, "{fault}");
        let token = w.agent("app", "db/*", "15m");
        assert_eq!(
            w.get("db/prod", &token).ok().stdout,
            "value-kept",
            "{fault}"
        );
        w.run(&["audit", "verify"]).ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_commit_names_the_prepared_one() {
    let w = World::new();
    let init = w.init_shares(2, 2);
    let _s = w.serve_env(&[], &[]);
    for share in init["operator_shares"].as_array().expect("shares") {
        w.run_with(
            &["unseal"],
            Some(share.as_str().expect("text").as_bytes()),
            &[],
        )
        .ok();
    }
    let mut admin = w.admin_client().await;
    let token = w.admin_token();
    let call = |prepare: bool, commit: &str| {
        tessera_e2e::authed(
            tessera_broker::proto::RekeyRootRequest {
                passphrase: Vec::new(),
                shares: 2,
                threshold: 2,
                prepare,
                commit: commit.into(),
            },
            &token,
        )
    };
    // One step is not offered for shares: the old ones would stop working
    // before the new ones were kept.
    let e = admin
        .rekey_root(call(false, ""))
        .await
        .expect_err("one step");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let first = admin
        .rekey_root(call(true, ""))
        .await
        .expect("prepare")
        .into_inner();
    let second = admin
        .rekey_root(call(true, ""))
        .await
        .expect("prepare")
        .into_inner();
    // The first was replaced by the second: committing it changes nothing.
    let e = admin
        .rekey_root(call(false, &first.pending_id))
        .await
        .expect_err("replaced");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("old operator shares still unseal"),
        "{e:?}"
    );
    let done = admin
        .rekey_root(call(false, &second.pending_id))
        .await
        .expect("commit")
        .into_inner();
    assert_eq!(done.generation, 2);
    // Committed once: the id is spent.
    let e = admin
        .rekey_root(call(false, &second.pending_id))
        .await
        .expect_err("committed twice");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let audit = w.run(&["audit", "export"]).ok().stdout;
    assert!(audit.contains("not in effect until committed"), "{audit}");
}

/// Someone who can write the database file but holds no root key and no
/// holder key cannot shred a class, lift a legal hold, act for a role or
/// receive its shares: holder and class rows (with their standing holds)
/// carry MACs, and a ceremony's quorum and joins are judged against them.
#[test]
fn edited_holder_class_and_hold_rows_shred_nothing() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let keys = three_holders(&w);
    for class in ["held", "loose", "joined", "asked"] {
        two_of_three(&w, class, "1y");
    }
    let sql = |stmt: &str| edit_db(&w, stmt);
    let tampered = |r: tessera_e2e::Ran| {
        let r = r.fails_with(9);
        assert!(r.stderr.contains("failed authentication"), "{r:#?}");
    };
    let early = |class: &str| w.run(&["shred", "open", "--class", class, "--early"]);
    // A legal hold deleted in the file.
    w.run(&["hold", "place", "--class", "held", "--reason", "litigation"])
        .ok();
    sql("DELETE FROM holds WHERE class = 'held';");
    tampered(early("held"));
    // No new hold is sealed into a record that fails (it would hide the
    // edit, or be lifted unseen itself).
    tampered(w.run(&["hold", "place", "--class", "held", "--reason", "again"]));
    // A threshold lowered, and a deadline moved into the past.
    sql(
        "UPDATE classes SET threshold = 1, early_threshold = 1, deadline = 0 WHERE name = 'loose';",
    );
    tampered(early("loose"));
    tampered(w.run(&["shred", "open", "--class", "loose"]));
    // The tick opens no ceremony for it either.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(open_ceremony(&class_json(&w, "loose")), None);
    assert_flagged(&w, &["class:held", "class:loose"]);
    // A join row written in the file does not count: the real joins of
    // the other two roles do not complete a 3-of-3 early shred with it.
    let id = open_early(&w, "joined");
    sql(&format!(
        "INSERT INTO ceremony_joins (ceremony, role, signature, joined_at)
         VALUES ('{id}', 'board', zeroblob(64), 0);"
    ));
    join(&w, &id, "legal", &keys[0]).ok();
    let refused = join(&w, &id, "ciso", &keys[1]);
    assert!(
        refused.stderr.contains("hold place --class joined"),
        "{refused:#?}"
    );
    tampered(refused);
    assert_ne!(class_json(&w, "joined")["state"], "shredded");
    // The way out the refusal names: a hold cancels the ceremony, and once
    // it is released a new one opens.
    w.run(&[
        "hold",
        "place",
        "--class",
        "joined",
        "--reason",
        "forged join",
    ])
    .ok();
    assert_eq!(open_ceremony(&class_json(&w, "joined")), None);
    w.run(&[
        "hold",
        "release",
        "--class",
        "joined",
        "--reason",
        "looked into",
    ])
    .ok();
    assert_ne!(open_early(&w, "joined"), id);
    // A ceremony row asking for fewer joins than its class: one join of a
    // 3-of-3 early shred destroys nothing.
    let id = open_early(&w, "asked");
    sql(&format!(
        "UPDATE ceremonies SET required = 1 WHERE id = '{id}';"
    ));
    join(&w, &id, "legal", &keys[0]).ok();
    std::thread::sleep(Duration::from_millis(1500));
    assert_ne!(class_json(&w, "asked")["state"], "shredded");
    // A holder's sealed share swapped in the file is not exported as the
    // holder's escrow.
    sql("UPDATE class_shares SET sealed = sealed || ' ' WHERE class = 'asked' AND role = 'ciso';");
    let mut export = strings(&[
        "holder", "share", "export", "--role", "ciso", "--class", "asked",
    ]);
    export.extend(id_args(&keys[1]));
    export.extend(strings(&[
        "--out",
        w.tmp.path().join("ciso.share").to_str().expect("p"),
    ]));
    tampered(run(&w, &export));
    // A holder's keys swapped for someone else's: they cannot act for the
    // role, and no share is sealed to their recipient.
    let (mine, pubkey, _) = new_holder_key(&w, "legal", "mine.key");
    let swapped = tessera_shred::holder::HolderPublicKey::parse(&pubkey).expect("pubkey");
    sql(&format!(
        "UPDATE holders SET signing_key = X'{}', age_recipient = '{}' WHERE role = 'legal';",
        tessera_shred::hex(&swapped.signing_key),
        swapped.age_recipient
    ));
    let out = w.tmp.path().join("stolen.share");
    tampered(w.run(&[
        "holder",
        "share",
        "export",
        "--role",
        "legal",
        "--class",
        "asked",
        "--identity-file",
        mine.to_str().expect("p"),
        "--out",
        out.to_str().expect("p"),
    ]));
    assert!(!out.exists());
    tampered(w.run(&[
        "class",
        "create",
        "more",
        "--retain",
        "1y",
        "--holders",
        "legal,ciso",
        "--threshold",
        "2",
    ]));
    assert_flagged(&w, &["holder:legal"]);
    // A holder row deleted: the classes it holds are flagged, and the role
    // is not enrolled again for someone else.
    sql("DELETE FROM holders WHERE role = 'board';");
    let (_, other, _) = new_holder_key(&w, "board", "other-board.key");
    tampered(w.run(&["holder", "enroll", "--role", "board", "--pubkey", &other]));
    assert_flagged(&w, &["class:joined"]);
    w.run(&["audit", "verify"]).ok();
}

/// A legal hold keeps a secret of its class from `secret rm` even when the
/// secret's row is edited to name no class, or its class row is deleted.
#[test]
fn a_held_secret_is_not_deleted_through_an_edited_row() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    three_holders(&w);
    two_of_three(&w, "c", "1y");
    w.put("kept/one", b"value");
    w.run(&["secret", "config", "kept/one", "--class", "c"])
        .ok();
    w.run(&["hold", "place", "--class", "c", "--reason", "litigation"])
        .ok();
    let sql = |stmt: &str| edit_db(&w, stmt);
    sql("UPDATE secrets SET class = NULL WHERE name = 'kept/one';");
    let r = w.run(&["secret", "rm", "kept/one"]).fails_with(5);
    assert!(r.stderr.contains("its class is not known"), "{r:#?}");
    // The hold deleted as well: the class record no longer verifies.
    sql("DELETE FROM holds;");
    let r = w.run(&["secret", "rm", "kept/one"]).fails_with(9);
    assert!(r.stderr.contains("class \"c\""), "{r:#?}");
    sql("UPDATE secrets SET class = 'c' WHERE name = 'kept/one';");
    sql("DELETE FROM classes WHERE name = 'c';");
    let r = w.run(&["secret", "rm", "kept/one"]).fails_with(9);
    assert!(r.stderr.contains("missing from the store"), "{r:#?}");
    let token = w.agent("app", "kept/*", "15m");
    assert_eq!(w.get("kept/one", &token).ok().stdout, "value");
}

/// Once the deadline passes, an early ceremony still short of its (larger)
/// quorum gives way to a normal one, which the broker opens itself: the
/// class's own threshold then suffices.
#[test]
fn an_early_ceremony_gives_way_to_the_normal_one_at_the_deadline() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let keys = three_holders(&w);
    // Long enough for the early ceremony to be opened and joined first.
    two_of_three(&w, "c", "15s");
    let early = w
        .run(&["shred", "open", "--class", "c", "--early", "--json"])
        .ok()
        .json();
    assert_eq!(early["action"], "shred-early", "{early}");
    let early_id = early["id"].as_str().expect("id").to_string();
    join(&w, &early_id, "legal", &keys[0]).ok();
    wait_class(&w, "c", "a normal ceremony", |c| {
        open_ceremony(c).is_some_and(|id| id != early_id)
    });
    let c = class_json(&w, "c");
    let state_of = |id: &str| {
        c["ceremonies"]
            .as_array()
            .expect("ceremonies")
            .iter()
            .find(|x| x["id"] == id)
            .map(|x| (x["action"].clone(), x["state"].clone()))
    };
    assert_eq!(
        state_of(&early_id),
        Some(("shred-early".into(), "cancelled".into()))
    );
    let normal = open_ceremony(&c).expect("open");
    assert_eq!(state_of(&normal), Some(("shred".into(), "open".into())));
    // A holder still on the early ceremony is sent to the new one.
    let r = join(&w, &early_id, "ciso", &keys[1]).fails_with(5);
    assert!(
        r.stderr
            .contains(&format!("join that one (`tessera shred join {normal}`)")),
        "{r:#?}"
    );
    join(&w, &normal, "legal", &keys[0]).ok();
    let done = join(&w, &normal, "ciso", &keys[1]).ok().json();
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(class_json(&w, "c")["state"], "shredded");
    let audit = w.run(&["audit", "export"]).ok().stdout;
    assert!(
        audit.contains(&format!("supersedes early ceremony {early_id}")),
        "{audit}"
    );
    w.run(&["audit", "verify"]).ok();
}
