//! Transports: TLS on TCP, and the standard reflection service.

use std::path::Path;
use std::process::Command;

use tessera_e2e::{PASSPHRASE, World};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throw-away CA and a server certificate for localhost / 127.0.0.1.
fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tessera-test-ca",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext.cnf");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    l.local_addr().expect("addr").port()
}

#[test]
fn tls_on_tcp_serves_clients_that_trust_the_ca() {
    let w = World::new();
    w.init_passphrase();
    let certs = w.tmp.path().join("certs");
    std::fs::create_dir(&certs).expect("certs dir");
    make_certs(&certs);
    let port = free_port();
    // A non-loopback listen address is accepted once TLS is configured.
    let listen = format!("0.0.0.0:{port}");
    let cert = certs.join("server.pem");
    let key = certs.join("server.key");
    let ca = certs.join("ca.pem");
    let _s = w.serve(&[
        "--listen",
        &listen,
        "--tls-cert",
        cert.to_str().expect("utf8"),
        "--tls-key",
        key.to_str().expect("utf8"),
    ]);
    let https = format!("https://localhost:{port}");
    let r = w
        .run(&[
            "status",
            "--json",
            "--addr",
            &https,
            "--tls-ca",
            ca.to_str().expect("utf8"),
        ])
        .ok();
    assert_eq!(r.json()["sealed"], false);
    // Without trusting the CA, the handshake fails: the broker is unreachable,
    // and the message says what to check.
    let r = w.run(&["status", "--addr", &https]).fails_with(6);
    assert!(r.stderr.contains("not reachable"), "{r:#?}");
    assert!(r.stderr.contains("--tls-ca the CA that signed"), "{r:#?}");
    // Plain text to the TLS port does not work either.
    let http = format!("http://127.0.0.1:{port}");
    let r = w.run(&["status", "--addr", &http]).fails_with(6);
    assert!(r.stderr.contains("https://"), "{r:#?}");
    // An address tessera cannot speak to is a bad argument, not a down broker.
    let r = w
        .run(&["status", "--addr", "ftp://127.0.0.1:1"])
        .fails_with(7);
    assert!(r.stderr.contains("unsupported scheme"), "{r:#?}");
    // A client that finishes the TLS handshake and then sends nothing is
    // closed (the greeting deadline covers the decrypted HTTP/2 preface),
    // as is one that stops half-way through the handshake.
    let mut quiet = Command::new("openssl")
        .args(["s_client", "-quiet", "-alpn", "h2", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(&ca)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let mut half = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    std::io::Write::write_all(
        &mut half,
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
    )
    .expect("part of a ClientHello");
    let start = std::time::Instant::now();
    while quiet.try_wait().expect("s_client").is_none() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "a silent TLS client was never closed"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    half.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    loop {
        match std::io::Read::read(&mut half, &mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("a stalled handshake was never closed: {e}"),
        }
    }
}

#[test]
fn tls_key_without_cert_is_a_usage_error() {
    let w = World::new();
    w.init_passphrase();
    let r = w.run_with(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-key",
            "/nonexistent",
        ],
        None,
        &[("TESSERA_PASSPHRASE", PASSPHRASE)],
    );
    assert_eq!(r.code, 2, "{r:#?}");
    // TLS files without --listen would be ignored: a usage error too.
    let certs = w.tmp.path().join("certs");
    std::fs::create_dir(&certs).expect("certs dir");
    make_certs(&certs);
    let (cert, key) = (certs.join("server.pem"), certs.join("server.key"));
    let (cert, key) = (cert.to_str().expect("utf8"), key.to_str().expect("utf8"));
    let pass = [("TESSERA_PASSPHRASE", PASSPHRASE)];
    let r = w.run_with(
        &["serve", "--tls-cert", cert, "--tls-key", key],
        None,
        &pass,
    );
    assert_eq!(r.code, 2, "{r:#?}");
    // A key that is no key is a bad argument (exit 7), and the broker
    // that could not start leaves no socket behind.
    let serve_tls = |key: &str| {
        w.run_with(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ],
            None,
            &pass,
        )
    };
    let r = serve_tls(cert).fails_with(7);
    assert!(r.stderr.contains("invalid tls_key"), "{r:#?}");
    assert!(!w.socket().exists(), "a socket was left behind");
    // A key of another certificate says so.
    let other = certs.join("ca.key");
    let r = serve_tls(other.to_str().expect("utf8")).fails_with(7);
    assert!(r.stderr.contains("is not the private key"), "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_services_in_v1_and_v1alpha() {
    let w = World::new();
    w.init_passphrase();
    let _s = w.serve(&[]);
    let want = [
        "tessera.v1.Broker",
        "tessera.v1.Admin",
        "grpc.health.v1.Health",
    ];

    use tonic_reflection::pb::v1 as r1;
    let mut c = r1::server_reflection_client::ServerReflectionClient::new(w.channel().await);
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection v1")
        .into_inner();
    let resp = stream.message().await.expect("reply").expect("one reply");
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected v1 reply: {resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for w in want {
        assert!(names.contains(&w), "v1 lists {names:?}, not {w}");
    }

    use tonic_reflection::pb::v1alpha as ra;
    let mut c = ra::server_reflection_client::ServerReflectionClient::new(w.channel().await);
    let req = ra::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(ra::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let resp = stream.message().await.expect("reply").expect("one reply");
    let Some(ra::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected v1alpha reply: {resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for w in want {
        assert!(names.contains(&w), "v1alpha lists {names:?}, not {w}");
    }
}

#[test]
fn no_token_leaves_in_the_clear_or_through_proc() {
    use std::os::unix::fs::MetadataExt;
    let w = World::new();
    w.init_passphrase();
    let port = free_port();
    let _s = w.serve(&["--listen", &format!("127.0.0.1:{port}")]);
    w.put("openai/prod", b"sk-one");
    let token = w.agent("gw", "openai/*", "15m");
    // http:// to another machine is refused before anything is sent.
    for addr in ["http://192.0.2.2:47310", "http://example.invalid:80"] {
        let r = w
            .run_with(
                &["get", "openai/prod", "--addr", addr],
                None,
                &[("TESSERA_TOKEN", token.as_str())],
            )
            .fails_with(7);
        assert!(r.stderr.contains("in the clear"), "{r:#?}");
    }
    // The command `tessera run` starts cannot read run's environment (the
    // agent's token) from /proc. Root reads any process's, so as root the
    // run is made by nobody, over loopback TCP.
    let probe = "if tr '\\0' '\\n' < /proc/$PPID/environ 2>/dev/null | grep -q ^TESSERA_TOKEN=; \
                 then echo leaked; else echo kept; fi; echo key=$K";
    let bin = tessera_e2e::bin();
    let mut run = if std::fs::metadata("/proc/self").expect("self").uid() == 0 {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin);
        c
    } else {
        std::process::Command::new(&bin)
    };
    let out = run
        .args(["run", "--addr", &format!("http://127.0.0.1:{port}")])
        .args(["--env", "K=openai/prod", "--", "sh", "-c", probe])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", "/nonexistent")
        .env("TESSERA_TOKEN", &token)
        .current_dir("/")
        .output()
        .expect("tessera run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "kept\nkey=sk-one\n");
}

#[test]
fn idle_connections_neither_lock_others_out_nor_hold_a_shutdown() {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let w = World::new();
    w.init_passphrase();
    let mut s = w.serve(&["--max-connections", "8"]);
    // Sixteen connections that never send a byte (no token needed for
    // that): those past the cap are closed at once, the others once the
    // greeting deadline passes, and the broker is not locked up for good.
    let idle: Vec<_> = (0..16)
        .map(|_| std::os::unix::net::UnixStream::connect(w.socket()).expect("connect"))
        .collect();
    let start = Instant::now();
    while w.run(&["status"]).code != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "status never got in: {}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = [0u8; 256];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("an idle connection was not closed: {e}"),
            }
        }
    }
    let logs = s.logs();
    let warned = logs.matches("the most it accepts").count();
    assert!((1..=3).contains(&warned), "{warned} warnings: {logs}");
    // Connections that stay open with no call under way, silent or after
    // the HTTP/2 preface (a client that then answers nothing), do not hold
    // a shutdown open until the drain deadline.
    let _idle = std::os::unix::net::UnixStream::connect(w.socket()).expect("connect");
    let mut greeted = std::os::unix::net::UnixStream::connect(w.socket()).expect("connect");
    std::io::Write::write_all(
        &mut greeted,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    )
    .expect("preface");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.terminate(), 0);
    let logs = s.logs();
    assert!(!logs.contains("drain deadline"), "{logs}");

    // Each listener has its own places: connections over TCP (which any
    // local user can open) take none of the Unix socket's.
    let port = free_port();
    let s = w.serve(&[
        "--max-connections",
        "4",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    let _tcp: Vec<_> = (0..8)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    w.run(&["status"]).ok();
    assert!(s.logs().contains("4 connections are open"), "{}", s.logs());
}
