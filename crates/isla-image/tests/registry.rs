//! Pull and push against a real registry (Debian's `docker-registry`, distribution 2.8) started
//! on a free loopback port by the test.

use std::fs;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isla_image::registry::Client;
use isla_image::{busybox, Error, Store};
use oci_spec::image::{Descriptor, MediaType};

struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry() -> Registry {
    start_registry_with("")
}

/// A registry whose configuration ends with `extra` (an `auth:` section, say).
fn start_registry_with(extra: &str) -> Registry {
    let dir = tempfile::Builder::new().prefix("isla-registry").tempdir().expect("tempdir");
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let addr = format!("127.0.0.1:{port}");
    let config = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{extra}",
        dir.path().join("data").display()
    );
    let cfg = dir.path().join("config.yml");
    fs::write(&cfg, config).expect("config");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (apt install docker-registry; scripts/setup does)");
    let reg = Registry { child, addr, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&reg.addr).is_err() {
        assert!(Instant::now() < deadline, "registry did not start listening on {}", reg.addr);
        std::thread::sleep(Duration::from_millis(50));
    }
    reg
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::Builder::new().prefix("isla-image-test").tempdir().expect("tempdir");
    let s = Store::open(dir.path().join("store")).expect("open store");
    (dir, s)
}

#[test]
fn push_pull_index_and_resume_against_a_real_registry() {
    let reg = start_registry();
    let client = Client::new();
    let (_d1, src) = store();
    let digest = busybox::busybox_image(&src, None).expect("busybox");
    let remote = format!("{}/isla/busybox:1", reg.addr);
    assert_eq!(client.push(&src, "busybox", &remote).expect("push"), digest);
    // A second push finds every blob present.
    client.push(&src, "busybox", &remote).expect("push again");

    let (_d2, dst) = store();
    assert_eq!(client.pull(&dst, &remote, None).expect("pull"), digest);
    let img = dst.resolve(&remote).expect("named after the reference");
    assert_eq!(img.digest, digest);
    assert!(dst.fsck(false).expect("fsck").is_consistent());

    // An index with an arm64 and an amd64 entry: the pull picks amd64.
    let (_d3, multi) = store();
    busybox::busybox_image(&multi, Some("other")).expect("busybox");
    let mbytes = src.read_blob(&digest).expect("manifest");
    let entry = |arch: &str| {
        serde_json::json!({"mediaType": MediaType::ImageManifest.to_string(), "size": mbytes.len(), "digest": digest.to_string(),
            "platform": {"architecture": arch, "os": "linux"}})
    };
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": MediaType::ImageIndex.to_string(), "manifests": [entry("arm64"), entry("amd64")]});
    let ibytes = serde_json::to_vec(&index).expect("json");
    let id = src.put_blob_bytes(&ibytes).expect("index blob");
    src.tag(Some("multi:1"), &Descriptor::new(MediaType::ImageIndex, ibytes.len() as u64, id)).expect("tag index");
    let url = format!("http://{}/v2/isla/busybox/manifests/multi", reg.addr);
    let resp =
        ureq::put(&url).set("Content-Type", MediaType::ImageIndex.as_ref()).send_bytes(&ibytes).expect("put index");
    assert_eq!(resp.status(), 201);
    let (_d4, dst2) = store();
    let got = client.pull(&dst2, &format!("{}/isla/busybox:multi", reg.addr), Some("picked")).expect("pull index");
    assert_eq!(got, digest);

    // Resume: half of the layer blob is already downloaded.
    let layer = &src.layers_of(&src.resolve("busybox").expect("img")).expect("layers")[0];
    let bytes = fs::read(src.blob_path(&layer.digest).expect("path")).expect("blob");
    let (_d5, dst3) = store();
    let partial = dst3.root().join("tmp").join(format!("pull-{}.partial", layer.digest.digest()));
    fs::write(&partial, &bytes[..bytes.len() / 2]).expect("partial");
    client.pull(&dst3, &remote, None).expect("resumed pull");
    assert!(!partial.exists());
    assert!(dst3.fsck(false).expect("fsck").is_consistent());

    // A corrupt partial download is caught by the digest check and discarded.
    let (_d6, dst4) = store();
    let partial = dst4.root().join("tmp").join(format!("pull-{}.partial", layer.digest.digest()));
    fs::write(&partial, vec![0u8; bytes.len() / 2]).expect("partial");
    let e = client.pull(&dst4, &remote, None).expect_err("corrupt partial");
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    assert!(!partial.exists() && dst4.list().expect("list").is_empty());
    client.pull(&dst4, &remote, None).expect("pull after a failed one");

    // A tag the registry does not have.
    let e = client.pull(&dst4, &format!("{}/isla/busybox:nope", reg.addr), None).expect_err("unknown tag");
    assert!(e.to_string().contains("404"), "{e}");
}

/// A token service for the registry's `auth: token` mode, as Docker Hub's: it checks basic
/// credentials and answers with a JWT (RS256, signed by `openssl dgst`) granting the requested
/// scope, whose `x5c` header carries the certificate the registry trusts.
struct TokenService {
    addr: String,
    dir: tempfile::TempDir,
}

const TOKEN_USER: &str = "isla";
const TOKEN_PASSWORD: &str = "s3cret";

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl TokenService {
    fn start() -> TokenService {
        use base64::Engine;
        use std::io::{BufRead, BufReader, Write};
        let dir = tempfile::Builder::new().prefix("isla-token").tempdir().expect("tempdir");
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=isla-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(ok.success(), "openssl req");
        let der =
            Command::new("openssl").args(["x509", "-outform", "DER", "-in"]).arg(&cert).output().expect("openssl");
        let x5c = base64::engine::general_purpose::STANDARD.encode(der.stdout);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{TOKEN_USER}:{TOKEN_PASSWORD}"))
        );
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request_line = String::new();
                let _ = reader.read_line(&mut request_line);
                let mut authorized = false;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = h.split_once(':') {
                        authorized |= name.eq_ignore_ascii_case("authorization") && value.trim() == expected;
                    }
                }
                let query = request_line.split_whitespace().nth(1).and_then(|p| p.split_once('?')).map(|(_, q)| q);
                let param = |k: &str| {
                    query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                };
                let scope = param("scope").map(|s| s.replace("%3A", ":").replace("%2F", "/").replace("%2C", ","));
                let mut out = stream;
                if !authorized {
                    let _ =
                        out.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    continue;
                }
                let access: Vec<serde_json::Value> = scope
                    .iter()
                    .filter_map(|s| {
                        let mut p = s.splitn(3, ':');
                        let (t, n, a) = (p.next()?, p.next()?, p.next()?);
                        Some(serde_json::json!({"type": t, "name": n, "actions": a.split(',').collect::<Vec<_>>()}))
                    })
                    .collect();
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
                let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
                let claims = serde_json::json!({"iss": "isla-test-issuer", "sub": TOKEN_USER, "aud": "isla-test",
                    "exp": now + 300, "nbf": now - 60, "iat": now, "jti": format!("{now}-{}", access.len()), "access": access});
                let signing_input =
                    format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
                let mut sign = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign"])
                    .arg(&key)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("openssl dgst");
                sign.stdin.take().expect("stdin").write_all(signing_input.as_bytes()).expect("sign input");
                let sig = sign.wait_with_output().expect("signature").stdout;
                let body = serde_json::json!({"token": format!("{signing_input}.{}", b64url(&sig)), "expires_in": 300})
                    .to_string();
                let _ = write!(
                    out,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TokenService { addr, dir }
    }

    /// The registry's `auth:` section for this service.
    fn auth_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: isla-test\n    issuer: isla-test-issuer\n    rootcertbundle: {}\n",
            self.addr,
            self.dir.path().join("cert.pem").display()
        )
    }
}

#[test]
fn bearer_token_auth_against_a_real_registry_and_token_service() {
    let tokens = TokenService::start();
    let reg = start_registry_with(&tokens.auth_config());
    let (_d1, src) = store();
    let digest = busybox::busybox_image(&src, None).expect("busybox");
    let remote = format!("{}/isla/private:1", reg.addr);

    // Without credentials the token service refuses, and the error says where and why.
    let e = Client::new().push(&src, "busybox", &remote).expect_err("anonymous push");
    assert!(e.to_string().contains("token request failed") && e.to_string().contains("401"), "{e}");
    let mut wrong = Client::new();
    wrong.credentials = Some((TOKEN_USER.into(), "nope".into()));
    assert!(wrong.push(&src, "busybox", &remote).is_err());

    // With them: a bearer token per scope, push and pull both work.
    let mut client = Client::new();
    client.credentials = Some((TOKEN_USER.into(), TOKEN_PASSWORD.into()));
    assert_eq!(client.push(&src, "busybox", &remote).expect("push with a token"), digest);
    let (_d2, dst) = store();
    assert_eq!(client.pull(&dst, &remote, None).expect("pull with a token"), digest);
    assert!(dst.fsck(false).expect("fsck").is_consistent());
}
