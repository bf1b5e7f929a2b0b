//! The COM1 16550 UART: vm-superio's model on the PIO bus, its interrupt an irqfd.

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Raises the UART's interrupt line by writing to an `EventFd` that the VMM registered as
/// an irqfd on the UART's GSI.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
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
            uart: Serial::new(EventFdTrigger(irq), out),
        }
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
}
