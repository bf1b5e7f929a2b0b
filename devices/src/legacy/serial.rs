//! The COM1 16550 UART: vm-superio's model on the PIO bus, its interrupt an irqfd, and
//! its register state saved to and restored from a snapshot.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Depth of vm-superio's receive FIFO.
pub const SERIAL_FIFO_SIZE: usize = 64;
/// IIR bit 0: set when no interrupt is pending.
const IIR_NONE_PENDING: u8 = 1;

/// Errors restoring the UART from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved receive FIFO holds more bytes than the UART's FIFO can.
    #[error("saved serial input of {len} bytes exceeds the {SERIAL_FIFO_SIZE}-byte receive FIFO")]
    InputTooLong {
        /// Length of the saved `in_buffer`.
        len: usize,
    },
    /// vm-superio refused the state for a reason of its own.
    #[error("vm-superio refused the saved serial state: {reason}")]
    Rejected {
        /// What vm-superio reported.
        reason: String,
    },
    /// The interrupt's eventfd could not be duplicated for the restored UART.
    #[error("cannot duplicate the serial interrupt's eventfd: {source}")]
    Duplicate {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Re-raising the pending interrupt failed.
    #[error("raising the restored serial interrupt failed: {source}")]
    Interrupt {
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Raises the UART's interrupt line by writing to an `EventFd` that the VMM registered as
/// an irqfd on the UART's GSI.
#[derive(Debug)]
pub struct EventFdTrigger {
    irq: EventFd,
    /// Set while vm-superio rebuilds the UART from saved state: its `from_state` fires the
    /// line once per pending and enabled interrupt, and restore raises it once itself.
    muted: AtomicBool,
}

impl EventFdTrigger {
    /// A trigger on the irqfd `irq`.
    pub fn new(irq: EventFd) -> Self {
        EventFdTrigger {
            irq,
            muted: AtomicBool::new(false),
        }
    }

    fn raise(&self) -> io::Result<()> {
        self.irq.write(1)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        if self.muted.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.raise()
    }
}

/// Where the guest's console output goes. Each write is flushed at once so that a reader
/// of hospes' stdout (a terminal, a test) sees every line as the guest prints it.
pub struct SerialOutput(pub Box<dyn Write + Send>);

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The guest console: a 16550 UART at a PIO base (COM1 is 0x3f8).
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOutput>,
}

impl SerialConsole {
    /// A UART that raises `irq` and writes guest output to `out`.
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        SerialConsole {
            uart: Serial::new(EventFdTrigger::new(irq), out),
        }
    }

    /// The UART's registers and the unread bytes of its receive FIFO.
    pub fn save_state(&self) -> snapshot::SerialState {
        let s = self.uart.state();
        snapshot::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART continuing from `state`, raising `irq` and writing guest output to `out`.
    ///
    /// When the saved IIR shows an interrupt pending, the line is raised once: the edge the
    /// guest was waiting for may have been consumed by the old process's irqfd, and without
    /// it the guest's 8250 driver would never come back to read the FIFO or refill the
    /// transmitter.
    pub fn restore(
        irq: EventFd,
        out: SerialOutput,
        state: &snapshot::SerialState,
    ) -> Result<SerialConsole, SerialError> {
        let mut console = SerialConsole::new(irq, out);
        console.restore_state(state)?;
        Ok(console)
    }

    /// Continues this UART from `state`, as [`SerialConsole::restore`] does, keeping its
    /// interrupt line and its output: for a console already on its bus before the state
    /// is known (a VM built ahead of its state, as a migration's destination builds it),
    /// which the guest has not touched. After an error its output is gone and it must not
    /// be used.
    pub fn restore_state(&mut self, state: &snapshot::SerialState) -> Result<(), SerialError> {
        let len = state.in_buffer.len();
        if len > SERIAL_FIFO_SIZE {
            return Err(SerialError::InputTooLong { len });
        }
        let saved = vm_superio::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let irq = self
            .uart
            .interrupt_evt()
            .irq
            .try_clone()
            .map_err(|source| SerialError::Duplicate { source })?;
        let out = std::mem::replace(self.uart.writer_mut(), SerialOutput(Box::new(io::sink())));
        let trigger = EventFdTrigger::new(irq);
        trigger.muted.store(true, Ordering::Relaxed);
        let uart = Serial::from_state(&saved, trigger, vm_superio::serial::NoEvents, out).map_err(
            |e| SerialError::Rejected {
                reason: format!("{e}"),
            },
        )?;
        let trigger = uart.interrupt_evt();
        trigger.muted.store(false, Ordering::Relaxed);
        if state.interrupt_identification & IIR_NONE_PENDING == 0 {
            trigger
                .raise()
                .map_err(|source| SerialError::Interrupt { source })?;
        }
        self.uart = uart;
        Ok(())
    }

    /// How many bytes of host input the receive FIFO can take now.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input (a terminal's keystrokes) for the guest to read.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.uart
            .enqueue_raw_bytes(bytes)
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider or out-of-window accesses read as 0xff,
        // as from an unpopulated bus.
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) if off < 8 => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            if off < 8 {
                if let Err(e) = self.uart.write(off, data[0]) {
                    tracing::warn!("serial write at offset {off}: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_the_writer_and_input_the_guest() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = SerialConsole::new(
            irq.try_clone().unwrap(),
            SerialOutput(Box::new(sink.clone())),
        );
        for b in b"hi" {
            uart.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");

        // Enable the received-data interrupt (IER bit 0), then feed input.
        uart.write(1, &[1]);
        uart.enqueue_input(b"x").unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut byte = [0u8];
        uart.read(0, &mut byte);
        assert_eq!(byte[0], b'x');
        let mut wide = [0u8; 2];
        uart.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    fn console(irq: &EventFd, sink: &Sink) -> SerialConsole {
        SerialConsole::new(
            irq.try_clone().unwrap(),
            SerialOutput(Box::new(sink.clone())),
        )
    }

    #[test]
    fn state_round_trip_keeps_registers_and_pending_input() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = console(&irq, &sink);
        // A guest programs the divisor, line control and scratch, enables the received-data
        // interrupt, and has not read its input yet.
        uart.write(3, &[0x80]);
        uart.write(0, &[0x01]);
        uart.write(1, &[0x00]);
        uart.write(3, &[0x03]);
        uart.write(7, &[0x5a]);
        uart.write(1, &[0x01]);
        uart.enqueue_input(b"abc").unwrap();
        let _ = irq.read();
        let saved = uart.save_state();
        assert_eq!(saved.in_buffer, b"abc");
        assert_eq!(saved.baud_divisor_low, 0x01);
        assert_eq!(saved.scratch, 0x5a);
        assert_eq!(saved.interrupt_identification & IIR_NONE_PENDING, 0);

        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored = SerialConsole::restore(
            irq2.try_clone().unwrap(),
            SerialOutput(Box::new(sink.clone())),
            &saved,
        )
        .unwrap();
        assert_eq!(restored.save_state(), saved);
        assert_eq!(
            irq2.read().unwrap(),
            1,
            "pending interrupt raised exactly once"
        );
        assert_eq!(restored.input_capacity(), SERIAL_FIFO_SIZE - 3);
        let mut byte = [0u8];
        for expected in b"abc" {
            restored.read(0, &mut byte);
            assert_eq!(byte[0], *expected);
        }
        restored.write(0, b"!");
        assert_eq!(&*sink.0.lock().unwrap(), b"!");
    }

    #[test]
    fn restore_without_pending_interrupt_stays_quiet() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let saved = console(&irq, &sink).save_state();
        assert_ne!(saved.interrupt_identification & IIR_NONE_PENDING, 0);
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        SerialConsole::restore(
            irq2.try_clone().unwrap(),
            SerialOutput(Box::new(sink)),
            &saved,
        )
        .unwrap();
        assert!(irq2.read().is_err(), "no interrupt without one pending");
    }

    #[test]
    fn restore_refuses_input_longer_than_the_fifo() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut saved = console(&irq, &sink).save_state();
        saved.in_buffer = vec![b'x'; SERIAL_FIFO_SIZE + 1];
        let err = SerialConsole::restore(irq, SerialOutput(Box::new(sink)), &saved)
            .err()
            .unwrap();
        assert!(matches!(err, SerialError::InputTooLong { len: 65 }));
        assert!(err.to_string().contains("65 bytes"), "{err}");
    }
}
