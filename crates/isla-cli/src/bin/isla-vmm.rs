//! `isla-vmm`: isla's microVM monitor alone, with exactly the arguments of `isla vm run` (which
//! runs this binary when it is installed beside `isla`).
//!
//! One monitor process runs per guest for the guest's whole life. This binary holds only the
//! monitor and its argument parsing, so what it keeps resident beside guest RAM is the monitor's,
//! not the start-up of the whole command-line tool (measured in docs/vmm.md).

use std::process::ExitCode;

use clap::Parser;

// Only `Kit::find` and `Flavour` are used here (the default kernel and initramfs).
#[allow(dead_code)]
#[path = "../kit.rs"]
mod kit;
#[path = "../vmrun.rs"]
mod vmrun;

fn main() -> ExitCode {
    vmrun::init_logging();
    let args = vmrun::VmRunOnly::parse();
    vmrun::exit_code(vmrun::vm_run(&args.args))
}
