//! `isla-lab`: the comparison lab behind `isla lab`. It measures isla's three kinds side by
//! side on the user's machine (full VMs through isla-qemu, containers on isla's OCI runtime,
//! microVMs on isla's monitor) and the peers given by path (Firecracker, crun, runc, plain
//! QEMU): start time with phases, base memory, density in a memory budget, CPU, disk and
//! network inside each kind against the host (Debian's sysbench, fio and iperf3, put inside
//! with their shared libraries), a web service under a bounded HTTP load, and isolation probed
//! from inside. A figure that cannot be measured carries the reason instead of a number, and
//! every figure carries its method.
//!
//! Main types and modules:
//! - [`run::run`] with [`run::Options`]: the whole lab; [`run::Progress`] receives the stages.
//! - [`model`]: [`model::Results`] (`results.json`: every raw sample), [`model::Figure`] with its
//!   [`model::Outcome`] (measured, not run, failed) and method, [`model::Isolation`].
//! - [`kinds`]: [`kinds::Launcher`] starts one [`kinds::Instance`] of a kind. Every kind is driven
//!   through child processes (`isla runtime`, `isla vm run`, `isla qemu`, the peers' own command
//!   lines): the container library refuses multi-threaded callers, and a monitor per process is
//!   how users run them.
//! - [`script`]: `lab.sh`, the one script every kind runs inside, and the parser of its output.
//! - [`tools`]: the `ldd` closure of the tools, the guests' tools disk and initramfs addition.
//! - [`load`]: the HTTP load client (hand-written: it enters the instance's network namespace per
//!   worker thread and keeps every latency) and the iperf3 client.
//! - [`render`] and [`plot`]: terminal table, `report.md`, `report.html` with SVG plots (plotters).
//! - [`stats::Summary`]: median, min/max, p10/p90.

pub mod error;
pub mod host;
pub mod kinds;
pub mod load;
pub mod model;
pub mod plot;
pub mod render;
pub mod run;
pub mod script;
pub mod stats;
pub mod tools;

use std::path::Path;

pub use error::{Error, Result};
pub use model::{Figure, Kind, Outcome, Results};
pub use run::{run, KitPaths, Options, Progress};

/// Writes `results.json`, `report.md` and `report.html` into `out` (created if missing; files of
/// an earlier report there are replaced, nothing else is touched).
pub fn write_report(r: &Results, out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::Out { path: out.to_path_buf(), what: "exists and is not a directory".into() });
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let html = render::html(r)?;
    for (name, text) in
        [("results.json", serde_json::to_string_pretty(r)?), ("report.md", render::markdown(r)), ("report.html", html)]
    {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}
