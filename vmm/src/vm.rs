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
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiPower, SerialConsole, SerialOutput, I8042};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use devices::virtio::{self, Block, BlockConfig, MmioTransport, Net};
use kvm_ioctls::IoEventAddress;

use crate::acpi::{self, AcpiMachine, VirtioMmioSlot};
use crate::boot::{self, BootSource};
use crate::bus::{lock, Bus};
use crate::layout::*;
use crate::spec::Spec;
use crate::vcpu::{self, VcpuEvent, VcpuLinks};
use crate::{cpuid, memory, regs, terminal, VmmError};

/// Arguments hospes puts before the spec's own command line.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off 8250.nr_uarts=1";

/// How a VM ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted; a microVM treats that as the end of the service.
    Reset,
    /// hospes received SIGINT or SIGTERM and stopped the VM.
    Signal(i32),
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

fn eventfd(what: &'static str) -> Result<EventFd, VmmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io { what, source })
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
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

/// The spec's virtio devices, in guest order: drives (vda, vdb, ...) then networks.
fn virtio_devices(spec: &Spec) -> Result<Vec<Box<dyn virtio::VirtioDevice + Send>>, VmmError> {
    let mut out: Vec<Box<dyn virtio::VirtioDevice + Send>> = Vec::new();
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
        out.push(Box::new(Block::new(config).map_err(|e| {
            VmmError::Device {
                id: d.id.clone(),
                reason: e.to_string(),
            }
        })?));
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
    Ok(out)
}

/// Puts one virtio device behind a virtio-mmio window: its interrupt becomes an irqfd on
/// the slot's GSI and each queue's notification an ioeventfd on QueueNotify matching the
/// queue index, so neither ever leaves the kernel through the vCPU thread.
fn attach_virtio(
    vm: &kvm_ioctls::VmFd,
    mem: &devices::GuestMemoryMmap,
    mmio: &mut Bus,
    slot: VirtioMmioSlot,
    device: Box<dyn virtio::VirtioDevice + Send>,
) -> Result<Arc<Mutex<MmioTransport>>, VmmError> {
    let irq = eventfd("virtio interrupt")?;
    vm.register_irqfd(&irq, slot.gsi)
        .map_err(kvm_err("KVM_IRQFD for a virtio device"))?;
    let transport = MmioTransport::new(mem.clone(), device, irq).map_err(|e| VmmError::Device {
        id: format!("virtio-mmio@{:#x}", slot.base),
        reason: e.to_string(),
    })?;
    let notify = IoEventAddress::Mmio(slot.base + virtio::mmio::REG_QUEUE_NOTIFY);
    for (index, evt) in transport.queue_events().iter().enumerate() {
        vm.register_ioevent(evt, &notify, index as u32)
            .map_err(kvm_err("KVM_IOEVENTFD for a virtio queue"))?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(slot.base, VIRTIO_MMIO_SIZE, transport.clone())?;
    Ok(transport)
}

/// Builds the VM for `spec` and runs it until it ends.
pub fn run(spec: &Spec, files: &BootFiles) -> Result<Outcome, VmmError> {
    // 1. KVM and the host.
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

    // 2-3. VM, TSS, irqchip, PIT.
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

    // 4. Memory.
    let mem = memory::create_guest_memory(u64::from(spec.memory_mib) << 20)?;
    memory::register_with_kvm(&vm, &mem)?;

    // 5. Devices.
    let poweroff = eventfd("power-off event")?;
    let reset = eventfd("reset event")?;
    let mut pio = Bus::default();
    let mut mmio = Bus::default();
    let serial_irq = eventfd("COM1 interrupt")?;
    vm.register_irqfd(&serial_irq, COM1_GSI)
        .map_err(kvm_err("KVM_IRQFD for COM1"))?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        serial_irq,
        SerialOutput(Box::new(io::stdout())),
    )));
    pio.insert(u64::from(COM1_PORT), 8, serial.clone())?;
    let clone = |e: &EventFd| {
        e.try_clone().map_err(|source| VmmError::Io {
            what: "eventfd clone",
            source,
        })
    };
    pio.insert(
        u64::from(I8042_PORT),
        5,
        Arc::new(Mutex::new(I8042::new(clone(&reset)?))),
    )?;
    pio.insert(
        u64::from(ACPI_POWER_PORT),
        1,
        Arc::new(Mutex::new(AcpiPower::new(
            clone(&poweroff)?,
            clone(&reset)?,
        ))),
    )?;
    let virtio_devices = virtio_devices(spec)?;
    let mut machine = AcpiMachine {
        vcpus: spec.vcpus,
        virtio: Vec::new(),
    };
    let mut transports = Vec::new();
    for (i, device) in virtio_devices.into_iter().enumerate() {
        let slot = VirtioMmioSlot {
            base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_GSI_START + i as u32,
        };
        transports.push(attach_virtio(&vm, &mem, &mut mmio, slot, device)?);
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

    // The event loop. Signals are blocked before the vCPU threads start so they inherit
    // the mask and only the signalfd sees SIGINT/SIGTERM.
    let signals = signal_fd().map_err(|source| VmmError::Io {
        what: "signalfd",
        source,
    })?;
    let vcpu_wake = eventfd("vCPU wake")?;
    let (tx, rx) = channel();
    let supervisor = Arc::new(Mutex::new(Supervisor {
        poweroff,
        reset,
        vcpu_wake: clone(&vcpu_wake)?,
        vcpu_events: rx,
        signals,
        outcome: None,
    }));
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
    events.add_subscriber(supervisor.clone());
    for transport in transports {
        events.add_subscriber(transport);
    }
    let _raw_terminal = if terminal::stdin_is_terminal() {
        events.add_subscriber(Arc::new(Mutex::new(ConsoleInput {
            serial: serial.clone(),
        })));
        terminal::RawMode::enter().ok()
    } else {
        None
    };

    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    for (index, fd) in vcpus.into_iter().enumerate() {
        let links = VcpuLinks {
            pio: pio.clone(),
            mmio: mmio.clone(),
            events: tx.clone(),
            wake: clone(&vcpu_wake)?,
        };
        vcpu::spawn(index as u32, fd, links).map_err(|source| VmmError::Io {
            what: "spawning a vCPU thread",
            source,
        })?;
    }
    tracing::info!(service = %spec.name, vcpus = spec.vcpus, memory_mib = spec.memory_mib, "VM started");

    loop {
        if let Some(outcome) = lock(&supervisor).outcome.take() {
            // The vCPU threads are still inside KVM_RUN on this VM and its memory; unmapping
            // the memory under them would turn their next guest access into an error. The
            // caller ends the process right after, which releases both at once.
            std::mem::forget(vm);
            std::mem::forget(mem);
            return outcome;
        }
        events
            .run()
            .map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
    }
}
