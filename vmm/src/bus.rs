//! PIO and MMIO buses: address ranges mapped to devices, looked up on every vCPU exit.

use std::sync::{Arc, Mutex, MutexGuard};

use devices::BusDevice;

/// A device shared between the bus (vCPU threads) and the VMM thread.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Locks a device even if a thread panicked while holding it: device state stays
/// consistent per register access, and a panic already ends the VMM.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap {
        /// New range start.
        base: u64,
        /// New range length.
        len: u64,
        /// Start of the range it overlaps.
        other: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Non-overlapping ranges, sorted by base. Built before the vCPUs start, then read-only.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(BusError::Overlap {
                base,
                len,
                other: e.base,
            });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let i = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let e = &self.entries[i];
        (addr - e.base < e.len).then_some((e, addr - e.base))
    }

    /// Dispatches a read; an address with no device reads as all ones. Returns whether a
    /// device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                lock(&e.device).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; a write to no device is dropped. Returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                lock(&e.device).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range_with_relative_offsets() {
        let a = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Echo(vec![]))))
            .unwrap();
        assert!(matches!(
            bus.insert(0x3fc, 8, a.clone()),
            Err(BusError::Overlap { other: 0x3f8, .. })
        ));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3ff, &[9]));
        assert!(!bus.write(0x5f, &[9]));
        assert_eq!(a.lock().unwrap().0, vec![(7, vec![9])]);
    }
}
