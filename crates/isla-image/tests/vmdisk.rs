//! microVM base disks (`isla_image::vmdisk`) built from a real image (the busybox image) with
//! real overlayfs mounts and `mkfs.ext4`, checked with e2fsprogs' own `e2fsck` and `debugfs`
//! (these tests run as root).

use std::process::Command;

use isla_image::vmdisk::{self, find_program};
use isla_image::{busybox, Store};

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run e2fsprogs");
    assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn busybox_image_becomes_a_cached_ext4_disk_that_gc_removes_with_the_image() {
    let dir = tempfile::Builder::new().prefix("isla-vmdisk-test").tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("open store");
    let img = busybox::resolve_or_make(&store, "busybox").expect("busybox image");

    let (path, built) = store
        .with_image_root(&img, |root| {
            // Programs resolve as execvp would inside the image: `sh` is /bin/sh, an absolute
            // symbolic link to /bin/busybox that must resolve inside the root, not on the host.
            assert_eq!(find_program(root, "sh", "/usr/bin:/bin")?, Some("/bin/sh".to_string()));
            assert_eq!(find_program(root, "/bin/busybox", "")?, Some("/bin/busybox".to_string()));
            assert_eq!(find_program(root, "no-such-program", "/usr/bin:/bin")?, None);
            // A directory is not a program.
            assert_eq!(find_program(root, "/etc", "")?, None);
            store.vm_disk(&img, root)
        })
        .expect("build the disk");
    assert!(built);
    assert_eq!(path, store.vm_disk_path(&img).expect("path"));
    let meta = std::fs::metadata(&path).expect("disk");
    assert_eq!(meta.len() % (1 << 20), 0);
    assert!(meta.len() >= vmdisk::HEADROOM, "headroom for the container's writes: {}", meta.len());
    assert!(meta.permissions().readonly(), "the shared base is read-only");
    // The temporary root is gone again.
    assert_eq!(std::fs::read_dir(store.root().join("containers")).expect("containers").count(), 0);

    // A clean ext4 file system with the image's files.
    run(Command::new("e2fsck").args(["-fn"]).arg(&path));
    let ls = run(Command::new("debugfs").args(["-R", "ls -l /bin"]).arg(&path));
    assert!(ls.contains("busybox") && ls.contains(" sh"), "{ls}");
    let stat = run(Command::new("debugfs").args(["-R", "stat /bin/sh"]).arg(&path));
    assert!(stat.contains("Type: symlink") && stat.contains("/bin/busybox"), "{stat}");

    // Cached: the second call builds nothing.
    let (again, built) = store.with_image_root(&img, |root| store.vm_disk(&img, root)).expect("cached");
    assert_eq!((again, built), (path.clone(), false));

    // GC keeps the disk while the image is there and removes it with the image.
    assert_eq!(store.gc().expect("gc").vm_disks_removed, 0);
    assert!(path.exists());
    let r = store.remove("busybox").expect("rm busybox");
    assert_eq!(r.vm_disks_removed, 1, "{r:?}");
    assert!(!path.exists());
}
