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
    let dir = tempfile::Builder::new().prefix("isla-registry").tempdir().expect("tempdir");
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let addr = format!("127.0.0.1:{port}");
    let config = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
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
