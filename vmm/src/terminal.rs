//! The host terminal: raw mode while a guest console is attached, restored on drop.

use std::io;

/// Whether stdin is a terminal (then keystrokes go to the guest's UART).
pub fn stdin_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Raw mode on stdin for as long as this value lives: no echo, no line editing, no signals
/// from Ctrl-C (it goes to the guest, as on a serial line).
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Switches stdin to raw mode.
    pub fn enter() -> io::Result<RawMode> {
        // SAFETY: termios is a plain C struct, filled by tcgetattr before use.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is valid writable memory for tcgetattr.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is an initialized termios; cfmakeraw only edits its flags.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_oflag = saved.c_oflag; // keep the host's output processing (\n -> \r\n)
                                     // SAFETY: `raw` is a valid termios for tcsetattr.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: `saved` is the termios read from this descriptor in `enter`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}
