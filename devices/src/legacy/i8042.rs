//! The i8042 keyboard controller, reduced to what a guest needs from it: the CPU reset line.
//!
//! Linux reboots with `reboot=k` by writing 0xfe (pulse the reset line) to the command port
//! 0x64. Everything else reads as an idle controller: status 0 (input buffer empty, so the
//! kernel's `kb_wait` returns at once) and no data. With no PS/2 controller in ACPI, the
//! kernel's i8042 driver does not probe further.

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Command that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;
/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;

/// The i8042 at PIO 0x60..=0x64; a reset command signals `reset_evt`.
pub struct I8042 {
    reset_evt: EventFd,
}

impl I8042 {
    /// A controller whose reset line writes to `reset_evt`.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 { reset_evt }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            tracing::info!("guest pulsed the i8042 reset line");
            if let Err(e) = self.reset_evt.write(1) {
                tracing::error!("i8042 reset: cannot signal the VMM: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_other_writes_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert!(evt.read().is_err(), "no reset yet");
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0], 0);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
