//! RUN steps of `isla build` in a container of isla's own runtime: the step's root filesystem
//! (the build's overlay) becomes an OCI bundle's root, and `isla runtime run` runs the command
//! with the runtime's full isolation (pid, mount, UTS and IPC namespaces, pivot_root, a private
//! /proc and /dev, masked paths, the default device rules and capabilities). The network is the
//! host's, as `docker build` gives RUN a network to fetch from.
//!
//! The runtime refuses a multi-threaded caller (it forks), so it runs as a child process of the
//! same `isla` binary rather than in this process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use isla_container::oci_spec::runtime::{LinuxNamespaceType, ProcessBuilder, RootBuilder, UserBuilder};
use isla_image::{Error, Result, RunStep};
use oci_spec::image::Config;

/// [`RunStep`] through `isla runtime run`.
pub struct ContainerRunner {
    /// The `isla` binary.
    exe: PathBuf,
    /// Bundles and the runtime's state live here for the length of one step.
    work: PathBuf,
}

impl ContainerRunner {
    /// A runner whose bundles and runtime state go under `work` (created when needed).
    pub fn new(work: &Path) -> std::io::Result<Self> {
        Ok(ContainerRunner { exe: std::env::current_exe()?, work: work.to_path_buf() })
    }
}

static STEP: AtomicU32 = AtomicU32::new(0);

impl RunStep for ContainerRunner {
    fn run(&self, rootfs: &Path, config: &Config, argv: &[String]) -> Result<()> {
        let shown = argv.join(" ");
        let fail = |msg: String| Error::Run { cmd: shown.clone(), msg };
        if argv.is_empty() {
            return Err(fail("empty command".into()));
        }
        let root_dir = std::fs::File::open(rootfs).map_err(|e| fail(format!("{}: {e}", rootfs.display())))?;
        let (uid, gid) = isla_image::run::resolve_user(&root_dir, config.user().as_deref().unwrap_or(""))?;
        let cwd = isla_image::run::step_workdir(config);
        let env = isla_image::run::step_env(config);

        let mut spec = isla_container::spec::default_spec(false);
        let user = UserBuilder::default().uid(uid).gid(gid).build().map_err(|e| fail(e.to_string()))?;
        let mut process = ProcessBuilder::default()
            .args(argv.to_vec())
            .env(env)
            .cwd(cwd)
            .user(user)
            .terminal(false)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        // The default spec's capabilities and rlimits, not the builder's empty ones.
        if let Some(p) = spec.process() {
            process.set_capabilities(p.capabilities().clone());
            process.set_rlimits(p.rlimits().clone());
            process.set_no_new_privileges(p.no_new_privileges());
        }
        spec.set_process(Some(process));
        spec.set_root(Some(
            RootBuilder::default().path(rootfs).readonly(false).build().map_err(|e| fail(e.to_string()))?,
        ));
        spec.set_hostname(Some("isla-build".into()));
        if let Some(linux) = spec.linux_mut() {
            if let Some(ns) = linux.namespaces_mut() {
                ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
            }
        }

        let id = format!("isla-build-{}-{}", std::process::id(), STEP.fetch_add(1, Ordering::Relaxed));
        let bundle = self.work.join(&id);
        let state = self.work.join("runtime");
        let cleanup = || {
            let _ = Command::new(&self.exe)
                .arg("runtime")
                .arg("--root")
                .arg(&state)
                .args(["delete", "--force", &id])
                .output();
            let _ = std::fs::remove_dir_all(&bundle);
        };
        std::fs::create_dir_all(&bundle).map_err(|e| fail(format!("{}: {e}", bundle.display())))?;
        let written = serde_json::to_vec_pretty(&spec)
            .map_err(|e| fail(e.to_string()))
            .and_then(|json| std::fs::write(bundle.join("config.json"), json).map_err(|e| fail(e.to_string())));
        if let Err(e) = written {
            cleanup();
            return Err(e);
        }
        let status = Command::new(&self.exe)
            .arg("runtime")
            .arg("--root")
            .arg(&state)
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .status();
        cleanup();
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(fail(match s.code() {
                Some(c) => format!("exited with status {c}"),
                None => format!("ended by {s}"),
            })),
            Err(e) => Err(fail(format!("starting the container runtime {}: {e}", self.exe.display()))),
        }
    }
}
