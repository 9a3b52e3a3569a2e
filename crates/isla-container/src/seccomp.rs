//! OCI seccomp profiles compiled to classic BPF with libseccomp, in the runtime before the
//! container's process is cloned; the init only hands the finished program to seccomp(2).
//!
//! libseccomp rather than seccompiler: OCI profiles are written in libseccomp's own terms
//! (syscall names resolved per architecture, `SCMP_ACT_*`, `SCMP_CMP_*` including masked
//! equality, several architectures in one filter), which is what runc and crun feed it too.

use std::io::{Read, Seek};
use std::os::fd::AsFd;

use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};

use crate::error::{Error, Result};

/// A compiled filter: the BPF program and the seccomp(2) flags to load it with.
pub(crate) struct Program {
    pub filter: Vec<libc::sock_filter>,
    pub flags: libc::c_ulong,
}

/// The OCI name of an enum value (its serde string), e.g. "SCMP_ACT_ERRNO".
fn oci_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn action(a: LinuxSeccompAction, errno: Option<u32>, field: &str) -> Result<ScmpAction> {
    let name = oci_name(&a);
    if a == LinuxSeccompAction::ScmpActNotify {
        return Err(Error::Seccomp(format!(
            "{field}: SCMP_ACT_NOTIFY needs a seccomp listener, which isla does not support"
        )));
    }
    let val = match a {
        LinuxSeccompAction::ScmpActErrno => Some(errno.unwrap_or(libc::EPERM as u32) as i32),
        LinuxSeccompAction::ScmpActTrace => Some(errno.unwrap_or(0) as i32),
        _ => None,
    };
    ScmpAction::from_str(&name, val).map_err(|e| Error::Seccomp(format!("{field}: action {name}: {e}")))
}

/// Compile `s`.
pub(crate) fn compile(s: &LinuxSeccomp) -> Result<Program> {
    if s.listener_path().is_some() {
        return Err(Error::Seccomp("listenerPath: seccomp notification is not supported by isla".into()));
    }
    let default = action(s.default_action(), s.default_errno_ret(), "defaultAction")?;
    let mut ctx = ScmpFilterContext::new(default).map_err(|e| Error::Seccomp(format!("creating the filter: {e}")))?;
    // NO_NEW_PRIVS is the process's business (process.noNewPrivileges), not the filter's.
    ctx.set_ctl_nnp(false).map_err(|e| Error::Seccomp(e.to_string()))?;
    for arch in s.architectures().iter().flatten() {
        let name = oci_name(arch);
        let a: ScmpArch = name.parse().map_err(|e| Error::Seccomp(format!("architectures: {name}: {e}")))?;
        if a != ScmpArch::native() {
            ctx.add_arch(a).map_err(|e| Error::Seccomp(format!("architectures: {name}: {e}")))?;
        }
    }
    for (i, rule) in s.syscalls().iter().flatten().enumerate() {
        let field = format!("syscalls[{i}]");
        let act = action(rule.action(), rule.errno_ret(), &field)?;
        if act == default {
            continue; // libseccomp refuses rules that repeat the default action
        }
        let mut conds = Vec::new();
        for a in rule.args().iter().flatten() {
            let op = match a.op() {
                LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
                LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
                LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
                LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
                LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
                LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
                LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(a.value()),
            };
            let datum =
                if matches!(op, ScmpCompareOp::MaskedEqual(_)) { a.value_two().unwrap_or(0) } else { a.value() };
            conds.push(ScmpArgCompare::new(a.index() as u32, op, datum));
        }
        for name in rule.names() {
            // Profiles list syscalls of every architecture; ones this kernel lacks are skipped,
            // as runc does.
            let Ok(sc) = ScmpSyscall::from_name(name) else {
                tracing::debug!("seccomp: {field}: unknown system call {name:?} skipped");
                continue;
            };
            let r = if conds.is_empty() { ctx.add_rule(act, sc) } else { ctx.add_rule_conditional(act, sc, &conds) };
            r.map_err(|e| Error::Seccomp(format!("{field}: {name}: {e}")))?;
        }
    }
    let mut flags: libc::c_ulong = 0;
    for f in s.flags().iter().flatten() {
        flags |= match oci_name(f).as_str() {
            "SECCOMP_FILTER_FLAG_TSYNC" => 1,
            "SECCOMP_FILTER_FLAG_LOG" => 2,
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => 4,
            other => return Err(Error::Seccomp(format!("flags: {other} is not supported"))),
        };
    }
    // libseccomp 2.5 (Debian 12) exports BPF to a file descriptor only.
    let mem = nix::sys::memfd::memfd_create(c"isla-seccomp", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| Error::Seccomp(format!("memfd_create: {e}")))?;
    let mut file = std::fs::File::from(mem);
    ctx.export_bpf(file.as_fd()).map_err(|e| Error::Seccomp(format!("exporting BPF: {e}")))?;
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| Error::Seccomp(format!("reading BPF: {e}")))?;
    let filter = bytes
        .chunks_exact(8)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect::<Vec<_>>();
    if filter.is_empty() || filter.len() > 4096 {
        return Err(Error::Seccomp(format!("the compiled filter has {} instructions (1..4096 allowed)", filter.len())));
    }
    Ok(Program { filter, flags })
}
