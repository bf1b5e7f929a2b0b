//! A QUIC stream as the blocking `std::io::Read`/`Write` the wire protocol speaks: each
//! call runs the async operation to completion on the migration's runtime, bounded by
//! [`super::IO_TIMEOUT`]. The runtime has a worker thread of its own, so the connection
//! (acknowledgements, keep-alives) is served between calls too.

use std::io::{self, Read, Write};
use std::time::Duration;

use tokio::runtime::Handle;

use super::IO_TIMEOUT;

fn timed_out(waited: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no progress on the migration stream for {waited:?}"),
    )
}

/// `error` and its sources, joined by ": ". quinn's "connection lost" keeps why (e.g. the
/// peer's close reason) in its source.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The most the peer may send after Commit and before its stream's end, for
/// [`StreamWriter::confirm`]: a Running frame is 24 bytes.
const TAIL_MAX: usize = 256;

/// Queued writes go to QUIC once this many bytes wait, or on `flush`.
const SEND_AT: usize = 64 << 10;

/// The sending half, counting what it wrote. Writes are queued here and handed to QUIC
/// together (`flush`, which the wire protocol calls after each frame the peer answers,
/// or once [`SEND_AT`] bytes wait): a paused guest's last frames (the last round, State,
/// Done) then leave in one hand-over, so the one CPU of a loaded host wakes the
/// connection's thread once for them rather than once per frame part.
pub(crate) struct StreamWriter {
    pub(crate) rt: Handle,
    pub(crate) stream: quinn::SendStream,
    /// Bytes written so far, queued here or not.
    pub(crate) bytes: u64,
    /// Test hook (`HOSPES_FAULT=corrupt-frame`): flip one byte in the next write of a
    /// frame payload, after its CRC was computed, as a corrupting network or peer would.
    pub(crate) corrupt: bool,
    /// Written, not yet handed to QUIC.
    queued: Vec<u8>,
}

impl StreamWriter {
    pub(crate) fn new(rt: Handle, stream: quinn::SendStream) -> Self {
        Self {
            rt,
            stream,
            bytes: 0,
            corrupt: false,
            queued: Vec::new(),
        }
    }

    /// Hands what is queued to QUIC (without copying it), as the stream's send window
    /// makes room; each wait for room is bounded by [`IO_TIMEOUT`].
    fn send_queued(&mut self) -> io::Result<()> {
        let mut chunk = [bytes::Bytes::from(std::mem::take(&mut self.queued))];
        while !chunk[0].is_empty() {
            let stream = &mut self.stream;
            let chunks = &mut chunk;
            self.rt
                .block_on(async {
                    tokio::time::timeout(IO_TIMEOUT, stream.write_chunks(chunks)).await
                })
                .map_err(|_| timed_out(IO_TIMEOUT))?
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, describe(&e)))?;
        }
        Ok(())
    }

    /// Ends the stream and waits until the peer has received every byte of it: until its
    /// QUIC stack acknowledged them all, or until it ended its own stream, `input`, with
    /// nothing more on it, whichever comes first. The destination ends its stream only
    /// once it has read Commit and let its vCPUs go (step 7 of the parent module).
    /// Anything else on `input` (data, an error) leaves only the acknowledgement to wait
    /// for.
    ///
    /// The acknowledgement may come first (a QUIC receiver sends it within `max_ack_delay`,
    /// 25 ms by default, of the bytes' arrival, whatever its application does): then this
    /// still waits up to `resume_wait` for the peer's end, which marks its guest running.
    /// Returns what the peer sent before that end (at most [`TAIL_MAX`] bytes; more, or
    /// a read error, counts as no end), or `None` if the end was not seen.
    pub(crate) fn confirm(
        &mut self,
        input: &mut StreamReader,
        wait: Duration,
        resume_wait: Duration,
    ) -> Result<Option<Vec<u8>>, String> {
        self.send_queued().map_err(|e| e.to_string())?;
        self.stream.finish().map_err(|e| e.to_string())?;
        let (stream, recv) = (&mut self.stream, &mut input.stream);
        let peer_finished = async {
            let mut tail = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                match recv.read(&mut buf).await {
                    Ok(None) => return tail,
                    Ok(Some(n)) if tail.len() + n <= TAIL_MAX => {
                        tail.extend_from_slice(&buf[..n]);
                    }
                    Ok(Some(_)) | Err(_) => std::future::pending().await,
                }
            }
        };
        let acknowledged = async {
            match stream.stopped().await {
                Ok(None) => Ok(()),
                Ok(Some(code)) => Err(format!("the peer stopped the stream with code {code}")),
                Err(e) => Err(describe(&e)),
            }
        };
        self.rt.block_on(async {
            tokio::pin!(peer_finished);
            let confirmed = async {
                tokio::select! {
                    tail = &mut peer_finished => Ok(Some(tail)),
                    result = acknowledged => result.map(|()| None),
                }
            };
            match tokio::time::timeout(wait, confirmed).await {
                Ok(Ok(Some(tail))) => Ok(Some(tail)),
                Ok(Ok(None)) => Ok(tokio::time::timeout(resume_wait, peer_finished).await.ok()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("no acknowledgement within {wait:?}")),
            }
        })
    }
}

impl Write for StreamWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let corrupted;
        let buf = if self.corrupt && buf.len() >= 4096 {
            self.corrupt = false;
            tracing::warn!(
                "HOSPES_FAULT: corrupting a frame payload of {} bytes",
                buf.len()
            );
            let mut copy = buf.to_vec();
            copy[buf.len() / 2] ^= 0x40;
            corrupted = copy;
            &corrupted[..]
        } else {
            buf
        };
        self.queued.extend_from_slice(buf);
        self.bytes += buf.len() as u64;
        if self.queued.len() >= SEND_AT {
            self.send_queued()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_queued()
    }
}

/// The receiving half.
pub(crate) struct StreamReader {
    pub(crate) rt: Handle,
    pub(crate) stream: quinn::RecvStream,
    /// How long one read may wait for data.
    pub(crate) timeout: Duration,
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let stream = &mut self.stream;
        let wait = self.timeout;
        let read = self
            .rt
            .block_on(async { tokio::time::timeout(wait, stream.read(buf)).await })
            .map_err(|_| timed_out(wait))?
            .map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, describe(&e)))?;
        Ok(read.unwrap_or(0))
    }
}

/// The migration's runtime: one worker thread that drives the QUIC connection.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, super::MigrationError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("migration-io")
        .enable_all()
        .build()
        .map_err(super::MigrationError::Runtime)
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn describe_keeps_the_sources() {
        let inner = std::io::Error::other("closed by peer: the destination gave up");
        let outer = std::io::Error::new(std::io::ErrorKind::BrokenPipe, inner);
        assert_eq!(
            describe(outer.get_ref().unwrap()),
            "closed by peer: the destination gave up"
        );
        #[derive(Debug, thiserror::Error)]
        #[error("connection lost")]
        struct Lost(#[source] std::io::Error);
        let lost = Lost(std::io::Error::other("closed by peer: CRC mismatch"));
        assert_eq!(
            describe(&lost),
            "connection lost: closed by peer: CRC mismatch"
        );
    }
}
