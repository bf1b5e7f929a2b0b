//! One microVM from spec to exit: builds the VM in the order KVM requires, starts the
//! vCPUs and runs the VMM thread's event loop until the guest powers off, resets, fails or
//! hospes is told to stop.
//!
//! Build order, and why:
//! 1. `/dev/kvm`, and a host check: stock kernels need hardware virtualization.
//! 2. `KVM_CREATE_VM`, then `KVM_SET_TSS_ADDR` (Intel needs the TSS pages placed before any
//!    vCPU exists).
//! 3. `KVM_CREATE_IRQCHIP` before any vCPU, so each vCPU gets an in-kernel LAPIC; then
//!    `KVM_CREATE_PIT2`, which routes its interrupt through that irqchip.
//! 4. Guest RAM, registered as memory slots.
//! 5. Devices on the buses, their interrupts as irqfds (which need the irqchip).
//! 6. Kernel, initrd, command line, zero page; ACPI tables describing vCPUs and devices.
//! 7. vCPUs: create, then CPUID/MSRs/registers/LAPIC (see `regs`), then their threads.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::{AcpiPower, SerialConsole, SerialOutput, I8042};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use devices::virtio::{self, Block, BlockConfig, MmioTransport, Net};
use kvm_ioctls::IoEventAddress;

use snapshot::{DriveConfig, MachineConfig, NetConfig as SnapNetConfig};

use crate::acpi::{self, AcpiMachine, VirtioMmioSlot};
use crate::api::{ApiChannel, ApiRequest, ApiResponse, ApiServer};
use crate::boot::{self, BootSource};
use crate::bus::{lock, Bus};
use crate::control::Control;
use crate::layout::*;
use crate::spec::Spec;
use crate::vcpu::{self, VcpuEvent, VcpuHandle, VcpuLinks};
use crate::{cpuid, memory, regs, terminal, VmmError};

/// Arguments hospes puts before the spec's own command line.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off 8250.nr_uarts=1";

/// How a VM ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted; a microVM treats that as the end of the service.
    Reset,
    /// hospes received SIGINT or SIGTERM and stopped the VM.
    Signal(i32),
    /// The control API asked for a shutdown.
    Shutdown,
    /// A snapshot was written to this directory and the VM stopped, as asked.
    Snapshotted(PathBuf),
    /// The VM migrated: it runs on the destination now, which acknowledged it.
    Migrated {
        /// The destination's address.
        to: String,
    },
}

/// The boot files a VM runs, resolved from the spec or the default guest.
#[derive(Debug, Clone)]
pub struct BootFiles {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
}

/// Where the default guest lives: `$HOSPES_GUEST_DIR`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/hospes/guest` (what `resources/guest/build.sh` fills).
pub fn default_guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HOSPES_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("hospes").join("guest")
}

/// The spec's kernel and initrd, or the default guest's when the spec names no kernel.
pub fn boot_files(spec: &Spec) -> Result<BootFiles, VmmError> {
    if let Some(kernel) = &spec.kernel {
        return Ok(BootFiles {
            kernel: kernel.clone(),
            initrd: spec.initrd.clone(),
        });
    }
    let dir = default_guest_dir();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    if !kernel.is_file() || !initrd.is_file() {
        return Err(VmmError::NoDefaultGuest { dir });
    }
    Ok(BootFiles {
        kernel,
        initrd: Some(spec.initrd.clone().unwrap_or(initrd)),
    })
}

/// Whether this host's CPU offers hardware virtualization (vmx or svm).
pub fn host_has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(true)
}

/// Watches everything that ends the VM: power events, vCPU reports, SIGINT/SIGTERM.
struct Supervisor {
    poweroff: EventFd,
    reset: EventFd,
    vcpu_wake: EventFd,
    vcpu_events: Receiver<VcpuEvent>,
    signals: File,
    outcome: Option<Result<Outcome, VmmError>>,
}

impl Supervisor {
    /// Decides in priority order: a power event the guest made happens-before any vCPU
    /// failure that follows it (the kernel may triple-fault after writing the reset port),
    /// so power events are checked first.
    fn decide(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        if self.poweroff.read().is_ok() {
            self.outcome = Some(Ok(Outcome::PowerOff));
        } else if self.reset.read().is_ok() {
            self.outcome = Some(Ok(Outcome::Reset));
        } else if let Some(sig) = read_signal(&mut self.signals) {
            self.outcome = Some(Ok(Outcome::Signal(sig)));
        } else if let Ok(ev) = self.vcpu_events.try_recv() {
            let _ = self.vcpu_wake.read();
            self.outcome = Some(match ev {
                VcpuEvent::PowerOff => Ok(Outcome::PowerOff),
                VcpuEvent::Reset => Ok(Outcome::Reset),
                VcpuEvent::Failed { index, reason } => Err(VmmError::VcpuFailed { index, reason }),
            });
        }
    }
}

impl MutEventSubscriber for Supervisor {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.decide();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.poweroff.as_raw_fd(),
            self.reset.as_raw_fd(),
            self.vcpu_wake.as_raw_fd(),
            self.signals.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
                tracing::error!("cannot watch fd {fd}: {e:?}");
            }
        }
    }
}

/// Forwards a terminal's keystrokes to the guest's UART.
struct ConsoleInput {
    serial: Arc<Mutex<SerialConsole>>,
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut serial = lock(&self.serial);
        let room = serial.input_capacity();
        if room == 0 {
            return; // the guest reads its FIFO soon; stdin stays readable (level-triggered)
        }
        let mut buf = vec![0u8; room];
        match io::stdin().lock().read(&mut buf) {
            Ok(0) => {
                let _ = ops.remove(events);
            }
            Ok(n) => {
                if let Err(e) = serial.enqueue_input(&buf[..n]) {
                    tracing::warn!("{e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("reading the terminal: {e}; console input stops");
                let _ = ops.remove(events);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data_raw(libc::STDIN_FILENO, 0, EventSet::IN)) {
            tracing::warn!("console input unavailable: {e:?}");
        }
    }
}

fn read_signal(f: &mut File) -> Option<i32> {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    match f.read(&mut info) {
        Ok(n) if n == info.len() => Some(i32::from_ne_bytes([info[0], info[1], info[2], info[3]])),
        _ => None,
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts) and returns a
/// signalfd that receives them instead, so the event loop handles them in order.
fn signal_fd() -> io::Result<File> {
    // SAFETY: sigset_t is a plain C type; sigemptyset/sigaddset initialize it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid, writable memory; pthread_sigmask only changes this thread's
    // mask; signalfd creates a new descriptor which we own right away.
    let fd: RawFd = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor returned by signalfd, owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub(crate) fn eventfd(what: &'static str) -> Result<EventFd, VmmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io { what, source })
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// Refuses hosts whose KVM cannot run stock kernels (no vmx/svm), with the way out.
pub fn check_host() -> Result<(), VmmError> {
    if host_has_hardware_virtualization() {
        Ok(())
    } else {
        Err(VmmError::NoHardwareVirtualization)
    }
}

/// Virtio devices in guest order, and each drive's dirty-block bitmap.
pub(crate) type VirtioDevices = (
    Vec<Box<dyn virtio::VirtioDevice + Send>>,
    Vec<Arc<virtio::DiskDirty>>,
);

/// The spec's virtio devices, in guest order: drives (vda, vdb, ...) then networks.
fn virtio_devices(spec: &Spec) -> Result<VirtioDevices, VmmError> {
    let mut out: Vec<Box<dyn virtio::VirtioDevice + Send>> = Vec::new();
    let mut dirty = Vec::new();
    for d in &spec.drives {
        let cache = match d.cache {
            crate::spec::CacheMode::Writeback => virtio::CacheMode::Writeback,
            crate::spec::CacheMode::None => virtio::CacheMode::None,
        };
        let config = BlockConfig {
            id: d.id.clone(),
            path: d.path.clone(),
            read_only: d.read_only,
            cache,
        };
        let block = Block::new(config).map_err(|e| VmmError::Device {
            id: d.id.clone(),
            reason: e.to_string(),
        })?;
        dirty.push(block.dirty());
        out.push(Box::new(block));
    }
    for n in &spec.nets {
        let mac = n
            .mac
            .unwrap_or_else(|| virtio::mac_from_name(&spec.name, &n.id));
        let config = virtio::NetConfig {
            id: n.id.clone(),
            tap: n.tap.clone(),
            mac,
        };
        out.push(Box::new(Net::new(config).map_err(|e| {
            VmmError::Device {
                id: n.id.clone(),
                reason: e.to_string(),
            }
        })?));
    }
    Ok((out, dirty))
}

/// Puts one virtio device behind a virtio-mmio window: its interrupt becomes an irqfd on
/// the slot's GSI and each queue's notification an ioeventfd on QueueNotify matching the
/// queue index, so neither ever leaves the kernel through the vCPU thread. With `state`,
/// the transport continues from a snapshot instead of starting at reset.
pub(crate) fn attach_virtio(
    vm: &kvm_ioctls::VmFd,
    mem: &devices::GuestMemoryMmap,
    mmio: &mut Bus,
    slot: VirtioMmioSlot,
    device: Box<dyn virtio::VirtioDevice + Send>,
    state: Option<&snapshot::VirtioTransportState>,
) -> Result<Arc<Mutex<MmioTransport>>, VmmError> {
    let irq = eventfd("virtio interrupt")?;
    vm.register_irqfd(&irq, slot.gsi)
        .map_err(kvm_err("KVM_IRQFD for a virtio device"))?;
    let id = format!("virtio-mmio@{:#x}", slot.base);
    let transport = match state {
        None => MmioTransport::new(mem.clone(), device, irq).map_err(|e| VmmError::Device {
            id,
            reason: e.to_string(),
        })?,
        Some(state) => MmioTransport::restore(mem.clone(), device, irq, state).map_err(|e| {
            VmmError::Device {
                id,
                reason: e.to_string(),
            }
        })?,
    };
    let notify = IoEventAddress::Mmio(slot.base + virtio::mmio::REG_QUEUE_NOTIFY);
    for (index, evt) in transport.queue_events().iter().enumerate() {
        vm.register_ioevent(evt, &notify, index as u32)
            .map_err(kvm_err("KVM_IOEVENTFD for a virtio queue"))?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(slot.base, VIRTIO_MMIO_SIZE, transport.clone())?;
    Ok(transport)
}

/// What the user chose for a VM beyond its spec.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Serve the control API on this Unix socket.
    pub api_socket: Option<PathBuf>,
}

/// A built VM: what the event loop and the control API work on.
pub(crate) struct Vm {
    /// Service name.
    pub(crate) name: String,
    /// What GET /vm reports as the spec.
    pub(crate) spec_json: serde_json::Value,
    /// The machine as a snapshot records it.
    pub(crate) config: MachineConfig,
    /// Host path of each drive's image, in `config.drives` order.
    pub(crate) drive_paths: Vec<PathBuf>,
    pub(crate) fd: kvm_ioctls::VmFd,
    pub(crate) mem: devices::GuestMemoryMmap,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Each drive's dirty-block bitmap, in `config.drives` order.
    pub(crate) disk_dirty: Vec<Arc<virtio::DiskDirty>>,
    pub(crate) vcpus: Vec<VcpuHandle>,
    /// /dev/kvm, open as long as the VM.
    pub(crate) _kvm: Kvm,
}

/// Steps 1-3 of the build order: KVM (checked), the VM, its TSS, irqchip and PIT.
pub(crate) fn create_vm() -> Result<(Kvm, kvm_ioctls::VmFd), VmmError> {
    check_host()?;
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    for (cap, name) in [
        (Cap::Irqchip, "irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::UserMemory, "user memory"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::MissingCapability(name));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok((kvm, vm))
}

/// The legacy devices on the PIO bus, and the power events they raise.
pub(crate) struct Platform {
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) poweroff: EventFd,
    pub(crate) reset: EventFd,
}

fn clone_fd(e: &EventFd) -> Result<EventFd, VmmError> {
    e.try_clone().map_err(|source| VmmError::Io {
        what: "eventfd clone",
        source,
    })
}

/// Step 5a: COM1, the i8042 reset line, the ACPI power
/// port.
pub(crate) fn platform(vm: &kvm_ioctls::VmFd) -> Result<Platform, VmmError> {
    let poweroff = eventfd("power-off event")?;
    let reset = eventfd("reset event")?;
    let mut pio = Bus::default();
    let serial_irq = eventfd("COM1 interrupt")?;
    vm.register_irqfd(&serial_irq, COM1_GSI)
        .map_err(kvm_err("KVM_IRQFD for COM1"))?;
    let out = SerialOutput(Box::new(io::stdout()));
    let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, out)));
    pio.insert(u64::from(COM1_PORT), 8, serial.clone())?;
    pio.insert(
        u64::from(I8042_PORT),
        5,
        Arc::new(Mutex::new(I8042::new(clone_fd(&reset)?))),
    )?;
    pio.insert(
        u64::from(ACPI_POWER_PORT),
        1,
        Arc::new(Mutex::new(AcpiPower::new(
            clone_fd(&poweroff)?,
            clone_fd(&reset)?,
        ))),
    )?;
    Ok(Platform {
        pio,
        mmio: Bus::default(),
        serial,
        poweroff,
        reset,
    })
}

/// The virtio-mmio slot of the `i`th virtio device.
pub(crate) fn virtio_slot(i: usize) -> VirtioMmioSlot {
    VirtioMmioSlot {
        base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE,
        gsi: VIRTIO_GSI_START + i as u32,
    }
}

/// The machine a snapshot of a VM booted from `spec` records.
fn machine_config(spec: &Spec, cmdline: &str) -> Result<MachineConfig, VmmError> {
    let mut drives = Vec::new();
    for d in &spec.drives {
        let size = std::fs::metadata(&d.path)
            .map_err(|source| VmmError::Io {
                what: "reading a drive's size",
                source,
            })?
            .len();
        drives.push(DriveConfig {
            id: d.id.clone(),
            file: format!("disk-{}.img", d.id),
            size,
            read_only: d.read_only,
            cache: match d.cache {
                crate::spec::CacheMode::Writeback => "writeback".into(),
                crate::spec::CacheMode::None => "none".into(),
            },
        });
    }
    let nets = spec
        .nets
        .iter()
        .map(|n| SnapNetConfig {
            id: n.id.clone(),
            tap: n.tap.clone(),
            mac: n
                .mac
                .unwrap_or_else(|| virtio::mac_from_name(&spec.name, &n.id)),
        })
        .collect();
    Ok(MachineConfig {
        name: spec.name.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        cmdline: cmdline.to_string(),
        drives,
        nets,
    })
}

/// Builds the VM for `spec`, boots it and runs it until it ends.
pub fn run(spec: &Spec, files: &BootFiles, options: &RunOptions) -> Result<Outcome, VmmError> {
    // Bind the API socket first: a socket in use fails before anything else starts.
    let api = options
        .api_socket
        .as_deref()
        .map(ApiServer::start)
        .transpose()?;

    // 1-3. KVM and the host; VM, TSS, irqchip, PIT.
    let (kvm, vm) = create_vm()?;

    // 4. Memory.
    let mem = memory::create_guest_memory(u64::from(spec.memory_mib) << 20)?;
    memory::register_with_kvm(&vm, &mem)?;

    // 5. Devices.
    let mut platform = platform(&vm)?;
    let mut machine = AcpiMachine {
        vcpus: spec.vcpus,
        virtio: Vec::new(),
    };
    let mut transports = Vec::new();
    let (devices, disk_dirty) = virtio_devices(spec)?;
    for (i, device) in devices.into_iter().enumerate() {
        let slot = virtio_slot(i);
        transports.push(attach_virtio(
            &vm,
            &mem,
            &mut platform.mmio,
            slot,
            device,
            None,
        )?);
        machine.virtio.push(slot);
    }

    // 6. Boot memory and ACPI.
    let cmdline = if spec.cmdline.is_empty() {
        BASE_CMDLINE.to_string()
    } else {
        format!("{BASE_CMDLINE} {}", spec.cmdline)
    };
    let entry = boot::load(
        &mem,
        &BootSource {
            kernel: &files.kernel,
            initrd: files.initrd.as_deref(),
            cmdline: &cmdline,
        },
    )?;
    acpi::write_tables(&mem, &machine)?;

    // 7. vCPUs.
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for index in 0..spec.vcpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::normalize(&mut cpuid, index, spec.vcpus);
        regs::configure(&fd, index, &cpuid, entry)?;
        vcpus.push(fd);
    }

    let built = Built {
        name: spec.name.clone(),
        spec_json: serde_json::to_value(spec).unwrap_or(serde_json::Value::Null),
        config: machine_config(spec, &cmdline)?,
        drive_paths: spec.drives.iter().map(|d| d.path.clone()).collect(),
        kvm,
        vm,
        mem,
        platform,
        transports,
        disk_dirty,
        vcpu_fds: vcpus,
    };
    run_built(built, api)
}

/// A VM with every part in place and its vCPUs not yet started.
pub(crate) struct Built {
    pub(crate) name: String,
    pub(crate) spec_json: serde_json::Value,
    pub(crate) config: MachineConfig,
    pub(crate) drive_paths: Vec<PathBuf>,
    pub(crate) kvm: Kvm,
    pub(crate) vm: kvm_ioctls::VmFd,
    pub(crate) mem: devices::GuestMemoryMmap,
    pub(crate) platform: Platform,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) disk_dirty: Vec<Arc<virtio::DiskDirty>>,
    pub(crate) vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
}

/// Wakes the event loop when another thread (the API's, a migration's) has queued
/// requests; the loop drains them.
struct Wake(EventFd);

impl MutEventSubscriber for Wake {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!("cannot watch a wake eventfd: {e:?}");
        }
    }
}

/// Starts the vCPUs of `built` and runs the event loop until the VM ends.
pub(crate) fn run_built(
    built: Built,
    api: Option<(ApiServer, ApiChannel)>,
) -> Result<Outcome, VmmError> {
    launch(built, api, false)?.run()
}

/// A VM with its vCPU threads and event loop set up: what [`launch`] returns.
pub(crate) struct Launched {
    vm: Vm,
    events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    supervisor: Arc<Mutex<Supervisor>>,
    api_requests: Option<Receiver<(ApiRequest, Sender<ApiResponse>)>>,
    control_wake: EventFd,
    _api_server: Option<ApiServer>,
    _raw_terminal: Option<terminal::RawMode>,
}

/// Sets up everything `built` needs to run (event loop, signal handling, vCPU threads)
/// and starts its vCPUs, or with `paused` leaves each thread stopped before its first
/// `KVM_RUN` until [`Launched::resume`]. A restore, and a migration's destination as
/// soon as the Hello arrives, launch paused before the state is known
/// (`checkpoint::Prebuilt::launch_paused`): the state is then written into the launched
/// VM, so whatever can fail fails while the source can still resume, and Commit only has
/// to let the vCPUs go. Dropping a paused `Launched` never runs the guest: its vCPU
/// threads park for good once their command channel is gone.
pub(crate) fn launch(
    built: Built,
    api: Option<(ApiServer, ApiChannel)>,
    paused: bool,
) -> Result<Launched, VmmError> {
    let Built {
        name,
        spec_json,
        config,
        drive_paths,
        kvm,
        vm,
        mem,
        platform,
        transports,
        disk_dirty,
        vcpu_fds,
    } = built;
    let Platform {
        pio,
        mmio,
        serial,
        poweroff,
        reset,
    } = platform;

    // The event loop. Signals are blocked before the vCPU threads start so they inherit
    // the mask and only the signalfd sees SIGINT/SIGTERM.
    let mut laps = crate::laps::Laps::start();
    let signals = signal_fd().map_err(|source| VmmError::Io {
        what: "signalfd",
        source,
    })?;
    let vcpu_wake = eventfd("vCPU wake")?;
    let (tx, rx) = channel();
    let supervisor = Arc::new(Mutex::new(Supervisor {
        poweroff,
        reset,
        vcpu_wake: clone_fd(&vcpu_wake)?,
        vcpu_events: rx,
        signals,
        outcome: None,
    }));
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
    events.add_subscriber(supervisor.clone());
    for transport in &transports {
        events.add_subscriber(transport.clone());
    }
    let (_api_server, api_requests) = match api {
        Some((server, channel)) => {
            events.add_subscriber(Arc::new(Mutex::new(Wake(channel.wake))));
            (Some(server), Some(channel.requests))
        }
        None => (None, None),
    };
    let migration_wake = eventfd("migration wake")?;
    let control_wake = clone_fd(&migration_wake)?;
    events.add_subscriber(Arc::new(Mutex::new(Wake(migration_wake))));
    let _raw_terminal = if terminal::stdin_is_terminal() {
        events.add_subscriber(Arc::new(Mutex::new(ConsoleInput {
            serial: serial.clone(),
        })));
        terminal::RawMode::enter().ok()
    } else {
        None
    };

    laps.lap("event loop");
    let msr_index: Arc<[u32]> = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .into();
    vcpu::install_kick_handler().map_err(|e| VmmError::Io {
        what: "installing the vCPU kick signal handler",
        source: io::Error::other(e.to_string()),
    })?;
    laps.lap("MSR list and kick handler");
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let mut vcpus = Vec::new();
    for (index, fd) in vcpu_fds.into_iter().enumerate() {
        let links = VcpuLinks {
            pio: pio.clone(),
            mmio: mmio.clone(),
            events: tx.clone(),
            wake: clone_fd(&vcpu_wake)?,
            msr_index: msr_index.clone(),
        };
        let handle =
            vcpu::spawn(index as u32, fd, links, paused).map_err(|source| VmmError::Io {
                what: "spawning a vCPU thread",
                source,
            })?;
        vcpus.push(handle);
    }
    laps.lap("vCPU threads");
    if paused {
        // A destination launches inside the guest's pause: worth seeing.
        tracing::info!("launch, paused: {laps}");
    } else {
        tracing::debug!("launch: {laps}");
    }

    let vm = Vm {
        name,
        spec_json,
        config,
        drive_paths,
        fd: vm,
        mem,
        serial,
        transports,
        disk_dirty,
        vcpus,
        _kvm: kvm,
    };
    let launched = Launched {
        vm,
        events,
        supervisor,
        api_requests,
        control_wake,
        _api_server,
        _raw_terminal,
    };
    if !paused {
        launched.running();
    }
    Ok(launched)
}

impl Launched {
    /// The VM.
    pub(crate) fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Lets the vCPUs of a VM launched paused run; returns when the last of their threads
    /// let the guest go.
    pub(crate) fn resume(&self) -> Result<Instant, VmmError> {
        // Earlier than any of theirs.
        let mut last = Instant::now();
        for vcpu in &self.vm.vcpus {
            let at = vcpu.resume().map_err(|e| VmmError::VcpuFailed {
                index: vcpu.index(),
                reason: e.to_string(),
            })?;
            last = last.max(at);
        }
        self.running();
        Ok(last)
    }

    fn running(&self) {
        let (vm, config) = (&self.vm, &self.vm.config);
        tracing::info!(service = %vm.name, vcpus = config.vcpus, memory_mib = config.memory_mib, "VM running");
    }

    /// Runs the event loop until the VM ends.
    pub(crate) fn run(self) -> Result<Outcome, VmmError> {
        let Launched {
            mut vm,
            mut events,
            supervisor,
            api_requests,
            control_wake,
            _api_server,
            _raw_terminal,
        } = self;
        let mut control = Control::new(control_wake);
        loop {
            if let Some(outcome) = lock(&supervisor).outcome.take() {
                // The vCPU threads may still be inside KVM_RUN on this VM and its memory;
                // unmapping the memory under them would turn their next guest access into an
                // error. The caller ends the process right after, which releases both at once.
                std::mem::forget(vm);
                return outcome;
            }
            if let Some(requests) = &api_requests {
                while let Ok((request, reply)) = requests.try_recv() {
                    if let Some(outcome) = control.handle_request(&mut vm, request, reply) {
                        std::mem::forget(vm);
                        return Ok(outcome);
                    }
                }
            }
            if let Some(outcome) = control.poll_migration(&mut vm) {
                std::mem::forget(vm);
                return Ok(outcome);
            }
            events
                .run()
                .map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
        }
    }
}
