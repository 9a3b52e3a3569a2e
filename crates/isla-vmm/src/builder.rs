//! The boot recipe: KVM VM, guest memory, kernel and initrd, boot tables, devices, vCPUs; then
//! run until the guest powers off, reboots, fails, or is stopped.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use isla_arch::acpi::{self, AcpiConfig};
use isla_arch::boot::{self, BootParamsConfig};
use isla_arch::cpuid::{self, features, CpuTemplate};
use isla_arch::layout::*;
use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_CAP_EXIT_ON_EMULATION_FAILURE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::loader::{bootparam::setup_header, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::config::{ConsoleConfig, KernelFormat, VmConfig};
use crate::devices::{console::Console, Devices};
use crate::report::RunReport;
use crate::state::VmShared;
use crate::vcpu::{self, Vcpu};
use crate::{host, VmmError};

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// A loaded kernel.
struct Kernel {
    entry: u64,
    end: u64,
    header: Option<setup_header>,
}

/// Boots the configured microVM and runs it to the end. Returns the report of the run; the
/// outcome is in `report.exit`.
pub fn run(cfg: &VmConfig) -> Result<RunReport, VmmError> {
    cfg.validate()?;
    let shared = Arc::new(VmShared::new(host::process_start_us()));
    let template = cfg.cpu_template.resolve();
    let format = KernelFormat::detect(&cfg.kernel)?;

    let kvm = Kvm::new().map_err(|e| {
        VmmError::Setup(format!("cannot open /dev/kvm: {e} (is KVM available, and are you root or in group kvm?)"))
    })?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let mem = create_memory(&vm, cfg.memory, &shared)?;
    vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    let emulation_exits = kvm.check_extension_raw(KVM_CAP_EXIT_ON_EMULATION_FAILURE.into()) > 0;
    if emulation_exits {
        let cap = kvm_enable_cap { cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE, args: [1, 0, 0, 0], ..Default::default() };
        vm.enable_cap(&cap).map_err(kvm_err("KVM_ENABLE_CAP(EXIT_ON_EMULATION_FAILURE)"))?;
    }

    let kernel = load_kernel(&mem, cfg, format)?;
    let initrd = load_initrd(&mem, cfg, &kernel)?;

    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Setup(format!("eventfd: {e}")))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(kvm_err("KVM_IRQFD"))?;
    let console = Console::new(console_sink(&cfg.console)?, shared.clone(), cfg.stop_on_console.clone());
    let devices = Arc::new(Devices::new(shared.clone(), serial_irq, console));

    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    let mut cpuid_fixups = Vec::new();
    for id in 0..cfg.vcpus {
        let fd = vm.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = vcpu::cpuid_for(&supported, template, id, cfg.vcpus)?;
        let effective = vcpu::configure(&fd, id, &cpuid, (id == 0).then_some(kernel.entry))?;
        if id == 0 {
            let (args, left_out) = cpuid::guest_clear_args(template, &effective);
            if !args.is_empty() {
                tracing::info!(
                    "KVM did not apply the {template} CPUID template; telling the guest kernel: {}",
                    args.join(" ")
                );
            }
            if !left_out.is_empty() {
                tracing::warn!(
                    "CPU features still visible to the guest (no room in clearcpuid=): {}",
                    left_out.join(", ")
                );
            }
            cpuid_fixups = args;
        }
        let fallback = cfg.insn_fallback.then(|| isla_insn::Options {
            bmi1: cpuid::has_feature(&cpuid, &features::BMI1),
            lzcnt: cpuid::has_feature(&cpuid, &features::LZCNT),
        });
        vcpus.push(Vcpu::new(id, fd, devices.clone(), shared.clone(), mem.clone(), fallback));
    }

    let mut cmdline = cfg.cmdline.clone();
    for a in &cpuid_fixups {
        cmdline.push(' ');
        cmdline.push_str(a);
    }
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(VmmError::Config(crate::config::ConfigError::Invalid {
            option: "--cmdline",
            reason: format!(
                "with the CPU template's additions ({}) it exceeds {} bytes",
                cpuid_fixups.join(" "),
                CMDLINE_MAX_SIZE - 1
            ),
        }));
    }
    let mut cmdline_bytes = cmdline.clone().into_bytes();
    cmdline_bytes.push(0);
    mem.write_slice(&cmdline_bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| VmmError::Setup(format!("command line: {e}")))?;
    boot::write_boot_tables(&mem).map_err(|e| VmmError::Setup(e.to_string()))?;
    let rsdp = acpi::create_acpi_tables(&mem, &AcpiConfig { cpu_count: cfg.vcpus, virtio_mmio: Vec::new() })
        .map_err(|e| VmmError::Setup(format!("ACPI tables: {e}")))?;
    let params = boot::build_boot_params(&BootParamsConfig {
        setup_header: kernel.header,
        cmdline_len: cmdline.len(),
        initrd,
        ram: ram_regions(cfg.memory),
        rsdp: Some(rsdp),
    })
    .map_err(|e| VmmError::Setup(e.to_string()))?;
    boot::write_boot_params(&mem, &params).map_err(|e| VmmError::Setup(e.to_string()))?;

    // Kicks a vCPU thread out of KVM_RUN; the handler itself does nothing.
    extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(SIGRTMIN(), kick).map_err(|e| VmmError::Setup(format!("signal handler: {e}")))?;
    signals::install()?;

    let mut threads = Vec::new();
    for v in vcpus {
        let name = format!("isla-vcpu{}", v.id);
        let t = std::thread::Builder::new()
            .name(name)
            .spawn(move || v.run())
            .map_err(|e| VmmError::Setup(format!("vCPU thread: {e}")))?;
        threads.push(t);
    }
    if cfg.console == ConsoleConfig::Stdio {
        spawn_stdin_reader(devices.clone());
    }

    let exit = shared.wait_exit(signals::interrupted);
    // Stop every vCPU: re-kick until each thread has left KVM_RUN and seen the stop flag.
    for _ in 0..400 {
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(SIGRTMIN());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let all_joined = threads.iter().all(|t| t.is_finished());
    for t in threads.into_iter().filter(|t| t.is_finished()) {
        let _ = t.join();
    }
    shared.measure_memory("exit");
    if let Ok(mut s) = devices.serial.lock() {
        let _ = s.writer_mut().flush();
    }
    Ok(RunReport::new(cfg, &cmdline, format, template, emulation_exits, &shared, exit, all_joined))
}

fn create_memory(vm: &VmFd, size: u64, shared: &VmShared) -> Result<GuestMemoryMmap, VmmError> {
    let ranges: Vec<(GuestAddress, usize)> =
        ram_regions(size).into_iter().map(|(s, l)| (GuestAddress(s), l as usize)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| VmmError::Setup(format!("guest memory ({} MiB): {e}", size >> 20)))?;
    let mut host_ranges = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let host = region.as_ptr() as u64;
        host_ranges.push((host, region.len()));
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: the region is a live anonymous mapping owned by `mem`, which every vCPU thread
        // holds a clone of and which outlives the VM's use of it (threads are stopped first).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    shared.set_guest_ranges(host_ranges);
    Ok(mem)
}

fn open(path: &std::path::Path, option: &'static str) -> Result<File, VmmError> {
    File::open(path).map_err(|e| {
        VmmError::Config(crate::config::ConfigError::File { option, path: path.into(), reason: e.to_string() })
    })
}

fn load_kernel(mem: &GuestMemoryMmap, cfg: &VmConfig, format: KernelFormat) -> Result<Kernel, VmmError> {
    let mut f = open(&cfg.kernel, "--kernel")?;
    let himem = Some(GuestAddress(HIMEM_START));
    let bad = |e: linux_loader::loader::Error| VmmError::Kernel { path: cfg.kernel.clone(), reason: e.to_string() };
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut f, himem).map_err(bad)?;
            Ok(Kernel { entry: r.kernel_load.0, end: r.kernel_end, header: None })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut f, himem).map_err(bad)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| VmmError::Kernel { path: cfg.kernel.clone(), reason: "no setup header".into() })?;
            const XLF_KERNEL_64: u16 = 1;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(VmmError::Kernel {
                    path: cfg.kernel.clone(),
                    reason: "this bzImage has no 64-bit entry point (XLF_KERNEL_64); isla boots 64-bit kernels only"
                        .into(),
                });
            }
            // The kernel decompresses itself to its preferred address and needs init_size bytes there.
            let end = r.kernel_end.max(hdr.pref_address + u64::from(hdr.init_size));
            Ok(Kernel { entry: r.kernel_load.0 + 0x200, end, header: Some(hdr) })
        }
    }
}

fn load_initrd(mem: &GuestMemoryMmap, cfg: &VmConfig, kernel: &Kernel) -> Result<Option<(u64, u64)>, VmmError> {
    let Some(path) = &cfg.initrd else { return Ok(None) };
    let mut data = Vec::new();
    open(path, "--initrd")?.read_to_end(&mut data).map_err(|e| VmmError::Setup(format!("{}: {e}", path.display())))?;
    let low_end = ram_regions(cfg.memory)[0].1;
    let addr_max = kernel.header.map_or(0x37ff_ffff, |h| u64::from(h.initrd_addr_max)).max(0x37ff_ffff);
    let addr = boot::initrd_address(low_end, data.len() as u64, addr_max, kernel.end).map_err(|e| {
        VmmError::Config(crate::config::ConfigError::Invalid { option: "--initrd", reason: e.to_string() })
    })?;
    mem.write_slice(&data, GuestAddress(addr)).map_err(|e| VmmError::Setup(format!("initrd: {e}")))?;
    Ok(Some((addr, data.len() as u64)))
}

fn console_sink(c: &ConsoleConfig) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match c {
        ConsoleConfig::Stdio => Box::new(std::io::stdout()),
        ConsoleConfig::Null => Box::new(std::io::sink()),
        ConsoleConfig::File(p) => Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| VmmError::Setup(format!("--console file:{}: {e}", p.display())))?,
        )),
    })
}

/// Feeds the monitor's standard input to the guest's serial port.
fn spawn_stdin_reader(devices: Arc<Devices>) {
    let _ = std::thread::Builder::new().name("isla-stdin".into()).spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut pending = &buf[..n];
            while !pending.is_empty() {
                let taken = devices.serial.lock().map(|mut s| s.enqueue_raw_bytes(pending).unwrap_or(0)).unwrap_or(0);
                pending = &pending[taken..];
                if taken == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    });
}

/// The template that `auto` picks here, for display.
pub fn auto_template() -> CpuTemplate {
    crate::config::TemplateChoice::Auto.resolve()
}

/// SIGINT and SIGTERM stop the guest cleanly (status `stopped`, report written).
mod signals {
    use std::sync::atomic::{AtomicI32, Ordering};

    use vmm_sys_util::signal::register_signal_handler;

    use crate::VmmError;

    static RECEIVED: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        RECEIVED.store(num, Ordering::SeqCst);
    }

    pub fn install() -> Result<(), VmmError> {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            register_signal_handler(sig, on_signal).map_err(|e| VmmError::Setup(format!("signal handler: {e}")))?;
        }
        Ok(())
    }

    pub fn interrupted() -> Option<String> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            libc::SIGINT => Some("SIGINT".into()),
            libc::SIGTERM => Some("SIGTERM".into()),
            n => Some(format!("signal {n}")),
        }
    }
}
