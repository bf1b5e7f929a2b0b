//! vCPU threads: each runs `KVM_RUN` in a loop, dispatches PIO/MMIO exits to the buses,
//! and obeys pause, resume and save commands from the VMM thread.
//!
//! A vCPU never decides the VM's fate itself: on an exit that ends the guest (a triple
//! fault, a KVM internal error, a failed entry) it reports a [`VcpuEvent`] to the VMM
//! thread over a channel, signals an `EventFd` so the event loop wakes, and from then on
//! only answers commands.
//!
//! Pausing, step by step:
//! 1. The VMM thread queues [`Command::Pause`] and sends the thread the kick signal
//!    ([`kick_signal`], a real-time signal whose handler does nothing). A signal arriving
//!    while the thread is in guest mode makes `KVM_RUN` return EINTR; one arriving just
//!    before the thread enters `KVM_RUN` is lost, so the VMM thread repeats the kick every
//!    millisecond until the vCPU acknowledges (an idle vCPU halts inside KVM and would
//!    otherwise never come out).
//! 2. The thread looks at its commands only when `KVM_RUN` returned EINTR. After an I/O
//!    exit KVM still owes the vCPU the result of the access (it completes it on the next
//!    `KVM_RUN`), so a vCPU paused there would be saved mid-instruction.
//! 3. Paused, it calls `KVM_KVMCLOCK_CTRL` (the guest then does not take the pause for a
//!    soft lockup), acknowledges, and blocks on its command channel: `Save` reads its
//!    state, `Restore` writes one (a VM launched before its state was known),
//!    `Resume` acknowledges and re-enters `KVM_RUN`.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use snapshot::VcpuState;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::state::{self, StateError};

/// Something a vCPU tells the VMM thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked for power-off through a KVM system event.
    PowerOff,
    /// The guest asked for a reset through a KVM system event.
    Reset,
    /// The vCPU cannot continue; the text names the exit and the registers.
    Failed {
        /// vCPU index.
        index: u32,
        /// What happened, with the registers.
        reason: String,
    },
}

/// Errors commanding a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread did not acknowledge in time.
    #[error("vCPU {index} did not {what} within {waited:?}")]
    Timeout {
        /// vCPU index.
        index: u32,
        /// "pause" or "resume".
        what: &'static str,
        /// How long we waited.
        waited: Duration,
    },
    /// The thread is gone.
    #[error("vCPU {index}'s thread is gone")]
    Gone {
        /// vCPU index.
        index: u32,
    },
    /// A command arrived in the wrong state.
    #[error("vCPU {index} must be paused (and not stopped) to {what}")]
    NotPaused {
        /// vCPU index.
        index: u32,
        /// The command.
        what: &'static str,
    },
    /// Reading its state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The kick signal could not be installed or sent.
    #[error("vCPU kick signal: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// What the VMM thread asks of a vCPU thread.
enum Command {
    Pause,
    Resume,
    /// Spend this percentage of the time outside the guest (0: none); see
    /// [`THROTTLE_SLICE`].
    Throttle(u32),
    Save(Sender<Result<VcpuState, VcpuError>>),
    /// Write this state into the vCPU (a VM built before its state was known).
    Restore(Box<VcpuState>, Sender<Result<(), VcpuError>>),
}

/// What a vCPU thread acknowledges.
#[derive(Debug, PartialEq, Eq)]
enum Ack {
    Paused,
    /// When the thread let the guest go, just before it enters `KVM_RUN` again.
    Resumed(Instant),
}

/// Where a vCPU sends its exits and reports.
pub struct VcpuLinks {
    /// The PIO bus.
    pub pio: Arc<Bus>,
    /// The MMIO bus.
    pub mmio: Arc<Bus>,
    /// Reports to the VMM thread.
    pub events: Sender<VcpuEvent>,
    /// Wakes the VMM thread's event loop after a report.
    pub wake: EventFd,
    /// KVM's MSR index list, for saving.
    pub msr_index: Arc<[u32]>,
}

/// The VMM thread's side of one vCPU thread.
pub struct VcpuHandle {
    index: u32,
    thread: JoinHandle<()>,
    commands: Sender<Command>,
    acks: Receiver<Ack>,
}

/// How long a vCPU may take to acknowledge a pause or resume.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an unacknowledged pause is kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

/// Auto-converge throttling: a throttled vCPU runs the guest for this long, is kicked out
/// by a timer of its own and then sleeps `slice × p / (100 - p)` for a throttle of p%, as
/// QEMU's cpu-throttle does: 2.5 ms at 20%, 10 ms at 50%, 990 ms at 99%. The guest's
/// writes then come in bursts with long quiet gaps between them at a high throttle, and a
/// short pre-copy round can fall in a gap and find nothing dirty: spreading the same share
/// evenly (0.1 ms every 10 ms at 99%) dirties something in every round however short.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// How long a vCPU throttled to `percent` sleeps after each [`THROTTLE_SLICE`].
pub fn throttle_sleep_time(percent: u32) -> Duration {
    let percent = percent.min(99);
    THROTTLE_SLICE * percent / (100 - percent)
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: being delivered is the point (KVM_RUN returns EINTR).
}

/// Installs the kick signal's handler (without SA_RESTART). Once per process, before the
/// first vCPU thread starts.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::Signal)
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Stops the vCPU outside `KVM_RUN` and waits until it says so (module documentation).
    pub fn pause(&self) -> Result<(), VcpuError> {
        let index = self.index;
        self.commands
            .send(Command::Pause)
            .map_err(|_| VcpuError::Gone { index })?;
        let start = Instant::now();
        loop {
            self.thread.kill(kick_signal()).map_err(VcpuError::Signal)?;
            match self.acks.recv_timeout(KICK_INTERVAL) {
                Ok(Ack::Paused) => return Ok(()),
                Ok(Ack::Resumed(_)) => continue, // a stale answer to an earlier resume
                Err(RecvTimeoutError::Timeout) if start.elapsed() < ACK_TIMEOUT => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::Timeout {
                        index,
                        what: "pause",
                        waited: start.elapsed(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone { index }),
            }
        }
    }

    /// Lets a paused vCPU run again; returns when its thread let the guest go.
    pub fn resume(&self) -> Result<Instant, VcpuError> {
        let index = self.index;
        self.commands
            .send(Command::Resume)
            .map_err(|_| VcpuError::Gone { index })?;
        loop {
            match self.acks.recv_timeout(ACK_TIMEOUT) {
                Ok(Ack::Resumed(at)) => return Ok(at),
                Ok(Ack::Paused) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::Timeout {
                        index,
                        what: "resume",
                        waited: ACK_TIMEOUT,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone { index }),
            }
        }
    }

    /// Slows the vCPU down for auto-converge: `percent` (at most 99) of the time is spent
    /// sleeping outside the guest, in the rhythm [`THROTTLE_SLICE`] describes; 0 ends
    /// throttling.
    pub fn throttle(&self, percent: u32) -> Result<(), VcpuError> {
        let index = self.index;
        self.commands
            .send(Command::Throttle(percent.min(99)))
            .map_err(|_| VcpuError::Gone { index })?;
        // Seen at the next exit; a paused vCPU sees it when resumed.
        self.thread.kill(kick_signal()).map_err(VcpuError::Signal)
    }

    /// The state of a paused vCPU.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        self.start_save()?.wait()
    }

    /// Asks a paused vCPU for its state without waiting: its thread reads it while the
    /// caller does something else.
    pub fn start_save(&self) -> Result<PendingSave, VcpuError> {
        let index = self.index;
        let (tx, rx) = channel();
        self.commands
            .send(Command::Save(tx))
            .map_err(|_| VcpuError::Gone { index })?;
        Ok(PendingSave { index, rx })
    }
}

impl VcpuHandle {
    /// Writes `state` into a paused vCPU (by its own thread, as KVM prefers vCPU ioctls)
    /// and waits until it is in: for a VM launched paused before its state was known.
    pub fn restore(&self, state: VcpuState) -> Result<(), VcpuError> {
        let index = self.index;
        let (tx, rx) = channel();
        self.commands
            .send(Command::Restore(Box::new(state), tx))
            .map_err(|_| VcpuError::Gone { index })?;
        rx.recv().map_err(|_| VcpuError::Gone { index })?
    }
}

/// A vCPU state being read by the vCPU's thread ([`VcpuHandle::start_save`]).
pub struct PendingSave {
    index: u32,
    rx: Receiver<Result<VcpuState, VcpuError>>,
}

impl PendingSave {
    /// Waits for the state.
    pub fn wait(self) -> Result<VcpuState, VcpuError> {
        let index = self.index;
        self.rx.recv().map_err(|_| VcpuError::Gone { index })?
    }
}

/// A vCPU thread's stack. KVM_RUN and the device register handlers need little; the
/// default 2 MiB stack is exactly one transparent huge page, and with THP on (as hosts
/// commonly run it) its first touch makes all 2 MiB resident.
const VCPU_STACK_SIZE: usize = 512 << 10;

/// Starts vCPU `index` on its own thread; it enters the guest at once unless `paused`.
pub fn spawn(
    index: u32,
    fd: VcpuFd,
    links: VcpuLinks,
    paused: bool,
) -> std::io::Result<VcpuHandle> {
    let (commands, command_rx) = channel();
    let (ack_tx, acks) = channel();
    if paused {
        // Queued before the thread starts: it pauses before its first KVM_RUN.
        let _ = commands.send(Command::Pause);
    }
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .stack_size(VCPU_STACK_SIZE)
        .spawn(move || {
            let mut vcpu = Thread {
                index,
                fd,
                links,
                commands: command_rx,
                acks: ack_tx,
                throttle: 0,
                timer: None,
            };
            vcpu.rehearse_save();
            vcpu.serve_commands();
            let event = vcpu.run();
            // The receiver lives as long as the VMM thread's loop; if it is gone the
            // process is exiting anyway.
            let _ = vcpu.links.events.send(event);
            let _ = vcpu.links.wake.write(1);
            // The guest cannot continue on this vCPU; it still answers commands so that
            // pausing the others and saving what is left keeps working.
            vcpu.stopped();
        })?;
    if paused {
        // Consume the acknowledgement of the queued pause.
        match acks.recv_timeout(ACK_TIMEOUT) {
            Ok(_) => {}
            Err(_) => {
                return Err(std::io::Error::other(format!(
                    "vCPU {index} did not start paused"
                )))
            }
        }
    }
    Ok(VcpuHandle {
        index,
        thread,
        commands,
        acks,
    })
}

/// The vCPU thread's own state.
struct Thread {
    index: u32,
    fd: VcpuFd,
    links: VcpuLinks,
    commands: Receiver<Command>,
    acks: Sender<Ack>,
    /// Auto-converge: percent of the time spent outside the guest (see [`THROTTLE_SLICE`]).
    throttle: u32,
    /// The timer that kicks this thread out of the guest after each [`THROTTLE_SLICE`]
    /// while throttled.
    timer: Option<KickTimer>,
}

/// A POSIX timer sending the kick signal to one thread (SIGEV_THREAD_ID) periodically.
struct KickTimer(libc::timer_t);

impl KickTimer {
    /// A disarmed timer that will signal the calling thread.
    fn for_this_thread() -> std::io::Result<Self> {
        // SAFETY: all-zero is a valid `sigevent`; the fields that matter are set below.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` are valid for the call; the kernel fills `timer`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(timer))
    }

    /// Fires once, `after` from now; zero disarms it. One shot, re-armed after each sleep:
    /// a periodic timer would keep firing while the thread sleeps.
    fn set(&self, after: Duration) -> std::io::Result<()> {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let spec = libc::itimerspec {
            it_interval: zero,
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: the timer is ours and alive; `spec` is valid for the call and the old
        // value is not asked for.
        if unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        // SAFETY: the timer is ours and deleted once.
        unsafe { libc::timer_delete(self.0) };
    }
}

impl Thread {
    /// Applies a throttle command: arms this thread's kick timer, or disarms it.
    fn set_throttle(&mut self, percent: u32) {
        self.throttle = percent;
        if percent > 0 && self.timer.is_none() {
            match KickTimer::for_this_thread() {
                Ok(timer) => self.timer = Some(timer),
                Err(e) => {
                    tracing::warn!("vCPU {}: cannot throttle, no timer: {e}", self.index);
                    self.throttle = 0;
                    return;
                }
            }
        }
        self.arm_timer();
    }

    /// Starts a [`THROTTLE_SLICE`] of guest time while throttled; disarms the timer if not.
    fn arm_timer(&self) {
        if let Some(timer) = &self.timer {
            let slice = if self.throttle > 0 {
                THROTTLE_SLICE
            } else {
                Duration::ZERO
            };
            if let Err(e) = timer.set(slice) {
                tracing::warn!("vCPU {}: throttle timer: {e}", self.index);
            }
        }
    }

    /// While throttled, after a kick: sleep this vCPU's share, then start the next slice.
    /// The sleep ends early for commands: a pause must not wait for it (at 99% it lasts
    /// almost a second), and a throttle of 0 ends it.
    fn throttle_sleep(&mut self) {
        if self.throttle == 0 {
            return;
        }
        let until = Instant::now() + throttle_sleep_time(self.throttle);
        while self.throttle > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.commands.recv_timeout(left) {
                Ok(command) => self.handle(command),
                Err(RecvTimeoutError::Timeout) => break,
                // The VMM thread is gone: the process is ending.
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        self.arm_timer();
    }

    /// Handles queued commands; returns once none is queued and the vCPU may run.
    fn serve_commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            self.handle(command);
        }
    }

    /// One command, while the vCPU is outside KVM_RUN between runs.
    fn handle(&mut self, command: Command) {
        match command {
            Command::Pause => self.paused(),
            Command::Resume => {
                let _ = self.acks.send(Ack::Resumed(Instant::now()));
            }
            Command::Throttle(percent) => self.set_throttle(percent),
            Command::Save(reply) => {
                let _ = reply.send(Err(VcpuError::NotPaused {
                    index: self.index,
                    what: "save its state",
                }));
            }
            Command::Restore(_, reply) => self.refuse_restore(reply),
        }
    }

    fn refuse_restore(&self, reply: Sender<Result<(), VcpuError>>) {
        let _ = reply.send(Err(VcpuError::NotPaused {
            index: self.index,
            what: "restore its state",
        }));
    }

    /// Saves this vCPU's state once, before the guest first runs here, and drops it. The
    /// first run of a code path pays for page faults on the binary's text (major ones if
    /// it is not in the page cache) and, under emulation, for translating it, in hospes
    /// and in KVM alike: without this the first save would pay inside the guest's pause,
    /// a migration's stop-and-copy or a snapshot's. Measured in the test rig, whose L2
    /// runs under TCG: about 15 ms of a first save's 18. A failure only costs that gain.
    /// A migration's destination spawns its vCPU threads when the Hello arrives, long
    /// before the guest's pause.
    fn rehearse_save(&mut self) {
        let start = Instant::now();
        match state::save_vcpu(&self.fd, self.index, &self.links.msr_index) {
            Ok(_) => tracing::debug!(
                "vCPU {}: save rehearsed in {:.1} ms",
                self.index,
                start.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => tracing::debug!("vCPU {}: save rehearsal stopped: {e}", self.index),
        }
    }

    /// Paused: outside KVM_RUN until told to resume.
    fn paused(&mut self) {
        // EINVAL means the guest does not use kvmclock: nothing to tell it.
        if let Err(e) = self.fd.kvmclock_ctrl() {
            if e.errno() != libc::EINVAL {
                tracing::warn!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.index);
            }
        }
        let _ = self.acks.send(Ack::Paused);
        loop {
            match self.commands.recv() {
                Ok(Command::Pause) => {
                    let _ = self.acks.send(Ack::Paused);
                }
                Ok(Command::Resume) => {
                    let _ = self.acks.send(Ack::Resumed(Instant::now()));
                    return;
                }
                Ok(Command::Throttle(percent)) => self.set_throttle(percent),
                Ok(Command::Save(reply)) => {
                    let saved = state::save_vcpu(&self.fd, self.index, &self.links.msr_index);
                    let _ = reply.send(saved.map_err(VcpuError::from));
                }
                Ok(Command::Restore(saved, reply)) => {
                    let done = state::restore_vcpu(&self.fd, self.index, &saved);
                    let _ = reply.send(done.map_err(VcpuError::from));
                }
                // The VMM thread is gone: the process is ending.
                Err(_) => loop {
                    std::thread::park();
                },
            }
        }
    }

    /// After a fatal exit: answers commands, never runs the guest again.
    fn stopped(&mut self) {
        loop {
            match self.commands.recv() {
                Ok(Command::Pause) => {
                    let _ = self.acks.send(Ack::Paused);
                }
                Ok(Command::Resume) => {
                    let _ = self.acks.send(Ack::Resumed(Instant::now()));
                }
                Ok(Command::Throttle(_)) => {}
                Ok(Command::Save(reply)) => {
                    let saved = state::save_vcpu(&self.fd, self.index, &self.links.msr_index);
                    let _ = reply.send(saved.map_err(VcpuError::from));
                }
                Ok(Command::Restore(_, reply)) => self.refuse_restore(reply),
                Err(_) => loop {
                    std::thread::park();
                },
            }
        }
    }

    fn run(&mut self) -> VcpuEvent {
        let index = self.index;
        loop {
            let links = &self.links;
            let fd = &mut self.fd;
            let failure = match fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    links.pio.read(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    links.pio.write(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !links.mmio.read(addr, data) {
                        tracing::debug!(
                            "vcpu{index}: MMIO read of {} bytes at {addr:#x}: no device",
                            data.len()
                        );
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !links.mmio.write(addr, data) {
                        tracing::debug!(
                            "vcpu{index}: MMIO write of {} bytes at {addr:#x}: no device",
                            data.len()
                        );
                    }
                    continue;
                }
                // With the in-kernel LAPIC, HLT is handled by KVM; an exit here is spurious.
                Ok(VcpuExit::Hlt) => continue,
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => return VcpuEvent::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => return VcpuEvent::Reset,
                    other => format!("unknown KVM system event {other}"),
                },
                Ok(VcpuExit::Shutdown) => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
                Ok(VcpuExit::InternalError) => {
                    "KVM internal error (KVM_EXIT_INTERNAL_ERROR)".to_string()
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    format!("KVM_RUN entry failed: hardware reason {reason:#x} on host cpu {cpu}")
                }
                Ok(other) => format!("unexpected vCPU exit {other:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // The only place a vCPU pauses (module documentation, step 2).
                    self.serve_commands();
                    self.throttle_sleep();
                    continue;
                }
                Err(e) => format!("KVM_RUN: {e}"),
            };
            return VcpuEvent::Failed {
                index,
                reason: format!("{failure}; {}", describe_registers(&self.fd)),
            };
        }
    }
}

/// The registers a user needs to see why a guest died.
pub fn describe_registers(fd: &VcpuFd) -> String {
    let regs = match fd.get_regs() {
        Ok(r) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
        ),
        Err(e) => format!("registers unavailable ({e})"),
    };
    let sregs = match fd.get_sregs() {
        Ok(s) => format!(
            " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/{:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base
        ),
        Err(e) => format!(" special registers unavailable ({e})"),
    };
    regs + &sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_vcpu_sleeps_its_share_after_each_slice() {
        let ms = Duration::from_millis;
        assert_eq!(throttle_sleep_time(0), Duration::ZERO);
        assert_eq!(throttle_sleep_time(20), Duration::from_micros(2500));
        assert_eq!(throttle_sleep_time(50), ms(10));
        assert_eq!(throttle_sleep_time(99), ms(990));
        // Past the ceiling it stays at 99%: a vCPU always gets its slice.
        assert_eq!(throttle_sleep_time(100), ms(990));
    }
}
