//! isla-image: the OCI image store of isla.
//!
//! - [`Store`] (`store`): a content-addressed store that is itself an OCI image layout
//!   (`oci-layout`, `index.json` with the image names, `blobs/sha256/…`), plus each layer
//!   unpacked once under `layers/<diff_id>` and shared by every image and container that uses
//!   it. Writes go through staging files, fsync and rename, so a killed import leaves the store
//!   consistent; [`Store::fsck`] checks it, [`Store::gc`] removes what nothing refers to.
//! - `layer`: safe tar extraction (no `..`, no following symlinks, no hard links outside the
//!   layer) into overlayfs form (whiteouts as 0/0 character devices, opaque directories as
//!   `trusted.overlay.opaque=y`), and the reverse for writing layers.
//! - [`RootfsMount`] (`rootfs`): a container's root filesystem, overlayfs over the layers with a
//!   writable upper directory ([`Store::prepare_rootfs`]).
//! - `vmdisk`: one read-only ext4 disk per image (`mkfs.ext4 -d` of its mounted root, cached
//!   under `vmdisks/`, collected with the image) for booting the image as a microVM.
//! - `archive`: import and export of OCI layout directories and tarballs and `docker save`
//!   archives.
//! - `registry`: pull and push over the OCI distribution API (bearer-token and basic auth, image
//!   indexes resolved to linux/amd64, resumable blob downloads, digest verification).
//! - `build`: the common subset of Containerfiles, one cached layer per step; RUN steps go
//!   through the [`RunStep`] trait: `isla build` runs them in containers of isla's runtime
//!   (isla-cli's `buildrun`); [`ChrootRunner`] is the dependency-free runner this crate's own
//!   tests use.
//! - `busybox`: images from a root filesystem directory and a reproducible busybox image built
//!   from the host's busybox-static, so containers work on a machine without a network.
//!
//! Types of the OCI image specification come from the `oci-spec` crate; tar reading and writing
//! from `tar`, gzip from `flate2`, HTTP from `ureq`. The tar *extraction* is our own (on top of
//! the `tar` crate's reader) because overlayfs whiteouts and `openat`-style confinement are not
//! what `tar::Archive::unpack` does.

pub mod archive;
pub mod build;
pub mod busybox;
pub mod digest;
pub mod error;
pub mod layer;
pub mod progress;
pub mod registry;
pub mod rootfs;
pub mod run;
pub mod store;
pub mod vmdisk;

pub use error::{Error, Result};
pub use progress::{Progress, Quiet};
pub use rootfs::RootfsMount;
pub use run::{ChrootRunner, RunStep};
pub use store::{Image, LayerDesc, Store};
