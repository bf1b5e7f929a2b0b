//! The framing between the host and the agent loop in L2 (see `l2-init.sh`).
//!
//! Host -> L2, one line per command: `<nonce> <timeout-secs> <base64 of the script>\n`.
//! L2 -> host: the command's raw output (stdout and stderr interleaved), then
//! `\n@@rig-end <nonce> <status> <timed-out 0|1>@@\n`. The nonce is fresh per command,
//! so output that happens to contain an end marker of another command is still output.
//! The agent announces itself once with `@@rig-ready kvm=<0|1> npt=<0|1>@@\n`.

/// The prefix of the agent's first line.
pub const READY_PREFIX: &[u8] = b"@@rig-ready ";
/// Closes both the ready line and an end marker.
const MARKER_END: &[u8] = b"@@\n";

/// How a command ended, as the agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandEnd {
    /// Exit status of `sh -c script` (128 + signal when killed).
    pub status: i32,
    /// The agent's watchdog killed the command's process group.
    pub timed_out: bool,
}

/// The line that asks the agent to run `script` with a watchdog of `timeout_secs`.
pub fn command_line(nonce: u64, timeout_secs: u64, script: &str) -> Vec<u8> {
    let mut line = format!("{nonce:016x} {timeout_secs} ").into_bytes();
    line.extend_from_slice(base64(script.as_bytes()).as_bytes());
    line.push(b'\n');
    line
}

/// Parses the "kvm=1 npt=1" fields of a ready line found in `buf`, if complete.
pub fn parse_ready(buf: &[u8]) -> Option<(bool, bool)> {
    let start = find(buf, READY_PREFIX)? + READY_PREFIX.len();
    let len = find(&buf[start..], MARKER_END)?;
    let fields = String::from_utf8_lossy(&buf[start..start + len]).into_owned();
    let flag = |key: &str| fields.split(' ').any(|f| f == format!("{key}=1"));
    Some((flag("kvm"), flag("npt")))
}

/// Splits the agent's byte stream for one command into output and its end marker.
pub struct FrameParser {
    prefix: Vec<u8>,
    pending: Vec<u8>,
}

impl FrameParser {
    /// Expects the end marker of the command sent with `nonce`.
    pub fn new(nonce: u64) -> Self {
        FrameParser {
            prefix: format!("\n@@rig-end {nonce:016x} ").into_bytes(),
            pending: Vec::new(),
        }
    }

    /// Feeds bytes read from the channel. Returns the bytes that are certainly output
    /// (to pass on now) and, once the marker is complete, how the command ended. Bytes
    /// that might start the marker are held back until the next call decides.
    pub fn push(&mut self, data: &[u8]) -> (Vec<u8>, Option<CommandEnd>) {
        self.pending.extend_from_slice(data);
        if let Some(at) = find(&self.pending, &self.prefix) {
            let output = self.pending[..at].to_vec();
            self.pending.drain(..at);
            let rest = &self.pending[self.prefix.len()..];
            let Some(len) = find(rest, MARKER_END) else {
                return (output, None);
            };
            let fields = String::from_utf8_lossy(&rest[..len]).into_owned();
            let mut it = fields.split(' ');
            let status = it.next().and_then(|s| s.parse().ok()).unwrap_or(-1);
            let timed_out = it.next() == Some("1");
            self.pending.clear();
            return (output, Some(CommandEnd { status, timed_out }));
        }
        let keep = longest_prefix_suffix(&self.pending, &self.prefix);
        let emit = self.pending.len() - keep;
        (self.pending.drain(..emit).collect(), None)
    }

    /// Whatever was held back (for a partial output on timeout).
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `buf` that is a proper prefix of `pat`.
fn longest_prefix_suffix(buf: &[u8], pat: &[u8]) -> usize {
    (1..pat.len().min(buf.len() + 1))
        .rev()
        .find(|&n| buf[buf.len() - n..] == pat[..n])
        .unwrap_or(0)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Standard base64 with padding, no line breaks (what busybox `base64 -d` reads).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, enc) in cases {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
    }

    #[test]
    fn command_line_is_one_line() {
        let line = command_line(0xab, 30, "echo a\necho b\n");
        assert_eq!(line, b"00000000000000ab 30 ZWNobyBhCmVjaG8gYgo=\n");
    }

    #[test]
    fn parser_splits_output_and_marker_across_chunks() {
        let nonce = 0x1234;
        let stream = b"hello\nworld\n@@rig-end 0000000000001234 3 0@@\n".to_vec();
        // Feed in every possible two-chunk split.
        for cut in 0..stream.len() {
            let mut p = FrameParser::new(nonce);
            let (mut out, end) = p.push(&stream[..cut]);
            assert!(end.is_none(), "cut {cut}");
            let (more, end) = p.push(&stream[cut..]);
            out.extend(more);
            assert_eq!(out, b"hello\nworld", "cut {cut}");
            assert_eq!(
                end,
                Some(CommandEnd {
                    status: 3,
                    timed_out: false
                })
            );
        }
    }

    #[test]
    fn parser_ignores_other_nonces_and_holds_back_partial_prefix() {
        let mut p = FrameParser::new(7);
        let (out, end) = p.push(b"x\n@@rig-end 0000000000000008 0 0@@\ny\n@@rig-e");
        assert_eq!(out, b"x\n@@rig-end 0000000000000008 0 0@@\ny");
        assert!(end.is_none());
        let (out, end) = p.push(b"nd 0000000000000007 137 1@@\n");
        assert!(out.is_empty());
        assert_eq!(
            end,
            Some(CommandEnd {
                status: 137,
                timed_out: true
            })
        );
        let mut p = FrameParser::new(7);
        let (out, _) = p.push(b"abc\n@@ri");
        assert_eq!(out, b"abc");
        assert_eq!(p.take_pending(), b"\n@@ri");
    }

    #[test]
    fn ready_line() {
        assert_eq!(
            parse_ready(b"junk@@rig-ready kvm=1 npt=0@@\n"),
            Some((true, false))
        );
        assert_eq!(parse_ready(b"@@rig-ready kvm=1 npt=1@"), None);
    }
}
