//! Legacy x86 platform devices: the COM1 UART, the i8042 reset line and the ACPI power port.

mod i8042;
mod power;
mod serial;

pub use i8042::I8042;
pub use power::{AcpiPower, ACPI_RESET_VALUE, ACPI_SLEEP_S5};
pub use serial::{EventFdTrigger, SerialConsole, SerialError, SerialOutput, SERIAL_FIFO_SIZE};
