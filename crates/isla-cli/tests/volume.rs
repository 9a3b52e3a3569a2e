//! Named volumes end to end, as root: busybox containers (no network, so no namespace is
//! needed) write and read a volume one after the other; `isla volume` lists, inspects, refuses
//! to remove a volume in use, removes and prunes. A private state root, removed on drop.

mod common;

use std::path::PathBuf;
use std::process::Output;

struct Root(PathBuf);

impl Root {
    fn new(tag: &str) -> Root {
        let r = common::tmp(&format!("volume-{tag}"));
        let _ = std::fs::remove_dir_all(&r);
        Root(r)
    }

    /// `isla ARGS[0] --root ROOT ARGS[1..]`.
    fn isla(&self, args: &[&str]) -> Output {
        common::isla().arg(args[0]).arg("--root").arg(&self.0).args(&args[1..]).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        common::expect_ok(args, self.isla(args))
    }

    fn fails(&self, args: &[&str]) -> String {
        common::expect_failure(args, self.isla(args))
    }

    fn volumes(&self) -> Vec<serde_json::Value> {
        let out = self.ok(&["volume", "ls", "--output", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().clone()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let o = self.isla(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let _ = self.isla(&["rm", "-f", id]);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn named_volumes_outlive_containers_and_are_removed_only_when_unused() {
    let r = Root::new("life");
    let vol = format!("data{}", std::process::id());
    let mount = format!("{vol}:/data");
    // The first container makes the volume and writes to it.
    r.ok(&[
        "run",
        "--name",
        "writer",
        "--network",
        "none",
        "-v",
        &mount,
        "busybox",
        "sh",
        "-c",
        "echo hello > /data/f",
    ]);
    // The next one sees the file; read-only mounts refuse writes.
    let ro = format!("{mount}:ro");
    let out = r.ok(&["run", "--rm", "--network", "none", "-v", &ro, "busybox", "cat", "/data/f"]);
    assert_eq!(out, "hello\n");
    let o = r.isla(&["run", "--rm", "--network", "none", "-v", &ro, "busybox", "sh", "-c", "echo x > /data/g"]);
    assert!(!o.status.success(), "a write to a read-only volume succeeded");

    let list = r.volumes();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], vol.as_str());
    assert_eq!(list[0]["in_use_by"], serde_json::json!(["writer"]), "{list:?}");
    let dir = PathBuf::from(list[0]["mountpoint"].as_str().unwrap());
    assert_eq!(dir, r.0.join("volumes").join(&vol).join("_data"));
    assert_eq!(std::fs::read_to_string(dir.join("f")).unwrap(), "hello\n");

    // In use (by a stopped instance too): not removed, nothing touched.
    let err = r.fails(&["volume", "rm", &vol]);
    assert!(err.contains("in use by writer"), "{err}");
    assert!(dir.join("f").exists());
    // The instance goes, the volume stays.
    r.ok(&["rm", "writer"]);
    let v: serde_json::Value = serde_json::from_str(&r.ok(&["volume", "inspect", &vol])).unwrap();
    assert_eq!(v[0]["in_use_by"], serde_json::json!([]), "{v}");
    assert!(dir.join("f").exists());
    r.ok(&["volume", "rm", &vol]);
    assert!(!r.0.join("volumes").join(&vol).exists());
    let err = r.fails(&["volume", "rm", &vol]);
    assert!(err.contains(&format!("no volume named `{vol}`")), "{err}");

    // create (labels), prune of unused volumes only.
    r.ok(&["volume", "create", "-l", "team=a", "kept"]);
    r.ok(&["volume", "create", "unused"]);
    r.ok(&["create", "--name", "holder", "--network", "none", "-v", "kept:/k", "busybox", "true"]);
    assert_eq!(r.ok(&["volume", "prune"]), "unused\n");
    let list = r.volumes();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["labels"]["team"], "a");
    assert_eq!(r.ok(&["volume", "ls", "-q"]), "kept\n");
    r.ok(&["rm", "holder"]);
    r.ok(&["volume", "rm", "kept"]);

    // An empty volume is filled with the image's files at the mount path, only once.
    let etc = ["run", "--rm", "--network", "none", "-v", "etc:/etc", "busybox"];
    let out = r.ok(&[&etc[..], &["cat", "/etc/passwd"]].concat());
    assert!(out.starts_with("root:"), "{out}");
    assert!(r.0.join("volumes/etc/_data/group").exists());
    r.ok(&[&etc[..], &["rm", "/etc/passwd"]].concat());
    assert_eq!(r.ok(&[&etc[..], &["ls", "/etc"]].concat()), "group\n");
    r.ok(&["volume", "rm", "etc"]);

    // Bad names, and guests that cannot mount host files.
    let err = r.fails(&["volume", "create", "bad!"]);
    assert!(err.contains("volume name"), "{err}");
    let err = r.fails(&["run", "--network", "none", "-v", "a/b:/d", "busybox", "true"]);
    assert!(err.contains("must be absolute"), "{err}");
    let err = r.fails(&["run", "--kind", "microvm", "-v", "v:/d", "kit"]);
    assert!(err.contains("not shared into guests") && err.contains("virtio-fs"), "{err}");
    assert!(r.volumes().is_empty());
    assert_eq!(r.ok(&["ps", "-aq"]), "");
}
