//! Store, layers, overlay root filesystems, build and import/export, on real files, real
//! overlayfs mounts and real namespaces (these tests run as root).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use isla_image::archive::{self, Format};
use isla_image::build::Builder;
use isla_image::layer::{self, WriteOptions};
use isla_image::{busybox, ChrootRunner, Error, Store};

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::Builder::new().prefix("isla-image-test").tempdir().expect("tempdir");
    let s = Store::open(dir.path().join("store")).expect("open store");
    (dir, s)
}

/// A tar with the given entries: (path, type, data or link target).
fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_mtime(0);
        match kind {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                h.set_size(0);
                b.append_link(&mut h, path, data).expect("append link");
            }
            _ => {
                h.set_size(data.len() as u64);
                // Write the raw name so that `..` reaches the archive as is.
                let name = h.as_old_mut().name.as_mut_slice();
                name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, data.as_bytes()).expect("append");
            }
        }
    }
    b.into_inner().expect("finish tar")
}

fn unpack_err(entries: &[(&str, tar::EntryType, &str)]) -> (tempfile::TempDir, Error) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("layer");
    fs::create_dir(&dest).expect("mkdir");
    let err = layer::unpack(&tar_of(entries)[..], &dest, "test").expect_err("hostile layer must be refused");
    (dir, err)
}

#[test]
fn hostile_layers_are_refused_and_write_nothing_outside() {
    use tar::EntryType::*;
    let (dir, e) = unpack_err(&[("../escape", Regular, "x")]);
    assert!(e.to_string().contains("`..`"), "{e}");
    assert!(!dir.path().join("escape").exists());

    // An absolute symlink may exist, but nothing may be written through it.
    let target = tempfile::tempdir().expect("tempdir");
    let abs = target.path().to_str().expect("utf8").to_string();
    let (_d, e) = unpack_err(&[("evil", Symlink, &abs), ("evil/owned", Regular, "x")]);
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert!(!target.path().join("owned").exists());

    let (_d, e) = unpack_err(&[("a/../../x", Regular, "x")]);
    assert!(matches!(e, Error::UnsafeEntry { .. }), "{e}");

    let (_d, e) = unpack_err(&[("link", Link, "../../etc/passwd")]);
    assert!(e.to_string().contains("`..`"), "{e}");
    let (_d, e) = unpack_err(&[("link", Link, "/etc/passwd")]);
    assert!(e.to_string().contains("not earlier in this layer"), "{e}");
}

#[test]
fn whiteouts_round_trip_between_oci_and_overlay_forms() {
    use tar::EntryType::*;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("layer");
    fs::create_dir(&dest).expect("mkdir");
    let t = tar_of(&[
        ("d/", Directory, ""),
        ("d/.wh..wh..opq", Regular, ""),
        ("d/keep", Regular, "k"),
        (".wh.gone", Regular, ""),
        ("abs", Symlink, "/bin/busybox"),
    ]);
    layer::unpack(&t[..], &dest, "test").expect("unpack");
    let gone = fs::symlink_metadata(dest.join("gone")).expect("whiteout");
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
    let mut v = [0u8; 2];
    let n = rustix::fs::lgetxattr(dest.join("d"), "trusted.overlay.opaque", &mut v[..]).expect("opaque xattr");
    assert_eq!(&v[..n], b"y");
    assert_eq!(fs::read_link(dest.join("abs")).expect("link"), PathBuf::from("/bin/busybox"));

    // Back to OCI form.
    let mut out = Vec::new();
    layer::write_dir(&dest, &mut out, WriteOptions { overlay: true, mtime: Some(0) }).expect("write");
    let mut names: Vec<String> = tar::Archive::new(&out[..])
        .entries()
        .expect("entries")
        .map(|e| e.expect("entry").path().expect("path").display().to_string())
        .collect();
    names.sort();
    assert_eq!(names, [".wh.gone", "abs", "d/", "d/.wh..wh..opq", "d/keep"]);
}

#[test]
fn busybox_image_is_reproducible_and_runs_a_build() {
    let (_d1, s1) = store();
    let (_d2, s2) = store();
    let a = busybox::busybox_image(&s1, None).expect("busybox image");
    let b = busybox::busybox_image(&s2, None).expect("busybox image");
    assert_eq!(a, b, "same busybox binary, same digest");

    let ctx = tempfile::tempdir().expect("tempdir");
    fs::write(ctx.path().join("hello.txt"), "hello from the context\n").expect("write");
    fs::create_dir(ctx.path().join("sub")).expect("mkdir");
    fs::write(ctx.path().join("sub/inner"), "inner\n").expect("write");
    let file = "FROM busybox\n\
        ENV GREETING=hi \\\n    OTHER=two\n\
        WORKDIR /app\n\
        COPY hello.txt ./\n\
        COPY sub /app/sub/\n\
        RUN echo $GREETING > /f && cat hello.txt >> /f && echo pid=$$ >> /f && hostname >> /f && rm /etc/group\n\
        USER nobody\n\
        EXPOSE 8080\n\
        LABEL org.example=yes\n\
        ENTRYPOINT [\"/bin/sh\", \"-c\"]\n\
        CMD [\"cat /f\"]\n";
    let runner = ChrootRunner;
    let builder = Builder {
        store: &s1,
        context: ctx.path().to_path_buf(),
        file: "Containerfile".into(),
        runner: &runner,
        verbose: false,
    };
    let r1 = builder.build(file, Some("test/app:1")).expect("build");
    assert_eq!((r1.cached, r1.executed), (0, 3));
    let r2 = builder.build(file, Some("test/app:2")).expect("rebuild");
    assert_eq!((r2.cached, r2.executed), (3, 0), "every layer step comes from the cache");
    assert_eq!(r1.digest, r2.digest);

    let img = s1.resolve("test/app:1").expect("resolve");
    let c = img.config.config().clone().expect("config");
    assert_eq!(c.working_dir().as_deref(), Some("/app"));
    assert_eq!(c.user().as_deref(), Some("nobody"));
    assert!(c.env().clone().unwrap_or_default().contains(&"OTHER=two".to_string()));
    assert_eq!(c.exposed_ports().clone().unwrap_or_default(), vec!["8080/tcp".to_string()]);
    assert_eq!(c.cmd().clone().unwrap_or_default(), vec!["cat /f".to_string()]);
    assert_eq!(img.manifest.layers().len(), 4);

    // The container view: the RUN step's file, the copied files, the deleted /etc/group.
    let m = s1.prepare_rootfs("test/app:1", "t1").expect("prepare");
    m.mount().expect("mount");
    let f = fs::read_to_string(m.merged.join("f")).expect("/f");
    let inner = fs::read_to_string(m.merged.join("app/sub/inner"));
    let group = m.merged.join("etc/group").exists();
    fs::write(m.merged.join("scratch"), "upper").expect("write in container");
    m.unmount().expect("unmount");
    assert_eq!(f, "hi\nhello from the context\npid=1\nisla-build\n");
    assert_eq!(inner.expect("copied dir"), "inner\n");
    assert!(!group, "RUN rm became a whiteout");
    assert!(m.upper.join("scratch").exists(), "writes land in the container's upper layer");
    s1.remove_rootfs("t1").expect("remove rootfs");

    // A failing RUN step names the command and status.
    let bad = builder.build("FROM busybox\nRUN exit 3\n", None).expect_err("must fail");
    assert!(bad.to_string().contains("exit status 3"), "{bad}");
}

#[test]
fn save_and_load_keep_digests_and_refuse_corruption() {
    let (dir, s) = store();
    let d = busybox::busybox_image(&s, Some("bb:1")).expect("busybox");
    for (fmt, file) in [(Format::Oci, "oci.tar"), (Format::Docker, "docker.tar")] {
        let out = dir.path().join(file);
        archive::save(&s, &["bb:1".into()], &out, fmt).expect("save");
        let (_d2, s2) = store();
        let loaded = archive::load(&s2, &out).expect("load");
        assert_eq!(loaded[0].names, vec!["bb:1".to_string()]);
        let img = s2.resolve("bb:1").expect("resolve");
        if fmt == Format::Oci {
            assert_eq!(img.digest, d, "OCI round trip keeps the manifest");
        }
        assert_eq!(img.config, s.resolve("bb:1").expect("resolve").config);
        assert!(s2.fsck(false).expect("fsck").is_consistent());
    }

    // Flip one byte of a blob inside the OCI tarball: the import must fail and name nothing.
    let mut bytes = fs::read(dir.path().join("oci.tar")).expect("read");
    let pos = bytes.windows(13).position(|w| w == b"schemaVersion").expect("a manifest in the tar");
    bytes[pos] = b'S';
    let bad = dir.path().join("bad.tar");
    fs::write(&bad, &bytes).expect("write");
    let (_d3, s3) = store();
    let e = archive::load(&s3, &bad).expect_err("corrupt manifest");
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    assert!(s3.list().expect("list").is_empty());
    assert!(s3.fsck(false).expect("fsck").is_consistent());
}

/// A docker-save archive whose layer climbs out with `..` is refused and writes nothing.
#[test]
fn docker_archive_with_escaping_layer_is_refused() {
    let (dir, s) = store();
    let layer = tar_of(&[("../../../../outside-isla-test", tar::EntryType::Regular, "x")]);
    let diff = isla_image::digest::of_bytes(&layer);
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff.to_string()]}});
    let cbytes = serde_json::to_vec(&config).expect("json");
    let manifest = serde_json::json!([{"Config": "c.json", "RepoTags": ["evil:1"], "Layers": ["l/layer.tar"]}]);
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in
        [("c.json", cbytes), ("l/layer.tar", layer), ("manifest.json", serde_json::to_vec(&manifest).expect("json"))]
    {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, &data[..]).expect("append");
    }
    let path = dir.path().join("evil.tar");
    fs::File::create(&path).and_then(|mut f| f.write_all(&b.into_inner().expect("tar"))).expect("write");
    let e = archive::load(&s, &path).expect_err("escaping layer");
    assert!(e.to_string().contains("`..`"), "{e}");
    assert!(s.resolve("evil:1").is_err());
    let store_root = s.root().to_path_buf();
    assert!(!store_root.join("../../../outside-isla-test").exists() && !Path::new("/outside-isla-test").exists());
    assert!(s.fsck(true).expect("fsck").is_consistent());
}

/// More layers than fit in one page of overlay options still mount.
#[test]
fn many_layers_mount() {
    let (_d, s) = store();
    let mut layers = Vec::new();
    for i in 0..120 {
        let l = s
            .add_layer(|w| {
                let mut b = tar::Builder::new(w);
                let mut h = tar::Header::new_gnu();
                let data = format!("{i}");
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, format!("f{i}"), data.as_bytes())
                    .map_err(|e| Error::invalid("tar", e.to_string()))?;
                b.into_inner().map(|_| ()).map_err(|e| Error::invalid("tar", e.to_string()))
            })
            .expect("layer");
        layers.push(l);
    }
    let config: oci_spec::image::ImageConfiguration = serde_json::from_value(serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>()}
    }))
    .expect("config");
    s.commit_image(&config, &layers, Some("many")).expect("commit");
    let m = s.prepare_rootfs("many", "m1").expect("prepare");
    m.mount().expect("mount 120 layers");
    let first = fs::read_to_string(m.merged.join("f0"));
    let last = fs::read_to_string(m.merged.join("f119"));
    m.unmount().expect("unmount");
    s.remove_rootfs("m1").expect("remove");
    assert_eq!((first.expect("f0").as_str(), last.expect("f119").as_str()), ("0", "119"));
}

#[test]
fn gc_keeps_what_is_named_and_removes_the_rest() {
    let (_d, s) = store();
    busybox::busybox_image(&s, Some("keep:1")).expect("busybox");
    let rootfs = tempfile::tempdir().expect("tempdir");
    fs::write(rootfs.path().join("only"), "x").expect("write");
    busybox::from_rootfs(&s, rootfs.path(), "drop:1", true).expect("from-rootfs");
    assert_eq!(s.list().expect("list").len(), 2);
    let r = s.remove("drop:1").expect("rm");
    assert_eq!((r.blobs_removed, r.layers_removed), (3, 1), "{r:?}");
    assert!(s.resolve("keep:1").is_ok());
    let f = s.fsck(false).expect("fsck");
    assert!(f.is_consistent() && f.leftovers.is_empty(), "{f:?}");
}

#[test]
fn arg_values_reach_run_steps_only() {
    let (_d, s) = store();
    let ctx = tempfile::tempdir().expect("tempdir");
    let runner = ChrootRunner;
    let builder = Builder {
        store: &s,
        context: ctx.path().to_path_buf(),
        file: "Containerfile".into(),
        runner: &runner,
        verbose: false,
    };
    let file = "FROM busybox\nARG A=\"the default\"\nARG B\nENV B=from-env\nRUN echo \"$A|$B\" > /args\n";
    let read = |tag: &str| {
        let m = s.prepare_rootfs(tag, "args").expect("prepare");
        m.mount().expect("mount");
        let text = fs::read_to_string(m.merged.join("args"));
        m.unmount().expect("unmount");
        s.remove_rootfs("args").expect("remove rootfs");
        text.expect("/args")
    };
    let given: std::collections::BTreeMap<String, String> =
        [("A".to_string(), "given".to_string()), ("B".to_string(), "arg".to_string())].into();
    let r1 = builder.build_with_args(file, Some("args:1"), &given).expect("build");
    // ENV wins over an ARG of the same name; the ARG is not kept in the image.
    assert_eq!(read("args:1"), "given|from-env\n");
    let env = s.resolve("args:1").expect("resolve").config.config().clone().and_then(|c| c.env().clone());
    assert!(!env.unwrap_or_default().iter().any(|e| e.starts_with("A=")));
    // Without values the default applies, and the RUN step is not taken from the cache.
    let r2 = builder.build(file, Some("args:2")).expect("build");
    assert_eq!(read("args:2"), "the default|from-env\n");
    assert_ne!(r1.digest, r2.digest);
    assert_eq!(r2.executed, 1);
    let bad = builder.build("FROM busybox\nARG\n", None).expect_err("ARG without a name");
    assert!(bad.to_string().contains("ARG takes one NAME"), "{bad}");
}
