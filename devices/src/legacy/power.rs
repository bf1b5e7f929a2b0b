//! The ACPI power port: the hardware-reduced FADT's sleep-control and reset registers.
//!
//! A hardware-reduced ACPI platform has no PM1 blocks; the FADT instead names a sleep
//! control register and a reset register. Both point at this one-byte port. Linux powers
//! off by writing `SLP_TYP << 2 | SLP_EN` with the S5 type from the DSDT's `_S5_` package,
//! and resets by writing the FADT's reset value.

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Sleep-control value for S5 (soft off): SLP_TYP = 5 in bits 2..=4, SLP_EN = bit 5.
pub const ACPI_SLEEP_S5: u8 = (5 << 2) | (1 << 5);
/// Reset-register value the FADT advertises.
pub const ACPI_RESET_VALUE: u8 = 1;
const SLEEP_TYPE_MASK: u8 = 0b1_1100;
const SLEEP_ENABLE: u8 = 1 << 5;

/// The port behind the FADT's sleep-control and reset registers.
pub struct AcpiPower {
    poweroff_evt: EventFd,
    reset_evt: EventFd,
}

impl AcpiPower {
    /// A power port that signals `poweroff_evt` on S5 and `reset_evt` on reset.
    pub fn new(poweroff_evt: EventFd, reset_evt: EventFd) -> Self {
        AcpiPower {
            poweroff_evt,
            reset_evt,
        }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The sleep-status register: WAK_STS never needs to be seen set, we never wake.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let evt = if value == ACPI_RESET_VALUE {
            tracing::info!("guest wrote the ACPI reset register");
            &self.reset_evt
        } else if value & SLEEP_ENABLE != 0
            && value & SLEEP_TYPE_MASK == ACPI_SLEEP_S5 & SLEEP_TYPE_MASK
        {
            tracing::info!("guest entered ACPI S5 (power off)");
            &self.poweroff_evt
        } else {
            tracing::debug!("ignoring ACPI power port write {value:#x}");
            return;
        };
        if let Err(e) = evt.write(1) {
            tracing::error!("ACPI power port: cannot signal the VMM: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = AcpiPower::new(off.try_clone().unwrap(), reset.try_clone().unwrap());
        dev.write(0, &[5 << 2]); // type without SLP_EN: nothing
        assert!(off.read().is_err());
        dev.write(0, &[ACPI_SLEEP_S5]);
        assert_eq!(off.read().unwrap(), 1);
        dev.write(0, &[ACPI_RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
