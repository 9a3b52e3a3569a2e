//! The boot recipe: KVM VM, guest memory, kernel and initrd, boot tables, devices, vCPUs; then
//! run until the guest powers off, reboots, fails, or is stopped.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use isla_arch::acpi::{self, AcpiConfig};
use isla_arch::boot::{self, BootParamsConfig};
use isla_arch::cpuid::{self, features};
use isla_arch::layout::*;
use isla_virtio::EventLoop;
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
use crate::profile::{ProfileReport, Symbols};
use crate::report::RunReport;
use crate::state::VmShared;
use crate::vcpu::{self, Vcpu};
use crate::virtio::{self, VirtioDevices};
use crate::{host, kvm_err, VmmError};

/// Logged (at info level) once every vCPU thread has started: the monitor is ready and the guest
/// is running. `isla vm bench` times it as Firecracker's "Successfully started microvm".
pub const STARTED_LOG: &str = "guest started";

/// Kernel arguments added (unless the command line sets them) on hosts whose emulator runs the
/// guest kernel, each measured there on the kit's kernel, 1 vCPU (boot to init's marker):
///
/// - `noreplace-smp`: a kernel that sees one CPU rewrites every `lock` prefix of its text through
///   `text_poke`, an address-space switch and a TLB flush each: about 2 s there.
/// - `percpu_alloc=page`: the first per-CPU chunk page by page instead of one 1 MiB unit per CPU
///   that early boot zeroes: about 0.9 s there.
/// - `rodata=off`: the kernel does not write-protect its text and read-only data at the end of
///   boot, nor free the alignment gaps around them; splitting the kernel's large pages and
///   changing the attributes of some 3,000 pages one by one takes about 1.5 s there. The cost is
///   the guest kernel's own hardening (its text stays writable to itself) and 3.3 MiB of guest
///   memory; the boundary between guest and host is KVM's, and is unchanged. `rodata=on` on the
///   command line keeps the protection.
///
/// On hardware they cost nothing worth measuring either way, so they are left to the user there.
pub const EMULATED_KERNEL_ARGS: &[&str] = &["noreplace-smp", "percpu_alloc=page", "rodata=off"];

/// Whether the kernel command line already sets `key` (as `key` or `key=...`): isla's additions
/// never override the user's.
fn sets_key(cmdline: &str, key: &str) -> bool {
    cmdline.split_whitespace().any(|w| w.split('=').next() == Some(key))
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
    let (event_loop, io) = EventLoop::new().map_err(|e| VmmError::Setup(format!("event loop: {e}")))?;
    let virtio = VirtioDevices::create(&vm, &mem, cfg, &io)?;
    let io_thread = std::thread::Builder::new()
        .name("isla-io".into())
        .spawn(move || event_loop.run())
        .map_err(|e| VmmError::Setup(format!("device thread: {e}")))?;
    let devices = Arc::new(Devices::new(shared.clone(), serial_irq, console, virtio));

    let nested = host::is_nested_pvm();
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    let mut added_args = Vec::new();
    for id in 0..cfg.vcpus {
        let fd = vm.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = vcpu::cpuid_for(&supported, template, id, cfg.vcpus)?;
        let effective = vcpu::configure(&fd, id, &cpuid, (id == 0).then_some(kernel.entry))?;
        if id == 0 {
            let extra = if nested { cpuid::EMULATED_KERNEL_HIDDEN } else { &[] };
            let (args, left_out) = cpuid::guest_clear_args(template, extra, &effective);
            if !args.is_empty() {
                tracing::info!(
                    "telling the guest kernel to drop CPU features (the {template} template where KVM did not apply it{}): {}",
                    if nested { ", and what costs most under an emulating host" } else { "" },
                    args.join(" ")
                );
            }
            if !left_out.is_empty() {
                tracing::warn!(
                    "CPU features still visible to the guest (no room in clearcpuid=): {}",
                    left_out.join(", ")
                );
            }
            added_args = args;
        }
        let fallback = cfg.insn_fallback.then(|| isla_insn::Options {
            bmi1: cpuid::has_feature(&cpuid, &features::BMI1),
            lzcnt: cpuid::has_feature(&cpuid, &features::LZCNT),
        });
        vcpus.push(Vcpu::new(id, fd, devices.clone(), shared.clone(), mem.clone(), fallback));
    }

    let mut cmdline = cfg.cmdline.clone();
    let acpi_off = virtio::acpi_disabled(&cmdline);
    if acpi_off {
        added_args.extend(devices.virtio.cmdline_args());
    }
    if let Some(root) = &devices.virtio.root_arg {
        if !sets_key(&cmdline, "root") {
            added_args.push(root.clone());
        }
    }
    if nested {
        for arg in EMULATED_KERNEL_ARGS {
            if !sets_key(&cmdline, arg.split('=').next().unwrap_or(arg)) {
                added_args.push(arg.to_string());
            }
        }
    }
    for a in &added_args {
        cmdline.push(' ');
        cmdline.push_str(a);
    }
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(VmmError::Config(crate::config::ConfigError::Invalid {
            option: "--cmdline",
            reason: format!(
                "with isla's additions ({}) it exceeds {} bytes",
                added_args.join(" "),
                CMDLINE_MAX_SIZE - 1
            ),
        }));
    }
    let mut cmdline_bytes = cmdline.clone().into_bytes();
    cmdline_bytes.push(0);
    mem.write_slice(&cmdline_bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| VmmError::Setup(format!("command line: {e}")))?;
    boot::write_boot_tables(&mem).map_err(|e| VmmError::Setup(e.to_string()))?;
    let virtio_mmio = if acpi_off { Vec::new() } else { devices.virtio.acpi_devices() };
    let rsdp = acpi::create_acpi_tables(&mem, &AcpiConfig { cpu_count: cfg.vcpus, virtio_mmio })
        .map_err(|e| VmmError::Setup(format!("ACPI tables: {e}")))?;
    let setup_data = boot::write_rng_seed(&mem, &host::random_seed()?).map_err(|e| VmmError::Setup(e.to_string()))?;
    let params = boot::build_boot_params(&BootParamsConfig {
        setup_header: kernel.header,
        cmdline_len: cmdline.len(),
        initrd,
        ram: ram_regions(cfg.memory),
        rsdp: Some(rsdp),
        setup_data: Some(setup_data),
    })
    .map_err(|e| VmmError::Setup(e.to_string()))?;
    boot::write_boot_params(&mem, &params).map_err(|e| VmmError::Setup(e.to_string()))?;

    let _api = match &cfg.api_socket {
        Some(path) => {
            let ctx = crate::api::ApiContext {
                shared: shared.clone(),
                vcpus: cfg.vcpus,
                memory_mib: cfg.memory >> 20,
                balloon: cfg.balloon.clone().zip(devices.virtio.balloon.clone()),
            };
            let server = crate::api::ApiServer::start(path, ctx);
            Some(server.map_err(|e| VmmError::Setup(format!("API socket {}: {e}", path.display())))?)
        }
        None => None,
    };

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
    tracing::info!("{STARTED_LOG}: {} vCPU(s)", threads.len());

    if cfg.console == ConsoleConfig::Stdio {
        spawn_stdin_reader(devices.clone());
    }

    // The guest is running: a sampler that cannot start costs the profile, not the run.
    let sampler = cfg.profile_interval.and_then(|interval| {
        start_sampler(&threads, interval, &shared).map_err(|e| tracing::warn!("no profile: {e}")).ok()
    });
    let exit = shared.wait_exit(signals::interrupted);
    if let Some(s) = sampler {
        let _ = s.join();
    }
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
    io.stop();
    let _ = io_thread.join();
    shared.measure_memory("exit");
    if let Ok(mut s) = devices.serial.lock() {
        let _ = s.writer_mut().flush();
    }
    let mut report = RunReport::new(cfg, &cmdline, format, template, emulation_exits, &shared, exit, all_joined);
    if let Some(interval) = cfg.profile_interval {
        report.profile = Some(profile_report(cfg, format, interval, &shared));
    }
    Ok(report)
}

/// Starts the profiler's sampler: every `interval` it kicks each vCPU thread out of KVM_RUN, and
/// the vCPU records its RIP ([`crate::profile`]). It stops when the VM does; join it before the
/// vCPU threads.
fn start_sampler(
    threads: &[std::thread::JoinHandle<()>],
    interval: Duration,
    shared: &Arc<VmShared>,
) -> Result<std::thread::JoinHandle<()>, VmmError> {
    use std::os::unix::thread::JoinHandleExt;
    let targets: Vec<libc::pthread_t> = threads.iter().map(|t| t.as_pthread_t()).collect();
    shared.enable_profiling();
    let shared = shared.clone();
    std::thread::Builder::new()
        .name("isla-sampler".into())
        .spawn(move || {
            while !shared.should_stop() {
                std::thread::sleep(interval);
                for &t in &targets {
                    // SAFETY: each pthread_t belongs to a vCPU thread that `run` joins only after
                    // this sampler has been joined, so the id is live; SIGRTMIN has a no-op handler.
                    unsafe { libc::pthread_kill(t, SIGRTMIN()) };
                }
            }
        })
        .map_err(|e| VmmError::Setup(format!("sampler thread: {e}")))
}

/// Resolves the samples with the kernel's symbols: the ELF kernel's own symbol table, or a
/// `System.map` beside a bzImage.
fn profile_report(cfg: &VmConfig, format: KernelFormat, interval: Duration, shared: &VmShared) -> ProfileReport {
    let source = match format {
        KernelFormat::Elf => cfg.kernel.clone(),
        KernelFormat::BzImage => cfg.kernel.with_file_name("System.map"),
    };
    let symbols = Symbols::load(&source).unwrap_or_else(|e| {
        tracing::warn!("profile without symbols: {e}");
        Symbols::default()
    });
    ProfileReport::new(&shared.samples(), &symbols, interval.as_secs_f64() * 1e3, 25, 1.0)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn file(name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("isla-loader-{}-{name}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        p
    }

    /// A minimal ELF64 executable: one PT_LOAD of `code` at physical 16 MiB, entry there.
    fn tiny_elf(code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        f[ph + 8..ph + 16].copy_from_slice(&0x800u64.to_le_bytes()); // p_offset
        f[ph + 16..ph + 24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes()); // p_vaddr
        f[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // p_paddr
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
        f[ph + 40..ph + 48].copy_from_slice(&0x2000u64.to_le_bytes()); // p_memsz (with bss)
        f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        f[0x800..0x800 + code.len()].copy_from_slice(code);
        f
    }

    /// A minimal bzImage: boot sector + 1 setup sector, then `payload` as the protected-mode part.
    fn tiny_bzimage(payload: &[u8], kernel_64: bool) -> Vec<u8> {
        let mut f = vec![0u8; 1024];
        f[0x1f1] = 1; // setup_sects
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        f[0x211] = 1; // loadflags: LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        f[0x236..0x238].copy_from_slice(&u16::from(kernel_64).to_le_bytes()); // xloadflags
        f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        f[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn loads_an_elf_vmlinux_at_its_physical_address() {
        let code = [0xf4u8, 0x90, 0x90, 0xeb];
        let k = file("elf", &tiny_elf(&code));
        let m = mem(64 << 20);
        let cfg = VmConfig::new(&k);
        let kernel = load_kernel(&m, &cfg, KernelFormat::detect(&k).unwrap()).unwrap();
        assert_eq!(kernel.entry, 0x100_0000);
        assert!(kernel.end >= 0x100_0000 + code.len() as u64);
        assert!(kernel.header.is_none());
        let mut got = [0u8; 4];
        m.read_slice(&mut got, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(got, code);
        let _ = std::fs::remove_file(k);
    }

    #[test]
    fn loads_a_bzimage_and_enters_at_the_64_bit_entry() {
        let payload = vec![0xccu8; 0x400];
        let k = file("bz", &tiny_bzimage(&payload, true));
        let m = mem(64 << 20);
        let kernel = load_kernel(&m, &VmConfig::new(&k), KernelFormat::BzImage).unwrap();
        assert_eq!(kernel.entry, 0x10_0000 + 0x200, "startup_64 is 0x200 into the protected-mode part");
        assert_eq!(kernel.end, 0x100_0000 + 0x40_0000, "room to decompress at pref_address");
        let hdr = kernel.header.unwrap();
        assert_eq!({ hdr.version }, 0x20f);
        let mut got = [0u8; 2];
        m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got, [0xcc, 0xcc]);
        let _ = std::fs::remove_file(k);
    }

    #[test]
    fn refuses_a_bzimage_without_a_64_bit_entry() {
        let k = file("bz32", &tiny_bzimage(&[0u8; 0x400], false));
        let err = load_kernel(&mem(64 << 20), &VmConfig::new(&k), KernelFormat::BzImage).err().unwrap();
        assert!(err.to_string().contains("XLF_KERNEL_64"), "{err}");
        let _ = std::fs::remove_file(k);
    }

    #[test]
    fn refuses_a_truncated_elf() {
        let k = file("elf-trunc", &tiny_elf(&[1, 2, 3])[..40]);
        let err = load_kernel(&mem(64 << 20), &VmConfig::new(&k), KernelFormat::Elf).err().unwrap();
        assert!(err.to_string().starts_with("--kernel:"), "{err}");
        let _ = std::fs::remove_file(k);
    }

    #[test]
    fn places_the_initrd_high_and_refuses_one_that_does_not_fit() {
        let k = file("elf-i", &tiny_elf(&[0x90]));
        let small = file("initrd", &[7u8; 5000]);
        let m = mem(64 << 20);
        let mut cfg = VmConfig::new(&k);
        cfg.memory = 64 << 20;
        cfg.initrd = Some(small.clone());
        let kernel = load_kernel(&m, &cfg, KernelFormat::Elf).unwrap();
        let (addr, size) = load_initrd(&m, &cfg, &kernel).unwrap().unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr >= kernel.end);
        let mut b = [0u8; 1];
        m.read_slice(&mut b, GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b[0], 7);
        let big = file("initrd-big", &vec![0u8; 70 << 20]);
        cfg.initrd = Some(big.clone());
        let err = load_initrd(&m, &cfg, &kernel).err().unwrap();
        assert!(err.to_string().contains("does not fit"), "{err}");
        for p in [k, small, big] {
            let _ = std::fs::remove_file(p);
        }
    }
}
